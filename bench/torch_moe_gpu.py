#!/usr/bin/env python3
"""Times PyTorch MoE layers on a CUDA device, bfloat16 by default, for bench/compare_gpu.sh:

  loop     the per-expert loop most MoE code uses (torch_moe_loop.LoopMoE: index_select each
           expert's tokens, three nn.Linear, index_add back);
  grouped  where this PyTorch has torch._grouped_mm: tokens sorted by expert and each projection
           one grouped GEMM over all experts (the kernel torchtitan and transformers use).

Both route as moe-bench's default layer (softmax, top-k, normalized, dropless, SwiGLU) and, in
forward+backward, add the load-balance loss (0.01). FLOPs as moe-bench (DESIGN section 8):
forward = 2*T*k*d*d_ff*(3 GLU | 2) + router 2*T*d*E, backward ~ 2x forward. Each iteration is
timed on the host clock after torch.cuda.synchronize(), as moe-bench times a CUDA layer; the
median of --iters is reported. Parameters are made on the device in --dtype; one layer at a time
is alive, so the device holds one copy of the weights (and their gradients).
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_moe_loop import GLU, PLAIN, LoopMoE, nonzero_uniform  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


class GroupedMoE(torch.nn.Module):
    """Experts stacked as [E, out, in] (nn.Linear layout) and run with torch._grouped_mm."""

    def __init__(self, d, ff, experts, k, activation, aux_coef=0.01, device=None, dtype=None):
        super().__init__()
        self.k, self.experts, self.aux_coef = k, experts, aux_coef
        self.glu = activation in GLU
        self.act = GLU.get(activation) or PLAIN[activation]
        f = {"device": device, "dtype": dtype}
        self.router = torch.nn.Linear(d, experts, bias=False, **f)

        def stacked(out_features, in_features):
            bound = 1.0 / in_features ** 0.5  # nn.Linear's initial range
            return torch.nn.Parameter(torch.empty(experts, out_features, in_features, **f).uniform_(-bound, bound))

        self.w1 = stacked(ff, d)
        self.w3 = stacked(ff, d) if self.glu else None
        self.w2 = stacked(d, ff)

    def forward(self, x):
        T = x.shape[0]
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1)
        weights, idx = torch.topk(probs, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # slots in expert order, tokens ascending
        counts = torch.bincount(flat, minlength=self.experts)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # end row of each expert's group
        tok = order // self.k
        xs = x.index_select(0, tok)
        # out = input @ weight.T per group: mat_b is the transposed [E, in, out] view (column-major)
        h = self.act(torch._grouped_mm(xs, self.w1.transpose(-2, -1), offs=offs))
        if self.glu:
            h = h * torch._grouped_mm(xs, self.w3.transpose(-2, -1), offs=offs)
        out = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offs)
        out = out * weights.reshape(-1)[order].unsqueeze(-1)
        y = torch.zeros_like(x).index_add_(0, tok, out)
        aux = None
        if torch.is_grad_enabled():
            frac = counts.to(x.dtype) / (T * self.k)
            aux = self.aux_coef * self.experts * (frac * probs.mean(dim=0)).sum()
        return y, aux


def time_cuda(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms), min(ms)


def error_text(e):
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def run_impl(make_model, a, x, dy, flops):
    """Times one implementation. A failure (out of memory, a kernel this GPU or PyTorch lacks) is
    reported in the result, per mode, instead of ending the run: the other figures still count."""
    res = {}
    model = None
    try:
        model = make_model()
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError and NotImplementedError are RuntimeErrors
        res["error"] = error_text(e)
    if model is not None:
        x_req = x.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                model(x)

        def fwdbwd():
            y, aux = model(x_req)
            ((y * dy).sum() + aux).backward()

        for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            if a.mode not in (name, "both"):
                continue
            try:
                med, lo = time_cuda(fn, a.warmup, a.iters)
                res[name] = {"ms_median": med, "ms_min": lo, "tokens_per_s": a.tokens / (med * 1e-3),
                             "tflops": flops[name] / (med * 1e-3) / 1e12}
            except RuntimeError as e:
                res[name] = {"error": error_text(e)}
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        del fwd, fwdbwd, x_req
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--activation", default="swiglu", choices=sorted(list(GLU) + list(PLAIN)))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device-index", type=int, default=0)
    p.add_argument("--impl", default="both", choices=["loop", "grouped", "both"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="both", choices=["fwd", "fwdbwd", "both"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    if not torch.cuda.is_available():
        sys.exit("torch_moe_gpu.py: this PyTorch sees no CUDA device")
    dev = torch.device("cuda", a.device_index)
    torch.cuda.set_device(dev)
    dtype = DTYPES[a.dtype]
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed + 1)
    x = nonzero_uniform((a.tokens, a.d_model), gen).to(dev, dtype)
    dy = nonzero_uniform((a.tokens, a.d_model), gen).to(dev, dtype)

    glu_factor = 3 if a.activation in GLU else 2
    fwd_flops = 2.0 * a.tokens * a.top_k * a.d_model * a.d_ff * glu_factor + 2.0 * a.tokens * a.d_model * a.experts
    flops = {"fwd": fwd_flops, "fwdbwd": 3.0 * fwd_flops}
    shape = (a.d_model, a.d_ff, a.experts, a.top_k, a.activation)

    res = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(dev),
        "dtype": a.dtype,
        "config": {"d_model": a.d_model, "d_ff": a.d_ff, "experts": a.experts, "top_k": a.top_k,
                   "activation": a.activation},
        "tokens": a.tokens,
        "iters": a.iters,
        "flops": flops,
        "impls": {},
    }
    if a.impl in ("loop", "both"):
        res["impls"]["loop"] = run_impl(lambda: LoopMoE(*shape, device=dev, dtype=dtype), a, x, dy, flops)
    if a.impl in ("grouped", "both"):
        if hasattr(torch, "_grouped_mm"):
            res["impls"]["grouped"] = run_impl(lambda: GroupedMoE(*shape, device=dev, dtype=dtype), a, x, dy, flops)
        else:
            res["impls"]["grouped"] = {"error": f"torch {torch.__version__} has no torch._grouped_mm"}

    if a.json:
        print(json.dumps(res))
        return 0
    print(f"torch {res['torch']} (CUDA {res['cuda']}) on {res['device']}  {a.dtype}")
    print(f"layer  d_model {a.d_model}  d_ff {a.d_ff}  experts {a.experts}  top-k {a.top_k}  {a.activation}  "
          f"tokens {a.tokens}  iters {a.iters} (median)")
    print(f"{'impl':<8} {'mode':<8} {'ms/iter':>10} {'min ms':>10} {'TFLOP/s':>9}")
    for impl, r in res["impls"].items():
        if "error" in r:
            print(f"{impl:<8} {'-':<8} {r['error']}")
        for name, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            t = r.get(name)
            if t and "error" in t:
                print(f"{impl:<8} {label:<8} {t['error']}")
            elif t:
                print(f"{impl:<8} {label:<8} {t['ms_median']:10.3f} {t['ms_min']:10.3f} {t['tflops']:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
