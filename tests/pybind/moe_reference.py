"""A plain PyTorch implementation of shared/DESIGN.md section 4, written from the text (not from
libmoe's code), in float64 with autograd: the oracle for libmoe's forward and gradients.

Noise is not modelled (inference, or noise "none"); everything else is: softmax/sigmoid scores,
selection bias, group-limited routing, top-k with normalisation and routed_scale, capacity with
position or probability dropping, expert choice, GLU and plain experts, shared experts with their
gate, and the load-balance, z, and importance losses. Capacity is per group of tokens when
capacity_group_size is set (consecutive groups, a shorter last group with its own capacity).
Also gpt-oss's pieces: the router's logit bias, expert biases and the clamped SwiGLU
(router_logits, swiglu_clamped, expert_out).
"""

import math

import torch
import torch.nn.functional as F

GLU = {"swiglu": F.silu, "geglu": lambda h: F.gelu(h)}
PLAIN = {"relu": F.relu, "gelu": lambda h: F.gelu(h), "silu": F.silu}


def ffn(x, w1, w3, w2, activation, bias=None, clamp=None):
    """bias: (b1, b3, b2) of expert_bias, or None; clamp: (alpha, limit) of swiglu_clamped."""
    b1, b3, b2 = bias if bias is not None else (None, None, None)
    h = x @ w1.T if b1 is None else x @ w1.T + b1
    if activation == "swiglu_clamped":
        a = swiglu_clamped(h, x @ w3.T if b3 is None else x @ w3.T + b3, *clamp)
    elif activation in GLU:
        a = GLU[activation](h) * (x @ w3.T if b3 is None else x @ w3.T + b3)
    else:
        a = PLAIN[activation](h)
    return a @ w2.T if b2 is None else a @ w2.T + b2


def swiglu_clamped(h, u, alpha, limit):
    """gpt-oss's activation (transformers' GptOssExperts._apply_gate) of gate h and up u; torch.clamp
    passes the gradient on the closed interval."""
    h = h.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * h * torch.sigmoid(alpha * h)


def router_logits(p, x):
    """x Wr^T, plus router.logit_bias when the layer has one (router_logit_bias)."""
    L = x @ p["router.weight"].T
    return L + p["router.logit_bias"] if "router.logit_bias" in p else L


def expert_out(p, e, x, cfg):
    """Routed expert e on rows x, with its biases (expert_bias) and the clamp's parameters."""
    bias = None
    if "experts.b1" in p:
        bias = (p["experts.b1"][e], p["experts.b3"][e] if "experts.b3" in p else None, p["experts.b2"][e])
    clamp = (cfg.get("swiglu_alpha"), cfg.get("swiglu_limit"))
    return ffn(x, p["experts.w1"][e], p["experts.w3"][e] if "experts.w3" in p else None, p["experts.w2"][e],
               cfg["activation"], bias=bias, clamp=clamp)


def cv_squared(v):
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return var / torch.clamp(mean * mean, min=1e-10)  # mean^2 floored: no gradient through it there


def capacity_groups(cfg, T):
    """(first token, end token, C) of each capacity group: C = max(min_capacity, ceil(cf * n * k / E)),
    at most n * k, for a group of n tokens; groups of capacity_group_size tokens (0: one group)."""
    E, k, cf = cfg["num_experts"], cfg["top_k"], cfg["capacity_factor"]
    size = cfg.get("capacity_group_size", 0) or T
    out = []
    for t0 in range(0, T, max(size, 1)):
        n = min(size, T - t0)
        out.append((t0, t0 + n, min(max(cfg.get("min_capacity", 0), math.ceil(cf * (n * k) / E)), n * k)))
    return out


def expert_choice_mask(S, cfg):
    """[T, E] bool: in each capacity group, expert e takes its C best tokens by S[:, e] (ties to the
    lower token)."""
    T, E = S.shape
    chosen = torch.zeros(T, E, dtype=torch.bool)
    for t0, t1, C in capacity_groups(cfg, T):
        for e in range(E):
            s = S[:, e].detach()
            order = sorted(range(t0, t1), key=lambda t: (-s[t].item(), t))[:C]
            chosen[order, e] = True
    return chosen


def kept_slots(idx, w, cfg):
    """[T, k] bool: the slots each capacity group keeps. POSITION: per expert the first C in the order
    (choice, then token) of the group; PROBS: the C largest weights of the group, ties in that order."""
    T, k = idx.shape
    kept = torch.ones(T, k, dtype=torch.bool)
    if cfg["capacity_factor"] <= 0:
        return kept
    E = cfg["num_experts"]
    for t0, t1, C in capacity_groups(cfg, T):
        if cfg["drop_policy"] == "position":
            used = [0] * E
            for j in range(k):
                for t in range(t0, t1):
                    e = int(idx[t, j])
                    if used[e] < C:
                        used[e] += 1
                    else:
                        kept[t, j] = False
        else:
            for e in range(E):
                slots = [(t, j) for j in range(k) for t in range(t0, t1) if int(idx[t, j]) == e]
                slots.sort(key=lambda s: -w[s].item())  # stable: position order among equals
                for t, j in slots[C:]:
                    kept[t, j] = False
    return kept


def forward(p, x, cfg):
    """p: {name: float64 tensor}; x: float64 [T, d]; cfg: libmoe.Layer.config. Returns (y, aux dict)."""
    E, k, T = cfg["num_experts"], cfg["top_k"], x.shape[0]
    L = router_logits(p, x)
    S = torch.softmax(L, -1) if cfg["score"] == "softmax" else torch.sigmoid(L)
    expert_choice = cfg["routing"] == "expert_choice"
    y = torch.zeros_like(x)

    if expert_choice:
        chosen = expert_choice_mask(S, cfg)
        gates = S * chosen  # final gate weights, 0 off the kept slots
        counts = chosen.sum(0).to(x.dtype)  # each expert is routed its C slots
    else:
        sel = (S + p["router.bias"]).detach()
        G = cfg["num_groups"]
        if G > 1:
            gs = sel.view(T, G, E // G)
            top = gs.topk(min(2, E // G), dim=-1).values.sum(-1)
            keep = top.topk(cfg["topk_groups"], dim=-1).indices
            mask = torch.zeros(T, G, dtype=torch.bool).scatter(1, keep, True)
            sel = sel.masked_fill(~mask.repeat_interleave(E // G, dim=1), float("-inf"))
        idx = sel.topk(k, dim=-1).indices  # choice order: best first
        w = S.gather(1, idx)
        if cfg["normalize_topk"]:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * cfg["routed_scale"]
        counts = torch.bincount(idx.flatten(), minlength=E).to(x.dtype)
        kept = kept_slots(idx, w, cfg)
        gates = torch.zeros(T, E, dtype=x.dtype).scatter_add(1, idx, w * kept)
        chosen = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, kept)

    for e in range(E):
        sel_rows = chosen[:, e].nonzero().flatten()
        if len(sel_rows) == 0:
            continue
        out = expert_out(p, e, x[sel_rows], cfg)
        y = y.index_add(0, sel_rows, gates[sel_rows, e:e + 1] * out)

    S_n = cfg["num_shared_experts"]
    if S_n:
        shared = torch.zeros_like(x)
        for s in range(S_n):
            shared = shared + ffn(x, p["shared.w1"][s], p["shared.w3"][s] if "shared.w3" in p else None,
                                  p["shared.w2"][s], cfg["activation"],
                                  clamp=(cfg.get("swiglu_alpha"), cfg.get("swiglu_limit")))
        if cfg["shared_gate"]:
            shared = shared * torch.sigmoid(x @ p["shared.gate"].T)
        y = y + shared

    aux = {}
    P = S if cfg["score"] == "softmax" else S / S.sum(-1, keepdim=True)
    if T:
        aux["load_balance_loss"] = E * ((counts / (T * k)) * P.mean(0)).sum()
        aux["z_loss"] = (torch.logsumexp(L, -1) ** 2).mean()
        aux["importance_loss"] = cv_squared(gates.sum(0))
    else:
        aux = {n: torch.zeros((), dtype=x.dtype) for n in ("load_balance_loss", "z_loss", "importance_loss")}
    aux["aux_loss_total"] = (cfg["aux_loss_coef"] * aux["load_balance_loss"] + cfg["z_loss_coef"] * aux["z_loss"]
                             + cfg["importance_loss_coef"] * aux["importance_loss"])
    return y, aux


def params_from_layer(layer, dtype=torch.float64):
    """{name: leaf tensor requiring grad (router.bias: no grad)} with the layer's current values."""
    out = {}
    for name, info in layer.param_info().items():
        t = torch.from_numpy(layer.get_param(name)).to(dtype)
        out[name] = t.requires_grad_(info.trainable)
    return out


def forward_backward(layer, x, dy):
    """Reference y, aux, dx and parameter gradients for loss = sum(y * dy) + aux_loss_total."""
    p = params_from_layer(layer)
    xt = torch.from_numpy(x).to(torch.float64).requires_grad_(True)
    y, aux = forward(p, xt, layer.config)
    loss = (y * torch.from_numpy(dy).to(torch.float64)).sum() + aux["aux_loss_total"]
    loss.backward()
    grads = {n: t.grad for n, t in p.items() if t.requires_grad}
    return y.detach(), {n: float(v) for n, v in aux.items()}, xt.grad, grads
