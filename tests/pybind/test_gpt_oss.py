"""gpt-oss's pieces in libmoe.Layer against the PyTorch reference (moe_reference.py): the router's
trainable logit bias (router_logit_bias), expert biases (expert_bias) and the clamped SwiGLU
(activation "swiglu_clamped"), forward and every gradient (the new parameters' included), in
float32 and in bfloat16/float16; softmax over the k largest logits equals libmoe's normalised
softmax top-k; the "gpt-oss" checkpoint family's layout; bad values of the new fields."""

import math
import os
import sys

import numpy as np
import pytest
import torch

import libmoe
import moe_reference as ref
from conftest import randn
from test_lowp_reference import TOL, assert_scaled_close, rounded
from test_reference import check_against_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import safetensors_np as ST  # noqa: E402  (numpy writer of safetensors files, shared with tests/python)

CASES = {
    "logit_bias": dict(router_logit_bias=True),
    "logit_bias_z_capacity": dict(router_logit_bias=True, z_loss_coef=1e-2, capacity_factor=0.75),
    "logit_bias_sigmoid_importance": dict(router_logit_bias=True, score="sigmoid", importance_loss_coef=0.01),
    "expert_bias_geglu": dict(expert_bias=True, activation="geglu"),
    "expert_bias_relu": dict(expert_bias=True, activation="relu", top_k=1, normalize_topk=False),
    "swiglu_clamped": dict(activation="swiglu_clamped", swiglu_limit=0.6, swiglu_alpha=1.3),
    "gpt_oss_like": dict(activation="swiglu_clamped", router_logit_bias=True, expert_bias=True, swiglu_limit=0.6),
    "gpt_oss_shared": dict(activation="swiglu_clamped", expert_bias=True, swiglu_limit=0.6, num_shared_experts=1),
}


def randomize_biases(layer, rng, scale=0.5):
    """Random values (never zeros) in every bias the layer has; returns their names."""
    names = [n for n in layer.param_info() if n in ("router.logit_bias", "experts.b1", "experts.b3", "experts.b2")]
    for n in names:
        layer.set_param(n, (scale * rng.standard_normal(layer.param_info()[n].shape)).astype(np.float32))
    return names


def clamp_hits(layer, x):
    """(gate values above the limit, up values below -limit, above +limit, inside) over the routed rows
    of the reference: the case must reach every branch of the clamps."""
    cfg = layer.config
    p = ref.params_from_layer(layer)
    lim = cfg["swiglu_limit"]
    xt = torch.from_numpy(x).double()
    hits = np.zeros(4, dtype=np.int64)
    with torch.no_grad():
        for e in range(cfg["num_experts"]):
            h = xt @ p["experts.w1"][e].T + (p["experts.b1"][e] if "experts.b1" in p else 0)
            u = xt @ p["experts.w3"][e].T + (p["experts.b3"][e] if "experts.b3" in p else 0)
            hits += [int((h > lim).sum()), int((u < -lim).sum()), int((u > lim).sum()), int((u.abs() < lim).sum())]
    return hits


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case, rng):
    cfg = dict(d_model=16, d_ff=32, num_experts=6, top_k=2, seed=13)
    cfg.update(CASES[case])
    layer = libmoe.Layer(**cfg)
    layer.set_param("router.weight", randn(rng, cfg["num_experts"], 16))
    names = randomize_biases(layer, rng)
    assert len(names) == int(cfg.get("router_logit_bias", False)) + (
        (3 if cfg.get("activation", "swiglu") != "relu" else 2) if cfg.get("expert_bias") else 0)
    x, dy = randn(rng, 41, 16), randn(rng, 41, 16)
    if cfg.get("activation") == "swiglu_clamped":
        assert (clamp_hits(layer, x) > 0).all(), clamp_hits(layer, x)
    stats = check_against_reference(layer, x, dy)
    for n in names:  # the new parameters' gradients are there and not zero
        assert np.abs(layer.get_grad(n)).max() > 0, n
    if "capacity" in case:
        assert stats["dropped_slots"] > 0


def test_logit_bias_changes_routing_and_weights(rng):
    # Unlike router.bias (selection only), the logit bias enters the scores, hence the weights.
    layer = libmoe.Layer(d_model=16, d_ff=16, num_experts=4, top_k=1, normalize_topk=False, router_logit_bias=True,
                         seed=5)
    assert layer.param_info()["router.logit_bias"].trainable
    np.testing.assert_array_equal(layer.get_param("router.logit_bias"), np.zeros(4, np.float32))  # starts at zero
    x = randn(rng, 20, 16)
    layer.set_param("router.logit_bias", np.array([0.0, 0.0, 0.0, 8.0], np.float32))
    ids, w = layer.route(x).topk()
    assert (ids == 3).all() and (w > 0.9).all()


def test_softmax_over_topk_logits_is_normalised_topk(rng):
    # gpt-oss: top-k on the logits, softmax over the k; libmoe: softmax, top-k, normalise: the same.
    layer = libmoe.Layer.from_preset("gpt-oss", d_model=16, d_ff=8, num_experts=8, top_k=4)
    layer.set_param("router.weight", randn(rng, 8, 16))
    randomize_biases(layer, rng)
    x = randn(rng, 30, 16)
    ids, w = layer.route(x).topk()
    L = torch.from_numpy(x).double() @ torch.from_numpy(layer.get_param("router.weight")).double().T
    L = L + torch.from_numpy(layer.get_param("router.logit_bias")).double()
    top = L.topk(4, dim=-1)
    np.testing.assert_array_equal(ids, top.indices.numpy())
    np.testing.assert_allclose(w, torch.softmax(top.values, -1).numpy(), rtol=1e-5, atol=1e-6)


def test_preset():
    cfg = libmoe.Layer.from_preset("gpt-oss", d_model=8, d_ff=8).config
    assert (cfg["num_experts"], cfg["top_k"], cfg["activation"]) == (32, 4, "swiglu_clamped")
    assert cfg["router_logit_bias"] and cfg["expert_bias"] and cfg["normalize_topk"]
    assert cfg["swiglu_alpha"] == pytest.approx(1.702) and cfg["swiglu_limit"] == 7.0
    assert cfg["aux_loss_coef"] == pytest.approx(0.9) and cfg["capacity_factor"] == 0


@pytest.mark.parametrize("field, value", [("swiglu_limit", 0.0), ("swiglu_limit", -1.0), ("swiglu_alpha", 0.0),
                                          ("swiglu_alpha", -2.0)])
def test_bad_values_are_refused(field, value):
    with pytest.raises(libmoe.InvalidArgumentError, match=field):
        libmoe.Layer(d_model=8, d_ff=8, activation="swiglu_clamped", **{field: value})


def clean_tokens(layer, T, dtype, seed, kink=0.02):
    """T random tokens (rounded to dtype) whose routing is decided by a wide gap and whose routed
    pre-activations stay kink * limit away from the clamps' kinks: stored in 16 bits, a value that
    close could land on the other side, and its gradient differ by the whole step (as a routing
    decision could)."""
    cfg = layer.config
    p = ref.params_from_layer(layer)
    lim, k = cfg["swiglu_limit"], cfg["top_k"]
    rng = np.random.default_rng(seed)
    keep = []
    while len(keep) < T:
        x = rounded(rng.standard_normal((256, layer.d_model)).astype(np.float32), dtype)
        xt = torch.from_numpy(x).double()
        with torch.no_grad():
            srt, ids = ref.router_logits(p, xt).softmax(-1).sort(-1, descending=True)
            for t in range(len(x)):
                if float(srt[t, k - 1] - srt[t, k]) < 1e-4:
                    continue
                near = False
                for e in ids[t, :k].tolist():
                    h = xt[t] @ p["experts.w1"][e].T + p["experts.b1"][e]
                    u = xt[t] @ p["experts.w3"][e].T + p["experts.b3"][e]
                    near |= bool(((h - lim).abs() < kink * lim).any() or ((u.abs() - lim).abs() < kink * lim).any())
                if not near:
                    keep.append(x[t])
    return np.stack(keep[:T])


@pytest.mark.parametrize("dtype", sorted(TOL))
def test_low_precision_matches_reference(dtype):
    rng = np.random.default_rng(21)
    E, d, ff, T = 8, 32, 16, 64
    layer = libmoe.Layer.from_preset("gpt-oss", d_model=d, d_ff=ff, num_experts=E, top_k=2, swiglu_limit=0.8,
                                     aux_loss_coef=0.02, z_loss_coef=1e-3, dtype=dtype, seed=3)
    layer.set_param("router.weight", (0.5 * rng.standard_normal((E, d))).astype(np.float32))
    randomize_biases(layer, rng)
    x = clean_tokens(layer, T, dtype, seed=100)
    assert (clamp_hits(layer, x) > 0).all()
    dy = rounded(rng.standard_normal((T, d)).astype(np.float32), dtype)
    ctx = layer.context()
    y = layer.forward(x, ctx)
    dx = layer.backward(ctx, dy)
    ry, raux, rdx, rgrads = ref.forward_backward(layer, x, dy)
    tol = TOL[dtype]
    assert_scaled_close(y, ry.numpy(), tol, "y")
    assert_scaled_close(dx, rdx.numpy(), tol, "dx")
    assert ctx.stats()["aux_loss_total"] == pytest.approx(raux["aux_loss_total"], rel=1e-4, abs=1e-6)
    assert set(rgrads) == {n for n, i in layer.param_info().items() if i.trainable}
    for name, g in rgrads.items():
        assert_scaled_close(layer.get_grad(name), g.numpy(), tol, name)


def gpt_oss_tensors(rng, E, d, ff):
    """A gpt-oss MLP block's tensors in transformers' layout (GptOssTopKRouter, GptOssExperts)."""
    return {"router.weight": randn(rng, E, d), "router.bias": randn(rng, E),
            "experts.gate_up_proj": randn(rng, E, d, 2 * ff), "experts.gate_up_proj_bias": randn(rng, E, 2 * ff),
            "experts.down_proj": randn(rng, E, ff, d), "experts.down_proj_bias": randn(rng, E, d)}


@pytest.mark.parametrize("file_dtype", ["F32", "BF16"])
def test_gpt_oss_checkpoint_layout(tmp_path, file_dtype):
    rng = np.random.default_rng(9)
    E, d, ff = 4, 12, 10
    t = gpt_oss_tensors(rng, E, d, ff)
    ST.write(str(tmp_path / "model.safetensors"), {"model.layers.1.mlp." + k: (file_dtype, v) for k, v in t.items()})
    stored = {k: (ST.bf16_round(v) if file_dtype == "BF16" else v) for k, v in t.items()}
    layer = libmoe.Layer.from_preset("gpt-oss", d_model=d, d_ff=ff, num_experts=E, top_k=2)
    layer.load(tmp_path, "model.layers.1.mlp", "gpt-oss")
    gu, gub = stored["experts.gate_up_proj"], stored["experts.gate_up_proj_bias"]
    want = {"router.weight": stored["router.weight"], "router.logit_bias": stored["router.bias"],
            "router.bias": np.zeros(E, np.float32),
            "experts.w1": gu[:, :, 0::2].transpose(0, 2, 1), "experts.w3": gu[:, :, 1::2].transpose(0, 2, 1),
            "experts.w2": stored["experts.down_proj"].transpose(0, 2, 1),
            "experts.b1": gub[:, 0::2], "experts.b3": gub[:, 1::2], "experts.b2": stored["experts.down_proj_bias"]}
    assert set(want) == set(layer.param_info())
    for name, v in want.items():
        np.testing.assert_array_equal(layer.get_param(name), v, err_msg=name)

    # A layer that is not gpt-oss's is refused, naming what differs, and left unchanged.
    plain = libmoe.Layer(d_model=d, d_ff=ff, num_experts=E, top_k=2)
    with pytest.raises(libmoe.InvalidArgumentError, match="SWIGLU_CLAMPED"):
        plain.load(tmp_path, "model.layers.1.mlp", "gpt-oss")
    nobias = libmoe.Layer(d_model=d, d_ff=ff, num_experts=E, top_k=2, activation="swiglu_clamped")
    before = nobias.state_dict()
    with pytest.raises(libmoe.InvalidArgumentError, match="router.bias|_bias"):
        nobias.load(tmp_path, "model.layers.1.mlp", "gpt-oss")
    for name, v in before.items():
        np.testing.assert_array_equal(nobias.get_param(name), v, err_msg=name)
    # libmoe's own names round-trip the new parameters bit for bit.
    layer.save(tmp_path / "own.safetensors")
    again = libmoe.Layer.from_preset("gpt-oss", d_model=d, d_ff=ff, num_experts=E, top_k=2, seed=99)
    again.load(tmp_path / "own.safetensors")
    for name in want:
        np.testing.assert_array_equal(again.get_param(name), layer.get_param(name), err_msg=name)


E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def mxfp4(rng, *rows_shape, cols):
    """Random MXFP4 blocks [..., cols/32, 16] and scales [..., cols/32] (e8m0 near 2^0), and their
    values [..., cols] by the OCP Microscaling spec: e2m1 codes, the low nibble first."""
    blocks = rng.integers(0, 256, size=(*rows_shape, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(124, 130, size=(*rows_shape, cols // 32), dtype=np.uint8)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*rows_shape, cols // 32, 32)
    values = E2M1[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return blocks, scales, values.reshape(*rows_shape, cols).astype(np.float32)


def test_gpt_oss_mxfp4_checkpoint(tmp_path):
    # As openai/gpt-oss-20b is published: MXFP4 expert weights in nn.Linear layout, bf16 biases.
    rng = np.random.default_rng(17)
    E, d, ff = 4, 64, 32
    gu_b, gu_s, gu = mxfp4(rng, E, 2 * ff, cols=d)
    dn_b, dn_s, dn = mxfp4(rng, E, d, cols=ff)
    p = "model.layers.5.mlp."
    t = {p + "router.weight": ("BF16", randn(rng, E, d)), p + "router.bias": ("BF16", randn(rng, E)),
         p + "experts.gate_up_proj_blocks": ("U8", gu_b), p + "experts.gate_up_proj_scales": ("U8", gu_s),
         p + "experts.gate_up_proj_bias": ("BF16", randn(rng, E, 2 * ff)),
         p + "experts.down_proj_blocks": ("U8", dn_b), p + "experts.down_proj_scales": ("U8", dn_s),
         p + "experts.down_proj_bias": ("BF16", randn(rng, E, d))}
    ST.write(str(tmp_path / "model.safetensors"), t)
    for dtype in ("float32", "bfloat16"):
        layer = libmoe.Layer.from_preset("gpt-oss", d_model=d, d_ff=ff, num_experts=E, top_k=2, dtype=dtype)
        layer.load(tmp_path, "model.layers.5.mlp", "gpt-oss")
        # e2m1 times a power of two: exact in bfloat16 as in float32.
        np.testing.assert_array_equal(layer.get_param("experts.w1"), gu[:, 0::2, :])
        np.testing.assert_array_equal(layer.get_param("experts.w3"), gu[:, 1::2, :])
        np.testing.assert_array_equal(layer.get_param("experts.w2"), dn)
        b3 = ST.bf16_round(t[p + "experts.gate_up_proj_bias"][1])[:, 1::2]
        np.testing.assert_array_equal(layer.get_param("experts.b3"), b3)
        np.testing.assert_array_equal(layer.get_param("router.logit_bias"), ST.bf16_round(t[p + "router.bias"][1]))
    # A scale tensor of the wrong shape is refused, naming it.
    t[p + "experts.down_proj_scales"] = ("U8", dn_s[:, :, :0])
    ST.write(str(tmp_path / "bad.safetensors"), t)
    with pytest.raises(libmoe.InvalidArgumentError, match="down_proj_scales"):
        layer.load(tmp_path / "bad.safetensors", "model.layers.5.mlp", "gpt-oss")


def test_switch_router_bias_maps_to_logit_bias(tmp_path):
    rng = np.random.default_rng(4)
    E, d, ff = 4, 8, 6
    t = {"router.classifier.weight": randn(rng, E, d), "router.classifier.bias": randn(rng, E)}
    for e in range(E):
        t[f"experts.expert_{e}.wi.weight"] = randn(rng, ff, d)
        t[f"experts.expert_{e}.wo.weight"] = randn(rng, d, ff)
    ST.write(str(tmp_path / "model.safetensors"), {k: ("F32", v) for k, v in t.items()})
    layer = libmoe.Layer.from_preset("switch", d_model=d, d_ff=ff, num_experts=E, router_logit_bias=True)
    layer.load(tmp_path, None, "switch")
    np.testing.assert_array_equal(layer.get_param("router.logit_bias"), t["router.classifier.bias"])
    with pytest.raises(libmoe.InvalidArgumentError, match="router.classifier.bias"):  # no place without the field
        libmoe.Layer.from_preset("switch", d_model=d, d_ff=ff, num_experts=E).load(tmp_path, None, "switch")
    assert math.isfinite(float(layer.forward(randn(rng, 5, d)).sum()))


def test_torch_module_trains_the_new_parameters(rng):
    import libmoe.torch as lt
    m = lt.MoE(d_model=16, d_ff=32, preset="gpt-oss", num_experts=4, top_k=2, swiglu_limit=0.6)
    names = {n for n, _ in m.named_parameters()}
    assert {"router.logit_bias", "experts.b1", "experts.b3", "experts.b2"} <= names
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "b" in n.split(".")[1]:
                p.copy_(torch.from_numpy(randn(rng, *p.shape)) * 0.5)
    x = torch.from_numpy(randn(rng, 20, 16)).requires_grad_(True)
    dy = torch.from_numpy(randn(rng, 20, 16))
    (m(x) * dy).sum().backward()
    layer = m._layer
    ry, _, rdx, rgrads = ref.forward_backward(layer, x.detach().numpy(), dy.numpy())
    # aux_loss="add" (the default): the objective is sum(y * dy) + aux_loss_total, as the reference's.
    np.testing.assert_allclose(x.grad.numpy(), rdx.numpy(), rtol=2e-5, atol=2e-6)
    params = dict(m.named_parameters())
    assert set(rgrads) == set(params)
    for n, g in rgrads.items():
        np.testing.assert_allclose(params[n].grad.numpy(), g.numpy(), rtol=2e-5, atol=2e-6, err_msg=n)
