"""libmoe.torch.MoE: zero-copy parameters, autograd against the reference, aux-loss modes, module
behaviour (optimisers, state_dict, modes, copies, devices), and training inside a transformer block."""

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import libmoe
import libmoe.torch as lt
import moe_reference as ref

CFG = dict(d_model=16, d_ff=32, num_experts=4, top_k=2, seed=3, z_loss_coef=1e-3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(**kw):
    cfg = dict(CFG)
    cfg.update(kw)
    return lt.MoE(**cfg)


def reference(moe, x, dy, aux_weight=1.0):
    """Reference y, dx and grads (by libmoe name) of sum(y*dy) + aux_weight * aux_loss_total."""
    p = ref.params_from_layer(moe.layer)
    xt = x.detach().double().reshape(-1, moe.layer.d_model).requires_grad_(True)
    y, aux = ref.forward(p, xt, moe.layer.config)
    ((y * dy.double().reshape(y.shape)).sum() + aux_weight * aux["aux_loss_total"]).backward()
    return y.reshape(x.shape), xt.grad.reshape(x.shape), {n: t.grad for n, t in p.items() if t.requires_grad}


def grads_by_name(moe):
    return {n: p.grad for n, p in moe.named_parameters()}


def assert_close(a, b, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---- zero copy ---------------------------------------------------------------------------------
def test_parameters_are_the_layers_storage():
    moe = make(num_shared_experts=1, shared_gate=True)
    names = [n for n, _ in moe.named_parameters()]
    assert names == [n for n, i in moe.layer.param_info().items() if i.trainable]
    assert list(moe.state_dict()) == moe.layer.param_names  # router.bias is a buffer
    for name, t in list(moe.named_parameters()) + list(moe.named_buffers()):
        assert t.data_ptr() == moe.layer.buffer_addresses(name)[0], name
        assert t.dtype == torch.float32 and t.is_contiguous()
    with torch.no_grad():
        moe.experts.w2[1, 2, 3] = 5.0
    assert moe.layer.get_param("experts.w2")[1, 2, 3] == 5.0


def test_activations_are_passed_without_copy(monkeypatch):
    moe = make()
    x = torch.randn(6, 16)
    seen = []
    real = moe.layer._forward_raw
    monkeypatch.setattr(moe.layer, "_forward_raw", lambda *a: (seen.append(a[0]), real(*a)))
    moe(x)
    assert seen == [x.data_ptr()]


# ---- autograd against the reference ----------------------------------------------------------------
@pytest.mark.parametrize("extra", [dict(), dict(activation="relu", top_k=1, capacity_factor=1.0),
                                   dict(score="sigmoid", num_shared_experts=1, routed_scale=2.0)])
def test_forward_and_gradients_match_reference(extra):
    moe = make(**extra)
    x = torch.randn(3, 7, 16, requires_grad=True)
    dy = torch.randn(3, 7, 16)
    y = moe(x)
    assert y.shape == x.shape
    y.backward(dy)
    ry, rdx, rgrads = reference(moe, x, dy)
    assert_close(y.detach(), ry)
    assert_close(x.grad, rdx)
    for name, g in grads_by_name(moe).items():
        assert_close(g, rgrads[name])
    assert moe.aux_loss.item() == pytest.approx(moe.last_stats["aux_loss_total"])
    assert moe.last_stats["num_tokens"] == 21
    # the numpy Layer gives the same bits
    np.testing.assert_array_equal(moe.layer.forward(x.detach().reshape(-1, 16).numpy()), y.detach().reshape(-1, 16))


def test_non_contiguous_input():
    moe = make()
    base = torch.randn(16, 10, requires_grad=True)
    x = base.t()  # [10, 16], not contiguous
    dy = torch.randn(10, 16)
    moe(x).backward(dy)
    _, rdx, _ = reference(moe, x, dy)
    assert_close(base.grad.t(), rdx)


@pytest.mark.parametrize("scale", [0.25, 0.0, 3.0])
def test_aux_loss_scale_add_mode(scale):
    moe = make()
    other = make(seed=5)  # a second module keeps its own scale
    x, dy = torch.randn(12, 16), torch.randn(12, 16)
    moe.set_aux_loss_scale(scale)
    assert moe.aux_loss_scale == scale and other.aux_loss_scale == 1.0
    xo = x.clone().requires_grad_()
    (moe(x.requires_grad_()) * dy).sum().add((other(xo) * dy).sum()).backward()
    _, rdx, rgrads = reference(moe, x, dy, aux_weight=scale)
    assert_close(x.grad, rdx)
    for name, g in grads_by_name(moe).items():
        assert_close(g, rgrads[name])
    _, rdx, rgrads = reference(other, xo, dy, aux_weight=1.0)
    assert_close(xo.grad, rdx)
    for name, g in grads_by_name(other).items():
        assert_close(g, rgrads[name])
    # kept across a copy and refused when not finite
    assert copy.deepcopy(moe).aux_loss_scale == scale
    with pytest.raises(libmoe.InvalidArgumentError, match="set_aux_loss_scale"):
        moe.set_aux_loss_scale(float("nan"))
    assert moe.aux_loss_scale == scale


@pytest.mark.parametrize("aux_weight", [1.0, 0.5, 0.0])
def test_return_mode(aux_weight):
    moe = make(aux_loss="return")
    x, dy = torch.randn(12, 16, requires_grad=True), torch.randn(12, 16)
    y, aux = moe(x)
    assert aux.requires_grad and aux.item() == pytest.approx(moe.last_stats["aux_loss_total"])
    loss = (y * dy).sum() + aux_weight * aux if aux_weight else (y * dy).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one backward whatever the weight: nothing to warn about
        loss.backward()
    _, rdx, rgrads = reference(moe, x, dy, aux_weight=aux_weight)
    assert_close(x.grad, rdx)
    for name, g in grads_by_name(moe).items():
        assert_close(g, rgrads[name])


def test_accumulation_zero_grad_and_reuse_in_one_graph():
    moe = make()
    x, dy = torch.randn(9, 16), torch.randn(9, 16)
    moe(x).backward(dy)
    first = {n: g.clone() for n, g in grads_by_name(moe).items()}
    moe(x).backward(dy)  # no zero_grad: .grad accumulates
    for n, g in grads_by_name(moe).items():
        assert_close(g, 2 * first[n])
    moe.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in moe.parameters())
    moe(x).backward(dy)
    for n, g in grads_by_name(moe).items():
        assert_close(g, first[n])
    # the module used twice in one graph: y = moe(moe(x)); each call's context is its own
    moe.zero_grad()
    xx = x.clone().requires_grad_()
    moe(moe(xx)).backward(dy)
    p = ref.params_from_layer(moe.layer)
    cfg = moe.layer.config
    xr = x.double().requires_grad_()
    h, a1 = ref.forward(p, xr, cfg)
    y, a2 = ref.forward(p, h, cfg)
    ((y * dy.double()).sum() + a1["aux_loss_total"] + a2["aux_loss_total"]).backward()
    assert_close(xx.grad, xr.grad)
    for n, g in grads_by_name(moe).items():
        assert_close(g, p[n].grad)


def test_retain_graph_and_double_backward():
    moe = make()
    x = torch.randn(5, 16, requires_grad=True)
    y = moe(x)
    y.sum().backward(retain_graph=True)
    g1 = moe.experts.w1.grad.clone()
    y.sum().backward()
    assert_close(moe.experts.w1.grad, 2 * g1)
    y = moe(x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_autograd_rules_in_place_change_and_second_backward():
    """A parameter changed in place between forward and backward, and a second backward without
    retain_graph, raise as for any PyTorch op, before any gradient is written."""
    moe = make()
    x = torch.randn(6, 16, requires_grad=True)
    y = moe(x)
    with torch.no_grad():
        moe.experts.w1.add_(0.1)  # what an optimizer step between the two would do
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    assert x.grad is None and all(p.grad is None for p in moe.parameters())
    y = moe(x)
    y.sum().backward()
    first = moe.experts.w2.grad.clone()
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()
    torch.testing.assert_close(moe.experts.w2.grad, first, rtol=0, atol=0)  # not doubled
    # an optimiser step after backward is the normal order
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    opt.step()
    moe(x).sum().backward()


def test_optimizer_and_load_state_dict_write_the_layer():
    moe = make()
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    x = torch.randn(20, 16)
    for _ in range(3):
        opt.zero_grad()
        moe(x).pow(2).mean().backward()
        opt.step()
    for name, p in moe.named_parameters():
        np.testing.assert_array_equal(moe.layer.get_param(name), p.detach().numpy())
    fresh = make(seed=99)
    fresh.load_state_dict(moe.state_dict())
    np.testing.assert_array_equal(fresh.layer.get_param("experts.w1"), moe.layer.get_param("experts.w1"))
    torch.testing.assert_close(fresh(x), moe(x), rtol=0, atol=0)


def test_modes_inference_and_stats():
    moe = make(bias_update_rate=0.01)
    x = torch.randn(30, 16)
    moe.eval()
    with torch.no_grad():
        y = moe(x)
    assert moe.last_stats is None and moe.aux_loss.item() == 0.0 and y.grad_fn is None
    assert not moe.router.bias.any()  # inference: no bias update
    moe.train()
    with torch.no_grad():
        moe(x)  # a training forward (bias update, stats) with nothing kept for backward
    assert moe.last_stats["num_tokens"] == 30 and moe.router.bias.abs().sum() > 0
    assert moe.router.bias.data_ptr() == moe.layer.buffer_addresses("router.bias")[0]


def test_copies_and_serialisation():
    moe = make(aux_loss="return")
    x = torch.randn(8, 16)
    twin = copy.deepcopy(moe)
    assert twin.layer is not moe.layer
    assert twin.experts.w1.data_ptr() == twin.layer.buffer_addresses("experts.w1")[0]
    assert twin.experts.w1.data_ptr() != moe.experts.w1.data_ptr()
    torch.testing.assert_close(twin(x)[0], moe(x)[0], rtol=0, atol=0)
    with torch.no_grad():
        twin.experts.w1.zero_()
    assert moe.experts.w1.abs().sum() > 0
    buf = io.BytesIO()
    torch.save(moe, buf)
    buf.seek(0)
    try:
        loaded = torch.load(buf, weights_only=False)  # torch >= 2.6 defaults to weights only
    except TypeError:
        loaded = torch.load(buf)
    torch.testing.assert_close(loaded(x)[0], moe(x)[0], rtol=0, atol=0)
    assert loaded.experts.w1.data_ptr() == loaded.layer.buffer_addresses("experts.w1")[0]


def test_device_and_dtype_conversions():
    moe = make()
    w = moe.experts.w1
    assert moe.to("cpu") is moe and moe.float() is moe and moe.experts.w1 is w
    assert w.data_ptr() == moe.layer.buffer_addresses("experts.w1")[0]
    with pytest.raises(TypeError, match="float32 parameters"):
        moe.double()
    with pytest.raises(TypeError, match="float32 parameters"):
        nn.Sequential(nn.Linear(16, 16), moe).half()
    with pytest.raises(RuntimeError, match="not its group"):
        moe.experts.to(torch.float64)
    if torch.cuda.is_available():
        try:
            moe.cuda()
        except (libmoe.UnsupportedError, libmoe.DeviceError):
            pass  # this libmoe has no CUDA module
        else:
            assert moe.experts.w1 is w and w.is_cuda
            assert w.data_ptr() == moe.layer.buffer_addresses("experts.w1")[0]


def test_bad_inputs():
    moe = make()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        moe(np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 16\]"):
        moe(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 16\]"):
        moe(torch.zeros(()))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        moe(torch.zeros(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="is on meta"):
        moe(torch.zeros(2, 16, device="meta"))
    with pytest.raises(ValueError, match="aux_loss="):
        make(aux_loss="sum")
    with pytest.raises(TypeError, match="torch.float32, torch.bfloat16 or torch.float16"):
        make(dtype=torch.int32)
    with pytest.raises(TypeError, match="device="):
        make(device_index=1)
    with pytest.raises(TypeError, match="x has dtype torch.float32, this MoE computes in torch.bfloat16"):
        make(dtype=torch.bfloat16)(torch.zeros(2, 16))
    with pytest.raises(libmoe.InvalidArgumentError, match="top_k"):
        make(top_k=7)
    assert moe(torch.zeros(0, 16)).shape == (0, 16)


# ---- inside a transformer ------------------------------------------------------------------------------
class RefMoE(nn.Module):
    """The reference mathematics as a module with libmoe's parameter names (float32)."""

    def __init__(self, layer):
        super().__init__()
        self.cfg = layer.config
        self.router, self.experts = nn.Module(), nn.Module()
        for name, info in layer.param_info().items():
            group, attr = name.split(".")
            t = torch.from_numpy(layer.get_param(name))
            if info.trainable:
                getattr(self, group).register_parameter(attr, nn.Parameter(t))
            else:
                getattr(self, group).register_buffer(attr, t)
        self.aux = []

    def forward(self, x):
        p = {f"{g}.{n}": t for g in ("router", "experts") for n, t in
             list(getattr(self, g).named_parameters()) + list(getattr(self, g).named_buffers())}
        y, aux = ref.forward(p, x.reshape(-1, x.shape[-1]), self.cfg)
        self.aux.append(aux["aux_loss_total"])
        return y.reshape(x.shape)


class Block(nn.Module):
    def __init__(self, d, moe):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.moe = moe

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.moe(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab, d, seq, moes):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d, m) for m in moes)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1))

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos
        for b in self.blocks:
            x = b(x, self.mask)
        return self.head(self.ln(x))


def batch(gen, vocab, seq, n=16):
    tokens = torch.randint(0, vocab, (n, seq), generator=gen)
    target = torch.roll(tokens, 1, 1) * 3 % vocab  # a function of the previous token: needs attention
    return tokens, target


def test_trains_in_a_transformer_like_the_reference():
    vocab, d, seq = 12, 32, 10
    cfg = dict(d_model=d, d_ff=48, num_experts=4, top_k=2, z_loss_coef=1e-3)
    model = TinyLM(vocab, d, seq, [lt.MoE(**cfg, seed=s) for s in (1, 2)])
    refm = TinyLM(vocab, d, seq, [RefMoE(b.moe.layer) for b in model.blocks])
    refm.load_state_dict(model.state_dict())
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in refm.named_parameters()}
    opts = [torch.optim.Adam(m.parameters(), lr=3e-3) for m in (model, refm)]
    gen = torch.Generator().manual_seed(0)
    losses, ref_losses = [], []
    for step in range(60):
        tokens, target = batch(gen, vocab, seq)
        for m, opt, out in ((model, opts[0], losses), (refm, opts[1], ref_losses)):
            if step >= 5 and m is refm:
                continue
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(m(tokens).reshape(-1, vocab), target.reshape(-1))
            out.append(loss.item())
            if m is refm:  # the reference adds its aux losses; libmoe adds their gradient itself
                loss = loss + sum(b.moe.aux.pop() for b in m.blocks)
            loss.backward()
            opt.step()
    # the first steps follow the reference step for step, then it learns
    np.testing.assert_allclose(losses[:5], ref_losses, rtol=1e-4)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    for b in model.blocks:  # what the optimiser did is in the layer
        np.testing.assert_array_equal(b.moe.layer.get_param("experts.w2"), b.moe.experts.w2.detach().numpy())
        assert b.moe.last_stats["num_tokens"] == 16 * seq
