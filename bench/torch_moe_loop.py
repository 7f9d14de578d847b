#!/usr/bin/python3
"""Times the PyTorch per-expert loop, the way most MoE code is written, on CPU in float32.

router linear -> softmax -> top-k -> normalize -> for each expert: index_select its tokens,
w1/w3/w2 linears with SwiGLU (or a plain FFN), scale by the routing weight, index_add back.

FLOPs use the same formula as moe-bench (DESIGN §8): forward = 2*T*k*d*d_ff*(3 for GLU, 2
otherwise) + router 2*T*d*E; backward ~ 2x forward. Forward is timed under torch.no_grad();
forward+backward includes the load-balance loss (coefficient 0.01), as libmoe's training step does.
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


class LoopMoE(torch.nn.Module):
    # device/dtype: where the parameters are made (and initialised): a DeepSeek-V3-sized layer has
    # 11e9 parameters, too many to create on the host and copy.
    def __init__(self, d, ff, experts, k, activation, aux_coef=0.01, device=None, dtype=None):
        super().__init__()
        self.k, self.experts, self.aux_coef = k, experts, aux_coef
        self.glu = activation in GLU
        self.act = GLU.get(activation) or PLAIN[activation]
        f = {"bias": False, "device": device, "dtype": dtype}
        self.router = torch.nn.Linear(d, experts, **f)
        self.w1 = torch.nn.ModuleList(torch.nn.Linear(d, ff, **f) for _ in range(experts))
        self.w3 = torch.nn.ModuleList(torch.nn.Linear(d, ff, **f) for _ in range(experts)) if self.glu else None
        self.w2 = torch.nn.ModuleList(torch.nn.Linear(ff, d, **f) for _ in range(experts))

    def forward(self, x):
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1)
        weights, idx = torch.topk(probs, self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        counts = []
        for e in range(self.experts):
            tok, slot = torch.where(idx == e)
            counts.append(tok.numel())
            if tok.numel() == 0:
                continue
            xe = x.index_select(0, tok)
            h = self.act(self.w1[e](xe))
            if self.glu:
                h = h * self.w3[e](xe)
            out = self.w2[e](h) * weights[tok, slot].unsqueeze(-1)
            y.index_add_(0, tok, out)
        aux = None
        if torch.is_grad_enabled():
            frac = torch.tensor(counts, dtype=x.dtype, device=x.device) / (x.shape[0] * self.k)
            aux = self.aux_coef * self.experts * (frac * probs.mean(dim=0)).sum()
        return y, aux


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
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="both", choices=["fwd", "fwdbwd", "both"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = LoopMoE(a.d_model, a.d_ff, a.experts, a.top_k, a.activation).float()
    gen = torch.Generator().manual_seed(a.seed + 1)
    x = nonzero_uniform((a.tokens, a.d_model), gen)
    x_req = x.clone().requires_grad_(True)
    dy = nonzero_uniform((a.tokens, a.d_model), gen)

    glu_factor = 3 if a.activation in GLU else 2
    fwd_flops = 2.0 * a.tokens * a.top_k * a.d_model * a.d_ff * glu_factor + 2.0 * a.tokens * a.d_model * a.experts
    fwdbwd_flops = 3.0 * fwd_flops

    def fwd():
        with torch.no_grad():
            model(x)

    def fwdbwd():
        y, aux = model(x_req)
        loss = (y * dy).sum() + aux
        loss.backward()

    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {"d_model": a.d_model, "d_ff": a.d_ff, "experts": a.experts, "top_k": a.top_k,
                   "activation": a.activation},
        "tokens": a.tokens,
        "iters": a.iters,
        "flops": {"fwd": fwd_flops, "fwdbwd": fwdbwd_flops},
    }
    for name, fn, flops in (("fwd", fwd, fwd_flops), ("fwdbwd", fwdbwd, fwdbwd_flops)):
        if a.mode not in (name, "both"):
            continue
        med, lo = time_it(fn, a.warmup, a.iters)
        res[name] = {"ms_median": med, "ms_min": lo, "tokens_per_s": a.tokens / (med * 1e-3),
                     "gflops": flops / (med * 1e-3) / 1e9}

    if a.json:
        print(json.dumps(res))
        return
    print(f"torch {res['torch']} per-expert loop  threads {res['threads']}  float32")
    print(f"layer  d_model {a.d_model}  d_ff {a.d_ff}  experts {a.experts}  top-k {a.top_k}  {a.activation}  "
          f"tokens {a.tokens}  iters {a.iters} (median)")
    print(f"{'mode':<9} {'ms/iter':>12} {'min ms':>10} {'tokens/s':>14} {'GFLOP/s':>10}")
    for name, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
        if name in res:
            r = res[name]
            print(f"{label:<9} {r['ms_median']:12.3f} {r['ms_min']:10.3f} {r['tokens_per_s']:14.0f} {r['gflops']:10.1f}")


if __name__ == "__main__":
    sys.exit(main())
