"""No leak across 10,000 create/destroy cycles: Python objects (tracemalloc) and process memory (RSS).

The cycles run in a fresh interpreter (a clean RSS baseline, nothing else of the test session in
the way) with OMP_NUM_THREADS=1: the point is memory, and on a loaded machine OpenMP start-up costs
dominate such tiny layers.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CYCLES = 10_000

SCRIPT = textwrap.dedent(r"""
    import gc, json, resource, sys, time, tracemalloc
    import numpy as np
    import libmoe

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def one_cycle(x, dy, i):
        layer = libmoe.Layer(d_model=8, d_ff=16, num_experts=4, top_k=2, seed=i)
        ctx = layer.context()
        layer.forward(x, ctx)
        layer.backward(ctx, dy)
        ctx.stats()
        layer.get_grad("experts.w1")
        layer.param_view("router.weight")
        if i % 4 == 0:  # the error paths too: exceptions must not leak wrapper state
            for bad in (lambda: layer.forward(x[:, :4].copy()),
                        lambda: libmoe.Layer(d_model=8, d_ff=16, top_k=9),
                        lambda: layer.get_param("nope")):
                try:
                    bad()
                except (ValueError, libmoe.MoeError):
                    pass
        ctx.close()
        layer.close()

    cycles = int(sys.argv[1])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8)).astype(np.float32)
    dy = rng.standard_normal((8, 8)).astype(np.float32)
    for i in range(500):  # warm up allocator pools and lazily created objects
        one_cycle(x, dy, i)
    gc.collect()
    tracemalloc.start()
    rss0, py0, t0 = rss_bytes(), tracemalloc.get_traced_memory()[0], time.perf_counter()
    for i in range(cycles):
        one_cycle(x, dy, i)
    gc.collect()
    py1, rss1 = tracemalloc.get_traced_memory()[0], rss_bytes()
    print(json.dumps({"py": py1 - py0, "rss": rss1 - rss0, "seconds": time.perf_counter() - t0}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS needs /proc")
def test_no_leak_over_10000_cycles():
    import libmoe

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(libmoe.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([package_parent] + sys.path))
    # cwd: the package's parent, so `-c`'s sys.path[0] cannot shadow libmoe (a build dir holds libmoe.so)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(CYCLES)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=package_parent)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{CYCLES} cycles in {r['seconds']:.1f} s: Python +{r['py']} B, RSS +{r['rss']} B")
    # One leaked object per cycle would be >= 10,000 * 32 bytes of Python memory; one leaked layer
    # per cycle (parameters and gradients alone are ~3 KB) >= 30 MB of RSS.
    assert r["py"] < 64 * 1024, f"Python memory grew by {r['py']} bytes over {CYCLES} cycles"
    assert r["rss"] < 4 * 1024 * 1024, f"RSS grew by {r['rss']} bytes over {CYCLES} cycles"
