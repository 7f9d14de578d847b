#!/usr/bin/env python3
"""train_specialize.py: experts specialise on a clustered task, and load balancing prevents collapse.

The Python twin of examples/c/train_specialize.c, on ``libmoe.Layer`` and numpy; the same task, the
same three runs, the same printed figures (the generator is the C demo's, so the tokens are the same
and the figures agree with it up to float rounding), and a PNG of the training curves.

The task: every token comes from one of K clusters, x = c_k + noise with c_k the cluster's centre
(plus, with --offset M, a component of length M shared by every token), and its target is
y = A_k x with a linear map A_k of its own. A top-1 MoE layer (Switch-style gate: the router
probability of the chosen expert, ReLU experts) learns the task from scratch with the layer's own
backward and plain SGD on the loss 1/(2 T d) sum_t |y_t - target_t|^2, three times from the same
initial weights and the same batches:
  none  no balancing at all;
  lb    the load-balance loss E * sum_e f_e P_e with coefficient --alpha (Switch / GShard);
  bias  auxiliary-loss-free balancing: router.bias[e] += u * sign(mean load - load_e) after each
        step (DeepSeek-V3), no balance loss.
It prints the progress (step, loss, load CV) and, at the end, on held-out tokens:
  purity      the mean over clusters of the fraction of its tokens routed to its most frequent expert;
  exclusive   the fraction of tokens whose expert's most frequent cluster is their own;
  experts     the number of distinct experts that are some cluster's favourite;
  load CV     std/mean of the per-expert token counts.
A collapsed router can have purity 1 (every cluster on the same expert); "exclusive" and "experts"
show the collapse.

--plot PATH (default train_specialize.png) saves a 2x3 figure: the training loss of each run over
the steps (top) and each expert's share of the batch's tokens over the steps (bottom, stacked).

Exit status 0 only when both balanced runs specialise (purity and exclusivity >= --min-purity,
every cluster on its own expert when E >= K, eval loss at most half the initial one) and the run
without balancing does not; 1 otherwise (or when the PNG could not be written); 2 on a libmoe
error, bad arguments or a missing module (numpy, matplotlib, libmoe).

    PYTHONPATH=build/python python3 examples/python/train_specialize.py [--steps N] [--plot PATH] ...
"""

import argparse
import math
import os
import sys
import time

try:
    import numpy as np
except ImportError as e:
    print(f"train_specialize.py: needs numpy (Debian: apt install python3-numpy): {e}", file=sys.stderr)
    sys.exit(2)

try:
    import libmoe
except ImportError as e:
    print(f"train_specialize.py: cannot import libmoe ({e}); build it and put the build's python directory "
          f"on PYTHONPATH, e.g. PYTHONPATH=build/python", file=sys.stderr)
    sys.exit(2)

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


class Rng:
    """The C demo's generator: splitmix64, uniforms in (0, 1), Box-Muller normals (one per pair)."""

    def __init__(self, seed):
        self.s = seed & MASK64

    def next(self, n):
        """The next n raw 64-bit draws, as a uint64 array."""
        steps = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(self.s) + steps * np.uint64(GOLDEN)  # wraps modulo 2^64, like the C
        self.s = (self.s + n * GOLDEN) & MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(raw):
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def normal(raw_pairs):
    """Box-Muller on draws laid out u1, u2, u1, u2, ... (the C's rng_normal called repeatedly)."""
    u = uniform(raw_pairs)
    return np.sqrt(-2.0 * np.log(u[..., 0::2])) * np.cos(6.283185307179586 * u[..., 1::2])


class Task:
    def __init__(self, o):
        r = Rng(o.seed * 1000003 + 17)
        K, d = o.clusters, o.d_model
        self.K, self.d, self.noise = K, d, o.noise
        self.shared = np.full(d, o.offset / math.sqrt(d))  # along (1, ..., 1) / sqrt(d)
        self.centre = o.spread * normal(r.next(2 * K * d)).reshape(K, d)
        self.map = (normal(r.next(2 * K * d * d)) / math.sqrt(d)).reshape(K, d, d)

    def batch(self, r, T):
        """T tokens: x float32 [T,d], target float32 [T,d], cluster int [T] (each token draws its
        cluster, then d normals, exactly as the C demo's task_batch)."""
        d = self.d
        raw = r.next(T * (1 + 2 * d)).reshape(T, 1 + 2 * d)
        cluster = (raw[:, 0] % np.uint64(self.K)).astype(np.int64)
        xv = self.shared + self.centre[cluster] + self.noise * normal(raw[:, 1:])
        target = np.einsum("nij,nj->ni", self.map[cluster], xv)
        return xv.astype(np.float32), target.astype(np.float32), cluster


def mse(y, target, want_grad=False):
    """1/(2 T d) sum |y - target|^2 and, when asked, dy = (y - target) / (T d)."""
    e = y.astype(np.float64) - target.astype(np.float64)
    loss = 0.5 * float(np.sum(e * e)) / e.size
    return loss, ((e / e.size).astype(np.float32) if want_grad else None)


def evaluate(layer, o, x, target, cluster):
    E, K = o.experts, o.clusters
    ids = layer.route(x).topk()[0][:, 0]  # inference routing: no noise, no bias update
    loss, _ = mse(layer.forward(x), target)
    kept = ids >= 0
    hist = np.zeros((K, E), dtype=np.int64)
    np.add.at(hist, (cluster[kept], ids[kept]), 1)
    load = hist.sum(axis=0).astype(np.float64)
    totals = hist.sum(axis=1)
    favourite = hist.argmax(axis=1)  # the first maximum, as in the C
    purity = float(np.mean(np.where(totals > 0, hist.max(axis=1) / np.maximum(totals, 1), 0.0)))
    exclusive = float(hist.max(axis=0).sum()) / len(x)
    mean = load.mean()
    load_cv = float(load.std() / mean) if mean > 0 else 0.0
    return dict(loss=loss, purity=purity, exclusive=exclusive, experts=len(set(favourite.tolist())), load_cv=load_cv)


def report(ev):
    return (f"eval loss {ev['loss']:.4f}, purity {ev['purity']:.3f}, exclusive {ev['exclusive']:.3f}, "
            f"experts {ev['experts']}, load CV {ev['load_cv']:.3f}")


def train(o, task, mode, ex, etarget, ecluster):
    T = o.tokens
    data = Rng(o.seed * 7919 + 3)  # the same batches for every mode
    layer = libmoe.Layer(d_model=o.d_model, d_ff=o.d_ff, num_experts=o.experts, top_k=1,
                         normalize_topk=False,  # the gate is the router probability: the router learns
                         activation="relu",
                         aux_loss_coef=o.alpha if mode == "lb" else 0.0,
                         bias_update_rate=o.bias_rate if mode == "bias" else 0.0,
                         seed=o.seed)  # the same initial weights for every mode
    ctx = layer.context()
    # Plain SGD writes through the layer's own parameter storage (zero-copy views).
    params = [(layer.param_view(name), layer.grad_view(name))
              for name, info in layer.param_info().items() if info.trainable]
    lr = np.float32(o.lr)
    every = o.steps // 10 if o.steps >= 10 else 1

    ev0 = evaluate(layer, o, ex, etarget, ecluster)
    print(f"[{mode}] before training: {report(ev0)}")
    losses = np.empty(o.steps)
    loads = np.empty((o.steps, o.experts))
    for step in range(o.steps):
        x, target, _ = task.batch(data, T)
        layer.zero_grad()
        y = layer.forward(x, ctx)
        loss, dy = mse(y, target, want_grad=True)
        if not math.isfinite(loss):
            print(f"[{mode}] step {step}: the loss is {loss}", file=sys.stderr)
            sys.exit(1)
        layer.backward(ctx, dy, need_dx=False)
        for p, g in params:
            p -= lr * g
        losses[step] = loss
        loads[step] = ctx.expert_counts() / T
        if step % every == 0 or step == o.steps - 1:
            st = ctx.stats()
            print(f"[{mode}] step {step:4d}  loss {loss:8.4f}  aux {st['aux_loss_total']:.4f}  "
                  f"load CV {st['load_cv']:.3f}")
    ev = evaluate(layer, o, ex, etarget, ecluster)
    bias = layer.get_param("router.bias")
    print(f"[{mode}] after {o.steps} steps: {report(ev)}\n")
    ctx.close()
    layer.close()
    return dict(ev, loss0=ev0["loss"], purity0=ev0["purity"], bias_spread=float(bias.max() - bias.min()),
                losses=losses, loads=loads)


def specialised(o, r):
    want = min(o.experts, o.clusters)
    full = o.experts >= o.clusters
    return (r["purity"] >= o.min_purity and (not full or r["exclusive"] >= o.min_purity)
            and r["experts"] == want and r["loss"] <= 0.5 * r["loss0"])


def moving_mean(a, w):
    """Trailing mean over up to w steps (axis 0), the same length as a."""
    c = np.cumsum(np.concatenate([np.zeros((1,) + a.shape[1:]), a]), axis=0)
    n = np.arange(1, len(a) + 1)
    lo = np.maximum(n - w, 0)
    width = (n - lo).reshape((-1,) + (1,) * (a.ndim - 1))
    return (c[n] - c[lo]) / width


def plot(path, o, runs, labels):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E = o.experts
    w = max(1, o.steps // 40)
    steps = np.arange(o.steps)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True, sharey="row", constrained_layout=True)
    colours = plt.get_cmap("tab10" if E <= 10 else "tab20")(np.arange(E) % (10 if E <= 10 else 20))
    lo = min(float(r["losses"].min()) for r in runs)
    hi = max(float(r["losses"].max()) for r in runs)
    for col, (r, label) in enumerate(zip(runs, labels)):
        ax = axes[0, col]
        ax.plot(steps, r["losses"], color="0.75", lw=0.8, label="per step")
        ax.plot(steps, moving_mean(r["losses"], w), color="C3", lw=1.8, label=f"{w}-step mean")
        ax.axhline(r["loss"], color="k", ls="--", lw=1, label=f"held-out after: {r['loss']:.3f}")
        ax.set_yscale("log")
        ax.set_ylim(lo * 0.8, hi * 1.25)
        verdict = "specialised" if specialised(o, r) else "collapsed / mixed"
        ax.set_title(f"{label}\npurity {r['purity']:.3f}, exclusive {r['exclusive']:.3f}, "
                     f"experts {r['experts']}/{E}: {verdict}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        if col == 0:
            ax.set_ylabel("training loss (log scale)")

        ax = axes[1, col]
        share = moving_mean(r["loads"], w)
        ax.stackplot(steps, share.T, colors=colours, labels=[f"expert {e}" for e in range(E)], alpha=0.9)
        for q in range(1, E):
            ax.axhline(q / E, color="k", lw=0.6, ls=":", alpha=0.6)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, o.steps - 1)
        ax.set_xlabel("training step")
        ax.set_title(f"tokens per expert ({w}-step mean); held-out load CV {r['load_cv']:.3f}", fontsize=10)
        if col == 0:
            ax.set_ylabel("share of the batch's tokens (stacked)")
    handles, names = axes[1, 0].get_legend_handles_labels()
    axes[1, 2].legend(handles[::-1], names[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9,
                      title="dotted: equal shares", title_fontsize=8)
    fig.suptitle(f"libmoe: top-1 MoE, {E} ReLU experts, on {o.clusters} clusters with a linear map each "
                 f"(d {o.d_model}, SGD lr {o.lr:g}, {o.tokens} tokens a step, seed {o.seed})", fontsize=12)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Experts specialise on a clustered task; balancing prevents collapse.")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--d-model", type=int, default=16)
    p.add_argument("--d-ff", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--alpha", type=float, default=0.1, help="load-balance loss coefficient of the lb run")
    p.add_argument("--bias-rate", type=float, default=0.01, help="router bias update rate of the bias run")
    p.add_argument("--offset", type=float, default=0.0, help="length of a component shared by every token")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--min-purity", type=float, default=0.9)
    p.add_argument("--plot", default="train_specialize.png", help="PNG to write (default %(default)s)")
    o = p.parse_args(argv)
    o.eval_tokens, o.spread, o.noise = 2048, 1.0, 1.0
    if (min(o.steps, o.tokens, o.experts, o.clusters, o.d_model, o.d_ff) < 1 or not o.lr > 0 or o.alpha < 0
            or o.bias_rate < 0 or not 0 <= o.seed <= MASK64):
        p.error("sizes must be >= 1, --lr > 0, --alpha and --bias-rate >= 0, --seed in [0, 2^64)")
    if not o.plot:
        p.error("--plot needs a path")
    return o


def main(argv):
    o = parse_args(argv)
    try:
        import matplotlib  # noqa: F401 - fail now, not after the training
    except ImportError as e:
        print(f"train_specialize.py: needs matplotlib (Debian: apt install python3-matplotlib): {e}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"task: {o.clusters} clusters, x = c_k + noise (+ shared offset of length {o.offset:g}), target A_k x; "
          f"d {o.d_model}\nlayer: {o.experts} ReLU experts (d_ff {o.d_ff}), top-1, gate = router probability; "
          f"SGD lr {o.lr:g}, {o.steps} steps of {o.tokens} tokens\n")
    task = Task(o)
    ex, etarget, ecluster = task.batch(Rng(o.seed * 31337 + 5), o.eval_tokens)
    try:
        none, lb, bias = (train(o, task, mode, ex, etarget, ecluster) for mode in ("none", "lb", "bias"))
    except libmoe.MoeError as e:
        print(f"train_specialize.py: libmoe error: {e}", file=sys.stderr)
        return 2

    labels = ["none", f"load-balance loss (alpha {o.alpha:g})", f"bias balancing (u {o.bias_rate:g})"]
    print(f"held-out tokens ({o.eval_tokens}), after training; purity0 and loss0 before it:")
    print(f"{'balancing':<30} {'purity0':>7} {'purity':>7} {'exclusive':>9} {'experts':>7} {'load CV':>8} "
          f"{'loss0':>8} {'loss':>8}")
    for label, r in zip(labels, (none, lb, bias)):
        print(f"{label:<30} {r['purity0']:7.3f} {r['purity']:7.3f} {r['exclusive']:9.3f} {r['experts']:7d} "
              f"{r['load_cv']:8.3f} {r['loss0']:8.4f} {r['loss']:8.4f}")
    print(f"(bias balancing left router.bias spread over {bias['bias_spread']:.3f})")

    status = 0
    plot(o.plot, o, (none, lb, bias), labels)
    size = os.path.getsize(o.plot) if os.path.isfile(o.plot) else 0
    if size == 0:
        print(f"FAIL: the plot {o.plot} was not written")
        status = 1
    else:
        print(f"plot: {o.plot} ({size} bytes)")
    if not specialised(o, lb):
        print("FAIL: with the load-balance loss the experts did not specialise")
        status = 1
    if not specialised(o, bias):
        print("FAIL: with bias balancing the experts did not specialise")
        status = 1
    if specialised(o, none):
        print("FAIL: without balancing the router did not collapse: balancing shows nothing here")
        status = 1
    if status == 0:
        print(f"OK: with balancing every cluster has its own expert (purity {lb['purity']:.3f} / "
              f"{bias['purity']:.3f}); without it the router gives {none['experts']} of {o.experts} experts all "
              f"the clusters, load CV {none['load_cv']:.3f}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
