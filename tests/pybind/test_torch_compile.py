"""libmoe.torch.MoE as PyTorch 2 custom operators: torch.compile without a graph break (and with
fullgraph=True), torch.export, gradients equal to eager mode's, the aux loss and statistics, the
contexts' lifetime, and parameter substitution refused. Needs torch >= 2.4 (torch.library.custom_op);
on an older torch (Debian's 1.13) every test reports itself skipped."""

import gc

import pytest
import torch
from torch import nn

import libmoe
import libmoe.torch as lt

if not lt.CUSTOM_OPS:
    pytest.skip(f"torch {torch.__version__} has no torch.library.custom_op (torch >= 2.4): libmoe.torch.MoE uses "
                f"its autograd.Function path there, which torch.compile/export do not apply to",
                allow_module_level=True)

CFG = dict(d_model=16, d_ff=32, num_experts=4, top_k=2, seed=3, z_loss_coef=1e-3)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def device_or_skip(device):
    if device == "cuda":
        try:
            lt.MoE(**CFG, device="cuda")
        except (libmoe.UnsupportedError, libmoe.DeviceError) as e:
            pytest.skip(f"this libmoe has no usable CUDA backend: {e}")


class Net(nn.Module):
    """Linear -> MoE -> Linear: libmoe between ops torch compiles itself."""

    def __init__(self, device="cpu", **kw):
        super().__init__()
        cfg = dict(CFG)
        cfg.update(kw)
        self.inp = nn.Linear(16, 16, device=device)
        self.moe = lt.MoE(**cfg, device=device)
        self.out = nn.Linear(16, 16, device=device)

    def forward(self, x):
        h = self.moe(torch.tanh(self.inp(x)))
        if isinstance(h, tuple):
            h, aux = h
            return self.out(h), aux
        return self.out(h)


def run(model, x, dy):
    """Output and every gradient (x's and the parameters') of sum(out * dy) (+ aux if returned)."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = (out[0] * dy).sum() + out[1] if isinstance(out, tuple) else (out * dy).sum()
    loss.backward()
    y = out[0] if isinstance(out, tuple) else out
    # a compiled model (OptimizedModule) names the parameters of the module it wraps "_orig_mod.*"
    return y.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    ya, dxa, ga = a
    yb, dxb, gb = b
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dxa, dxb, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_break(device):
    device_or_skip(device)
    model = Net(device)
    x = torch.randn(3, 5, 16, device=device)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("libmoe.moe_forward" in op for op in ops), ops


@pytest.mark.parametrize("aux_loss", ["add", "return"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_equals_eager(backend, aux_loss):
    model = Net(aux_loss=aux_loss)
    x, dy = torch.randn(4, 6, 16), torch.randn(4, 6, 16)
    eager = run(model, x, dy)
    eager_stats, eager_aux = model.moe.last_stats, model.moe.aux_loss
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        assert_same(run(compiled, x, dy), eager)
        # statistics of the forward that just ran (inductor fuses tanh(inp(x)) and may round the
        # MoE's input differently in the last place)
        assert model.moe.last_stats == pytest.approx(eager_stats, rel=1e-5)
        assert model.moe.aux_loss.item() == pytest.approx(eager_aux.item()) and eager_aux.item() > 0
    # a different batch: the statistics follow it
    run(compiled, x[:2], dy[:2])
    assert model.moe.last_stats["num_tokens"] == 12


def test_compiled_aux_loss_scale_is_read_at_backward():
    """The module's aux_loss_scale is not a constant of the compiled graph: changing it between
    steps changes the gradient without a recompile."""
    model = Net()
    x, dy = torch.randn(10, 16), torch.randn(10, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads = {}
    for scale in (1.0, 0.0, 3.0):
        model.moe.set_aux_loss_scale(scale)
        grads[scale] = run(compiled, x, dy)[2]["moe.router.weight"]
    # the router gradient is affine in the scale: g(s) = g(0) + s * (g(1) - g(0))
    torch.testing.assert_close(grads[3.0], grads[0.0] + 3 * (grads[1.0] - grads[0.0]), rtol=1e-4, atol=1e-6)
    assert not torch.equal(grads[1.0], grads[0.0])


def test_fullgraph_dynamic_shapes():
    model = Net()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (3, 7, 11):
        x, dy = torch.randn(tokens, 16), torch.randn(tokens, 16)
        assert_same(run(compiled, x, dy), run(model, x, dy))


def test_compiled_inference_no_grad():
    model = Net().eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="inductor", fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.moe.last_stats is None and model.moe.aux_loss.item() == 0.0  # an inference forward
    assert not model.moe._engine.live


def test_export():
    model = Net().eval()
    x = torch.randn(2, 5, 16)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("libmoe.moe_forward" in t for t in targets) == 1, targets
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(ep.module()(x), want, rtol=1e-6, atol=1e-7)
        x2 = torch.randn(2, 5, 16)  # the exported program computes, it did not record one answer
        torch.testing.assert_close(ep.module()(x2), model(x2), rtol=1e-6, atol=1e-7)
    # after decompositions the libmoe call is still one node
    decomposed = ep.run_decompositions()
    assert sum("libmoe.moe_forward" in str(n.target) for n in decomposed.graph.nodes) == 1


def test_export_dynamic_batch():
    model = Net().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes={"x": {0: batch}})
    with torch.no_grad():
        for tokens in (1, 5, 33):
            x = torch.randn(tokens, 16)
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-6, atol=1e-7)


def test_contexts_live_while_the_graph_does():
    model = Net()
    engine = model.moe._engine
    x = torch.randn(6, 16, requires_grad=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert len(engine.live) == 1  # held for backward
    y.sum().backward()
    del y
    gc.collect()
    assert not engine.live and len(engine.pool) == 1  # back to the pool with the graph
    y = model(x)  # eager, graph dropped without a backward
    assert len(engine.live) == 1
    del y
    gc.collect()
    assert not engine.live
    # retain_graph: the context survives the first backward
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.sum().backward(retain_graph=True)
    g = model.moe.experts.w1.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(model.moe.experts.w1.grad, 2 * g)


def test_parameter_substitution_is_refused():
    model = lt.MoE(**CFG)
    other = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(libmoe.InvalidArgumentError, match="not this module's"):
        torch.func.functional_call(model, other, (torch.randn(3, 16),))
    # the module itself still works
    assert model(torch.randn(3, 16)).shape == (3, 16)


def test_module_gone():
    model = Net().eval()
    ep = torch.export.export(model, (torch.randn(3, 16),))
    gm = ep.module()
    model.moe._engine  # noqa: B018
    del model
    gc.collect()
    # the exported program's parameters keep the layer's storage alive, not the module: the
    # call says so instead of computing with freed memory
    with pytest.raises(libmoe.StateError, match="no longer exists"):
        gm(torch.randn(3, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_low_precision(dtype):
    model = lt.MoE(**CFG, dtype=dtype)
    x, dy = torch.randn(8, 16, dtype=dtype), torch.randn(8, 16, dtype=dtype)
    eager = run(model, x, dy)
    assert_same(run(torch.compile(model, backend="aot_eager", fullgraph=True), x, dy), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_compile_and_export():
    device_or_skip("cuda")
    model = Net("cuda")
    x, dy = torch.randn(4, 6, 16, device="cuda"), torch.randn(4, 6, 16, device="cuda")
    eager = run(model, x, dy)
    assert_same(run(torch.compile(model, fullgraph=True), x, dy), eager)
    model.eval()
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-6, atol=1e-7)
