"""libmoe (float32) against the PyTorch reference of DESIGN section 4 (float64, autograd):
forward output, routing decisions, counts, statistics, dx and every parameter gradient."""
import zlib

import numpy as np
import pytest
import torch

import moe_ctypes as M
import reference as R
from oracle_util import (assert_close, assert_stats_match, draw_x, make_layer, ref_config, run_library)

BASE = dict(d_model=32, d_ff=64, num_experts=8, top_k=2)

# name -> (config fields, T, extra); extra: "bias" sets a router.bias that changes the selection.
CASES = {
    "T1": (dict(BASE, num_experts=4), 1, {}),
    "oddT_37": (dict(BASE), 37, {}),
    "k1": (dict(BASE, top_k=1), 29, {}),
    "k_eq_E": (dict(BASE, num_experts=4, top_k=4), 21, {}),
    "k_eq_E_unnormalized": (dict(BASE, num_experts=4, top_k=4, normalize_topk=0), 13, {}),
    "T300_capacity_position": (dict(d_model=16, d_ff=32, num_experts=4, top_k=2, capacity_factor=0.9,
                                    z_loss_coef=0.01, importance_loss_coef=0.01), 300, {"drops": True}),
    "dropless_big": (dict(d_model=64, d_ff=96, num_experts=8, top_k=2), 48, {}),
    "capacity_position": (dict(BASE, capacity_factor=0.75, drop_policy=M.DROP_POSITION), 64, {"drops": True}),
    "capacity_probs": (dict(BASE, capacity_factor=0.75, drop_policy=M.DROP_PROBS), 64, {"drops": True}),
    "capacity_probs_k1_raw": (dict(BASE, top_k=1, normalize_topk=0, capacity_factor=1.0,
                                   drop_policy=M.DROP_PROBS), 40, {"drops": True}),
    "capacity_position_k3": (dict(BASE, top_k=3, capacity_factor=0.6, drop_policy=M.DROP_POSITION), 33,
                             {"drops": True}),
    "sigmoid_groups": (dict(BASE, score=M.SCORE_SIGMOID, num_groups=4, topk_groups=2, top_k=3), 37, {}),
    "sigmoid_groups_scaled_unnorm": (dict(BASE, score=M.SCORE_SIGMOID, num_groups=4, topk_groups=2, top_k=3,
                                          routed_scale=2.5, normalize_topk=0), 23, {}),
    "router_bias": (dict(BASE), 37, {"bias": True}),
    "router_bias_sigmoid_groups": (dict(BASE, score=M.SCORE_SIGMOID, num_groups=4, topk_groups=2, top_k=3), 31,
                                   {"bias": True}),
    "routed_scale": (dict(BASE, routed_scale=2.5), 25, {}),
    "normalize_off": (dict(BASE, normalize_topk=0), 25, {}),
    "act_swiglu": (dict(d_model=16, d_ff=32, num_experts=4, top_k=2, activation=M.ACT_SWIGLU), 19, {}),
    "act_geglu": (dict(d_model=16, d_ff=32, num_experts=4, top_k=2, activation=M.ACT_GEGLU), 19, {}),
    "act_relu": (dict(d_model=16, d_ff=32, num_experts=4, top_k=2, activation=M.ACT_RELU), 19, {}),
    "act_gelu": (dict(d_model=16, d_ff=32, num_experts=4, top_k=2, activation=M.ACT_GELU), 19, {}),
    "act_silu": (dict(d_model=16, d_ff=32, num_experts=4, top_k=2, activation=M.ACT_SILU), 19, {}),
    "shared_nogate": (dict(BASE, num_shared_experts=2, d_ff_shared=48), 21, {}),
    "shared_gate": (dict(BASE, num_shared_experts=1, shared_gate=1), 21, {}),
    "shared_gate_relu": (dict(BASE, activation=M.ACT_RELU, num_shared_experts=2, shared_gate=1, d_ff_shared=40),
                         17, {}),
    "z_and_importance": (dict(BASE, aux_loss_coef=0.05, z_loss_coef=0.1, importance_loss_coef=0.2), 33, {}),
    "importance_with_drops": (dict(BASE, aux_loss_coef=0.0, importance_loss_coef=0.3, capacity_factor=0.75,
                                   drop_policy=M.DROP_PROBS), 40, {"drops": True}),
    "everything": (dict(d_model=24, d_ff=40, num_experts=8, top_k=3, activation=M.ACT_GEGLU,
                        score=M.SCORE_SIGMOID, num_groups=4, topk_groups=3, routed_scale=1.7,
                        capacity_factor=0.8, drop_policy=M.DROP_PROBS, aux_loss_coef=0.03, z_loss_coef=0.02,
                        importance_loss_coef=0.05, num_shared_experts=2, shared_gate=1, d_ff_shared=32), 45,
                   {"bias": True, "drops": True}),
}


def _random_bias(layer, seed):
    rng = np.random.default_rng(seed)
    return (0.15 * rng.standard_normal(layer.num_experts)).astype(np.float32)


def _setup(name):
    fields, T, extra = CASES[name]
    seed = zlib.crc32(name.encode()) % 10000  # only picks inputs; any value is a valid case
    layer = make_layer(**fields)
    if extra.get("bias"):
        layer.set_param("router.bias", _random_bias(layer, seed))
    params = layer.params()
    x = draw_x(layer, T, seed, params)
    dy = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32)
    return layer, params, x, dy, extra


@pytest.mark.parametrize("name", sorted(CASES))
def test_against_reference(name):
    layer, params, x, dy, extra = _setup(name)
    T, k = x.shape[0], layer.top_k
    cfg = ref_config(layer)
    out, dx_ref, grads_ref = R.forward_backward(cfg, params, x, dy)
    lib = run_library(layer, x, dy)

    # The case exercises what it says.
    if extra.get("drops"):
        assert out.dropped > 0, "case %s drops nothing in the reference" % name
        # ... and the drop policy decides which slots go: the other policy would keep others.
        other = R.RefConfig.from_struct(layer.cfg)
        other.drop_policy = R.DROP_PROBS if cfg.drop_policy == R.DROP_POSITION else R.DROP_POSITION
        keep_other, _, _ = R.capacity_keep(other, out.topk_ids, out.topk_w)
        assert not torch.equal(keep_other, out.keep), "case %s: both drop policies drop the same slots" % name
    if extra.get("bias"):
        p0 = dict(params)
        p0["router.bias"] = np.zeros_like(params["router.bias"])
        with torch.no_grad():
            out0 = R.forward(cfg, R.to_tensors(p0, requires_grad=False), torch.tensor(x, dtype=torch.float64))
        assert not torch.equal(out0.topk_ids, out.topk_ids), "router.bias does not change the selection"

    # Routing decisions and counts.
    np.testing.assert_array_equal(lib["ids"], out.ids_final.numpy(), err_msg="top-k expert ids (-1 dropped)")
    assert_close(lib["w"], out.w_final.detach().numpy(), "top-k weights (0 dropped)", atol=1e-6)
    assert np.all(lib["w"][lib["ids"] < 0] == 0)
    np.testing.assert_array_equal(lib["counts"], out.counts_kept.numpy(), err_msg="expert counts after capacity")
    assert_stats_match(lib["stats"], out, T, k)

    # Forward and backward.
    assert_close(lib["y"], out.y.detach().numpy(), "y")
    assert_close(lib["dx"], dx_ref, "dx")
    assert set(lib["grads"]) == set(grads_ref), (sorted(lib["grads"]), sorted(grads_ref))
    for n in sorted(grads_ref):
        assert_close(lib["grads"][n], grads_ref[n], "grad " + n)


def test_param_layout_matches_design():
    for fields in (dict(BASE), dict(BASE, activation=M.ACT_RELU, num_shared_experts=3, d_ff_shared=20,
                                    shared_gate=1)):
        layer = make_layer(**fields)
        want = R.param_shapes(ref_config(layer))
        assert layer.param_info() == want
        with pytest.raises(M.MoeError) as e:
            layer.get_grad("router.bias")
        assert e.value.status_name == "MOE_ERR_INVALID_ARGUMENT"


def _grad_case():
    layer = make_layer(**dict(BASE, num_shared_experts=1, shared_gate=1, z_loss_coef=0.01,
                              importance_loss_coef=0.01))
    x = draw_x(layer, 23, 99)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    return layer, x, dy


def test_gradients_accumulate_and_zero_grad():
    layer, x, dy = _grad_case()
    once = run_library(layer, x, dy)
    ctx = once["ctx"]
    layer.backward(ctx, dy)  # second backward on the same context adds again
    twice = layer.grads()
    for n, g in once["grads"].items():
        assert np.any(g != 0), n
        assert_close(twice[n], 2.0 * g, "2x grad " + n, rtol=1e-6, atol=1e-7, elem_rtol=1e-6)
    # A second forward + backward also accumulates.
    ctx2 = layer.context()
    layer.forward(x, ctx2)
    layer.backward(ctx2, dy)
    for n, g in layer.grads().items():
        assert_close(g, 3.0 * once["grads"][n], "3x grad " + n, rtol=1e-6, atol=1e-7, elem_rtol=1e-6)
    layer.zero_grad()
    for n, g in layer.grads().items():
        assert np.all(g == 0), n


@pytest.mark.parametrize("capacity", [0.0, 0.5])
def test_bias_update(capacity):
    u = 0.01
    layer = make_layer(**dict(BASE, bias_update_rate=u, capacity_factor=capacity, drop_policy=M.DROP_POSITION))
    cfg = ref_config(layer)
    T = 40
    x = draw_x(layer, T, 4242)
    for step in range(3):  # the bias of each step is the one the previous step left
        params = layer.params()
        b0 = params["router.bias"]
        with torch.no_grad():
            out = R.forward(cfg, R.to_tensors(params, requires_grad=False), torch.tensor(x, dtype=torch.float64))
        n = out.counts_before.numpy().astype(np.float64)
        ctx = layer.context()
        layer.forward(x, ctx)
        ids, _ = ctx.topk()
        np.testing.assert_array_equal(ids, out.ids_final.numpy())
        if capacity > 0 and step == 0:
            kept = out.counts_kept.numpy()
            assert out.dropped > 0
            assert np.any(np.sign(n.mean() - n) != np.sign(kept.mean() - kept)), \
                "case does not tell counts before capacity from counts after"
        want = (b0 + np.float32(u) * np.sign(n.mean() - n).astype(np.float32)).astype(np.float32)
        got = layer.get_param("router.bias")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7, err_msg="router.bias after step %d" % step)
        assert np.any(got != b0)
    # Inference and routing never update the bias.
    b = layer.get_param("router.bias")
    layer.forward(x)
    layer.route(x, layer.context())
    np.testing.assert_array_equal(layer.get_param("router.bias"), b)


@pytest.mark.parametrize("name", ["oddT_37", "capacity_probs", "sigmoid_groups", "shared_gate", "everything"])
def test_inference_equals_training(name):
    layer, params, x, dy, _ = _setup(name)
    y_inf = layer.forward(x)
    ctx = layer.context()
    y_train = layer.forward(x, ctx)
    np.testing.assert_array_equal(y_inf, y_train)
    # moe_route fills the routing of the forward.
    ids, w = ctx.topk()
    rctx = layer.context()
    layer.route(x, rctx)
    rids, rw = rctx.topk()
    np.testing.assert_array_equal(rids, ids)
    np.testing.assert_array_equal(rw, w)
    np.testing.assert_array_equal(rctx.expert_counts(), ctx.expert_counts())
    assert rctx.stats() == ctx.stats()
    with pytest.raises(M.MoeError) as e:
        layer.backward(rctx, dy)
    assert e.value.status_name == "MOE_ERR_STATE"


@pytest.mark.parametrize("name", ["capacity_position", "capacity_probs", "everything"])
def test_assignments_match_topk(name):
    layer, params, x, dy, _ = _setup(name)
    ctx = layer.context()
    layer.forward(x, ctx)
    ids, w = ctx.topk()
    tok, exp, wt = ctx.assignments()
    want = sorted((int(ids[t, j]), t, float(w[t, j])) for t in range(ids.shape[0]) for j in range(ids.shape[1])
                  if ids[t, j] >= 0)
    got = [(int(e), int(t), float(v)) for t, e, v in zip(tok, exp, wt)]
    assert got == want  # ordered by expert then token
    np.testing.assert_array_equal(np.bincount(exp, minlength=layer.num_experts), ctx.expert_counts())


@pytest.mark.parametrize("name", ["oddT_37", "everything"])
def test_bitwise_determinism(name):
    fields, T, extra = CASES[name]
    results = []
    for _ in range(2):
        layer = make_layer(**fields)
        if extra.get("bias"):
            layer.set_param("router.bias", _random_bias(layer, 17))
        x = draw_x(layer, T, 321)
        dy = np.random.default_rng(322).standard_normal(x.shape).astype(np.float32)
        r = run_library(layer, x, dy)
        results.append((layer.params(), r))
    (p0, a), (p1, b) = results
    for n in p0:
        assert p0[n].tobytes() == p1[n].tobytes(), "initial " + n
    assert a["y"].tobytes() == b["y"].tobytes()
    assert a["dx"].tobytes() == b["dx"].tobytes()
    for n in a["grads"]:
        assert a["grads"][n].tobytes() == b["grads"][n].tobytes(), n
    assert a["stats"] == b["stats"]


def test_config_abi_roundtrip():
    """The ctypes mirror of moe_config is field-for-field right: sizes agree (moe_ctypes asserts
    it), a preset reads back as the header documents it, and unusual values in every field come
    back unchanged from moe_layer_get_config."""
    cfg = M.default_config()
    assert cfg.num_experts == 8 and cfg.top_k == 2 and cfg.normalize_topk == 1 and cfg.routed_scale == 1.0
    assert cfg.num_groups == 1 and cfg.topk_groups == 1 and abs(cfg.aux_loss_coef - 0.01) < 1e-9
    assert abs(cfg.noise_eps - 0.01) < 1e-9 and cfg.comm is None
    M._call("moe_config_preset", M.C.byref(cfg), b"deepseek-v3")
    assert (cfg.num_experts, cfg.top_k, cfg.score, cfg.num_groups, cfg.topk_groups, cfg.num_shared_experts) == \
        (256, 8, M.SCORE_SIGMOID, 8, 4, 1)
    assert abs(cfg.routed_scale - 2.5) < 1e-7 and abs(cfg.bias_update_rate - 0.001) < 1e-9
    fields = dict(d_model=12, d_ff=20, num_experts=6, top_k=3, activation=M.ACT_GEGLU, score=M.SCORE_SIGMOID,
                  normalize_topk=0, routed_scale=1.75, num_groups=3, topk_groups=2, capacity_factor=1.5,
                  drop_policy=M.DROP_PROBS, noise_eps=0.125, aux_loss_coef=0.25, z_loss_coef=0.375,
                  importance_loss_coef=0.5, bias_update_rate=0.0625, num_shared_experts=2, d_ff_shared=28,
                  shared_gate=1, seed=0x123456789ABCDEF, check_finite=1)
    layer = M.Layer(**fields)
    got = layer.get_config()
    assert got.struct_size == M.C.sizeof(M.moe_config)
    for k, v in fields.items():
        assert getattr(got, k) == v, (k, getattr(got, k), v)
    with pytest.raises(M.MoeError) as e:
        M.Layer(**dict(fields, top_k=7))
    assert e.value.status_name == "MOE_ERR_INVALID_ARGUMENT" and "top_k" in e.value.message
