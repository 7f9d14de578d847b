"""bfloat16 / float16 layers against the float64 PyTorch reference (moe_reference.py), through
libmoe.Layer and libmoe.torch.MoE: forward, dx and every parameter gradient, computed by the
reference from exactly what the layer holds (its rounded parameters, x and dy rounded to the
layer's dtype). The layer accumulates in float32 and rounds what it stores, so the comparison is
relative to each tensor's largest magnitude: 1e-2 for bfloat16 (8-bit significand), 2e-3 for
float16 (11-bit)."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import libmoe
import libmoe.torch as lt
import moe_reference as ref

TOL = {"bfloat16": 1e-2, "float16": 2e-3}
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MARGIN = 1e-4  # routing gaps (score units) below this could be decided differently in float32

BASE = dict(d_model=32, d_ff=64, num_experts=8)
CASES = {
    "mixtral_like": dict(BASE, top_k=2, activation="swiglu", aux_loss_coef=0.02, z_loss_coef=1e-3),
    "deepseek_like": dict(BASE, top_k=3, score="sigmoid", num_groups=4, topk_groups=2, routed_scale=2.5,
                          num_shared_experts=1, shared_gate=True, aux_loss_coef=1e-3),
    "switch_like_drops": dict(BASE, top_k=1, activation="relu", capacity_factor=1.0, drop_policy="position",
                              aux_loss_coef=0.01, z_loss_coef=1e-3),
    "gelu_shared": dict(BASE, top_k=2, activation="gelu", normalize_topk=False, num_shared_experts=2,
                        d_ff_shared=48, importance_loss_coef=0.01),
}


def rounded(a, dtype):
    """float32 numpy a rounded to dtype by torch (round to nearest even), as float32."""
    return torch.from_numpy(a).to(TORCH[dtype]).float().numpy()


def assert_scaled_close(got, want, tol, name):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{name}: not finite"
    scale = np.abs(want).max()
    assert scale > 0, f"{name}: the reference is all zeros; the case tests nothing"
    err = np.abs(got - want).max()
    i = np.unravel_index(np.argmax(np.abs(got - want)), got.shape)
    assert err <= tol * scale, (f"{name}: max error {err:.3g} = {err / scale:.3g} x max|want| ({scale:.3g}), "
                                f"limit {tol}; worst at {i}: got {got[i]:.6g}, want {want[i]:.6g}")


def routing(layer, x):
    """Reference top-k ids (before capacity) of float32 x, and the smallest gap that decided them."""
    cfg = layer.config
    p = ref.params_from_layer(layer)
    E, k = cfg["num_experts"], cfg["top_k"]
    with torch.no_grad():
        L = torch.from_numpy(x).double() @ p["router.weight"].T
        S = torch.softmax(L, -1) if cfg["score"] == "softmax" else torch.sigmoid(L)
        sel = S + p["router.bias"]
        margin = math.inf
        G, keep = cfg["num_groups"], cfg["topk_groups"]
        if G > 1:
            gscore = sel.view(-1, G, E // G).topk(min(2, E // G), -1).values.sum(-1)
            srt = gscore.sort(-1, descending=True).values
            if keep < G:
                margin = float((srt[:, keep - 1] - srt[:, keep]).min())
            kept = torch.zeros_like(gscore, dtype=torch.bool).scatter(1, gscore.topk(keep, -1).indices, True)
            sel = sel.masked_fill(~kept.repeat_interleave(E // G, 1), -math.inf)
        srt, ids = sel.sort(-1, descending=True)
        gaps = (srt[:, :k] - srt[:, 1:k + 1]).flatten()
        gaps = gaps[torch.isfinite(gaps)]
        if gaps.numel():
            margin = min(margin, float(gaps.min()))
    return ids[:, :k].numpy(), margin


def well_routed_x(layer, T, seed):
    """Random x (never zeros), rounded to the layer's dtype, whose routing has every gap above MARGIN."""
    for i in range(50):
        rng = np.random.default_rng(seed + 1009 * i)
        x = rounded(rng.standard_normal((T, layer.d_model)).astype(np.float32), layer.dtype)
        if routing(layer, x)[1] > MARGIN:
            return x
    raise AssertionError("no well-conditioned input in 50 draws")


def make_layer(case, dtype):
    cfg = CASES[case]
    layer = libmoe.Layer(**cfg, dtype=dtype, seed=sum(map(ord, case)))
    rng = np.random.default_rng(len(case))
    E, d = cfg["num_experts"], cfg["d_model"]
    layer.set_param("router.weight", (0.5 * rng.standard_normal((E, d))).astype(np.float32))  # spread the routing
    if cfg.get("score") == "sigmoid":
        layer.set_param("router.bias", (0.1 * rng.standard_normal(E)).astype(np.float32))
    return layer


# ---- libmoe.Layer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(TOL))
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_reference(case, dtype):
    layer = make_layer(case, dtype)
    T = 64
    x = well_routed_x(layer, T, seed=3)
    dy = rounded(np.random.default_rng(4).standard_normal((T, layer.d_model)).astype(np.float32), dtype)
    ctx = layer.context()
    y = layer.forward(x, ctx)
    dx = layer.backward(ctx, dy)
    stats = ctx.stats()

    ids, _ = routing(layer, x)
    lib_ids, _ = ctx.topk()
    kept = lib_ids >= 0
    np.testing.assert_array_equal(lib_ids[kept], ids[kept], err_msg="routing")
    assert stats["dropped_slots"] == int((~kept).sum())
    if "drops" in case:
        assert stats["dropped_slots"] > 0  # the case really drops

    ry, raux, rdx, rgrads = ref.forward_backward(layer, x, dy)  # from the layer's rounded parameters
    tol = TOL[dtype]
    assert_scaled_close(y, ry.numpy(), tol, "y")
    assert_scaled_close(dx, rdx.numpy(), tol, "dx")
    for name in ("load_balance_loss", "z_loss", "importance_loss", "aux_loss_total"):
        assert stats[name] == pytest.approx(raux[name], rel=1e-4, abs=1e-6), name  # the router is float32
    trainable = {n for n, i in layer.param_info().items() if i.trainable}
    assert set(rgrads) == trainable
    for name, g in rgrads.items():
        assert_scaled_close(layer.get_grad(name), g.numpy(), tol, name)


def test_bfloat16_rounding_matches_torch():
    x = np.random.default_rng(5).standard_normal(10000).astype(np.float32) * np.float32(1e3)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(libmoe.to_bfloat16_bits(x), want)


@pytest.mark.parametrize("dtype", sorted(TOL))
def test_low_precision_layer_is_close_to_float32(dtype):
    """The same (rounded) parameters and x in a float32 layer: y differs by the dtype's rounding only."""
    cfg = dict(CASES["mixtral_like"], seed=21)
    low = libmoe.Layer(**cfg, dtype=dtype)
    full = libmoe.Layer(**cfg)
    rng = np.random.default_rng(6)
    low.set_param("router.weight", (0.5 * rng.standard_normal((8, 32))).astype(np.float32))
    full.load_state_dict(low.state_dict())
    for name in low.param_names:
        np.testing.assert_array_equal(full.get_param(name), low.get_param(name))
    x = well_routed_x(low, 48, seed=8)
    y_low, y_full = low.forward(x), full.forward(x)
    np.testing.assert_array_equal(low.route(x).topk()[0], full.route(x).topk()[0])
    assert_scaled_close(y_low, y_full, TOL[dtype], "y")
    assert not np.array_equal(y_low, y_full)  # the low-precision layer really rounds


# ---- libmoe.torch.MoE ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(TOL))
def test_module_dtypes_and_reference(dtype):
    tdt = TORCH[dtype]
    torch.manual_seed(0)
    moe = lt.MoE(16, 32, 4, 2, dtype=tdt, seed=3, z_loss_coef=1e-3, num_shared_experts=1, shared_gate=True)
    assert moe.layer.dtype == dtype
    for name, t in list(moe.named_parameters()) + list(moe.named_buffers()):
        want = tdt if moe.layer.param_dtype(name) == dtype else torch.float32
        assert t.dtype == want, name
        assert (want == torch.float32) == (name.startswith("router.") or name == "shared.gate"), name
        assert t.data_ptr() == moe.layer.buffer_addresses(name)[0] and t.is_contiguous(), name
        np.testing.assert_array_equal(t.detach().float().numpy(), moe.layer.get_param(name), err_msg=name)
    with torch.no_grad():
        moe.experts.w2[1, 2, 3] = 0.375
    assert moe.layer.get_param("experts.w2")[1, 2, 3] == 0.375

    x = torch.randn(3, 9, 16).to(tdt).requires_grad_()
    dy = torch.randn(3, 9, 16).to(tdt)
    y = moe(x)
    assert y.dtype == tdt and y.shape == x.shape and moe.aux_loss.dtype == torch.float32
    y.backward(dy)
    assert x.grad.dtype == tdt
    for name, p in moe.named_parameters():
        assert p.grad.dtype == p.dtype, name
    # the numpy Layer gives the same values
    x2 = x.detach().reshape(-1, 16).float().numpy()
    np.testing.assert_array_equal(moe.layer.forward(x2), y.detach().reshape(-1, 16).float().numpy())

    p = ref.params_from_layer(moe.layer)
    xr = x.detach().double().reshape(-1, 16).requires_grad_()
    ry, aux = ref.forward(p, xr, moe.layer.config)
    ((ry * dy.double().reshape(ry.shape)).sum() + aux["aux_loss_total"]).backward()
    tol = TOL[dtype]
    assert_scaled_close(y.detach().float().reshape(ry.shape), ry.detach(), tol, "y")
    assert_scaled_close(x.grad.float().reshape(xr.shape), xr.grad, tol, "dx")
    for name, param in moe.named_parameters():
        assert_scaled_close(param.grad.float(), p[name].grad, tol, name)


def test_module_bfloat16_trains_with_sgd():
    torch.manual_seed(0)
    moe = lt.MoE(16, 32, 4, 2, dtype=torch.bfloat16, seed=4)
    x = torch.randn(64, 16).to(torch.bfloat16)
    target = (torch.tanh(x.float() @ torch.randn(16, 16)) * 0.5).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in moe.named_parameters()}
    opt = torch.optim.SGD(moe.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (moe(x).float() - target.float()).pow(2).sum(-1).mean()
        losses.append(loss.item())
        loss.backward()
        for name, p in moe.named_parameters():
            assert p.grad.dtype == p.dtype, name
        opt.step()
    assert losses[-1] < 0.6 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses
    for name, p in moe.named_parameters():
        assert p.data_ptr() == ptrs[name] == moe.layer.buffer_addresses(name)[0], name  # updated in place
        assert not torch.equal(p.detach(), before[name]), name
        assert p.dtype == (torch.float32 if name.startswith("router.") else torch.bfloat16), name
        np.testing.assert_array_equal(moe.layer.get_param(name), p.detach().float().numpy(), err_msg=name)


@pytest.mark.parametrize("dtype", sorted(TOL))
def test_module_state_dict_copies_and_conversions(dtype):
    tdt = TORCH[dtype]
    torch.manual_seed(1)
    moe = lt.MoE(16, 32, 4, 2, dtype=tdt, seed=5)
    x = torch.randn(10, 16).to(tdt)
    with torch.no_grad():
        y = moe(x)
    state = moe.state_dict()
    assert state["experts.w1"].dtype == tdt and state["router.weight"].dtype == torch.float32
    fresh = lt.MoE(16, 32, 4, 2, dtype=tdt, seed=6)
    with torch.no_grad():
        assert not torch.equal(fresh(x), y)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    assert fresh.experts.w1.data_ptr() == fresh.layer.buffer_addresses("experts.w1")[0]

    twin = copy.deepcopy(moe)
    assert twin.experts.w1.dtype == tdt and twin.experts.w1.data_ptr() == twin.layer.buffer_addresses("experts.w1")[0]
    buf = io.BytesIO()
    torch.save(moe, buf)
    buf.seek(0)
    try:
        loaded = torch.load(buf, weights_only=False)  # torch >= 2.6 defaults to weights only
    except TypeError:
        loaded = torch.load(buf)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)

    # the module's own dtype is accepted (a model converted as a whole); any other is refused
    w = moe.experts.w1
    model = nn.Sequential(nn.Linear(16, 16), moe).to(tdt)
    assert model[0].weight.dtype == tdt and moe.experts.w1 is w and w.dtype == tdt
    assert moe.router.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(moe(x), y, rtol=0, atol=0)
    for convert in (lambda m: m.float(), lambda m: m.double(), lambda m: m.half() if tdt == torch.bfloat16
                    else m.bfloat16()):
        with pytest.raises(TypeError, match=f"keeps {dtype} expert parameters and float32 router parameters"):
            convert(moe)
    assert moe.experts.w1 is w and w.dtype == tdt
