"""libmoe (through libmoe.Layer) against the PyTorch reference of DESIGN section 4 (moe_reference.py):
forward, auxiliary losses, dx and every parameter gradient, over the routing catalogue."""

import numpy as np
import pytest
import torch

import libmoe
import moe_reference as ref
from conftest import randn

CASES = {
    "default": dict(),
    "geglu_z_importance_unnormalized": dict(activation="geglu", z_loss_coef=1e-3, importance_loss_coef=0.01,
                                            normalize_topk=False, routed_scale=1.5),
    "relu_top1": dict(activation="relu", top_k=1),
    "gelu": dict(activation="gelu"),
    "silu_top3": dict(activation="silu", top_k=3),
    "deepseek_like": dict(score="sigmoid", num_experts=8, num_groups=4, topk_groups=2, routed_scale=2.5,
                          num_shared_experts=1, aux_loss_coef=1e-3),
    "qwen_like_shared_gate": dict(num_shared_experts=2, d_ff_shared=24, shared_gate=True, normalize_topk=False),
    "capacity_position": dict(capacity_factor=0.75),
    # top-1 without normalisation: normalised top-1 weights are all 1, and ties keep position order
    "capacity_probs": dict(capacity_factor=0.75, drop_policy="probs", top_k=1, normalize_topk=False),
    "dense_soft": dict(top_k=6),
    "expert_choice": dict(routing="expert_choice", capacity_factor=1.0, aux_loss_coef=0.01, z_loss_coef=0.01),
}


def check_against_reference(layer, x, dy, rtol=2e-5, atol=2e-6):
    ctx = layer.context()
    y = layer.forward(x, ctx)
    dx = layer.backward(ctx, dy)
    ry, raux, rdx, rgrads = ref.forward_backward(layer, x, dy)
    np.testing.assert_allclose(y, ry.numpy(), rtol=rtol, atol=atol, err_msg="y")
    stats = ctx.stats()
    for name in ("load_balance_loss", "z_loss", "importance_loss", "aux_loss_total"):
        assert stats[name] == pytest.approx(raux[name], rel=1e-5, abs=1e-7), name
    np.testing.assert_allclose(dx, rdx.numpy(), rtol=rtol, atol=atol, err_msg="dx")
    assert set(rgrads) == {n for n, i in layer.param_info().items() if i.trainable}
    for name, g in rgrads.items():
        np.testing.assert_allclose(layer.get_grad(name), g.numpy(), rtol=rtol, atol=atol, err_msg=name)
    return stats


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case, rng):
    cfg = dict(d_model=16, d_ff=32, num_experts=6, top_k=2, seed=11)
    cfg.update(CASES[case])
    layer = libmoe.Layer(**cfg)
    layer.set_param("router.weight", randn(rng, cfg["num_experts"], 16))  # spread the routing
    stats = check_against_reference(layer, randn(rng, 41, 16), randn(rng, 41, 16))
    if "capacity" in case:
        assert stats["dropped_slots"] > 0  # the case really drops


# Capacity per group of tokens (capacity_group_size 10): T 40 is four whole groups, T 43 adds a
# last group of 3 tokens with its own, smaller capacity.
GROUP_CASES = {
    "position": dict(capacity_factor=0.75),
    "probs": dict(capacity_factor=0.75, drop_policy="probs", top_k=1, normalize_topk=False),
    "position_min_capacity": dict(capacity_factor=0.5, min_capacity=2, routed_scale=1.5),
    "expert_choice": dict(routing="expert_choice", capacity_factor=1.0, aux_loss_coef=0.01, z_loss_coef=0.01),
}


@pytest.mark.parametrize("T", [40, 43])
@pytest.mark.parametrize("case", sorted(GROUP_CASES))
def test_capacity_per_group_matches_reference(case, T, rng):
    cfg = dict(d_model=16, d_ff=32, num_experts=6, top_k=2, seed=11, capacity_group_size=10)
    cfg.update(GROUP_CASES[case])
    layer = libmoe.Layer(**cfg)
    layer.set_param("router.weight", randn(rng, cfg["num_experts"], 16))
    x = randn(rng, T, 16)
    stats = check_against_reference(layer, x, randn(rng, T, 16))
    groups = ref.capacity_groups(layer.config, T)
    assert [t1 - t0 for t0, t1, _ in groups] == [10] * (T // 10) + ([T % 10] if T % 10 else [])
    # The groups decide: the same layer over the whole call keeps other slots.
    whole = libmoe.Layer(**dict(cfg, capacity_group_size=0))
    whole.load_state_dict(layer.state_dict())
    def pairs(lay):
        token, expert, _ = lay.route(x).assignments()
        return set(zip(token.tolist(), expert.tolist()))

    assert pairs(whole) != pairs(layer)
    if layer.config["routing"] == "token_choice":
        assert stats["dropped_slots"] > 0


def test_selection_bias_changes_choice_not_weights(rng):
    layer = libmoe.Layer(d_model=16, d_ff=16, num_experts=4, top_k=1, normalize_topk=False, seed=5)
    bias = np.array([0.0, 0.0, 0.0, 5.0], np.float32)  # everyone selects expert 3 ...
    layer.set_param("router.bias", bias)
    ctx = layer.route(randn(rng, 20, 16))
    ids, w = ctx.topk()
    assert (ids == 3).all() and (w < 1).all()  # ... with its unbiased score as weight
    check_against_reference(layer, randn(rng, 20, 16), randn(rng, 20, 16))


def test_inference_with_noise_matches_reference(rng):
    # Router noise is training-only: inference of a noisy preset is the clean mathematics.
    for preset in ("switch", "shazeer"):
        layer = libmoe.Layer.from_preset(preset, d_model=16, d_ff=32, capacity_factor=0.0)
        x = randn(rng, 25, 16)
        p = ref.params_from_layer(layer)
        y, _ = ref.forward(p, torch.from_numpy(x).double(), layer.config)
        np.testing.assert_allclose(layer.forward(x), y.detach().numpy(), rtol=2e-5, atol=2e-6)


def test_bigger_shapes(rng):
    layer = libmoe.Layer(d_model=64, d_ff=96, num_experts=8, top_k=2, z_loss_coef=1e-3, seed=2)
    check_against_reference(layer, randn(rng, 300, 64), randn(rng, 300, 64), rtol=1e-4, atol=1e-5)
