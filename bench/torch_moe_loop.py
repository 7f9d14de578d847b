#!/usr/bin/python3
"""Times the MoE block the way PyTorch code writes it, on the CPU: the peers of moe-bench.

  --impl loop     router linear -> softmax -> top-k -> normalize -> for each expert: index_select
                  its tokens, w1/w3/w2 linears with SwiGLU (or a plain FFN), scale by the routing
                  weight, index_add back (the Hugging Face Mixtral block's loop).
  --impl grouped  the same routing, tokens sorted by expert and the three expert products as
                  torch._grouped_mm over all experts at once (PyTorch >= 2.8; reported unavailable
                  otherwise).

FLOPs use the same formula as moe-bench (DESIGN section 8): forward = 2*T*k*d*d_ff*(3 for GLU,
2 otherwise) + router 2*T*d*E; backward ~ 2x forward. Forward is timed under torch.no_grad();
forward+backward includes the load-balance loss (coefficient 0.01), as libmoe's training step does.
--tokens takes a list (1,8,64): one JSON row per count, the model built once.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

GLU = {"swiglu": F.silu, "geglu": lambda t: F.gelu(t)}
PLAIN = {"relu": F.relu, "gelu": lambda t: F.gelu(t), "silu": F.silu}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class LoopMoE(torch.nn.Module):
    # device/dtype: where the parameters are made (and initialised): a DeepSeek-V3-sized layer has
    # 11e9 parameters, too many to create on the host and copy.
    def __init__(self, d, ff, experts, k, activation, aux_coef=0.01, device=None, dtype=None, grouped=False):
        super().__init__()
        self.k, self.experts, self.aux_coef, self.grouped = k, experts, aux_coef, grouped
        self.glu = activation in GLU
        self.act = GLU.get(activation) or PLAIN[activation]
        f = {"bias": False, "device": device, "dtype": dtype}
        self.router = torch.nn.Linear(d, experts, **f)
        self.w1 = torch.nn.ModuleList(torch.nn.Linear(d, ff, **f) for _ in range(experts))
        self.w3 = torch.nn.ModuleList(torch.nn.Linear(d, ff, **f) for _ in range(experts)) if self.glu else None
        self.w2 = torch.nn.ModuleList(torch.nn.Linear(ff, d, **f) for _ in range(experts))
        if grouped:  # the same weights stacked [E, in, out] for torch._grouped_mm
            self.g1 = torch.nn.Parameter(torch.stack([m.weight.detach().t() for m in self.w1]).contiguous())
            self.g3 = (torch.nn.Parameter(torch.stack([m.weight.detach().t() for m in self.w3]).contiguous())
                       if self.glu else None)
            self.g2 = torch.nn.Parameter(torch.stack([m.weight.detach().t() for m in self.w2]).contiguous())

    def route(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        weights, idx = torch.topk(probs, self.k, dim=-1)
        return probs, weights / weights.sum(dim=-1, keepdim=True), idx

    def forward(self, x):
        probs, weights, idx = self.route(x)
        y = self._grouped(x, weights, idx) if self.grouped else self._loop(x, weights, idx)
        aux = None
        if torch.is_grad_enabled():
            counts = torch.bincount(idx.flatten(), minlength=self.experts).to(x.dtype)
            frac = counts / (x.shape[0] * self.k)
            aux = self.aux_coef * self.experts * (frac * probs.mean(dim=0)).sum()
        return y, aux

    def _loop(self, x, weights, idx):
        y = torch.zeros_like(x)
        for e in range(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            xe = x.index_select(0, tok)
            h = self.act(self.w1[e](xe))
            if self.glu:
                h = h * self.w3[e](xe)
            out = self.w2[e](h) * weights[tok, slot].unsqueeze(-1)
            y.index_add_(0, tok, out)
        return y

    def _grouped(self, x, weights, idx):
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        tok = order // self.k
        offs = torch.cumsum(torch.bincount(flat, minlength=self.experts), 0).to(torch.int32)
        xs = x.index_select(0, tok)
        h = self.act(torch._grouped_mm(xs, self.g1, offs=offs))
        if self.glu:
            h = h * torch._grouped_mm(xs, self.g3, offs=offs)
        out = torch._grouped_mm(h, self.g2, offs=offs) * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, tok, out)


def nonzero_uniform(shape, gen):
    m = 0.1 + 0.9 * torch.rand(shape, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (m * sign).float()


def time_it(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms), min(ms)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--activation", default="swiglu", choices=sorted(list(GLU) + list(PLAIN)))
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--impl", default="loop", choices=["loop", "grouped"])
    p.add_argument("--tokens", default="4096", help="token counts, comma-separated")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="both", choices=["fwd", "fwdbwd", "both"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "impl": a.impl, "dtype": a.dtype,
           "config": {"d_model": a.d_model, "d_ff": a.d_ff, "experts": a.experts, "top_k": a.top_k,
                      "activation": a.activation}, "iters": a.iters, "rows": []}
    if a.impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        res["unavailable"] = f"torch {torch.__version__} has no torch._grouped_mm"
        print(json.dumps(res) if a.json else res["unavailable"])
        return 0
    torch.manual_seed(a.seed)
    dtype = DTYPES[a.dtype]
    model = LoopMoE(a.d_model, a.d_ff, a.experts, a.top_k, a.activation, grouped=a.impl == "grouped").to(dtype)
    glu_factor = 3 if a.activation in GLU else 2
    for tokens in (int(t) for t in a.tokens.split(",")):
        gen = torch.Generator().manual_seed(a.seed + 1)
        x = nonzero_uniform((tokens, a.d_model), gen).to(dtype)
        x_req = x.clone().requires_grad_(True)
        dy = nonzero_uniform((tokens, a.d_model), gen).to(dtype)
        fwd_flops = 2.0 * tokens * a.top_k * a.d_model * a.d_ff * glu_factor + 2.0 * tokens * a.d_model * a.experts

        def fwd():
            with torch.no_grad():
                model(x)

        def fwdbwd():
            y, aux = model(x_req)
            ((y * dy).sum() + aux).backward()

        row = {"tokens": tokens}
        for name, fn, flops in (("fwd", fwd, fwd_flops), ("fwdbwd", fwdbwd, 3.0 * fwd_flops)):
            if a.mode not in (name, "both"):
                continue
            med, lo = time_it(fn, a.warmup, a.iters)
            row[name] = {"ms_median": med, "ms_min": lo, "gflops": flops / (med * 1e-3) / 1e9}
        res["rows"].append(row)

    if a.json:
        print(json.dumps(res))
        return 0
    print(f"torch {res['torch']} {a.impl}  threads {res['threads']}  {a.dtype}  d_model {a.d_model}  d_ff {a.d_ff}  "
          f"experts {a.experts}  top-k {a.top_k}  {a.activation}")
    print(f"{'tokens':>7} {'mode':<9} {'ms':>10} {'GFLOP/s':>9}")
    for row in res["rows"]:
        for name, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            if name in row:
                print(f"{row['tokens']:7d} {label:<9} {row[name]['ms_median']:10.3f} {row[name]['gflops']:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
