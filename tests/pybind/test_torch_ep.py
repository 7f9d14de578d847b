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
    init = f"file://{tmp_path}/rendezvous-{mode}-{size}"
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


def test_state_dict_written_at_one_ep_size_loads_at_another(tmp_path):
    """Saved at EP 2 (a shard per rank, full_state_dict, and save_block's safetensors file), loaded
    at EP 4 and at EP 1: the same parameters, the same outputs."""
    import torch

    import libmoe.torch as lt
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for mode, size in (("save", 2), ("load", 4)):
        codes, outs, _ = launch(tmp_path, mode, size, folder)
        report = "\n".join(f"--- {mode}: rank {r} (exit {c}) ---\n{o}" for r, (c, o) in enumerate(zip(codes, outs)))
        assert codes == [0] * size, report
        for r, o in enumerate(outs):
            assert f"rank {r} of {size}: {mode}: ok (0 failed checks)" in o, report
    # EP 1: the shards merged, or full.pt; one shard alone lacks experts and is refused.
    from ep_worker import GLOBAL_T, RESHARD, global_x  # noqa: E402 - the worker's shapes and batch
    shards = [torch.load(folder / f"shard{r}.pt") for r in range(2)]
    full = torch.load(folder / "full.pt")
    y_saved = torch.cat([torch.load(folder / f"y{r}.pt") for r in range(2)])
    merged = lt.merge_expert_shards(reversed(shards))
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)
    for state in (merged, full, None):
        one = lt.MoE(**RESHARD, seed=99).eval()
        if state is None:
            one.load_block(folder / "block.safetensors", "mlp")
            assert all(torch.equal(one.state_dict()[k], full[k]) for k in full)
        else:
            one.load_state_dict(state)
        with torch.no_grad():
            y = one(global_x())
        assert y.shape == (GLOBAL_T, RESHARD["d_model"])
        assert torch.allclose(y, y_saved, rtol=1e-5, atol=1e-6), (y - y_saved).abs().max()
    with pytest.raises(RuntimeError, match=r"holds experts \[4, 8\) of 8, this module needs \[0, 8\)"):
        lt.MoE(**RESHARD, seed=99).load_state_dict(shards[1])
    with pytest.raises(libmoe.InvalidArgumentError, match="cover"):
        lt.merge_expert_shards(shards[:1] + shards[:1])


def test_refuses_a_group_before_torch_distributed_is_initialised():
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    with pytest.raises(libmoe.StateError, match="not initialised"):
        libmoe.distributed.ProcessGroupComm(None)


@pytest.fixture
def world_of_one(tmp_path):
    """A one-rank gloo group in this process (expert parallelism with R = 1)."""
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process already")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_rank_group_equals_the_plain_module_and_refuses_what_would_lose_the_group(world_of_one):
    import copy

    import torch

    import libmoe.torch as lt
    cfg = dict(d_model=8, d_ff=16, num_experts=4, top_k=2, seed=9, z_loss_coef=1e-3)
    ep, plain = lt.MoE(**cfg, ep_group=world_of_one), lt.MoE(**cfg)
    x = torch.randn(5, 8)
    xe, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yp = ep(xe), plain(xp)
    ye.sum().backward()
    yp.sum().backward()
    assert torch.allclose(ye, yp, rtol=1e-6, atol=1e-6)
    assert torch.allclose(xe.grad, xp.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ep.experts.w1.grad, plain.experts.w1.grad, rtol=1e-6, atol=1e-6)
    assert ep.layer.comm.size == 1 and ep.layer.comm.broken is None
    with pytest.raises(TypeError, match="cannot be pickled or deep-copied"):
        copy.deepcopy(ep)
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.deepcopy(ep.layer)
    with pytest.raises(libmoe.UnsupportedError, match="CPU layers only"):
        lt.MoE(**cfg, device="cuda:0", ep_group=world_of_one)
    with pytest.raises(libmoe.InvalidArgumentError, match="num_experts"):
        libmoe.distributed.Layer(world_of_one, d_model=8, d_ff=16, num_experts=0, top_k=2)
