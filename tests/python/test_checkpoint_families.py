"""moe_layer_load with each model family's checkpoint naming and layout, written here with numpy in
the names and shapes of transformers' modelling code (4.x per-expert nn.Linear modules and 5.x fused
experts), against a PyTorch oracle of that family's block computed from the checkpoint tensors as
the family computes them (routing from reference.py; experts, fused halves and the one wide shared
expert taken straight from the checkpoint tensors)."""
import ctypes as C
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moe_ctypes as M
import reference as R
import safetensors_np as ST
from oracle_util import assert_close, draw_x, make_layer

D, FF = 16, 12


# name -> layer config (the family's routing, cut to test size), the block's prefix, and its keys.
FAMILIES = {
    "mixtral": dict(cfg=dict(num_experts=8, top_k=2), preset="mixtral", over={}, prefix="model.layers.1.block_sparse_moe",
                    router="gate.weight", proj=("w1", "w3", "w2"), expert="experts.%d."),
    "qwen2-moe": dict(cfg=dict(num_experts=8, top_k=2, normalize_topk=0, num_shared_experts=4, shared_gate=1),
                      preset="qwen2-moe", over=dict(num_experts=8, top_k=2),
                      prefix="model.layers.0.mlp", router="gate.weight", proj=("gate_proj", "up_proj", "down_proj"),
                      expert="experts.%d.", shared="shared_expert", shared_gate="shared_expert_gate.weight"),
    "qwen3-moe": dict(cfg=dict(num_experts=8, top_k=2, normalize_topk=1), preset="qwen3-moe",
                      over=dict(num_experts=8, top_k=2), prefix="model.layers.2.mlp",
                      router="gate.weight", proj=("gate_proj", "up_proj", "down_proj"), expert="experts.%d."),
    "olmoe": dict(cfg=dict(num_experts=8, top_k=2, normalize_topk=0), preset="olmoe", over=dict(num_experts=8, top_k=2), prefix="model.layers.3.mlp",
                  router="gate.weight", proj=("gate_proj", "up_proj", "down_proj"), expert="experts.%d."),
    "deepseek-v3": dict(cfg=dict(num_experts=16, top_k=4, score=M.SCORE_SIGMOID, num_groups=4, topk_groups=2,
                                 routed_scale=2.5, num_shared_experts=2, normalize_topk=1),
                        preset="deepseek-v3", over=dict(num_experts=16, top_k=4, num_groups=4, topk_groups=2,
                                                        num_shared_experts=2),
                        prefix="model.layers.4.mlp", router="gate.weight", bias="gate.e_score_correction_bias",
                        proj=("gate_proj", "up_proj", "down_proj"), expert="experts.%d.", shared="shared_experts"),
    "switch": dict(cfg=dict(num_experts=8, top_k=1, activation=M.ACT_RELU, normalize_topk=0),
                   preset="switch", over=dict(capacity_factor=0.0, noise=M.NOISE_NONE),  # dropless; jitter is training-only
                   prefix="encoder.block.1.layer.1.mlp", router="router.classifier.weight",
                   proj=("wi", None, "wo"), expert="experts.expert_%d."),
}


def family_tensors(fam, spec, rng, dtype, fused):
    """The block's tensors {key without prefix: float32 array}, values exactly as stored in dtype."""
    c = spec["cfg"]
    E = c["num_experts"]
    rnd = lambda *s, scale=0.4: (scale * rng.standard_normal(s)).astype(np.float32)
    t = {spec["router"]: rnd(E, D)}
    if "bias" in spec:
        t[spec["bias"]] = rnd(E, scale=0.05)
    gate, up, down = spec["proj"]
    G, U, Dn = rnd(E, FF, D), rnd(E, FF, D), rnd(E, D, FF)
    if fused:
        t["experts.gate_up_proj"] = np.concatenate([G, U], axis=1)  # [E, 2ff, d], gate rows first
        t["experts.down_proj"] = Dn
    else:
        for e in range(E):
            t[spec["expert"] % e + gate + ".weight"] = G[e]
            if up:
                t[spec["expert"] % e + up + ".weight"] = U[e]
            t[spec["expert"] % e + down + ".weight"] = Dn[e]
    if "shared" in spec:
        W = c["num_shared_experts"] * FF  # one module as wide as all the shared experts together
        t[spec["shared"] + ".gate_proj.weight"] = rnd(W, D)
        t[spec["shared"] + ".up_proj.weight"] = rnd(W, D)
        t[spec["shared"] + ".down_proj.weight"] = rnd(D, W)
    if "shared_gate" in spec:
        t[spec["shared_gate"]] = rnd(1, D)
    if dtype == "BF16":
        t = {k: ST.bf16_round(v) for k, v in t.items()}
    return t


def oracle(fam, spec, cfg, t, x):
    """The family's block on x (float64) from its checkpoint tensors."""
    T64 = lambda a: torch.tensor(a, dtype=torch.float64)
    x = T64(x)
    E = spec["cfg"]["num_experts"]
    gate, up, down = spec["proj"]
    L = x @ T64(t[spec["router"]]).t()
    bias = T64(t[spec["bias"]]) if "bias" in spec else torch.zeros(E, dtype=torch.float64)
    _, ids, w, _ = R.route(cfg, L, bias)

    def expert(e, xe):
        if "experts.gate_up_proj" in t:
            g, u = (xe @ T64(t["experts.gate_up_proj"][e]).t()).chunk(2, dim=-1)
            return (F.silu(g) * u) @ T64(t["experts.down_proj"][e]).t()
        p = spec["expert"] % e
        h = xe @ T64(t[p + gate + ".weight"]).t()
        a = F.silu(h) * (xe @ T64(t[p + up + ".weight"]).t()) if up else F.relu(h)
        return a @ T64(t[p + down + ".weight"]).t()

    y = torch.zeros_like(x)
    for tok in range(x.shape[0]):
        for j in range(ids.shape[1]):
            y[tok] += w[tok, j] * expert(int(ids[tok, j]), x[tok : tok + 1])[0]
    if "shared" in spec:
        s = spec["shared"]
        h = F.silu(x @ T64(t[s + ".gate_proj.weight"]).t()) * (x @ T64(t[s + ".up_proj.weight"]).t())
        ys = h @ T64(t[s + ".down_proj.weight"]).t()
        if "shared_gate" in spec:
            ys = ys * torch.sigmoid(x @ T64(t[spec["shared_gate"]]).t())
        y = y + ys
    return y.numpy()


def make_family_layer(spec, seed=3):
    """The family's preset with the test's sizes: preset + load must reproduce the block, so the
    layer's routing fields must be the family's (spec["cfg"], from its published config)."""
    cfg = M.default_config()
    M._call("moe_config_preset", C.byref(cfg), spec["preset"].encode())
    cfg.d_model, cfg.d_ff, cfg.seed = D, FF, seed
    for k, v in spec["over"].items():
        setattr(cfg, k, v)
    layer = M.Layer(cfg)
    for k, v in spec["cfg"].items():
        assert getattr(layer.cfg, k) == v, "preset %s: %s is %r, the family has %r" % (
            spec["preset"], k, getattr(layer.cfg, k), v)
    return layer


def family_ref_config(spec):
    """The reference's configuration from the family's own description, not from the layer."""
    ref = R.RefConfig(d_model=D, d_ff=FF)
    for k, v in spec["cfg"].items():
        setattr(ref, k, v)
    return ref


CASES = [(fam, dt, fused) for fam in FAMILIES for dt in ("F32", "BF16") for fused in (False, True)
         if not (fused and fam == "switch")]


@pytest.mark.parametrize("fam,dtype,fused", CASES, ids=["%s-%s-%s" % (f, d, "fused" if u else "per_expert")
                                                        for f, d, u in CASES])
def test_family_matches_its_block(tmp_path, fam, dtype, fused):
    spec = FAMILIES[fam]
    rng = np.random.default_rng(zlib.crc32(("%s/%s/%s" % (fam, dtype, fused)).encode()))
    t = family_tensors(fam, spec, rng, dtype, fused)
    prefix = spec["prefix"]
    tensors = {prefix + "." + k: (dtype, v) for k, v in t.items()}
    # Other layers' tensors in the same file are left alone.
    tensors["model.embed_tokens.weight"] = (dtype, rng.standard_normal((5, D)).astype(np.float32))
    tensors[prefix.rsplit(".", 1)[0] + ".input_layernorm.weight"] = (dtype, np.ones(D, np.float32))
    path = str(tmp_path / "model.safetensors")
    ST.write(path, tensors, {"format": "pt"})

    layer = make_family_layer(spec)
    layer.load(str(tmp_path), prefix, fam)  # the directory: model.safetensors in it
    x = draw_x(layer, 23, 5)
    y = layer.forward(x)
    assert_close(y, oracle(fam, spec, family_ref_config(spec), t, x.astype(np.float64)), "%s y" % fam, rtol=1e-4,
                 atol=1e-5)

    # Saved in libmoe's names and loaded back, the layer is the same to the bit.
    layer.save(str(tmp_path / "libmoe.safetensors"), "blk")
    again = make_family_layer(spec, seed=9)
    again.load(str(tmp_path / "libmoe.safetensors"), "blk")
    for n, v in layer.params().items():
        np.testing.assert_array_equal(again.get_param(n), v, err_msg=n)
    np.testing.assert_array_equal(again.forward(x), y)

    # Saved in the family's names (moe_layer_save_as), the file is the one written above, in the
    # layout a save picks (transformers 5's fused experts for a gated family), and loads back.
    layer.save(str(tmp_path / "family.safetensors"), prefix, fam)
    saved, meta = ST.read(str(tmp_path / "family.safetensors"))
    assert meta == {"format": "pt", "producer": "libmoe"}
    want = dict(t)
    if not fused and spec["proj"][1]:
        gate, up, down = spec["proj"]
        E = spec["cfg"]["num_experts"]
        ex = [spec["expert"] % e for e in range(E)]
        want = {k: v for k, v in t.items() if not k.startswith("experts.")}
        want["experts.gate_up_proj"] = np.stack(
            [np.concatenate([t[p + gate + ".weight"], t[p + up + ".weight"]]) for p in ex])
        want["experts.down_proj"] = np.stack([t[p + down + ".weight"] for p in ex])
    assert sorted(saved) == sorted(prefix + "." + k for k in want)
    for k, v in want.items():
        dt, a = saved[prefix + "." + k]
        assert dt == "F32", k  # the layer stores float32
        np.testing.assert_array_equal(a, v, err_msg=k)
    back = make_family_layer(spec, seed=11)
    back.load(str(tmp_path / "family.safetensors"), prefix, fam)
    for n, v in layer.params().items():
        np.testing.assert_array_equal(back.get_param(n), v, err_msg=n)


def test_sharded_family_checkpoint(tmp_path):
    fam, spec = "qwen2-moe", FAMILIES["qwen2-moe"]
    rng = np.random.default_rng(77)
    t = family_tensors(fam, spec, rng, "BF16", True)
    tensors = {spec["prefix"] + "." + k: ("BF16", v) for k, v in t.items()}
    tensors["lm_head.weight"] = ("BF16", rng.standard_normal((7, D)).astype(np.float32))
    ST.write_sharded(str(tmp_path), tensors, 3)
    layer = make_family_layer(spec)
    layer.load(str(tmp_path / "model.safetensors.index.json"), spec["prefix"], fam)
    x = draw_x(layer, 17, 8)
    assert_close(layer.forward(x), oracle(fam, spec, family_ref_config(spec), t, x.astype(np.float64)), "sharded y",
                 rtol=1e-4, atol=1e-5)


def test_mismatched_configuration_is_refused(tmp_path):
    """A checkpoint with a shared expert loaded into a layer without one names the leftover tensor;
    a wrong width names the tensor and both shapes; the layer keeps its values."""
    fam, spec = "qwen2-moe", FAMILIES["qwen2-moe"]
    t = family_tensors(fam, spec, np.random.default_rng(1), "F32", False)
    path = str(tmp_path / "m.safetensors")
    ST.write(path, {"blk." + k: ("F32", v) for k, v in t.items()})
    layer = make_layer(d_model=D, d_ff=FF, num_experts=8, top_k=2, normalize_topk=0)
    before = layer.params()
    with pytest.raises(M.MoeError) as e:
        layer.load(path, "blk", fam)
    assert e.value.status_name == "MOE_ERR_INVALID_ARGUMENT"
    assert "blk.shared_expert" in e.value.message and path in e.value.message, e.value.message
    wide = make_layer(d_model=D, d_ff=FF + 2, num_experts=8, top_k=2, normalize_topk=0, num_shared_experts=4,
                      shared_gate=1)
    with pytest.raises(M.MoeError) as e:
        wide.load(path, "blk", fam)
    assert "blk.experts.0.gate_proj.weight" in e.value.message and "[12, 16]" in e.value.message, e.value.message
    for n, v in before.items():
        np.testing.assert_array_equal(layer.get_param(n), v)
