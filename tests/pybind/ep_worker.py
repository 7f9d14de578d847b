"""One rank of the torch.distributed expert-parallel tests (test_torch_ep.py starts R of them).

    ep_worker.py equal    RANK SIZE INIT_METHOD
    ep_worker.py deadline RANK SIZE INIT_METHOD TIMEOUT_S FLAG_FILE
    ep_worker.py save     RANK SIZE INIT_METHOD DIR
    ep_worker.py load     RANK SIZE INIT_METHOD DIR

equal: libmoe.torch.MoE(ep_group=WORLD) on this rank's tokens against one libmoe.torch.MoE holding
every expert on the global batch (the concatenation of every rank's tokens), two configurations:
outputs, dx, aux loss and statistics, the router bias after its update, the replicated gradients
summed over the ranks and the local experts' gradients; and libmoe.distributed.Layer (numpy) the same.
deadline: the last rank skips a training forward; the others must raise libmoe.CommError within
the process group's timeout, naming the exchange and the rank, with parameters unchanged, and fail
at once afterwards.
save: a training step (replicated gradients summed over the ranks, then SGD), then this rank's
state_dict() to DIR/shard{RANK}.pt, MoE.full_state_dict() (rank 0) to DIR/full.pt, save_block
(collective) to DIR/block.safetensors, and this rank's
inference outputs of the global batch GLOBAL_X (split in equal parts) to DIR/y{RANK}.pt.
load: modules made with another seed load those files at this EP size: the shard of the save-time
rank that holds this rank's experts, full.pt, and block.safetensors through load_block; their parameters equal the full state's slice and
their outputs the saved ones. Exit status 0 when every check held on this rank.
"""

import datetime
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import libmoe
import libmoe.distributed
import libmoe.torch as lt

FAILURES = []


def check(cond, message):
    if not cond:
        FAILURES.append(message)
        print(f"rank {RANK}: FAIL {message}", flush=True)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


CONFIGS = [
    dict(d_model=16, d_ff=24, num_experts=8, top_k=2, seed=11, aux_loss_coef=0.01, z_loss_coef=0.001,
         importance_loss_coef=0.01),
    dict(d_model=16, d_ff=24, num_experts=8, top_k=2, seed=5, score="sigmoid", num_groups=4, topk_groups=2,
         routed_scale=2.0, num_shared_experts=1, shared_gate=True, bias_update_rate=0.01, activation="geglu",
         aux_loss_coef=0.01, z_loss_coef=0.001),
]


def tokens_per_rank(variant, size):
    return [0 if (variant == 1 and r == 1) else 5 + 3 * r for r in range(size)]


def run_equal(variant, size):
    cfg = CONFIGS[variant]
    counts = tokens_per_rank(variant, size)
    first, T, Tg = sum(counts[:RANK]), counts[RANK], sum(counts)
    g = torch.Generator().manual_seed(100 + variant)
    xg = torch.randn(Tg, cfg["d_model"], generator=g)
    dyg = torch.randn(Tg, cfg["d_model"], generator=g)

    ref = lt.MoE(**cfg)
    xr = xg.clone().requires_grad_(True)
    yr = ref(xr)
    (yr * dyg).sum().backward()

    ep = lt.MoE(**cfg, ep_group=dist.group.WORLD)
    E, local = cfg["num_experts"], cfg["num_experts"] // size
    experts = slice(RANK * local, (RANK + 1) * local)
    ref_bias = ref.router.bias.detach().clone()
    for name, p in ep.state_dict().items():
        if name == "experts._extra_state":  # which experts this rank holds: for loading at another EP size
            check(p == dict(num_experts=E, experts=(RANK * local, (RANK + 1) * local), ep_size=size), f"{name} is {p}")
            continue
        want = ref.state_dict()[name]
        if name.startswith("experts."):
            check(p.shape[0] == local and want.shape[0] == E, f"{name}: shape {tuple(p.shape)} of {tuple(want.shape)}")
            want = want[experts]
        if name != "router.bias":  # the reference's bias has had its update already
            check(torch.equal(p, want), f"variant {variant}: {name} does not start as the reference's slice")

    x = xg[first:first + T].clone().requires_grad_(True)
    y = ep(x)
    (y * dyg[first:first + T]).sum().backward()

    tag = f"variant {variant}, {size} ranks"
    if T:
        check(rel(y.detach(), yr.detach()[first:first + T]) < 1e-5, f"{tag}: y differs")
        check(rel(x.grad, xr.grad[first:first + T]) < 1e-5, f"{tag}: dx differs")
    check(abs(ep.aux_loss.item() - ref.aux_loss.item()) <= 1e-5 * abs(ref.aux_loss.item()),
          f"{tag}: aux loss {ep.aux_loss.item()} vs {ref.aux_loss.item()}")
    check(ref.aux_loss.item() > 0, f"{tag}: the reference's aux loss is {ref.aux_loss.item()}")
    for key in ("load_balance_loss", "z_loss", "importance_loss", "aux_loss_total", "load_cv"):
        a, b = ep.last_stats[key], ref.last_stats[key]
        check(abs(a - b) <= 1e-4 * abs(b) + 1e-7, f"{tag}: stats {key} {a} vs {b}")
    check(ep.last_stats["num_tokens"] == T, f"{tag}: num_tokens {ep.last_stats['num_tokens']}, this rank's {T}")
    if cfg.get("bias_update_rate"):
        check(torch.equal(ep.router.bias, ref.router.bias), f"{tag}: router.bias after the update differs")
        check(not torch.equal(ref.router.bias, torch.zeros_like(ref_bias)), f"{tag}: the bias update did nothing")

    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        want = ref_params[name].grad
        got = p.grad.clone()
        if name.startswith("experts."):
            want = want[experts]
        else:
            dist.all_reduce(got)  # replicated: each rank holds its share
        check(float(want.abs().max()) > 0, f"{tag}: the reference's grad of {name} is zero")
        check(rel(got, want) < 1e-5, f"{tag}: grad of {name} differs: rel err {rel(got, want):.3g}")

    # The numpy Layer over the same group gives the same forward.
    lay = libmoe.distributed.Layer(dist.group.WORLD, **cfg)
    check(lay.comm.size == size and lay.comm.rank == RANK, f"{tag}: comm {lay.comm}")
    ctx = lay.context()
    yn = lay.forward(np.ascontiguousarray(xg[first:first + T].numpy()), ctx)
    if T:
        check(rel(yn, yr.detach()[first:first + T]) < 1e-5, f"{tag}: libmoe.distributed.Layer's y differs")
    check(lay.get_param("experts.w1").shape[0] == local, f"{tag}: Layer experts.w1 {lay.get_param('experts.w1').shape}")


def run_deadline(size, timeout, flag):
    cfg = CONFIGS[0]
    # The world group has a generous timeout; the layer's group the short one under test.
    group = dist.new_group(timeout=datetime.timedelta(seconds=timeout))
    ep = lt.MoE(**cfg, ep_group=group)
    x = torch.randn(6, cfg["d_model"])
    dist.barrier()  # the ranks start the healthy step together (they share cores with others)
    ep(x).sum().backward()  # a healthy step first
    if RANK == size - 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        check(os.path.exists(flag), "the other ranks never finished")
        return
    before = {k: v.clone() for k, v in ep.state_dict().items() if isinstance(v, torch.Tensor)}
    t0 = time.monotonic()
    try:
        ep(x)
        check(False, "a forward with a missing rank returned")
    except libmoe.CommError as e:
        waited = time.monotonic() - t0
        msg = str(e)
        print(f"rank {RANK}: a missing rank reads: {msg} (after {waited:.2f} s)", flush=True)
        check(0.8 * timeout <= waited < timeout + 15, f"it failed after {waited:.2f} s; the group's timeout is {timeout} s")
        check("moe_forward" in msg and "all_to_all_single" in msg and f"on rank {RANK} of {size}" in msg,
              f"the text does not name the call, the exchange and the rank: {msg!r}")
    after = ep.state_dict()
    for k, v in before.items():
        check(torch.equal(v, after[k]), f"the failed forward changed {k}")
    check(ep.layer.comm.broken is not None, "the comm does not say it is broken")
    t1 = time.monotonic()
    try:
        ep(x)
        check(False, "a forward on the broken comm returned")
    except libmoe.CommError as e:
        check("not attempted" in str(e) and time.monotonic() - t1 < 1.0,
              f"the next forward took {time.monotonic() - t1:.2f} s: {e}")
    with open(flag + f".{RANK}", "w"):
        pass
    if all(os.path.exists(flag + f".{r}") for r in range(size - 1)):
        open(flag, "w").close()


RESHARD = dict(d_model=16, d_ff=24, num_experts=8, top_k=2, aux_loss_coef=0.01, num_shared_experts=1,
               bias_update_rate=0.05)
GLOBAL_T = 24


def global_x():
    return torch.randn(GLOBAL_T, RESHARD["d_model"], generator=torch.Generator().manual_seed(77))


def run_save(size, folder):
    ep = lt.MoE(**RESHARD, seed=3, ep_group=dist.group.WORLD)
    x = torch.randn(7 + RANK, RESHARD["d_model"], generator=torch.Generator().manual_seed(500 + RANK))
    ep(x).square().mean().backward()
    with torch.no_grad():
        for name, p in ep.named_parameters():
            if not name.startswith("experts."):
                dist.all_reduce(p.grad)  # replicated parameters: the same step on every rank
            p -= 0.5 * p.grad
    state = ep.state_dict()
    meta = state.get("experts._extra_state")
    local = RESHARD["num_experts"] // size
    check(meta == dict(num_experts=8, experts=(RANK * local, (RANK + 1) * local), ep_size=size),
          f"experts._extra_state is {meta}")
    torch.save(state, os.path.join(folder, f"shard{RANK}.pt"))
    full = ep.full_state_dict()
    check(full["experts.w1"].shape[0] == 8 and torch.equal(full["experts.w1"][RANK * local:(RANK + 1) * local],
                                                           ep.experts.w1.detach()), "full_state_dict's experts.w1")
    check(not torch.equal(full["router.bias"], torch.zeros(8)), "the bias update did nothing")
    if RANK == 0:
        torch.save(full, os.path.join(folder, "full.pt"))
    ep.save_block(os.path.join(folder, "block.safetensors"), "mlp")  # collective: one file of every expert
    ep.eval()
    part = GLOBAL_T // size
    with torch.no_grad():
        y = ep(global_x()[RANK * part:(RANK + 1) * part])
    torch.save(y, os.path.join(folder, f"y{RANK}.pt"))
    dist.barrier()


def run_load(size, folder):
    saved_size = len([f for f in os.listdir(folder) if f.startswith("shard")])
    full = torch.load(os.path.join(folder, "full.pt"))
    y_saved = torch.cat([torch.load(os.path.join(folder, f"y{r}.pt")) for r in range(saved_size)])
    local = RESHARD["num_experts"] // size
    mine = slice(RANK * local, (RANK + 1) * local)
    # the save-time rank whose experts include this rank's
    shard = torch.load(os.path.join(folder, f"shard{RANK * local // (RESHARD['num_experts'] // saved_size)}.pt"))
    part = GLOBAL_T // size
    x = global_x()[RANK * part:(RANK + 1) * part]
    for what, state in (("its save-time rank's shard", shard), ("full.pt", full), ("block.safetensors", None)):
        ep = lt.MoE(**RESHARD, seed=99, ep_group=dist.group.WORLD)  # another seed: other values until loaded
        check(not torch.equal(ep.experts.w1.detach(), full["experts.w1"][mine]), "the fresh module equals the saved one")
        if state is None:
            ep.load_block(os.path.join(folder, "block.safetensors"), "mlp")  # moe_layer_load: this rank's slice
        else:
            ep.load_state_dict(state)
        for key, want in full.items():
            got = ep.state_dict()[key]
            want = want[mine] if key.startswith("experts.") else want
            check(torch.equal(got, want), f"{what}: {key} differs from the saved state's")
        ep.eval()
        with torch.no_grad():
            y = ep(x)
        err = rel(y, y_saved[RANK * part:(RANK + 1) * part])
        check(err < 1e-5, f"{what}: outputs at EP {size} differ from those at EP {saved_size}: rel err {err:.3g}")
    # The numpy Layer over the group loads the same shard and says which experts it holds.
    lay = libmoe.distributed.Layer(dist.group.WORLD, **RESHARD, seed=99)
    lay.load_state_dict(shard)
    check(np.array_equal(lay.get_param("experts.w2"), full["experts.w2"][mine].numpy()), "Layer: experts.w2 after loading")
    check(lay.state_dict()["experts._extra_state"]["experts"] == (RANK * local, (RANK + 1) * local),
          f"Layer: experts._extra_state {lay.state_dict()['experts._extra_state']}")
    # A shard that lacks this rank's experts is refused, naming both ranges.
    other = (RANK * local // (RESHARD["num_experts"] // saved_size) + 1) % saved_size
    bad = torch.load(os.path.join(folder, f"shard{other}.pt"))
    try:
        lt.MoE(**RESHARD, seed=99, ep_group=dist.group.WORLD).load_state_dict(bad)
        check(False, "a shard without this rank's experts loaded")
    except RuntimeError as e:
        check("this module needs" in str(e), f"the refusal does not name the ranges: {e}")
    dist.barrier()


def main(argv):
    global RANK
    mode, RANK, size, init = argv[0], int(argv[1]), int(argv[2]), argv[3]
    timeout = float(argv[4]) if mode == "deadline" else 60.0
    if mode in ("save", "load"):
        torch.set_num_threads(1)
    torch.manual_seed(1 + RANK)
    dist.init_process_group("gloo", init_method=init, rank=RANK, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    if mode == "equal":
        for variant in range(len(CONFIGS)):
            run_equal(variant, size)
        dist.barrier()
        dist.destroy_process_group()
    elif mode in ("save", "load"):
        (run_save if mode == "save" else run_load)(size, argv[4])
        dist.destroy_process_group()
    else:
        run_deadline(size, timeout, argv[5])
    print(f"rank {RANK} of {size}: {mode}: {'FAIL' if FAILURES else 'ok'} ({len(FAILURES)} failed checks) "
          f"on {socket.gethostname()}", flush=True)
    # Leave without torch's exit-time teardown: a group whose collective timed out cannot be torn
    # down in order (its peers are gone or out of step), and even after destroy_process_group
    # gloo's worker threads sometimes still run while the interpreter finalises, which ends the
    # process in std::terminate (seen with torch 2.15 under load, one rank in many runs). The
    # results are printed and checked by then.
    sys.stdout.flush()
    os._exit(1 if FAILURES else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
