"""libmoe.torch.MoE.from_pretrained_block: a Mixtral-style block (transformers 4 naming) loaded
into the module, against the block computed in PyTorch from the checkpoint tensors as Mixtral does
(softmax, top-2, renormalised, SwiGLU experts w1/w3/w2)."""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from libmoe.torch import MoE

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import safetensors_np as ST  # noqa: E402


def test_from_pretrained_block_matches_mixtral(tmp_path):
    rng = np.random.default_rng(11)
    E, d, ff, k = 8, 16, 24, 2
    pre = "model.layers.0.block_sparse_moe."
    w = lambda *s: ST.bf16_round((rng.standard_normal(s) * 0.3).astype(np.float32))
    t = {pre + "gate.weight": w(E, d)}
    for e in range(E):
        for name, shape in (("w1", (ff, d)), ("w3", (ff, d)), ("w2", (d, ff))):
            t[pre + "experts.%d.%s.weight" % (e, name)] = w(*shape)
    ST.write_sharded(str(tmp_path), {n: ("BF16", v) for n, v in t.items()}, 2)

    m = MoE.from_pretrained_block(tmp_path, "model.layers.0.block_sparse_moe", "mixtral", preset="mixtral",
                                  d_model=d, d_ff=ff)
    m.eval()
    x = torch.tensor(rng.standard_normal((19, d)), dtype=torch.float32)
    with torch.no_grad():
        y = m(x)
    # The module's parameters are the checkpoint's (they share the layer's storage).
    assert torch.equal(m.experts.w2[3], torch.tensor(t[pre + "experts.3.w2.weight"]))

    T = lambda a: torch.tensor(a, dtype=torch.float64)
    x64 = x.double()
    probs = torch.softmax(x64 @ T(t[pre + "gate.weight"]).t(), dim=-1)
    top, ids = torch.topk(probs, k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    want = torch.zeros_like(x64)
    for i in range(x.shape[0]):
        for j in range(k):
            e = int(ids[i, j])
            p = pre + "experts.%d." % e
            h = F.silu(x64[i] @ T(t[p + "w1.weight"]).t()) * (x64[i] @ T(t[p + "w3.weight"]).t())
            want[i] += top[i, j] * (h @ T(t[p + "w2.weight"]).t())
    err = (y.double() - want).norm() / want.norm()
    assert err < 1e-5, err

    # save_block / load_block round trip into another module.
    m.save_block(tmp_path / "libmoe.safetensors")
    m2 = MoE(preset="mixtral", d_model=d, d_ff=ff, seed=9)
    m2.load_block(tmp_path / "libmoe.safetensors")
    m2.eval()
    with torch.no_grad():
        assert torch.equal(m2(x), y)
