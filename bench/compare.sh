#!/usr/bin/env bash
# libmoe against the PyTorch MoE blocks a user would otherwise run, on the same shapes, token
# counts and threads, in each dtype: moe-bench's sweep (with each row's roofline bound) beside
# bench/torch_moe_loop.py under PyTorch 2 from PyPI (the Hugging Face-style per-expert loop, and
# torch._grouped_mm) and under Debian's PyTorch 1.13 (the loop).
#
#   bench/compare.sh [--d-model 1024] [--d-ff 2048] [--experts 8] [--top-k 2] [--activation swiglu]
#                    [--tokens 1,8,64,512,4096] [--dtypes f32,bf16] [--threads 2] [--iters 10]
#                    [--warmup 2] [--torch-venv DIR] [--repeats 1] [--no-debian-torch] [--ep-ranks R]
#
# --torch-venv DIR: PyTorch 2 from PyPI in the virtual environment DIR, made there (from
# tests/pypi/requirements.txt) when it does not exist yet; without it only Debian's PyTorch runs.
# --repeats N runs every program N times, in turn (libmoe, then each peer, then libmoe again...),
# and reports the median of the N medians: on a machine shared with others, one run's times can
# drift by 10-20 % from the next one's. The yardsticks and each row's bound are medians over the
# runs too (moe-bench measures the read bandwidth of each row's bound just before timing it).
# --no-debian-torch leaves out Debian's PyTorch 1.13 (slow: it runs the large counts for minutes).
# --ep-ranks R > 1 adds a run of moe-bench with R expert-parallel ranks in one process and prints
# the bytes each rank sends per token (its times are of the in-process exchange, not compared).
#
# moe-bench is taken from $MOE_BENCH, else build/bench/moe-bench. Every program inherits this
# script's environment unchanged (OMP_*, ONEDNN_*).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
bench=${MOE_BENCH:-$root/build/bench/moe-bench}
debian_python=/usr/bin/python3

d_model=1024 d_ff=2048 experts=8 top_k=2 tokens=1,8,64,512,4096 dtypes=f32,bf16 threads=2 iters=10 warmup=2
activation=swiglu ep_ranks=1 venv= repeats=1 debian_torch=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --d-model) d_model=$2 ;;
    --d-ff) d_ff=$2 ;;
    --experts) experts=$2 ;;
    --top-k) top_k=$2 ;;
    --activation) activation=$2 ;;
    --tokens) tokens=$2 ;;
    --dtypes) dtypes=$2 ;;
    --threads) threads=$2 ;;
    --iters) iters=$2 ;;
    --warmup) warmup=$2 ;;
    --torch-venv) venv=$2 ;;
    --ep-ranks) ep_ranks=$2 ;;
    --repeats) repeats=$2 ;;
    --no-debian-torch) debian_torch=0; shift; continue ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift 2
done

if [[ ! -x $bench ]]; then
  echo "compare.sh: $bench not found; build first (cmake -S . -B build && cmake --build build) or set MOE_BENCH" >&2
  exit 1
fi
if [[ -n $venv && ! -x $venv/bin/python ]]; then
  echo "compare.sh: making $venv with PyTorch 2 from PyPI (tests/pypi/requirements.txt)"
  "$debian_python" "$root/tests/pypi/venv.py" setup "$venv" "$root/tests/pypi/requirements.txt"
fi

shape=(--d-model "$d_model" --d-ff "$d_ff" --experts "$experts" --top-k "$top_k" --activation "$activation")
run=(--tokens "$tokens" --threads "$threads" --iters "$iters" --warmup "$warmup" --json)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for ((rep = 1; rep <= repeats; ++rep)); do
  for dtype in ${dtypes//,/ }; do
    "$bench" "${shape[@]}" "${run[@]}" --dtype "$dtype" >"$tmp/moe-$dtype-$rep.json"
    if [[ -n $venv ]]; then
      "$venv/bin/python" "$here/torch_moe_loop.py" "${shape[@]}" "${run[@]}" --dtype "$dtype" --impl loop \
        >"$tmp/torch2-loop-$dtype-$rep.json"
      "$venv/bin/python" "$here/torch_moe_loop.py" "${shape[@]}" "${run[@]}" --dtype "$dtype" --impl grouped \
        >"$tmp/torch2-grouped-$dtype-$rep.json"
    fi
    if ((debian_torch)) && "$debian_python" -c "import torch" 2>/dev/null; then
      "$debian_python" "$here/torch_moe_loop.py" "${shape[@]}" "${run[@]}" --dtype "$dtype" --impl loop \
        >"$tmp/torch1-loop-$dtype-$rep.json"
    fi
  done
done
ep_json=null
if ((ep_ranks > 1)); then
  ep_json=$("$bench" "${shape[@]}" --tokens "${tokens##*,}" --threads "$threads" --iters "$iters" --warmup "$warmup" \
    --json --ep-ranks "$ep_ranks")
fi

"$debian_python" - "$tmp" "$dtypes" "$ep_json" "$repeats" <<'EOF'
import json, os, statistics, sys
tmp, dtypes, ep, repeats = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), int(sys.argv[4])

def load(name):
    """The documents of every repeat of a program (None where it did not run or was unavailable)."""
    docs = []
    for rep in range(1, repeats + 1):
        p = os.path.join(tmp, f"{name}-{rep}.json")
        if os.path.exists(p):
            d = json.load(open(p))
            if not d.get("unavailable"):
                docs.append(d)
    return docs or None

def ms(docs, tokens, mode, key="ms_median"):
    """Median over the repeats of each run's median time (or of another field of the row)."""
    if not docs:
        return None
    v = [row[mode][key] for d in docs for row in d["rows"] if row["tokens"] == tokens and mode in row]
    return statistics.median(v) if v else None

def yardstick(docs, get):
    return statistics.median(get(d) for d in docs)

first = True
for dtype in dtypes:
    ms_docs = load(f"moe-{dtype}")
    m = ms_docs[0]
    t2l, t2g, t1 = load(f"torch2-loop-{dtype}"), load(f"torch2-grouped-{dtype}"), load(f"torch1-loop-{dtype}")
    if first:
        c = m["config"]
        print(f"cpu: {m['cpu']}; {m['threads']} threads; GEMM: {m['blas']}")
        # Every run measures its own yardsticks and bounds; like the times, the medians over the
        # runs (one run's low GEMM rate would otherwise inflate every bound of its dtype).
        every = [d for dt in dtypes for d in (load(f"moe-{dt}") or [])]
        # The read rate each timing's bound used (measured just before it), over all of them.
        reads = [row[mode]["read_gbs"] for d in every for row in d["rows"] for mode in ("fwd", "fwdbwd")
                 if mode in row and "read_gbs" in row[mode]]
        read = (f"read {statistics.median(reads):.1f} GB/s, {min(reads):.1f} to {max(reads):.1f} (before each timing)"
                if reads else f"read {yardstick(every, lambda d: d['read_gbs']):.1f} GB/s")
        print(f"yardsticks: GEMM {yardstick(every, lambda d: d['gemm_gflops']['f32']):.0f} GFLOP/s float32, "
              f"{yardstick(every, lambda d: d['gemm_gflops']['bf16']):.0f} bfloat16 (medians over {len(every)} runs); "
              f"{read}")
        print(f"times: median over {repeats} run(s) of each run's median")
        print(f"shape: d_model {c['d_model']}, d_ff {c['d_ff']}, {c['experts']} experts, top-{c['top_k']}, {c['activation']}")
        peers = [("torch2 loop", t2l), ("torch2 grouped", t2g), ("torch1.13 loop", t1)]
        print("peers: " + "; ".join(f"{n} = torch {d[0]['torch']}" for n, d in peers if d))
        first = False
    print(f"\n{dtype}")
    head = f"{'tokens':>7} {'mode':<8} {'libmoe ms':>10} {'of bound':>9} {'torch2 loop':>12} {'torch2 grp':>11} {'torch1.13':>10} {'vs best torch2':>15}"
    print(head)
    for row in m["rows"]:
        T = row["tokens"]
        for mode, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            if mode not in row:
                continue
            lib = ms(ms_docs, T, mode)
            of = lib / ms(ms_docs, T, mode, "bound_ms")
            a, b, c1 = ms(t2l, T, mode), ms(t2g, T, mode), ms(t1, T, mode)
            best = min(v for v in (a, b) if v is not None) if (a or b) else None
            fmt = lambda v: f"{v:.3f}" if v is not None else "-"
            speed = f"{best / lib:.2f}x faster" if best and best >= lib else (f"{lib / best:.2f}x slower" if best else "-")
            print(f"{T:7d} {label:<8} {lib:10.3f} {of:8.2f}x {fmt(a):>12} {fmt(b):>11} {fmt(c1):>10} {speed:>15}")
if ep:
    e = ep["ep"]
    print(f"\nexpert parallel over {e['ranks']} in-process ranks: bytes each rank sends to the others per token"
          f" (token rows of {e['row_bytes']} bytes)")
    for phase in ("fwd", "bwd"):
        b = e["bytes_per_token"][phase]
        print(f"  {phase}: mean {b['remote']['mean']:.1f}  max {b['remote']['max']:.1f}"
              f"  (to itself {b['self']['mean']:.1f}; uniform routing expects {b['expected_uniform_remote']:.1f})")
EOF
