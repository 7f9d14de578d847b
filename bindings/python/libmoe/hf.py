"""libmoe inside Hugging Face transformers models: one call swaps every MoE block.

    import transformers, libmoe.hf
    model = transformers.AutoModelForCausalLM.from_pretrained(...)   # or built from a config
    report = libmoe.hf.replace_moe_blocks(model)
    print(report)            # what was replaced (and how), what was left alone and why
    model(**batch)           # the same logits, computed by libmoe; training works through it

Supported families and their blocks: Mixtral (MixtralSparseMoeBlock), Qwen2-MoE
(Qwen2MoeSparseMoeBlock, with its gated shared expert), Qwen3-MoE (Qwen3MoeSparseMoeBlock), OLMoE
(OlmoeSparseMoeBlock) and DeepSeek-V3 (DeepseekV3MoE: sigmoid scores, group-limited routing,
e_score_correction_bias, routed scaling, shared experts). Both weight layouts: the fused one of
transformers 5 (``experts.gate_up_proj`` [E, 2*ff, d], ``experts.down_proj`` [E, d, ff]) and the
per-expert nn.Linear modules of earlier versions (``experts[i].w1/w3/w2`` or
``experts[i].gate_proj/up_proj/down_proj``).

Each block becomes a subclass of its own class (so isinstance checks, and the output-recording
hooks transformers attaches by class, still match) whose forward has the original signature,
``forward(hidden_states)``, and returns what the original returned: the hidden states alone, or
``(hidden_states, router_logits)`` where the installed transformers' block returns a pair (this
is observed by running the original block once on a small probe input, not assumed). Router
logits that transformers records from the router module (``output_router_logits=True``, whose
load-balancing loss then trains the router) come from a stand-in of the router's class, computed
from libmoe's router weights: their gradient reaches the same weights.

Weights: the new block OWNS them. They are moved into the libmoe layer (whose storage the
``libmoe.torch.MoE`` parameters are) and the original parameters are released, so the
parameter names change (the report's ``param_map`` gives old name -> new names, e.g.
``model.layers.0.mlp.experts.gate_up_proj`` -> ``model.layers.0.mlp.moe.experts.w1`` and
``...moe.experts.w3``). Build the optimizer after the swap. The router weight is float32 in
libmoe whatever the model's dtype (an exact widening of bfloat16/float16 weights).

libmoe computes the block with its own aux losses off and no router-bias updates (as the
transformers blocks do); pass libmoe config fields as keywords to change that, e.g.
``replace_moe_blocks(model, aux_loss_coef=0.01)`` (libmoe then adds that loss's gradient in
backward) or ``bias_update_rate=1e-3`` (DeepSeek's aux-loss-free balancing).
"""

import collections
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from . import torch as _lt
from ._layer import CONFIG_FIELDS
from .errors import ArgumentTypeError

__all__ = ["replace_moe_blocks", "ReplaceReport", "Replaced", "LeftAlone", "LibmoeBlock", "FAMILIES"]

# transformers block class name -> family
FAMILIES = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
}
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Fields derived from the block; the caller may not override them.
_DERIVED = ("d_model", "d_ff", "num_experts", "top_k", "activation", "score", "normalize_topk", "routed_scale",
            "num_groups", "topk_groups", "num_shared_experts", "d_ff_shared", "shared_gate", "device",
            "device_index", "dtype")
_PROBE_TOKENS = 16
# Largest difference between the original block's output and libmoe's on the probe input,
# relative to the largest output magnitude, that counts as the same block.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}

Replaced = collections.namedtuple("Replaced", "path family layout returns config max_rel_diff")
Replaced.__doc__ = """A block replaced: its path in the model, family, weight layout ("fused" or
"per-expert"), what forward returns ("hidden_states" or "(hidden_states, router_logits)"), the
libmoe config it got (a dict), and the probe's largest relative difference (None if not checked)."""
LeftAlone = collections.namedtuple("LeftAlone", "path cls reason")
LeftAlone.__doc__ = "A block left as it was: its path, class name and why."


class ReplaceReport:
    """What replace_moe_blocks did: ``replaced`` (list of Replaced), ``left_alone`` (list of
    LeftAlone) and ``param_map`` ({old parameter name: [new names]})."""

    def __init__(self):
        self.replaced, self.left_alone, self.param_map = [], [], {}

    def __len__(self):
        return len(self.replaced)

    def __str__(self):
        lines = [f"libmoe.hf.replace_moe_blocks: {len(self.replaced)} block(s) replaced, "
                 f"{len(self.left_alone)} left alone"]
        for r in self.replaced:
            c = r.config
            diff = "not checked" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}"
            lines.append(f"  replaced {r.path} ({r.family}, {r.layout} weights, returns {r.returns}): "
                         f"E {c['num_experts']}, k {c['top_k']}, d {c['d_model']}, ff {c['d_ff']}, "
                         f"{c['activation']}, {c['score']}, {c['dtype']}; probe difference {diff}")
        for s in self.left_alone:
            lines.append(f"  left alone {s.path} ({s.cls}): {s.reason}")
        return "\n".join(lines)

    __repr__ = __str__


class _Skip(Exception):
    """A block this module cannot replace; the message says why."""


class LibmoeBlock(nn.Module):
    """A transformers MoE block computed by libmoe (made by replace_moe_blocks; each replaced block
    is an instance of a subclass of this class and of the original block's class).

    Submodules: ``moe`` (a libmoe.torch.MoE holding every weight of the block) and, where the
    original block had a router module of its own class, ``gate``: a parameter-free stand-in of
    that class that gives transformers' output-recording hooks the router logits."""

    def _libmoe_init(self, moe, family, returns_logits, logits_fp32, gate_cls):
        nn.Module.__init__(self)
        self.moe = moe
        self.libmoe_family = family
        self._returns_logits = returns_logits
        self._logits_fp32 = logits_fp32  # DeepSeek's router computes its logits in float32
        if gate_cls is not None:
            self.gate = _router_standin(gate_cls, moe, logits_fp32)

    def router_logits(self, hidden_states):
        """Router logits [tokens, num_experts] as the original block computed them, from libmoe's
        router weight (gradients reach it)."""
        return _router_logits(hidden_states, self.moe.router.weight, self._logits_fp32)

    def forward(self, hidden_states):
        y = self.moe(hidden_states)
        gate = self._modules.get("gate")
        if gate is not None and (gate._forward_hooks or gate._forward_pre_hooks):
            logits = gate(hidden_states)[0]
        elif self._returns_logits:
            logits = self.router_logits(hidden_states)
        else:
            return y
        return (y, logits) if self._returns_logits else y

    def extra_repr(self):
        return f"family={self.libmoe_family!r}"


def _router_logits(hidden_states, weight, fp32):
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    return F.linear(x.float(), weight) if fp32 else F.linear(x, weight.to(x.dtype))


def _standin_init(self, moe, fp32):
    nn.Module.__init__(self)
    # A plain attribute, not a submodule: the block registers the MoE once, as "moe".
    self.__dict__["_libmoe"] = moe
    self._logits_fp32 = fp32


def _standin_weight(self):
    """libmoe's router weight (the MoE module's parameter ``router.weight``, not registered here
    again), so that code reading or initialising ``block.gate.weight`` (transformers'
    _init_weights) reaches the weight libmoe computes with."""
    return self._libmoe.router.weight


def _standin_forward(self, hidden_states):
    return (_router_logits(hidden_states, self.weight, self._logits_fp32),)


_STANDIN_CLASSES = {}
_BLOCK_CLASSES = {}


def _router_standin(gate_cls, moe, fp32):
    cls = _STANDIN_CLASSES.get(gate_cls)
    if cls is None:
        cls = type(f"LibmoeRouterLogits{gate_cls.__name__}", (gate_cls,),
                   {"__init__": _standin_init, "forward": _standin_forward, "weight": property(_standin_weight),
                    "extra_repr": lambda self: "",
                    "__module__": __name__,
                    "__doc__": f"Router logits for the output hooks of {gate_cls.__name__}; no parameters "
                               f"of its own (``weight`` is the libmoe router's)."})
        _STANDIN_CLASSES[gate_cls] = cls
    return cls(moe, fp32)


def _block_class(orig_cls):
    cls = _BLOCK_CLASSES.get(orig_cls)
    if cls is None:
        cls = type(f"Libmoe{orig_cls.__name__}", (LibmoeBlock, orig_cls),
                   {"__module__": __name__, "__doc__": f"{orig_cls.__name__} computed by libmoe. " +
                    (LibmoeBlock.__doc__ or "")})
        _BLOCK_CLASSES[orig_cls] = cls
    return cls


def _cfg_get(configs, *names, default=None):
    for obj in configs:
        for n in names:
            if obj is not None and hasattr(obj, n) and getattr(obj, n) is not None:
                return getattr(obj, n)
    return default


def _linear_weight(module, what):
    if not isinstance(module, nn.Linear):
        raise _Skip(f"{what} is a {type(module).__name__}, not an nn.Linear")
    if module.bias is not None:
        raise _Skip(f"{what} has a bias, which libmoe's experts do not have")
    return module.weight


def _expert_weights(block):
    """(layout, w1 [E, ff, d], w3, w2 [E, d, ff]) of the routed experts."""
    experts = getattr(block, "experts", None)
    if experts is None:
        raise _Skip("no experts submodule")
    if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        gu, down = experts.gate_up_proj, getattr(experts, "down_proj", None)
        for extra in ("gate_up_proj_bias", "down_proj_bias"):
            if getattr(experts, extra, None) is not None:
                raise _Skip(f"experts.{extra}: expert biases are not part of libmoe's FFN")
        if not isinstance(down, torch.Tensor) or gu.dim() != 3 or down.dim() != 3:
            raise _Skip("experts.gate_up_proj/down_proj are not [E, 2*ff, d] and [E, d, ff] tensors")
        E, two_ff, d = gu.shape
        if two_ff % 2 or tuple(down.shape) != (E, d, two_ff // 2):
            raise _Skip(f"experts.gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are not "
                        f"[E, 2*ff, d] and [E, d, ff]")
        ff = two_ff // 2
        return "fused", gu[:, :ff], gu[:, ff:], down
    if isinstance(experts, (nn.ModuleList, list, tuple)) and len(experts) > 0:
        first = experts[0]
        names = next((n for n in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
                      if all(hasattr(first, a) for a in n)), None)
        if names is None:
            raise _Skip(f"experts[0] is a {type(first).__name__} with neither w1/w3/w2 nor gate/up/down_proj")
        stacks = []
        for a in names:
            ws = [_linear_weight(getattr(e, a), f"experts[{i}].{a}") for i, e in enumerate(experts)]
            if any(w.shape != ws[0].shape for w in ws):
                raise _Skip(f"experts[i].{a} differ in shape")
            stacks.append(torch.stack([w.detach() for w in ws]))
        return "per-expert", stacks[0], stacks[1], stacks[2]
    raise _Skip(f"experts is a {type(experts).__name__} with neither gate_up_proj nor per-expert modules")


def _mlp_weights(mlp, what):
    names = next((n for n in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
                  if all(hasattr(mlp, a) for a in n)), None)
    if names is None:
        raise _Skip(f"{what} is a {type(mlp).__name__} without gate/up/down_proj")
    return [_linear_weight(getattr(mlp, a), f"{what}.{a}") for a in names]


def _plan(block, family, configs, overrides):
    """The libmoe config and {libmoe name: tensor} for block, or _Skip."""
    layout, w1, w3, w2 = _expert_weights(block)
    E, ff, d = w1.shape
    dtype, device = w1.dtype, w1.device
    if dtype not in _DTYPES:
        raise _Skip(f"weights are {dtype}; libmoe computes in float32, bfloat16 or float16")
    if device.type not in ("cpu", "cuda"):
        raise _Skip(f"weights are on {device}; libmoe runs on cpu or cuda")
    gate = getattr(block, "gate", None)
    if gate is None or not isinstance(getattr(gate, "weight", None), torch.Tensor):
        raise _Skip("no router weight (block.gate.weight)")
    if isinstance(gate, nn.Linear) and gate.bias is not None:
        raise _Skip("the router has a bias; libmoe's router is X.Wr^T")
    router = gate.weight
    if tuple(router.shape) != (E, d):
        raise _Skip(f"router weight {tuple(router.shape)} is not [num_experts {E}, d {d}]")
    act = _cfg_get(configs, "hidden_act")
    activation = _ACTIVATIONS.get(act) if isinstance(act, str) else None
    if activation is None:
        raise _Skip(f"activation {act!r}: libmoe's GLU experts compute SiLU ('silu') or exact GELU ('gelu')")
    top_k = _cfg_get([gate, block] + configs, "top_k", "num_experts_per_tok")
    if not isinstance(top_k, int):
        raise _Skip("top-k not found (num_experts_per_tok)")
    cfg = dict(d_model=d, d_ff=ff, num_experts=E, top_k=top_k, activation=activation, score="softmax",
               routed_scale=1.0, num_groups=1, topk_groups=1, capacity_factor=0.0, noise="none",
               aux_loss_coef=0.0, z_loss_coef=0.0, importance_loss_coef=0.0, load_loss_coef=0.0,
               bias_update_rate=0.0, num_shared_experts=0, shared_gate=False)
    params = {"router.weight": router, "experts.w1": w1, "experts.w3": w3, "experts.w2": w2}
    if family == "mixtral":
        jitter = _cfg_get([block] + configs, "jitter_noise", "router_jitter_noise", default=0.0)
        if jitter:
            raise _Skip(f"router_jitter_noise {jitter}: in training it scales the experts' input too, "
                        f"where libmoe's jitter touches the router input only")
        cfg["normalize_topk"] = True
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        cfg["normalize_topk"] = bool(_cfg_get([gate, block] + configs, "norm_topk_prob", default=False))
    if family == "qwen2_moe":
        shared, sgate = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
        if shared is None or sgate is None:
            raise _Skip("no shared_expert / shared_expert_gate")
        s1, s3, s2 = _mlp_weights(shared, "shared_expert")
        g = _linear_weight(sgate, "shared_expert_gate")
        if tuple(g.shape) != (1, d):
            raise _Skip(f"shared_expert_gate weight {tuple(g.shape)} is not [1, {d}]")
        cfg.update(num_shared_experts=1, d_ff_shared=s1.shape[0], shared_gate=True)
        params.update({"shared.w1": s1[None], "shared.w3": s3[None], "shared.w2": s2[None], "shared.gate": g})
    if family == "deepseek_v3":
        groups = _cfg_get([gate] + configs, "num_group", "n_group", default=1)
        cfg.update(score="sigmoid", num_groups=groups,
                   topk_groups=_cfg_get([gate] + configs, "topk_group", default=1),
                   normalize_topk=bool(_cfg_get([gate] + configs, "norm_topk_prob", default=True)),
                   routed_scale=float(_cfg_get([gate] + configs, "routed_scaling_factor", default=1.0)))
        bias = getattr(gate, "e_score_correction_bias", None)
        if bias is not None:
            params["router.bias"] = bias
        shared = getattr(block, "shared_experts", None)
        if shared is not None:
            s1, s3, s2 = _mlp_weights(shared, "shared_experts")
            cfg.update(num_shared_experts=1, d_ff_shared=s1.shape[0])
            params.update({"shared.w1": s1[None], "shared.w3": s3[None], "shared.w2": s2[None]})
    for key, value in overrides.items():
        cfg[key] = value
    return layout, cfg, params, dtype, device


def _probe(block, d, dtype, device):
    """(input, output) of block in eval mode, without gradients, on a seeded random input."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, _PROBE_TOKENS, d, generator=gen).to(device=device, dtype=dtype)
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            out = block(x.clone())
    finally:
        block.train(was_training)
    return x, out


def _rel_diff(a, b):
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / scale)


def _build(block, family, path, configs, overrides, verify):
    layout, cfg, params, dtype, device = _plan(block, family, configs, overrides)
    x, ref = _probe(block, cfg["d_model"], dtype, device)
    if isinstance(ref, torch.Tensor):
        returns_logits = False
    elif isinstance(ref, tuple) and len(ref) == 2 and all(isinstance(t, torch.Tensor) for t in ref):
        returns_logits = True
    else:
        raise _Skip(f"forward returned {type(ref).__name__}{'' if not isinstance(ref, tuple) else len(ref)}, "
                    f"expected hidden_states or (hidden_states, router_logits)")
    prefix = path + "." if path else ""
    gate_old = getattr(block, "gate", None)
    moe_cfg = {k: v for k, v in cfg.items() if k not in ("device", "dtype")}
    moe = _lt.MoE(device=device, dtype=dtype, **moe_cfg)
    with torch.no_grad():
        for name, value in params.items():
            group, attr = name.split(".", 1)
            target = getattr(moe._modules[group], attr)
            target.copy_(value.detach().reshape(target.shape))
    gate_cls = None
    if gate_old is not None and not isinstance(gate_old, nn.Linear) and type(gate_old) is not nn.Module:
        gate_cls = type(gate_old)
    new = _block_class(type(block)).__new__(_block_class(type(block)))
    new._libmoe_init(moe, family, returns_logits, family == "deepseek_v3", gate_cls)
    new.train(block.training)
    # Hooks already attached to the original (transformers installs its output-recording hooks on
    # the first forward) carry over: the block's to the new block, the router's to the stand-in.
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(block, attr):
            getattr(new, attr).update(getattr(block, attr))
    if gate_cls is not None:
        for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(gate_old, attr):
                getattr(new.gate, attr).update(getattr(gate_old, attr))
    diff = None
    if verify:
        new.eval()
        try:
            with torch.no_grad():
                out = new(x.clone())
        finally:
            new.train(block.training)
        got = out if not returns_logits else out[0]
        want = ref if not returns_logits else ref[0]
        diff = _rel_diff(got, want)
        if returns_logits:
            diff = max(diff, _rel_diff(out[1], ref[1]))
        if not diff <= _TOLERANCE[dtype]:
            raise _Skip(f"on a probe input libmoe's output differs from the block's by {diff:.2e} of its largest "
                        f"value (tolerance {_TOLERANCE[dtype]:.0e} in {dtype}): not replaced")
    pmap = {}
    for old_name, _ in block.named_parameters():
        full = prefix + old_name
        if old_name.startswith("gate."):
            pmap[full] = [prefix + "moe.router.weight"]
        elif old_name.startswith("experts."):
            kind = old_name.rsplit(".", 2)[-2] if layout == "per-expert" else old_name.split(".")[-1]
            new_names = {"gate_up_proj": ["w1", "w3"], "down_proj": ["w2"], "w1": ["w1"], "w3": ["w3"], "w2": ["w2"],
                         "gate_proj": ["w1"], "up_proj": ["w3"]}.get(kind, [])
            pmap[full] = [f"{prefix}moe.experts.{n}" for n in new_names]
        elif old_name.startswith("shared_expert_gate."):
            pmap[full] = [prefix + "moe.shared.gate"]
        elif old_name.startswith(("shared_expert.", "shared_experts.")):
            kind = old_name.split(".")[-2]
            pmap[full] = [prefix + "moe.shared." + {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}.get(kind, kind)]
    return new, Replaced(path, family, layout, "(hidden_states, router_logits)" if returns_logits else "hidden_states",
                         moe.layer.config, diff), pmap


def _looks_like_moe(module):
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.Module) and (hasattr(module, "gate") or hasattr(module, "router"))


def replace_moe_blocks(model, *, verify=True, **overrides):
    """Replace every MoE block of a transformers model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
    DeepSeek-V3) by the equivalent libmoe block, in place. Returns a ReplaceReport (print it).

    For each block: the libmoe config is read from the block, its weights and the model config
    (widths, experts, top-k, top-k normalisation, softmax or sigmoid scores, groups, routed
    scaling, DeepSeek's score-correction bias, shared experts and Qwen2-MoE's shared-expert
    gate, activation, dtype and device), the weights are moved into a libmoe.torch.MoE that owns
    them from then on (see the module docstring: parameter names change; build the optimizer
    after the swap), and the original block is run once on a seeded 16-token probe in eval mode
    to learn what it returns. With verify=True (default) the new block's output on that probe
    must match the original's (relative difference 1e-4 in float32, 1e-2 float16, 6e-2
    bfloat16) or the block is left as it was. Blocks of other families, and blocks whose
    features libmoe lacks (expert or router biases, activations other than SiLU and exact GELU,
    Mixtral's router_jitter_noise > 0, other dtypes or devices), are left alone; the report says
    why. ``overrides``: libmoe config fields for every new block (aux_loss_coef, z_loss_coef,
    bias_update_rate, capacity_factor, noise, seed, check_finite, allow_tf32, ...); fields that
    define the block's mathematics (widths, top_k, scores, ...) cannot be overridden.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    for key in overrides:
        if key not in CONFIG_FIELDS:
            raise ArgumentTypeError(f"replace_moe_blocks: unknown libmoe config field {key!r}; the fields are: "
                                    f"{', '.join(CONFIG_FIELDS)}")
        if key in _DERIVED:
            raise ArgumentTypeError(f"replace_moe_blocks: {key} is read from each block and cannot be overridden")
    report = ReplaceReport()
    todo = []
    configs_at = {"": [getattr(model, "config", None)]}
    for path, module in model.named_modules():
        if path:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            own = getattr(module, "config", None)
            configs_at[path] = ([own] if own is not None and hasattr(own, "model_type") else []) + \
                configs_at.get(parent, [])
        if any(path.startswith(p + ".") for p, _ in todo) or any(path.startswith(s.path + ".") for s in
                                                                  report.left_alone):
            continue  # inside a block already taken
        if isinstance(module, LibmoeBlock):
            report.left_alone.append(LeftAlone(path, type(module).__name__, "already computed by libmoe"))
            continue
        family = FAMILIES.get(type(module).__name__)
        if family is not None:
            todo.append((path, module))
        elif _looks_like_moe(module):
            report.left_alone.append(LeftAlone(path, type(module).__name__,
                                               f"not a block of a family libmoe.hf supports "
                                               f"({', '.join(sorted(FAMILIES))})"))
    for path, block in todo:
        family = FAMILIES[type(block).__name__]
        params = inspect.signature(type(block).forward).parameters
        if len(params) != 2:
            report.left_alone.append(LeftAlone(path, type(block).__name__,
                                               f"forward{inspect.signature(type(block).forward)} takes more than "
                                               f"hidden_states"))
            continue
        configs = [c for c in configs_at.get(path, []) if c is not None]
        try:
            new, info, pmap = _build(block, family, path, configs, overrides, verify)
        except _Skip as e:
            report.left_alone.append(LeftAlone(path, type(block).__name__, str(e)))
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        setattr(parent, path.rsplit(".", 1)[-1], new)
        report.replaced.append(info)
        report.param_map.update(pmap)
    return report
