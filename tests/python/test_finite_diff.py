"""Finite differences of the DESIGN section 4 mathematics.

(a) torch.autograd.gradcheck proves the float64 reference's gradients (y and every aux loss),
    so the oracle of test_oracle.py is itself checked.
(b) Directional central differences of the library's own objective sum(y*dy) + aux_loss_total
    against <grad, v> from moe_backward, with h sized for float32 and no routing decision flipping.
"""
import numpy as np
import pytest
import torch

import moe_ctypes as M
import reference as R
from oracle_util import make_layer

# ---------------------------------------------------------------------------------------------
# (a) gradcheck of the reference
# ---------------------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "softmax_probs_capacity_all_losses": dict(
        d_model=5, d_ff=4, num_experts=4, top_k=2, activation=R.ACT_SWIGLU, capacity_factor=0.75,
        drop_policy=R.DROP_PROBS, aux_loss_coef=0.5, z_loss_coef=0.3, importance_loss_coef=0.7),
    "sigmoid_groups_shared_gate": dict(
        d_model=5, d_ff=3, num_experts=8, top_k=3, activation=R.ACT_GEGLU, score=R.SCORE_SIGMOID,
        num_groups=4, topk_groups=2, routed_scale=2.5, num_shared_experts=1, shared_gate=1, d_ff_shared=4,
        aux_loss_coef=0.5, z_loss_coef=0.2, importance_loss_coef=0.4),
    "k1_raw_position_gelu_shared": dict(
        d_model=4, d_ff=5, num_experts=4, top_k=1, activation=R.ACT_GELU, normalize_topk=0,
        capacity_factor=1.0, drop_policy=R.DROP_POSITION, num_shared_experts=2, d_ff_shared=3,
        aux_loss_coef=1.0, importance_loss_coef=1.0),
    "silu_importance_floor": dict(
        d_model=4, d_ff=4, num_experts=4, top_k=2, activation=R.ACT_SILU, routed_scale=1e-6,
        aux_loss_coef=0.0, importance_loss_coef=1.0),
}


def _random_reference_inputs(cfg, T, seed, bias_scale=0.0):
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n, (shape, trainable) in R.param_shapes(cfg).items():
        if n == "router.bias":
            params[n] = bias_scale * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            params[n] = torch.randn(shape, generator=g, dtype=torch.float64) / np.sqrt(shape[-1])
    x = torch.randn(T, cfg.d_model, generator=g, dtype=torch.float64)
    return params, x


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck_reference(name):
    cfg = R.RefConfig(**GRADCHECK_CASES[name])
    T = 7
    for seed in range(100):
        params, x = _random_reference_inputs(cfg, T, seed, bias_scale=0.1 if cfg.num_groups > 1 else 0.0)
        with torch.no_grad():
            out = R.forward(cfg, params, x)
        if out.margin > 1e-4 and (cfg.capacity_factor <= 0 or out.dropped > 0):
            break
    else:
        pytest.fail("no well-conditioned draw")
    if cfg.importance_loss_coef and cfg.routed_scale < 1e-3:
        m = float(out.w_final.sum() / cfg.num_experts)
        assert m * m < 1e-10, "the floor case does not reach the mean^2 floor"
    names = [n for n, (_, tr) in R.param_shapes(cfg).items() if tr]
    bias = params["router.bias"]

    def f(x_, *ps):
        p = dict(zip(names, ps))
        o = R.forward(cfg, p, x_, bias=bias)
        return o.y, o.lb, o.z, o.importance, o.aux_total

    inputs = [x.clone().requires_grad_(True)] + [params[n].clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# (b) directional finite differences of the library
# ---------------------------------------------------------------------------------------------

LIB_CASES = {
    "softmax_k2_z_importance": dict(d_model=16, d_ff=32, num_experts=4, top_k=2, aux_loss_coef=0.1,
                                    z_loss_coef=0.05, importance_loss_coef=0.2),
    "probs_capacity_geglu": dict(d_model=16, d_ff=32, num_experts=4, top_k=2, activation=M.ACT_GEGLU,
                                 capacity_factor=0.75, drop_policy=M.DROP_PROBS, aux_loss_coef=0.1,
                                 importance_loss_coef=0.2),
    "sigmoid_groups_shared_gate": dict(d_model=16, d_ff=32, num_experts=8, top_k=3, score=M.SCORE_SIGMOID,
                                       num_groups=4, topk_groups=2, routed_scale=2.5, num_shared_experts=1,
                                       shared_gate=1, aux_loss_coef=0.1, z_loss_coef=0.05),
    "raw_k1_silu": dict(d_model=16, d_ff=32, num_experts=4, top_k=1, activation=M.ACT_SILU, normalize_topk=0,
                        aux_loss_coef=0.2),
}

H = 1e-2          # relative step for float32
TOL = 2e-3        # relative tolerance on the directional derivative (observed errors ~1e-5)


def _objective(layer, x, dy):
    ctx = layer.context()
    y = layer.forward(x, ctx)
    ids, _ = ctx.topk()
    f = float(np.sum(y.astype(np.float64) * dy.astype(np.float64))) + float(ctx.stats()["aux_loss_total"])
    return f, ids


def _check_direction(name, fd, an, gnorm, vnorm):
    err = abs(fd - an)
    assert err <= TOL * abs(an) + 1e-4 * gnorm * vnorm, \
        "%s: finite difference %.7g, backward %.7g (relative error %.3g)" % (name, fd, an, err / max(abs(an), 1e-30))


@pytest.mark.parametrize("name", sorted(LIB_CASES))
def test_library_directional_fd(name):
    layer = make_layer(**LIB_CASES[name])
    T = 6
    rng = np.random.default_rng(2024)
    x = rng.standard_normal((T, layer.d_model)).astype(np.float32)
    dy = rng.standard_normal((T, layer.d_model)).astype(np.float32)

    ctx = layer.context()
    layer.zero_grad()
    layer.forward(x, ctx)
    base_ids, _ = ctx.topk()
    dx = layer.backward(ctx, dy).astype(np.float64)
    grads = {n: g.astype(np.float64) for n, g in layer.grads().items()}
    params = layer.params()

    targets = ["x", "router.weight", "experts.w1", "experts.w2"]
    if "shared.gate" in params:
        targets.append("shared.gate")
    checked = 0
    for target in targets:
        base = x if target == "x" else params[target]
        grad = dx if target == "x" else grads[target]
        scale = float(np.sqrt(np.mean(base.astype(np.float64) ** 2)))
        for attempt in range(30):
            v = rng.standard_normal(base.shape)
            h = H * scale

            def at(sign):
                moved = (base.astype(np.float64) + sign * h * v).astype(np.float32)
                if target == "x":
                    return _objective(layer, moved, dy)
                layer.set_param(target, moved)
                try:
                    return _objective(layer, x, dy)
                finally:
                    layer.set_param(target, base)

            fp, ids_p = at(+1)
            fm, ids_m = at(-1)
            if not (np.array_equal(ids_p, base_ids) and np.array_equal(ids_m, base_ids)):
                continue  # a routing decision flipped inside the step: draw another direction
            fd = (fp - fm) / (2 * h)
            an = float(np.sum(grad * v))
            _check_direction("%s d/d%s" % (name, target), fd, an, np.linalg.norm(grad), np.linalg.norm(v))
            checked += 1
            break
        else:
            pytest.fail("%s: every direction on %s flipped a routing decision" % (name, target))
    assert checked == len(targets)
