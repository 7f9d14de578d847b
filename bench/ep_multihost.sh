#!/bin/bash
# Expert parallelism across hosts, measured: one expert-parallel training step (moe-bench-mpi) on
# 4 ranks spread over 2 test hosts x 2 ranks (network namespaces on this machine, Open MPI over TCP,
# tests/mpi/multihost.sh), next to the same shapes on 4 ranks of one host (Open MPI's shared memory)
# and in one process (moe-bench --ep-ranks 4: threads exchanging through memory). Prints one JSON
# object: {"cpu", "two_hosts_tcp", "one_host_mpi", "in_process"}. Needs root (ip netns).
#
#   bench/ep_multihost.sh BUILD_DIR [--d-model 512 --d-ff 1024 --experts 8 --top-k 2 --tokens 4096 --iters 5]
#
# The test hosts share this machine's cores and memory: the TCP figures are those of the kernel's
# network stack over a veth bridge, not of a physical network, and 4 ranks oversubscribe a machine
# with fewer cores. Keep the measurement short (a couple of iterations at these shapes).
set -eu
build=${1:?usage: $0 BUILD_DIR [moe-bench-mpi flags]}
shift
here=$(cd "$(dirname "$0")" && pwd)
mpiexec=$(command -v mpiexec || command -v mpirun) || { echo "no mpiexec" >&2; exit 2; }
bench_mpi=$build/bench/moe-bench-mpi
bench=$build/bench/moe-bench
[ -x "$bench_mpi" ] || { echo "$bench_mpi not built (needs libmoe_mpi)" >&2; exit 2; }
args=(--d-model 512 --d-ff 1024 --experts 8 --top-k 2 --tokens 4096 --iters 5 --warmup 1 "$@")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# the value of flag $1 in args
flag() { local i; for ((i = 0; i < ${#args[@]} - 1; i++)); do [ "${args[$i]}" = "$1" ] && v=${args[$((i + 1))]}; done; echo "$v"; }

echo "two hosts x 2 ranks over TCP ..." >&2
bash "$here/../tests/mpi/multihost.sh" bench "$mpiexec" "$bench_mpi" "${args[@]}" >"$out/tcp.json"
echo "one host, 4 ranks over shared memory ..." >&2
"$mpiexec" --oversubscribe -n 4 --mca btl self,vader "$bench_mpi" "${args[@]}" >"$out/shm.json"
echo "one process, 4 ranks as threads ..." >&2
if [ -x "$bench" ]; then
  "$bench" --ep-ranks 4 --threads 4 --d-model "$(flag --d-model)" --d-ff "$(flag --d-ff)" --num-experts "$(flag --experts)" \
    --top-k "$(flag --top-k)" --tokens "$(flag --tokens)" --iters "$(flag --iters)" --warmup "$(flag --warmup)" \
    --sgemm-size 512 --json >"$out/proc.json"
else
  echo '{}' >"$out/proc.json"
fi
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
tcp, shm, proc = (json.load(open(f"{d}/{n}.json")) for n in ("tcp", "shm", "proc"))


def mpi_figures(r):
    b, a = r["bytes_per_token_per_rank"], r["alltoall"]
    return {"hosts": r["hosts"], "step_ms": r["step_ms"]["median"], "fwd_ms": r["fwd_ms"]["median"],
            "bytes_per_token_per_rank": {"fwd": b["fwd_rows_remote"], "bwd": b["bwd_rows_remote"],
                                         "metadata": b["metadata_remote"]},
            "alltoall_seconds_per_step": a["rows_seconds_per_step"]["mean"],
            "alltoall_share_of_step": a["share_of_step"],
            "alltoall_gbytes_per_s": {"per_rank": a["per_rank_gbytes_per_s"]["mean"], "aggregate": a["aggregate_gbytes_per_s"]}}


ep = proc.get("ep", {})
row = proc["rows"][0] if proc.get("rows") else {}
in_process = {"step_ms": row.get("fwdbwd", {}).get("ms_median"), "fwd_ms": row.get("fwd", {}).get("ms_median"),
              "bytes_per_token_per_rank": {ph: ep.get("bytes_per_token", {}).get(ph, {}).get("remote", {}).get("mean")
                                           for ph in ("fwd", "bwd")},
              "how": "moe-bench --ep-ranks 4: 4 layers as threads of one process, rows copied through memory"}
print(json.dumps({
    "bench": "ep_multihost", "cpu": proc.get("cpu", tcp["cpu"]), "shape": tcp["shape"],
    "tokens_global": tcp["tokens_global"], "ranks": tcp["ranks"], "iters": tcp["iters"],
    "two_hosts_tcp": mpi_figures(tcp), "one_host_mpi": mpi_figures(shm), "in_process": in_process,
    "raw": {"two_hosts_tcp": tcp, "one_host_mpi": shm}}, indent=1))
PY
