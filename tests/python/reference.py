"""An independent PyTorch implementation of shared/DESIGN.md section 4 (token-choice routing).

Nothing here calls libmoe: it takes a configuration, the parameter tensors (PyTorch nn.Linear
layout, [out, in]) and the input, and computes the layer's output, its routing decisions and its
auxiliary losses with torch operations, in float64 by default, so that torch.autograd gives the
gradient of the objective sum(y * dy) + aux_total that moe_backward implements.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

# Enum values of include/moe/moe.h (pinned), repeated here so that this file stands alone.
ACT_SWIGLU, ACT_GEGLU, ACT_RELU, ACT_GELU, ACT_SILU = 0, 1, 2, 3, 4
SCORE_SOFTMAX, SCORE_SIGMOID = 0, 1
DROP_POSITION, DROP_PROBS = 0, 1
NOISE_NONE = 0
ROUTE_TOKEN_CHOICE = 0


@dataclasses.dataclass
class RefConfig:
    d_model: int = 0
    d_ff: int = 0
    num_experts: int = 8
    top_k: int = 2
    activation: int = ACT_SWIGLU
    score: int = SCORE_SOFTMAX
    normalize_topk: int = 1
    routed_scale: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    capacity_factor: float = 0.0
    drop_policy: int = DROP_POSITION
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    importance_loss_coef: float = 0.0
    load_loss_coef: float = 0.0
    num_shared_experts: int = 0
    d_ff_shared: int = 0
    shared_gate: int = 0
    noise: int = NOISE_NONE
    routing: int = ROUTE_TOKEN_CHOICE

    @classmethod
    def from_struct(cls, s):
        """From a ctypes moe_config (or anything with the same attribute names)."""
        return cls(**{f.name: getattr(s, f.name) for f in dataclasses.fields(cls)})

    @property
    def glu(self):
        return self.activation in (ACT_SWIGLU, ACT_GEGLU)

    @property
    def ff_shared(self):
        return self.d_ff_shared if self.d_ff_shared > 0 else self.d_ff


def param_shapes(cfg):
    """{name: (shape, trainable)} of the layer's parameters (DESIGN section 3 / moe.h)."""
    E, d, ff, S, ffs = cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.num_shared_experts, cfg.ff_shared
    out = {"router.weight": ((E, d), True), "router.bias": ((E,), False), "experts.w1": ((E, ff, d), True)}
    if cfg.glu:
        out["experts.w3"] = ((E, ff, d), True)
    out["experts.w2"] = ((E, d, ff), True)
    if S > 0:
        out["shared.w1"] = ((S, ffs, d), True)
        if cfg.glu:
            out["shared.w3"] = ((S, ffs, d), True)
        out["shared.w2"] = ((S, d, ffs), True)
        if cfg.shared_gate:
            out["shared.gate"] = ((1, d), True)
    return out


def _act(cfg, h):
    a = cfg.activation
    if a in (ACT_SWIGLU, ACT_SILU):
        return F.silu(h)
    if a in (ACT_GEGLU, ACT_GELU):
        return F.gelu(h)  # approximate='none': the exact erf GELU
    if a == ACT_RELU:
        return F.relu(h)
    raise ValueError("activation %r" % a)


def ffn(cfg, x, w1, w3, w2):
    """One expert: x [T,d], w1/w3 [ff,d], w2 [d,ff] -> [T,d]."""
    h = _act(cfg, x @ w1.t())
    if cfg.glu:
        h = h * (x @ w3.t())
    return h @ w2.t()


def cv_squared(v):
    """Population variance / max(mean^2, 1e-10)."""
    m = v.mean()
    var = ((v - m) ** 2).mean()
    return var / torch.clamp(m * m, min=1e-10)


def _stable_desc(v):
    """Indices sorting v descending along the last dim, ties to the lower index."""
    return torch.sort(v, dim=-1, descending=True, stable=True).indices


@dataclasses.dataclass
class RefOutput:
    y: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor
    topk_ids: torch.Tensor        # [T,k] chosen experts before capacity, choice order
    topk_w: torch.Tensor          # [T,k] weights before capacity (normalised, scaled)
    keep: torch.Tensor            # [T,k] bool: slot kept by capacity
    ids_final: torch.Tensor       # [T,k] expert, -1 where dropped (what moe_context_topk reports)
    w_final: torch.Tensor         # [T,k] weight, 0 where dropped
    counts_before: torch.Tensor   # [E] slots routed before capacity (n_e)
    counts_kept: torch.Tensor     # [E] slots kept
    capacity: int                 # -1 if dropless
    lb: torch.Tensor
    z: torch.Tensor
    importance: torch.Tensor
    aux_total: torch.Tensor
    load_cv: float
    max_load_ratio: float
    dropped: int
    margin: float                 # smallest gap that decided a routing choice (see route())


def route(cfg, logits, bias):
    """Scores, group limiting, top-k and weights. Returns (S, ids, w, margin).

    margin is the smallest gap, over tokens, between consecutive selection scores among the k+1
    best (it decides the choice order) and between the kept and the first masked group score; a
    tiny margin means float32 and float64 could legitimately decide differently.
    """
    T, E = logits.shape
    k = cfg.top_k
    S = torch.softmax(logits, dim=-1) if cfg.score == SCORE_SOFTMAX else torch.sigmoid(logits)
    sel = (S + bias).detach().clone()
    sel[torch.isnan(sel)] = -math.inf
    margin = math.inf
    G = cfg.num_groups
    if G > 1:
        gsize = E // G
        gv = sel.view(T, G, gsize)
        top2 = torch.sort(gv, dim=-1, descending=True).values[..., : min(2, gsize)]
        gscore = top2.sum(-1)  # [T,G]
        order = _stable_desc(gscore)
        kept_groups = order[:, : cfg.topk_groups]
        if cfg.topk_groups < G:
            gs_sorted = torch.gather(gscore, 1, order)
            margin = min(margin, float((gs_sorted[:, cfg.topk_groups - 1] - gs_sorted[:, cfg.topk_groups]).min()))
        gmask = torch.zeros(T, G, dtype=torch.bool)
        gmask.scatter_(1, kept_groups, True)
        emask = gmask.repeat_interleave(gsize, dim=1)
        sel = torch.where(emask, sel, torch.full_like(sel, -math.inf))
    order = _stable_desc(sel)
    ids = order[:, :k]
    s_sorted = torch.gather(sel, 1, order)
    upto = min(k + 1, E)
    if upto > 1:
        gaps = s_sorted[:, : upto - 1] - s_sorted[:, 1:upto]
        gaps = gaps[torch.isfinite(gaps)]
        if gaps.numel():
            margin = min(margin, float(gaps.min()))
    w = torch.gather(S, 1, ids)
    if cfg.normalize_topk:
        w = w / (w.sum(dim=1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scale
    return S, ids, w, margin


def capacity_of(cfg, T):
    if not cfg.capacity_factor > 0:
        return -1
    c = math.ceil(float(cfg.capacity_factor) * T * cfg.top_k / cfg.num_experts)
    return min(c, T * cfg.top_k)


def capacity_keep(cfg, ids, w):
    """keep [T,k] and the smallest weight gap at a PROBS cut (inf if none)."""
    T, k = ids.shape
    E = cfg.num_experts
    C = capacity_of(cfg, T)
    keep = torch.ones(T, k, dtype=torch.bool)
    margin = math.inf
    if C < 0:
        return keep, C, margin
    # Slots in position order: choice j, then token t.
    slots = [[] for _ in range(E)]
    for j in range(k):
        for t in range(T):
            slots[int(ids[t, j])].append((t, j))
    wd = w.detach()
    for e in range(E):
        sl = slots[e]
        if len(sl) <= C:
            continue
        if cfg.drop_policy == DROP_POSITION:
            drop = sl[C:]
        elif cfg.drop_policy == DROP_PROBS:
            # C largest weights; equal weights in position order (sorted() is stable).
            ranked = sorted(sl, key=lambda s: -float(wd[s[0], s[1]]))
            drop = ranked[C:]
            margin = min(margin, float(wd[ranked[C - 1]]) - float(wd[ranked[C]]) if C > 0 else math.inf)
        else:
            raise ValueError("drop_policy %r" % cfg.drop_policy)
        for t, j in drop:
            keep[t, j] = False
    return keep, C, margin


def forward(cfg, params, x, bias=None):
    """The layer's training forward with no noise. params: {name: tensor} (router.bias may be
    absent or given as bias). Differentiable w.r.t. x and every trainable tensor in params."""
    if cfg.noise != NOISE_NONE or cfg.routing != ROUTE_TOKEN_CHOICE:
        raise NotImplementedError("the reference covers token choice without router noise")
    if cfg.load_loss_coef != 0:
        raise NotImplementedError("the Shazeer load loss needs router noise")
    T, d = x.shape
    E, k = cfg.num_experts, cfg.top_k
    if bias is None:
        bias = params.get("router.bias")
    if bias is None:
        bias = torch.zeros(E, dtype=x.dtype)
    bias = bias.to(x.dtype)

    L = x @ params["router.weight"].t()
    S, ids, w, margin = route(cfg, L, bias)
    keep, C, pmargin = capacity_keep(cfg, ids, w)
    margin = min(margin, pmargin)
    g = w * keep.to(w.dtype)  # final gate weights per slot

    onehot = F.one_hot(ids, E).to(x.dtype)            # [T,k,E]
    gate = (g.unsqueeze(-1) * onehot).sum(1)          # [T,E], G of DESIGN section 4
    y = torch.zeros_like(x)
    w3 = params.get("experts.w3")
    for e in range(E):
        rows = (ids == e).any(1)
        if not bool(rows.any()):
            continue
        ye = ffn(cfg, x, params["experts.w1"][e], None if w3 is None else w3[e], params["experts.w2"][e])
        y = y + gate[:, e : e + 1] * ye
    if cfg.num_shared_experts > 0:
        ys = torch.zeros_like(x)
        sw3 = params.get("shared.w3")
        for s in range(cfg.num_shared_experts):
            ys = ys + ffn(cfg, x, params["shared.w1"][s], None if sw3 is None else sw3[s], params["shared.w2"][s])
        if cfg.shared_gate:
            ys = ys * torch.sigmoid(x @ params["shared.gate"].t())  # [T,1]
        y = y + ys

    counts_before = torch.bincount(ids.reshape(-1), minlength=E)
    counts_kept = torch.bincount(ids[keep].reshape(-1), minlength=E)
    P = S if cfg.score == SCORE_SOFTMAX else S / S.sum(dim=1, keepdim=True)
    f = counts_before.to(x.dtype) / (T * k)             # a constant: no gradient
    lb = E * (f * P.mean(0)).sum()
    z = (torch.logsumexp(L, dim=1) ** 2).mean()
    importance = cv_squared(gate.sum(0))
    aux = cfg.aux_loss_coef * lb + cfg.z_loss_coef * z + cfg.importance_loss_coef * importance

    kc = counts_kept.double()
    mean = float(kc.mean())
    load_cv = float(torch.sqrt(((kc - mean) ** 2).mean()) / mean) if mean > 0 else 0.0
    max_ratio = float(kc.max() / mean) if mean > 0 else 0.0
    ids_final = torch.where(keep, ids, torch.full_like(ids, -1))
    return RefOutput(
        y=y, logits=L, scores=S, topk_ids=ids, topk_w=w, keep=keep, ids_final=ids_final,
        w_final=g, counts_before=counts_before, counts_kept=counts_kept, capacity=C, lb=lb, z=z,
        importance=importance, aux_total=aux, load_cv=load_cv, max_load_ratio=max_ratio,
        dropped=int((~keep).sum()), margin=margin)


def to_tensors(params_np, dtype=torch.float64, requires_grad=True, trainable=None):
    """numpy parameters -> leaf tensors; router.bias never requires grad."""
    out = {}
    for n, a in params_np.items():
        t = torch.tensor(a, dtype=dtype)
        if requires_grad and n != "router.bias" and (trainable is None or n in trainable):
            t.requires_grad_(True)
        out[n] = t
    return out


def forward_backward(cfg, params_np, x_np, dy_np, dtype=torch.float64):
    """Reference forward plus autograd of sum(y*dy) + aux_total.

    Returns (RefOutput, dx, {name: grad}) with numpy results in float64."""
    params = to_tensors(params_np, dtype)
    x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
    out = forward(cfg, params, x)
    obj = (out.y * torch.tensor(dy_np, dtype=dtype)).sum() + out.aux_total
    leaves = [x] + [t for t in params.values() if t.requires_grad]
    grads = torch.autograd.grad(obj, leaves, allow_unused=True)
    names = [n for n, t in params.items() if t.requires_grad]
    gd = {}
    for n, g in zip(names, grads[1:]):
        gd[n] = (torch.zeros_like(params[n]) if g is None else g).detach().numpy()
    dx = grads[0].detach().numpy() if grads[0] is not None else torch.zeros_like(x).numpy()
    return out, dx, gd
