"""Expert parallelism over torch.distributed (gloo, CPU): R processes on this machine, each running
ep_worker.py, against one layer on the global batch; and a rank that skips a collective."""

import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

import libmoe.distributed

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ep_worker.py")

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch has no torch.distributed with gloo")


def launch(tmp_path, mode, size, *extra, limit=120):
    """Run size ranks of ep_worker.py; returns (exit codes, outputs, seconds)."""
    init = f"file://{tmp_path}/rendezvous"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, WORKER, mode, str(r), str(size), init, *map(str, extra)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(size)]
    outs, codes = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, limit - (time.monotonic() - t0)))
            outs.append(out)
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, outs, time.monotonic() - t0


@pytest.mark.parametrize("size", [2, 4])
def test_ranks_equal_one_layer_on_the_global_batch(tmp_path, size):
    codes, outs, _ = launch(tmp_path, "equal", size)
    report = "\n".join(f"--- rank {r} (exit {c}) ---\n{o}" for r, (c, o) in enumerate(zip(codes, outs)))
    assert codes == [0] * size, report
    for r, o in enumerate(outs):
        assert f"rank {r} of {size}: equal: ok (0 failed checks)" in o, report


def test_a_missing_rank_raises_comm_error_within_the_group_timeout(tmp_path):
    timeout = 3
    codes, outs, seconds = launch(tmp_path, "deadline", 2, timeout, tmp_path / "done", limit=90)
    report = "\n".join(f"--- rank {r} (exit {c}) ---\n{o}" for r, (c, o) in enumerate(zip(codes, outs)))
    print(report)
    assert codes == [0, 0], report
    assert "a missing rank reads:" in outs[0] and "rank 0 of 2: deadline: ok" in outs[0], report


def test_refuses_a_group_before_torch_distributed_is_initialised():
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    with pytest.raises(libmoe.StateError, match="not initialised"):
        libmoe.distributed.ProcessGroupComm(None)
