"""PyTorch reference of the routing catalogue of shared/DESIGN.md section 4, beyond what
tests/python/reference.py covers: Gaussian router noise (Shazeer et al. 2017) with the smooth load
loss, multiplicative jitter of the router input (Switch), and expert-choice routing (Zhou et al.
2022). Token-choice selection, capacity and the expert FFNs are reference.py's (imported).

Nothing here calls libmoe. Noise and jitter are given as arrays (rng_ref draws the library's
numbers); everything else is torch in float64, so autograd gives the gradient of
sum(y * dy) + aux_total that moe_backward implements.
"""
import dataclasses
import math
import types

import numpy as np
import torch
import torch.nn.functional as F

import reference as R
import rng_ref

NOISE_NONE, NOISE_GAUSSIAN, NOISE_JITTER = 0, 1, 2
ROUTE_TOKEN_CHOICE, ROUTE_EXPERT_CHOICE = 0, 1


@dataclasses.dataclass
class Cfg(R.RefConfig):
    noise_eps: float = 0.01
    bias_update_rate: float = 0.0
    seed: int = 0


def cfg_of(layer):
    return Cfg.from_struct(layer.cfg)


def training_randomness(cfg, step, T):
    """(noise [T,E] or None, jitter [T,d] or None) the library draws in the training forward
    number `step` (0-based) of a layer with this configuration."""
    noise = jit = None
    if cfg.noise == NOISE_GAUSSIAN:
        noise = rng_ref.noise_draws(cfg.seed, step, T, cfg.num_experts)
    elif cfg.noise == NOISE_JITTER:
        jit = rng_ref.jitter_factors(cfg.seed, step, T, cfg.d_model, cfg.noise_eps)
    return noise, jit


def _stable_desc(v):
    return torch.sort(v, dim=-1, descending=True, stable=True).indices


def _experts_out(cfg, params, x, gate):
    """sum_e gate[:, e] * FFN_e(x) plus the shared experts."""
    y = torch.zeros_like(x)
    w3 = params.get("experts.w3")
    for e in range(cfg.num_experts):
        if not bool((gate[:, e] != 0).any()):
            continue
        ye = R.ffn(cfg, x, params["experts.w1"][e], None if w3 is None else w3[e], params["experts.w2"][e])
        y = y + gate[:, e : e + 1] * ye
    if cfg.num_shared_experts > 0:
        ys = torch.zeros_like(x)
        sw3 = params.get("shared.w3")
        for s in range(cfg.num_shared_experts):
            ys = ys + R.ffn(cfg, x, params["shared.w1"][s], None if sw3 is None else sw3[s], params["shared.w2"][s])
        if cfg.shared_gate:
            ys = ys * torch.sigmoid(x @ params["shared.gate"].t())
        y = y + ys
    return y


def ec_capacity(cfg, T):
    """C = ceil(cf * T * k / E) (DESIGN section 4); an expert can take at most the T tokens there are."""
    C = math.ceil(float(cfg.capacity_factor) * T * cfg.top_k / cfg.num_experts)
    return C, min(C, T)


def load_loss_terms(cfg, Lc, L, std):
    """Shazeer's smooth load: P[t,e] = Phi((Lc - thr) / std), thr = the k-th largest noisy logit
    excluding e: the (k+1)-th largest if e is in the noisy top k, else the k-th (ties to the lower
    index). thr is read from L with its gradient. Returns (P [T,E], margin of the order decisions)."""
    T, E = L.shape
    k = cfg.top_k
    order = _stable_desc(L.detach())
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(E).expand(T, E).contiguous())
    in_top = rank < k
    kth = order[:, k - 1 : k].expand(T, E)
    if k < E:
        k1th = order[:, k : k + 1].expand(T, E)
        thr_idx = torch.where(in_top, k1th, kth)
    else:
        thr_idx = kth  # unused where in_top (every e when k == E)
    thr = torch.gather(L, 1, thr_idx)
    z = (Lc - thr) / std
    P = 0.5 * torch.erfc(-z / math.sqrt(2.0))
    if k == E:
        P = torch.where(in_top, torch.ones_like(P), P)
    # The identity of the k-th and (k+1)-th largest decides thr: gaps among the top k+2.
    s = torch.gather(L.detach(), 1, order)
    upto = min(k + 2, E)
    margin = float((s[:, : upto - 1] - s[:, 1:upto]).min()) if upto > 1 else math.inf
    return P, margin


def forward(cfg, params, x, noise=None, jit=None, bias=None):
    """Training forward of DESIGN section 4 with the given noise draws / jitter factors (None: off).

    params: {name: tensor}; x [T,d]. Returns a namespace with y, logits, scores, routing, counts,
    every loss and statistic, and `margin`, the smallest gap that decided a discrete choice."""
    T, d = x.shape
    E, k = cfg.num_experts, cfg.top_k
    if bias is None:
        bias = params.get("router.bias")
    if bias is None:
        bias = torch.zeros(E, dtype=x.dtype)
    bias = bias.to(x.dtype)

    xr = x * torch.as_tensor(jit, dtype=x.dtype) if jit is not None else x
    Lc = xr @ params["router.weight"].t()
    std = None
    if noise is not None:
        std = F.softplus(x @ params["router.noise_weight"].t())
        L = Lc + torch.as_tensor(noise, dtype=x.dtype) * std
    else:
        L = Lc
    out = types.SimpleNamespace(logits=L, clean_logits=Lc, noise_std=std)

    if cfg.routing == ROUTE_EXPERT_CHOICE:
        S = torch.softmax(L, dim=-1)
        C, Ceff = ec_capacity(cfg, T)
        mask = torch.zeros(T, E, dtype=torch.bool)
        margin = math.inf
        Sd = S.detach()
        for e in range(E):
            order = _stable_desc(Sd[:, e])
            mask[order[:Ceff], e] = True
            if Ceff < T:
                margin = min(margin, float(Sd[order[Ceff - 1], e] - Sd[order[Ceff], e]))
        gate = S * mask.to(S.dtype)
        counts_before = mask.sum(0)
        counts_kept = counts_before
        out.capacity, out.capacity_eff = C, Ceff
        out.num_slots = E * C
        out.dropped = 0
        out.mask = mask
        # (token, expert, weight) ordered by expert then token, as moe_context_assignments.
        te = mask.t().nonzero()
        out.assignments = [(int(t), int(e), float(Sd[t, e])) for e, t in te.tolist()]
        P = S
        slots = T * k
    else:
        S, ids, w, margin = R.route(cfg, L, bias)
        keep, C, pmargin = R.capacity_keep(cfg, ids, w)
        margin = min(margin, pmargin)
        g = w * keep.to(w.dtype)
        gate = (g.unsqueeze(-1) * F.one_hot(ids, E).to(x.dtype)).sum(1)
        counts_before = torch.bincount(ids.reshape(-1), minlength=E)
        counts_kept = torch.bincount(ids[keep].reshape(-1), minlength=E)
        out.topk_ids, out.topk_w, out.keep, out.capacity = ids, w, keep, C
        out.ids_final = torch.where(keep, ids, torch.full_like(ids, -1))
        out.w_final = g
        out.num_slots = T * k
        out.dropped = int((~keep).sum())
        P = S if cfg.score == R.SCORE_SOFTMAX else S / S.sum(dim=1, keepdim=True)
        slots = T * k

    out.y = _experts_out(cfg, params, x, gate)
    out.scores, out.gate = S, gate
    out.counts_before, out.counts_kept = counts_before, counts_kept
    f = counts_before.to(x.dtype) / slots
    out.lb = E * (f * P.mean(0)).sum()
    out.z = (torch.logsumexp(L, dim=1) ** 2).mean()
    out.importance = R.cv_squared(gate.sum(0))
    out.load = torch.zeros((), dtype=x.dtype)
    if noise is not None:
        Pl, lmargin = load_loss_terms(cfg, Lc, L, std)
        out.load = R.cv_squared(Pl.sum(0))
        out.load_P = Pl
        margin = min(margin, lmargin)
    out.aux_total = (cfg.aux_loss_coef * out.lb + cfg.z_loss_coef * out.z +
                     cfg.importance_loss_coef * out.importance + cfg.load_loss_coef * out.load)
    kc = counts_kept.double()
    mean = float(kc.mean())
    out.load_cv = float(torch.sqrt(((kc - mean) ** 2).mean()) / mean) if mean > 0 else 0.0
    out.max_load_ratio = float(kc.max() / mean) if mean > 0 else 0.0
    out.margin = margin
    return out


def forward_backward(cfg, params_np, x_np, dy_np, noise=None, jit=None):
    """forward() plus autograd of sum(y * dy) + aux_total: (out, dx, {name: grad}) in float64 numpy."""
    params = R.to_tensors(params_np, torch.float64)
    x = torch.tensor(x_np, dtype=torch.float64, requires_grad=True)
    out = forward(cfg, params, x, noise, jit)
    obj = (out.y * torch.tensor(dy_np, dtype=torch.float64)).sum() + out.aux_total
    names = [n for n, t in params.items() if t.requires_grad]
    grads = torch.autograd.grad(obj, [x] + [params[n] for n in names], allow_unused=True)
    gd = {n: (torch.zeros_like(params[n]) if g is None else g).detach().numpy() for n, g in zip(names, grads[1:])}
    return out, grads[0].detach().numpy(), gd


def margin_of(cfg, params_np, x_np, steps=(0,)):
    """Smallest decision gap of the training forwards at the given steps (with their noise)."""
    params = R.to_tensors(params_np, requires_grad=False)
    x = torch.tensor(x_np, dtype=torch.float64)
    m = math.inf
    with torch.no_grad():
        for s in steps:
            noise, jit = training_randomness(cfg, s, x.shape[0])
            m = min(m, forward(cfg, params, x, noise, jit).margin)
    return m


def draw_x(layer, T, seed, steps=(0,), scale=1.0, margin=2e-5, max_tries=50):
    """Random x (never zeros) whose routing at every given training step has every decision gap
    above `margin` in the reference, so float32 and float64 decide alike."""
    cfg = cfg_of(layer)
    params = layer.params()
    for i in range(max_tries):
        rng = np.random.default_rng(seed + 7919 * i)
        x = (scale * rng.standard_normal((T, layer.d_model))).astype(np.float32)
        if margin_of(cfg, params, x, steps) > margin:
            return x
    raise AssertionError("no well-conditioned input in %d draws" % max_tries)
