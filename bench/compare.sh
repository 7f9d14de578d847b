#!/usr/bin/env bash
# Runs moe-bench and the PyTorch per-expert loop on the same shape and thread count and prints
# libmoe/PyTorch speed ratios for forward and forward+backward, and libmoe's fraction of sgemm.
#
#   bench/compare.sh [--d-model 512] [--d-ff 1024] [--experts 8] [--top-k 2] [--tokens 4096]
#                    [--threads 2] [--iters 20] [--warmup 3] [--activation swiglu] [--ep-ranks 1]
#
# --ep-ranks R > 1 adds a run of moe-bench with R expert-parallel ranks in one process and prints
# the bytes each rank sends per token (its times are of the in-process exchange, not compared).
#
# moe-bench is taken from $MOE_BENCH, else build/bench/moe-bench. Both programs inherit this
# script's environment unchanged (OPENBLAS_CORETYPE, OMP_* ...); the torch script always runs
# with /usr/bin/python3, the interpreter that has Debian's python3-torch.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
bench=${MOE_BENCH:-$root/build/bench/moe-bench}
python=/usr/bin/python3

d_model=512 d_ff=1024 experts=8 top_k=2 tokens=4096 threads=2 iters=20 warmup=3 activation=swiglu ep_ranks=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --d-model) d_model=$2 ;;
    --d-ff) d_ff=$2 ;;
    --experts) experts=$2 ;;
    --top-k) top_k=$2 ;;
    --tokens) tokens=$2 ;;
    --threads) threads=$2 ;;
    --iters) iters=$2 ;;
    --warmup) warmup=$2 ;;
    --activation) activation=$2 ;;
    --ep-ranks) ep_ranks=$2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift 2
done

if [[ ! -x $bench ]]; then
  echo "compare.sh: $bench not found; build first (cmake -S . -B build && cmake --build build) or set MOE_BENCH" >&2
  exit 1
fi

common=(--d-model "$d_model" --d-ff "$d_ff" --experts "$experts" --top-k "$top_k" --activation "$activation"
        --tokens "$tokens" --threads "$threads" --iters "$iters" --warmup "$warmup" --json)

echo "shape: d_model $d_model  d_ff $d_ff  experts $experts  top-k $top_k  $activation  tokens $tokens  threads $threads" \
     " OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-<unset>}"
moe_json=$("$bench" "${common[@]}")
torch_json=$("$python" "$here/torch_moe_loop.py" "${common[@]}")
ep_json=null
if ((ep_ranks > 1)); then
  ep_json=$("$bench" "${common[@]}" --ep-ranks "$ep_ranks")
fi

"$python" - "$moe_json" "$torch_json" "$ep_json" <<'EOF'
import json, sys
m, t, ep = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"libmoe {m['libmoe']} ({m['blas']}), sgemm 2048^3 {m['sgemm_gflops']:.1f} GFLOP/s;"
      f" torch {t['torch']} per-expert loop")
print(f"{'mode':<9} {'libmoe ms':>10} {'torch ms':>10} {'libmoe GF/s':>12} {'torch GF/s':>11}"
      f" {'speedup':>8} {'libmoe/sgemm':>13}")
for key, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
    a, b = m[key], t[key]
    speedup = b["ms_median"] / a["ms_median"]
    frac = a["sgemm_fraction"]
    print(f"{label:<9} {a['ms_median']:10.2f} {b['ms_median']:10.2f} {a['gflops']:12.1f} {b['gflops']:11.1f}"
          f" {speedup:7.2f}x {100 * frac:12.1f}%")
print("speedup = PyTorch time / libmoe time (libmoe/PyTorch throughput ratio; > 1: libmoe is faster)")
if ep:
    e = ep["ep"]
    print(f"expert parallel over {e['ranks']} in-process ranks: bytes each rank sends to the others per token"
          f" (token rows of {e['row_bytes']} bytes)")
    for phase in ("fwd", "bwd"):
        b = e["bytes_per_token"][phase]
        print(f"  {phase}: mean {b['remote']['mean']:.1f}  max {b['remote']['max']:.1f}"
              f"  (to itself {b['self']['mean']:.1f}; uniform routing expects {b['expected_uniform_remote']:.1f})")
EOF
