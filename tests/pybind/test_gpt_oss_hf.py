"""libmoe against transformers' own gpt-oss block (GptOssMLP: GptOssTopKRouter + GptOssExperts),
built from a tiny GptOssConfig (no download) with random weights and biases: its state dict is
written as a checkpoint in gpt-oss naming (float32 and bfloat16), loaded through moe_layer_load
(family "gpt-oss") into a layer made from the "gpt-oss" preset, and the output, dx and every
parameter gradient are compared with the block's, on inputs that reach both sides of both clamps.
Needs transformers (the .pypi variant has it); it reports SKIPPED otherwise.

Tolerances: float32 rtol 2e-5 / atol 2e-6 of the block's (libmoe sums each token's experts in
another order and its GEMMs are oneDNN's); a bfloat16 layer 2e-2 of the largest value."""

import os
import sys

import numpy as np
import pytest
import torch

import libmoe

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the .pypi variant has it)")
try:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
except ImportError as e:  # an older transformers without gpt-oss
    pytest.skip(f"transformers {transformers.__version__} has no gpt-oss ({e})", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import safetensors_np as ST  # noqa: E402

D, FF, E, K, T = 24, 16, 8, 3, 40
PREFIX = "model.layers.0.mlp"


def block(seed):
    cfg = transformers.GptOssConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=K,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    vocab_size=32)
    cfg._experts_implementation = "eager"  # the modelling file's own loop, not a fused kernel
    torch.manual_seed(seed)
    mlp = GptOssMLP(cfg).float()
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            # Weights large enough that the clamps (limit 7) are reached on both sides.
            p.copy_(torch.randn_like(p) * (1.2 if "proj" in name and "bias" not in name else 0.5))
    return mlp


def checkpoint(mlp, path, dtype):
    tensors = {f"{PREFIX}.{k}": (dtype, v.detach().numpy()) for k, v in mlp.state_dict().items()}
    assert set(tensors) == {f"{PREFIX}.{k}" for k in ("router.weight", "router.bias", "experts.gate_up_proj",
                                                       "experts.gate_up_proj_bias", "experts.down_proj",
                                                       "experts.down_proj_bias")}
    assert tuple(mlp.experts.gate_up_proj.shape) == (E, D, 2 * FF)  # transformers 5: [E, d, 2ff], interleaved
    ST.write(str(path / "model.safetensors"), tensors)
    if dtype == "BF16":  # the block computes with what the file holds
        with torch.no_grad():
            for p in mlp.parameters():
                p.copy_(p.to(torch.bfloat16).float())


def hf_grads(mlp):
    """The block's gradients in libmoe's names and layouts."""
    g = {n: p.grad for n, p in mlp.named_parameters()}
    gu, gub = g["experts.gate_up_proj"], g["experts.gate_up_proj_bias"]
    return {"router.weight": g["router.weight"], "router.logit_bias": g["router.bias"],
            "experts.w1": gu[:, :, 0::2].transpose(1, 2), "experts.w3": gu[:, :, 1::2].transpose(1, 2),
            "experts.w2": g["experts.down_proj"].transpose(1, 2),
            "experts.b1": gub[:, 0::2], "experts.b3": gub[:, 1::2], "experts.b2": g["experts.down_proj_bias"]}


def assert_close(got, want, tol, name):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    scale = np.abs(want).max()
    assert scale > 0, f"{name}: all zeros"
    err = np.abs(got - want).max()
    assert err <= tol * scale, f"{name}: max error {err:.3g} = {err / scale:.3g} x max|want|, limit {tol}"


@pytest.mark.parametrize("file_dtype, layer_dtype", [("F32", "float32"), ("BF16", "float32"), ("BF16", "bfloat16")])
def test_matches_transformers_gpt_oss_block(tmp_path, file_dtype, layer_dtype):
    mlp = block(seed=len(file_dtype) + len(layer_dtype))
    checkpoint(mlp, tmp_path, file_dtype)
    # The block adds no aux loss: libmoe's is left out of the gradient.
    layer = libmoe.Layer.from_preset("gpt-oss", d_model=D, d_ff=FF, num_experts=E, top_k=K, aux_loss_coef=0.0,
                                     dtype=layer_dtype)
    layer.load(tmp_path, PREFIX, "gpt-oss")

    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, D)).astype(np.float32)
    dy = rng.standard_normal((T, D)).astype(np.float32)
    if layer_dtype == "bfloat16":
        x = torch.from_numpy(x).bfloat16().float().numpy()
        dy = torch.from_numpy(dy).bfloat16().float().numpy()
    xt = torch.from_numpy(x).reshape(1, T, D).requires_grad_(True)
    want_y, _ = mlp(xt)
    (want_y * torch.from_numpy(dy).reshape(1, T, D)).sum().backward()

    # Both clamps are reached on both sides by the routed rows.
    with torch.no_grad():
        gate_up = torch.einsum("td,edf->etf", xt[0], mlp.experts.gate_up_proj) + mlp.experts.gate_up_proj_bias[:, None]
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        assert (gate > 7).any() and (gate < 7).any() and (up > 7).any() and (up < -7).any()

    ctx = layer.context()
    y = layer.forward(x, ctx)
    dx = layer.backward(ctx, dy)
    tol = 2e-2 if layer_dtype == "bfloat16" else 2e-5
    # Routing first: the same experts for every token.
    ids, w = ctx.topk()
    with torch.no_grad():
        _, scores, idx = mlp.router(xt[0])
    np.testing.assert_array_equal(ids, idx.numpy())
    np.testing.assert_allclose(w, scores.numpy(), rtol=1e-5, atol=1e-6)
    assert_close(y, want_y.detach().numpy().reshape(T, D), tol, "y")
    assert_close(dx, xt.grad.numpy().reshape(T, D), tol, "dx")
    grads = hf_grads(mlp)
    assert set(grads) == {n for n, i in layer.param_info().items() if i.trainable}
    for name, g in grads.items():
        assert_close(layer.get_grad(name), g.numpy(), tol if layer_dtype == "float32" or "router" in name else 3e-2,
                     name)


def test_mxfp4_checkpoint_matches_transformers_dequantisation(tmp_path):
    # The published files' MXFP4 tensors, dequantised by transformers' own convert_moe_packed_tensors
    # into the block that libmoe's load is compared with.
    try:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except ImportError as e:
        pytest.skip(f"transformers {transformers.__version__} has no MXFP4 integration ({e})")
    d, ff, e, k, t = 64, 32, 4, 2, 24
    cfg = transformers.GptOssConfig(hidden_size=d, intermediate_size=ff, num_local_experts=e, num_experts_per_tok=k,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    vocab_size=32)
    cfg._experts_implementation = "eager"
    mlp = GptOssMLP(cfg).float()
    g = torch.Generator().manual_seed(3)
    blocks = {"gate_up_proj": torch.randint(0, 256, (e, 2 * ff, d // 32, 16), generator=g, dtype=torch.uint8),
              "down_proj": torch.randint(0, 256, (e, d, ff // 32, 16), generator=g, dtype=torch.uint8)}
    scales = {n: torch.randint(122, 127, b.shape[:-1], generator=g, dtype=torch.uint8) for n, b in blocks.items()}
    with torch.no_grad():
        for n in blocks:
            getattr(mlp.experts, n).copy_(convert_moe_packed_tensors(blocks[n], scales[n], dtype=torch.float32))
        for n in ("gate_up_proj_bias", "down_proj_bias"):
            getattr(mlp.experts, n).copy_(torch.randn(getattr(mlp.experts, n).shape, generator=g).bfloat16().float())
        mlp.router.weight.copy_(torch.randn(e, d, generator=g).bfloat16().float())
        mlp.router.bias.copy_(torch.randn(e, generator=g).bfloat16().float())
    tensors = {f"{PREFIX}.router.weight": ("BF16", mlp.router.weight.detach().numpy()),
               f"{PREFIX}.router.bias": ("BF16", mlp.router.bias.detach().numpy())}
    for n in blocks:
        tensors[f"{PREFIX}.experts.{n}_blocks"] = ("U8", blocks[n].numpy())
        tensors[f"{PREFIX}.experts.{n}_scales"] = ("U8", scales[n].numpy())
        tensors[f"{PREFIX}.experts.{n}_bias"] = ("BF16", getattr(mlp.experts, n + "_bias").detach().numpy())
    ST.write(str(tmp_path / "model.safetensors"), tensors)
    layer = libmoe.Layer.from_preset("gpt-oss", d_model=d, d_ff=ff, num_experts=e, top_k=k)
    layer.load(tmp_path, PREFIX, "gpt-oss")
    gu = mlp.experts.gate_up_proj.detach()
    np.testing.assert_array_equal(layer.get_param("experts.w1"), gu[:, :, 0::2].transpose(1, 2).numpy())
    np.testing.assert_array_equal(layer.get_param("experts.w2"), mlp.experts.down_proj.detach().transpose(1, 2).numpy())
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((t, d)).astype(np.float32))
    with torch.no_grad():
        want, _ = mlp(x.reshape(1, t, d))
    assert_close(layer.forward(x.numpy()), want.numpy().reshape(t, d), 2e-5, "y")
