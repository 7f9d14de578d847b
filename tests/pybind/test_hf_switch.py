"""libmoe against transformers' own Switch Transformers block (SwitchTransformersSparseMLP), whose
capacity is per sequence: an absolute expert_capacity, each sequence of the batch ranking its
tokens by position (a cumulative count over the sequence). moe.h's recipe for it: the "switch"
preset with capacity_group_size = sequence length, min_capacity = expert_capacity, a tiny
capacity_factor and no noise. Output, dx and every weight gradient on a batch of sequences where
the capacity per sequence drops tokens that one capacity for the whole call would keep.

Needs transformers (the .pypi variant has it); float32, tolerances as test_hf.py's."""

import numpy as np
import pytest
import torch

import libmoe

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the .pypi variant has it)")
switch = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers",
                             reason="this transformers has no Switch Transformers")

D, FF, E, CAPACITY = 16, 24, 4, 2
TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def hf_block(seed=0):
    config = transformers.SwitchTransformersConfig(d_model=D, d_ff=FF, num_experts=E, expert_capacity=CAPACITY,
                                                   router_bias=False, router_jitter_noise=0.0, dropout_rate=0.0,
                                                   dense_act_fn="relu", router_dtype="float32")
    torch.manual_seed(seed)
    block = switch.SwitchTransformersSparseMLP(config).eval()
    with torch.no_grad():  # a router that spreads the tokens, so that every expert is used
        block.router.classifier.weight.normal_(0.0, 1.0)
    return block


def libmoe_layer(block, **over):
    cfg = dict(d_model=D, d_ff=FF, num_experts=E, capacity_factor=1e-6, min_capacity=CAPACITY, noise="none",
               aux_loss_coef=0.0, z_loss_coef=0.0)
    cfg.update(over)
    layer = libmoe.Layer.from_preset("switch", **cfg)
    experts = [block.experts[f"expert_{e}"] for e in range(E)]
    layer.set_param("router.weight", block.router.classifier.weight.detach().numpy())
    layer.set_param("experts.w1", np.stack([m.wi.weight.detach().numpy() for m in experts]))
    layer.set_param("experts.w2", np.stack([m.wo.weight.detach().numpy() for m in experts]))
    return layer


def kept_tokens(layer, x):
    ids, _ = layer.route(x).topk()
    return ids[:, 0] >= 0


@pytest.mark.parametrize("batch,seq", [(2, 12), (3, 10)])
def test_capacity_per_sequence_equals_hf_switch(batch, seq):
    block = hf_block(seed=batch)
    gen = torch.Generator().manual_seed(seq)
    x = torch.randn(batch, seq, D, generator=gen)
    dy = torch.randn(batch, seq, D, generator=gen)

    # transformers: output, and the gradients of sum(y * dy)
    xt = x.clone().requires_grad_(True)
    y_hf = block(xt)
    (y_hf * dy).sum().backward()
    hf_kept = (block.router(x)[0].sum(-1) > 0).reshape(-1).numpy()

    layer = libmoe_layer(block, capacity_group_size=seq)
    xf, dyf = x.reshape(-1, D).numpy(), dy.reshape(-1, D).numpy()
    ctx = layer.context()
    y = layer.forward(xf, ctx)
    dx = layer.backward(ctx, dyf)
    np.testing.assert_allclose(y, y_hf.detach().reshape(-1, D).numpy(), **TOL, err_msg="y")
    np.testing.assert_allclose(dx, xt.grad.reshape(-1, D).numpy(), **GRAD_TOL, err_msg="dx")
    np.testing.assert_allclose(layer.get_grad("router.weight"), block.router.classifier.weight.grad.numpy(),
                               **GRAD_TOL, err_msg="router.weight")
    for e in range(E):
        m = block.experts[f"expert_{e}"]
        np.testing.assert_allclose(layer.get_grad("experts.w1")[e], m.wi.weight.grad.numpy(), **GRAD_TOL,
                                   err_msg=f"experts.w1[{e}]")
        np.testing.assert_allclose(layer.get_grad("experts.w2")[e], m.wo.weight.grad.numpy(), **GRAD_TOL,
                                   err_msg=f"experts.w2[{e}]")

    # The same slots as transformers', and a batch where the grouping matters: one capacity of
    # batch * expert_capacity for the whole call keeps tokens that their own sequence dropped.
    kept = kept_tokens(layer, xf)
    np.testing.assert_array_equal(kept, hf_kept)
    assert not kept.all(), "the per-sequence capacity should drop tokens in this batch"
    per_call = kept_tokens(libmoe_layer(block, min_capacity=batch * CAPACITY), xf)
    assert (per_call & ~kept).any(), "a capacity for the whole call should keep a token its sequence dropped"
    assert ctx.stats()["dropped_slots"] == int((~hf_kept).sum())


def test_switch_checkpoint_with_capacity_per_sequence(tmp_path):
    # What a user does: the block's weights as a checkpoint in transformers' names, read with the
    # "switch" family into the preset with the per-sequence capacity.
    st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    batch, seq = 4, 8
    block = hf_block(seed=7)
    path = tmp_path / "model.safetensors"
    st.save_file({f"encoder.block.1.layer.1.mlp.{k}": v.contiguous() for k, v in block.state_dict().items()},
                 str(path))
    layer = libmoe.Layer.from_preset("switch", d_model=D, d_ff=FF, num_experts=E, capacity_factor=1e-6,
                                     min_capacity=CAPACITY, capacity_group_size=seq, noise="none")
    layer.load(str(path), prefix="encoder.block.1.layer.1.mlp", family="switch")
    x = torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = block(x).reshape(-1, D).numpy()
    got = layer.forward(x.reshape(-1, D).numpy())
    np.testing.assert_allclose(got, want, **TOL)
    assert layer.route(x.reshape(-1, D).numpy()).stats()["dropped_slots"] > 0
