"""libmoe.hf.replace_moe_blocks on tiny transformers models built from configs (no download), one
per supported family: logits, loss and every gradient of the swapped model equal the original's,
training follows it, router logits still reach transformers' load-balancing loss, both weight
layouts (transformers 5's fused experts and the per-expert modules of earlier versions),
torch.compile without a graph break and torch.export of the swapped model, and what is left
alone and why. Needs transformers and torch >= 2.4; each test that cannot run says why.

Tolerances (float32): logits and loss rtol 1e-5 / atol 1e-6 of the original's, gradients
rtol 1e-4 / atol 1e-6 (libmoe sums each token's experts in another order than transformers'
index_add_, and its GEMMs are oneDNN's, not torch's)."""

import copy
import os
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import libmoe
import libmoe.torch as lt

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the .pypi variant has it)")
if not lt.CUSTOM_OPS:
    pytest.skip(f"torch {torch.__version__} is older than 2.4 (no torch.library.custom_op)", allow_module_level=True)

import libmoe.hf as hf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import safetensors_np as ST  # noqa: E402  (numpy reader of safetensors files, shared with tests/python)

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]
VOCAB, SEQ = 64, 12
LOGITS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def tiny_config(family, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False, num_hidden_layers=2)
    if family == "mixtral":
        common.update(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
        cls = transformers.MixtralConfig
    elif family == "qwen2_moe":
        # layer 1 is a dense MLP (mlp_only_layers): nothing to replace there
        common.update(num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1])
        cls = transformers.Qwen2MoeConfig
    elif family == "qwen3_moe":
        common.update(intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, head_dim=8)
        cls = transformers.Qwen3MoeConfig
    elif family == "olmoe":
        common.update(intermediate_size=24, num_experts=8, num_experts_per_tok=2)
        cls = transformers.OlmoeConfig
    elif family == "deepseek_v3":
        # layer 0 dense (first_k_dense_replace); 8 experts in 4 groups, 2 groups kept, 2 shared experts
        common.update(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=2, first_k_dense_replace=1,
                      kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                      routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4)  # MLA: no GQA
        cls = transformers.DeepseekV3Config
    common.update(kw)
    return cls(**common)


def tiny_model(family, device="cpu", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **kw))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros at init: make the bias matter
                buf.copy_(torch.rand_like(buf) * 0.1)
    return model.to(device=device, dtype=dtype)


def moe_layers(model):
    return [n for n, m in model.named_modules() if type(m).__name__ in hf.FAMILIES]


def batch(device, n=3):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return ids.to(device), torch.roll(ids, 1, 1).to(device)


def grads_of_original_names(model, report):
    """Gradient of every parameter of the swapped model, keyed by the ORIGINAL model's names."""
    params = dict(model.named_parameters())
    out = {n: p.grad for n, p in params.items()}
    for old, new in report.param_map.items():
        out[old] = torch.cat([params[n].grad for n in new], dim=1) if len(new) > 1 else params[new[0]].grad
    return out


def assert_grads_equal(original, swapped, report):
    want = {n: p.grad for n, p in original.named_parameters()}
    got = grads_of_original_names(swapped, report)
    for name, g in want.items():
        assert name in got, f"{name}: no parameter of the swapped model stands for it"
        torch.testing.assert_close(got[name].reshape(g.shape).to(g.dtype), g, **GRAD_TOL, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_model_equals_original(family, device):
    original = tiny_model(family, device)
    swapped = copy.deepcopy(original)
    blocks = moe_layers(original)
    report = hf.replace_moe_blocks(swapped)
    assert [r.path for r in report.replaced] == blocks and blocks, str(report)
    assert not report.left_alone, str(report)
    for r in report.replaced:
        assert r.family == family and r.layout == "fused" and r.returns == "hidden_states"
        assert r.max_rel_diff is not None and r.max_rel_diff < 1e-4
        block = swapped.get_submodule(r.path)
        assert isinstance(block, hf.LibmoeBlock) and isinstance(block, type(original.get_submodule(r.path)))
        assert isinstance(block.moe, lt.MoE)
    assert not any("experts.gate_up_proj" in n for n, _ in swapped.named_parameters())
    ids, labels = batch(device)
    for m in (original, swapped):
        m.train()
        m.zero_grad(set_to_none=True)
    out_o = original(input_ids=ids, labels=labels)
    out_s = swapped(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_s.logits, out_o.logits, **LOGITS_TOL)
    torch.testing.assert_close(out_s.loss, out_o.loss, **LOGITS_TOL)
    out_o.loss.backward()
    out_s.loss.backward()
    assert_grads_equal(original, swapped, report)


def test_report_names_the_new_parameters():
    original = tiny_model("qwen2_moe")
    swapped = copy.deepcopy(original)
    report = hf.replace_moe_blocks(swapped)
    names = dict(swapped.named_parameters())
    p = "model.layers.0.mlp."
    assert report.param_map[p + "experts.gate_up_proj"] == [p + "moe.experts.w1", p + "moe.experts.w3"]
    assert report.param_map[p + "experts.down_proj"] == [p + "moe.experts.w2"]
    assert report.param_map[p + "gate.weight"] == [p + "moe.router.weight"]
    assert report.param_map[p + "shared_expert_gate.weight"] == [p + "moe.shared.gate"]
    assert report.param_map[p + "shared_expert.up_proj.weight"] == [p + "moe.shared.w3"]
    assert all(n in names for new in report.param_map.values() for n in new)
    # every original parameter is either kept under its name or mapped
    assert {n for n, _ in original.named_parameters()} <= set(names) | set(report.param_map)
    # the weights moved: the new module's storage holds the original values
    ff = original.config.moe_intermediate_size
    gu = original.get_submodule(p + "experts").gate_up_proj
    torch.testing.assert_close(names[p + "moe.experts.w3"].detach(), gu[:, ff:].detach(), rtol=0, atol=0)
    text = str(report)
    assert "replaced model.layers.0.mlp (qwen2_moe" in text and "1 block(s) replaced" not in text


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_router_logits_reach_the_load_balancing_loss(family):
    """output_router_logits=True: transformers records the router logits from the router module
    (a stand-in of its class in the swapped model) and adds its load-balancing loss; the loss
    and the router's gradient are the original's."""
    original = tiny_model(family, output_router_logits=True, router_aux_loss_coef=0.5)
    swapped = copy.deepcopy(original)
    original(input_ids=batch("cpu")[0])  # hooks installed by a forward before the swap carry over
    report = hf.replace_moe_blocks(swapped)
    ids, labels = batch("cpu")
    out_o = original(input_ids=ids, labels=labels)
    out_s = swapped(input_ids=ids, labels=labels)
    assert len(out_s.router_logits) == len(out_o.router_logits) == len(report.replaced)
    for a, b in zip(out_s.router_logits, out_o.router_logits):
        torch.testing.assert_close(a, b, **LOGITS_TOL)
    assert out_o.aux_loss.item() > 0
    torch.testing.assert_close(out_s.aux_loss, out_o.aux_loss, **LOGITS_TOL)
    torch.testing.assert_close(out_s.loss, out_o.loss, **LOGITS_TOL)
    out_o.loss.backward()
    out_s.loss.backward()
    assert_grads_equal(original, swapped, report)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_training_follows_the_original(family):
    original = tiny_model(family)
    swapped = copy.deepcopy(original)
    hf.replace_moe_blocks(swapped)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (original, swapped)]
    gen = torch.Generator().manual_seed(2)
    losses = {0: [], 1: []}
    for _ in range(6):
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=gen)
        labels = ids * 7 % VOCAB
        for i, (m, opt) in enumerate(zip((original, swapped), opts)):
            opt.zero_grad(set_to_none=True)
            loss = m(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=0)
    assert losses[1][-1] < losses[1][0]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_compile_without_graph_break_and_export(family):
    original = tiny_model(family).eval()
    swapped = copy.deepcopy(original)
    hf.replace_moe_blocks(swapped)
    ids, _ = batch("cpu")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(swapped)(input_ids=ids, use_cache=False)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        want = original(input_ids=ids, use_cache=False).logits
        got = torch.compile(swapped, fullgraph=True, backend="aot_eager")(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, want, **LOGITS_TOL)
        ep = torch.export.export(swapped, (), {"input_ids": ids, "use_cache": False})
        assert sum("libmoe.moe_forward" in str(n.target) for n in ep.graph.nodes) == len(moe_layers(original))
        torch.testing.assert_close(ep.module()(input_ids=ids, use_cache=False).logits, want, **LOGITS_TOL)
    torch._dynamo.reset()


def test_compiled_training_step_equals_eager():
    original = tiny_model("qwen2_moe")
    swapped = copy.deepcopy(original)
    report = hf.replace_moe_blocks(swapped)
    ids, labels = batch("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(swapped, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    want = original(input_ids=ids, labels=labels, use_cache=False).loss
    want.backward()
    torch.testing.assert_close(loss, want, **LOGITS_TOL)
    assert_grads_equal(original, swapped, report)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(dtype):
    original = tiny_model("mixtral", dtype=dtype)
    swapped = copy.deepcopy(original)
    report = hf.replace_moe_blocks(swapped)
    assert len(report.replaced) == 2 and all(r.config["dtype"] == str(dtype).split(".")[1] for r in report.replaced)
    assert swapped.model.layers[0].mlp.moe.experts.w1.dtype == dtype
    ids, _ = batch("cpu")
    with torch.no_grad():
        a, b = swapped(input_ids=ids).logits.float(), original(input_ids=ids).logits.float()
    # 16-bit rounding (and libmoe routing on float32 logits where transformers rounds them to the
    # model's dtype first) moves the logits by a few units in the last place of the dtype
    assert (a - b).abs().mean() < 2e-2 * b.abs().mean()


# ---- what is left alone ---------------------------------------------------------------------------------
def test_left_alone_with_reasons():
    jitter = tiny_model("mixtral", router_jitter_noise=0.1)
    report = hf.replace_moe_blocks(jitter)
    assert not report.replaced and len(report.left_alone) == 2
    assert all("router_jitter_noise" in s.reason for s in report.left_alone)
    assert all(type(m).__name__ == "MixtralSparseMoeBlock" for m in
               (jitter.get_submodule(s.path) for s in report.left_alone))

    tanh = tiny_model("olmoe", hidden_act="gelu_pytorch_tanh")
    report = hf.replace_moe_blocks(tanh)
    assert not report.replaced and all("activation 'gelu_pytorch_tanh'" in s.reason for s in report.left_alone)

    # a block whose computation is not what its config says: the probe catches it
    odd = tiny_model("qwen3_moe")
    odd.model.layers[1].mlp.experts.act_fn = nn.Tanh()
    report = hf.replace_moe_blocks(odd)
    assert [r.path for r in report.replaced] == ["model.layers.0.mlp"]
    assert report.left_alone[0].path == "model.layers.1.mlp" and "differs" in report.left_alone[0].reason

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.router = nn.Linear(4, 2)

    other = nn.Sequential(Router())
    report = hf.replace_moe_blocks(other)
    assert report.left_alone == [hf.LeftAlone("0", "Router", report.left_alone[0].reason)]
    assert "not a block of a family" in report.left_alone[0].reason

    done = tiny_model("olmoe")
    hf.replace_moe_blocks(done)
    again = hf.replace_moe_blocks(done)
    assert not again.replaced and all(s.reason == "already computed by libmoe" for s in again.left_alone)


def test_overrides():
    model = tiny_model("deepseek_v3")
    report = hf.replace_moe_blocks(model, bias_update_rate=1e-3, aux_loss_coef=0.01)
    moe = model.get_submodule(report.replaced[0].path).moe
    assert moe.layer.config["bias_update_rate"] == pytest.approx(1e-3)
    model.train()
    before = moe.router.bias.clone()
    model(input_ids=batch("cpu")[0]).logits.sum().backward()
    assert not torch.equal(before, moe.router.bias)  # DeepSeek's aux-loss-free balancing runs
    assert moe.aux_loss.item() > 0
    with pytest.raises(TypeError, match="top_k is read from each block"):
        hf.replace_moe_blocks(tiny_model("olmoe"), top_k=1)
    with pytest.raises(TypeError, match="unknown libmoe config field 'topk'"):
        hf.replace_moe_blocks(tiny_model("olmoe"), topk=1)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        hf.replace_moe_blocks("model")


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_family_file_loads_into_the_transformers_block(tmp_path, family):
    """Layer.save(..., family=...) writes what the family's transformers 5 block holds: its
    state_dict loads the file strictly (every key, every shape) and then computes the libmoe
    layer's output. The layer's values are drawn anew, so nothing is inherited from the block."""
    original = tiny_model(family).eval()
    swapped = copy.deepcopy(original)
    report = hf.replace_moe_blocks(swapped)
    path = report.replaced[0].path
    layer = swapped.get_submodule(path).moe.layer
    rng = torch.Generator().manual_seed(7)
    for name, info in layer.param_info().items():
        if name == "router.bias" and family != "deepseek_v3":
            continue  # the family has no selection bias: it stays zero
        v = torch.rand(info.shape, generator=rng) * 0.1 if name == "router.bias" else \
            torch.randn(info.shape, generator=rng) * 0.3
        layer.set_param(name, v.numpy())
    file = tmp_path / "block.safetensors"
    layer.save(file, None, family.replace("_", "-"))
    tensors, _ = ST.read(str(file))
    block = original.get_submodule(path)
    block.load_state_dict({k: torch.from_numpy(v.copy()) for k, (_, v) in tensors.items()}, strict=True)
    x = torch.randn(1, 9, 32, generator=rng)
    with torch.no_grad():
        want = block(x)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(torch.from_numpy(layer.forward(x[0].numpy())), want[0], rtol=1e-4, atol=1e-5)


# ---- the per-expert layout of transformers < 5 ----------------------------------------------------------
# transformers 5 fused its experts; earlier versions kept one nn.Linear module per expert and
# weight. Only one transformers is installed, so these blocks are written here from that
# layout (a router nn.Linear or router module, a ModuleList of expert MLPs, the routing of the
# family) and checked against transformers 5's own block on the same weights first.
class _ExpertMLP(nn.Module):
    def __init__(self, d, ff, names):
        super().__init__()
        self._names = names
        for n, shape in zip(names, ((ff, d), (ff, d), (d, ff))):
            setattr(self, n, nn.Linear(shape[1], shape[0], bias=False))

    def forward(self, x):
        w1, w3, w2 = (getattr(self, n) for n in self._names)
        return w2(F.silu(w1(x)) * w3(x))


def _loop_experts(experts, x, ids, weights):
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, pos = torch.where(ids == e)
        out.index_add_(0, tok, expert(x[tok]) * weights[tok, pos, None])
    return out


def _load_per_expert(experts, fused):
    ff = fused.down_proj.shape[2]
    with torch.no_grad():
        for e, expert in enumerate(experts):
            w1, w3, w2 = (getattr(expert, n) for n in expert._names)
            w1.weight.copy_(fused.gate_up_proj[e, :ff])
            w3.weight.copy_(fused.gate_up_proj[e, ff:])
            w2.weight.copy_(fused.down_proj[e])


class MixtralSparseMoeBlock(nn.Module):
    """Mixtral's block in the per-expert layout: forward returns (hidden_states, router_logits)."""

    def __init__(self, v5_block, d):
        super().__init__()
        E, ff = v5_block.experts.num_experts, v5_block.experts.intermediate_dim
        self.top_k = v5_block.top_k
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(_ExpertMLP(d, ff, ("w1", "w3", "w2")) for _ in range(E))
        with torch.no_grad():
            self.gate.weight.copy_(v5_block.gate.weight)
        _load_per_expert(self.experts, v5_block.experts)

    def forward(self, hidden_states):
        b, t, d = hidden_states.shape
        x = hidden_states.reshape(-1, d)
        router_logits = self.gate(x)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, ids = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return _loop_experts(self.experts, x, ids, weights).reshape(b, t, d), router_logits


class DeepseekV3MoE(nn.Module):
    """DeepSeek-V3's block in the per-expert layout (router module, per-expert MLPs, shared
    experts): forward returns hidden_states."""

    def __init__(self, v5_block):
        super().__init__()
        self.gate = copy.deepcopy(v5_block.gate)  # transformers' DeepseekV3TopkRouter
        E, ff, d = v5_block.experts.num_experts, v5_block.experts.intermediate_dim, v5_block.experts.hidden_dim
        self.experts = nn.ModuleList(_ExpertMLP(d, ff, ("gate_proj", "up_proj", "down_proj")) for _ in range(E))
        self.shared_experts = copy.deepcopy(v5_block.shared_experts)
        _load_per_expert(self.experts, v5_block.experts)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        _, weights, ids = self.gate(hidden_states)
        x = hidden_states.reshape(-1, shape[-1])
        return _loop_experts(self.experts, x, ids, weights).reshape(shape) + self.shared_experts(hidden_states)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_per_expert_layout(family):
    model = tiny_model(family)
    path = moe_layers(model)[0]
    v5 = model.get_submodule(path)
    old = MixtralSparseMoeBlock(v5, 32) if family == "mixtral" else DeepseekV3MoE(v5)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():  # the per-expert block computes what transformers 5's does
        got = old(x)
        torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, v5(x), **LOGITS_TOL)
    holder = nn.Module()  # where replace_moe_blocks finds the model config, as in a real model
    holder.config, holder.mlp = model.config, old
    original = copy.deepcopy(old)
    report = hf.replace_moe_blocks(holder)
    assert [(r.path, r.layout) for r in report.replaced] == [("mlp", "per-expert")], str(report)
    new = holder.mlp
    assert isinstance(new, type(old))
    returns_pair = family == "mixtral"
    assert report.replaced[0].returns == ("(hidden_states, router_logits)" if returns_pair else "hidden_states")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_new, out_old = new(xa), original(xb)
    assert isinstance(out_new, tuple) == returns_pair
    dy = torch.randn(2, 7, 32)
    if returns_pair:
        torch.testing.assert_close(out_new[1], out_old[1], **LOGITS_TOL)
        dl = torch.randn_like(out_old[1])
        ((out_new[0] * dy).sum() + (out_new[1] * dl).sum()).backward()
        ((out_old[0] * dy).sum() + (out_old[1] * dl).sum()).backward()
        out_new, out_old = out_new[0], out_old[0]
    else:
        (out_new * dy).sum().backward()
        (out_old * dy).sum().backward()
    torch.testing.assert_close(out_new, out_old, **LOGITS_TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **GRAD_TOL)
    p = dict(new.named_parameters())
    for name, param in original.named_parameters():
        mapped = report.param_map["mlp." + name]
        assert len(mapped) == 1
        g = p[mapped[0][len("mlp."):]].grad
        if name.startswith("experts."):
            g = g[int(name.split(".")[1])]
        torch.testing.assert_close(g.reshape(param.shape), param.grad, **GRAD_TOL, msg=name)


def test_generate_and_router_weight_through_the_gate():
    """generate() runs the swapped blocks on one token at a time (KV cache) and picks the same
    tokens; the router stand-in's ``weight`` is libmoe's router weight, so transformers'
    _init_weights on it re-initialises the weight libmoe computes with."""
    original = tiny_model("mixtral").eval()
    swapped = copy.deepcopy(original)
    report = hf.replace_moe_blocks(swapped)
    ids, _ = batch("cpu", n=2)
    want = original.generate(ids, max_new_tokens=5, do_sample=False)
    got = swapped.generate(ids, max_new_tokens=5, do_sample=False)
    assert want.shape == (2, SEQ + 5)
    assert torch.equal(got, want)
    block = swapped.get_submodule(report.replaced[0].path)
    assert block.gate.weight is block.moe.router.weight
    assert not list(block.gate.parameters())  # registered once, under moe
    before = block.moe.router.weight.detach().clone()
    with torch.no_grad():
        y0 = block(torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(5)))
    swapped._init_weights(block.gate)
    assert not torch.equal(block.moe.router.weight, before)
    with torch.no_grad():
        y1 = block(torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(y0, y1)  # libmoe routes with the new weight
