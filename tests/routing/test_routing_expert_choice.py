"""Expert-choice routing (Zhou et al. 2022) against the PyTorch reference of DESIGN section 4:
S = softmax(L); each expert takes its C = ceil(cf * T * k / E) highest-scoring tokens (ties to the
lower token index) with weight S[t,e]; a token may get 0..E experts. Forward, assignments, counts,
statistics, dx and every gradient."""
import numpy as np
import pytest

import moe_ctypes as M
import routing_ref as RR
from oracle_util import assert_close, make_layer
from routing_util import preset_fields


EC = preset_fields("expert-choice", d_model=16, d_ff=24, seed=2022)

CASES = {
    "preset": (dict(EC), 40),                                     # C = ceil(1 * 40 * 2 / 8) = 10
    "preset_oddT": (dict(EC), 37),                                # C = ceil(9.25) = 10
    "k1_cf1.5_losses": (dict(EC, num_experts=4, top_k=1, capacity_factor=1.5, aux_loss_coef=0.1,
                             z_loss_coef=0.05, importance_loss_coef=0.3, activation=M.ACT_GELU), 37),
    "E6_k2_shared_gate": (dict(EC, num_experts=6, capacity_factor=0.7, importance_loss_coef=0.2,
                               num_shared_experts=1, shared_gate=1), 31),
}


def _lib_run(layer, x, dy):
    layer.zero_grad()
    ctx = layer.context()
    y = layer.forward(x, ctx)
    res = dict(y=y, stats=ctx.stats(), counts=ctx.expert_counts(), assign=ctx.assignments(), ctx=ctx)
    res["dx"] = layer.backward(ctx, dy)
    res["grads"] = layer.grads()
    return res


def _check(layer, x, dy, name):
    cfg = RR.cfg_of(layer)
    out, dx_ref, grads_ref = RR.forward_backward(cfg, layer.params(), x, dy)
    lib = _lib_run(layer, x, dy)
    T, E = x.shape[0], layer.num_experts
    C = out.capacity_eff
    tok, exp, w = lib["assign"]
    got = [(int(t), int(e)) for t, e in zip(tok, exp)]
    want = [(t, e) for t, e, _ in out.assignments]
    assert got == want, name + ": assignments (ordered by expert, then token)"
    assert_close(w, np.array([v for _, _, v in out.assignments]), name + " assignment weights", atol=1e-6)
    np.testing.assert_array_equal(lib["counts"], np.full(E, C))
    st = lib["stats"]
    assert st["num_tokens"] == T
    assert st["num_slots"] == E * C and st["dropped_slots"] == 0, st
    for key, v in (("load_balance_loss", out.lb), ("z_loss", out.z), ("importance_loss", out.importance),
                   ("aux_loss_total", out.aux_total), ("load_cv", out.load_cv),
                   ("max_load_ratio", out.max_load_ratio)):
        v = float(v)
        assert abs(st[key] - v) <= 1e-4 * abs(v) + 1e-6, "%s %s: got %.8g expected %.8g" % (name, key, st[key], v)
    assert_close(lib["y"], out.y.detach().numpy(), name + " y")
    assert_close(lib["dx"], dx_ref, name + " dx")
    assert set(lib["grads"]) == set(grads_ref)
    for n in sorted(grads_ref):
        assert_close(lib["grads"][n], grads_ref[n], name + " grad " + n)
    return out, lib


@pytest.mark.parametrize("name", sorted(CASES))
def test_expert_choice_against_reference(name):
    fields, T = CASES[name]
    layer = make_layer(**fields)
    x = RR.draw_x(layer, T, 500 + T, scale=1.5)
    dy = np.random.default_rng(T + 7).standard_normal(x.shape).astype(np.float32)
    out, lib = _check(layer, x, dy, name)
    per_token = out.mask.sum(1).numpy()
    # What makes it expert choice: tokens get a variable number of experts (the ties test below
    # shows tokens with none).
    assert per_token.max() > per_token.min(), per_token
    assert per_token.sum() == layer.num_experts * out.capacity_eff
    tokens_without = np.setdiff1d(np.arange(T), lib["assign"][0])
    assert np.all(lib["y"][tokens_without] == 0) or layer.cfg.num_shared_experts > 0
    with pytest.raises(M.MoeError) as e:
        lib["ctx"].topk()
    assert e.value.status_name == "MOE_ERR_UNSUPPORTED"
    # Inference and moe_route route alike (no noise), and routing is not a token-choice top-k.
    y_inf = layer.forward(x)
    np.testing.assert_array_equal(y_inf, lib["y"])
    rctx = layer.context()
    layer.route(x, rctx)
    for a, b in zip(rctx.assignments(), lib["assign"]):
        np.testing.assert_array_equal(a, b)


def test_expert_choice_ties_go_to_lower_token():
    """Wr = 0: every score is 1/E, so each expert takes tokens 0..C-1: those get all E experts
    (weight 1/E each), the rest none."""
    E, T, d = 4, 12, 8
    layer = make_layer(**dict(EC, d_model=d, num_experts=E, top_k=1, capacity_factor=1.0))
    layer.set_param("router.weight", np.zeros((E, d), np.float32))
    C = 3  # ceil(1 * 12 * 1 / 4)
    x = np.random.default_rng(3).standard_normal((T, d)).astype(np.float32)
    dy = np.random.default_rng(4).standard_normal((T, d)).astype(np.float32)
    out, lib = _check(layer, x, dy, "ties")
    tok, exp, w = lib["assign"]
    np.testing.assert_array_equal(exp, np.repeat(np.arange(E), C))
    np.testing.assert_array_equal(tok, np.tile(np.arange(C), E))
    np.testing.assert_allclose(w, 1.0 / E, rtol=1e-6)
    assert np.all(lib["y"][C:] == 0)


def test_expert_choice_capacity_above_tokens():
    """cf * T * k / E > T: an expert cannot take more than the T tokens there are; every expert takes
    every token and nothing is dropped (this is the dense mixture)."""
    E, T = 4, 6
    layer = make_layer(**dict(EC, num_experts=E, top_k=2, capacity_factor=3.0))
    x = RR.draw_x(layer, T, 77)
    dy = np.random.default_rng(78).standard_normal(x.shape).astype(np.float32)
    cfg = RR.cfg_of(layer)
    C, Ceff = RR.ec_capacity(cfg, T)
    assert C > T and Ceff == T
    ref, dx_ref, grads_ref = RR.forward_backward(cfg, layer.params(), x, dy)
    layer.zero_grad()
    ctx = layer.context()
    y = layer.forward(x, ctx)
    dx = layer.backward(ctx, dy)
    st = ctx.stats()
    np.testing.assert_array_equal(ctx.expert_counts(), np.full(E, T))
    assert ctx.assignments()[0].size == E * T
    assert_close(y, ref.y.detach().numpy(), "y")
    assert_close(dx, dx_ref, "dx")
    for n, g in layer.grads().items():
        assert_close(g, grads_ref[n], "grad " + n)
    # Statistics: every slot an expert has is filled, none is dropped.
    assert st["dropped_slots"] == 0, "dropped_slots %d with every token taken by every expert (num_slots %d)" % (
        st["dropped_slots"], st["num_slots"])
