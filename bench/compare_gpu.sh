#!/usr/bin/env bash
# libmoe on a CUDA GPU beside PyTorch, in one run, bfloat16: the card's own dense bf16 GEMM rate and
# copy bandwidth (moe-gpu-peak), then for each shape moe-bench --device cuda and the PyTorch
# per-expert loop and torch._grouped_mm MoE (torch_moe_gpu.py), and a table of forward and
# forward+backward times, TFLOP/s, the fraction of the dense bf16 rate and libmoe/PyTorch ratios.
# For DeepSeek-V3 also the ratio to its bound max(FLOPs / GEMM rate, weight bytes / memory rate).
#
#   bench/compare_gpu.sh [--tokens 8192] [--iters 10] [--warmup 3] [--device-index 0]
#                        [--shapes mixtral,deepseek-v3] [--out DIR]
#
# Shapes: mixtral (d 4096, ff 14336, E 8, k 2), deepseek-v3 (d 7168, ff 2048, E 256, k 8), small
# (d 512, ff 1024, E 8, k 2). The comparison runs every program with the same routing (softmax
# top-k, normalized, dropless, SwiGLU, no shared expert); for deepseek-v3 libmoe also runs its full
# preset (sigmoid scores, groups, shared expert) on its own, for reference.
# Programs: $MOE_BENCH (build/bench/moe-bench), $MOE_GPU_PEAK (build/bench/moe-gpu-peak), and
# $PYTHON (python3: the interpreter with the GPU's PyTorch). Every raw JSON result and error log is
# kept in --out (default: a new directory under /tmp). A program that fails is reported in the
# table, and the others still run.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
bench=${MOE_BENCH:-$root/build/bench/moe-bench}
peak=${MOE_GPU_PEAK:-$root/build/bench/moe-gpu-peak}
python=${PYTHON:-python3}

tokens=8192 iters=10 warmup=3 device=0 shapes=mixtral,deepseek-v3 out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tokens) tokens=$2 ;;
    --iters) iters=$2 ;;
    --warmup) warmup=$2 ;;
    --device-index) device=$2 ;;
    --shapes) shapes=$2 ;;
    --out) out=$2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "compare_gpu.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift 2
done
for tool in "$bench" "$peak"; do
  if [[ ! -x $tool ]]; then
    echo "compare_gpu.sh: $tool not found; build with -DMOE_WITH_CUDA=ON (or set MOE_BENCH / MOE_GPU_PEAK)" >&2
    exit 1
  fi
done
out=${out:-$(mktemp -d /tmp/compare_gpu.XXXXXX)}
mkdir -p "$out"

# run NAME CMD...: stdout to $out/NAME.json, stderr to $out/NAME.err; a failure is recorded, not fatal
run() {
  local name=$1; shift
  echo "== $name: $*" >&2
  "$@" >"$out/$name.json" 2>"$out/$name.err"
  local rc=$?
  if ((rc != 0)); then
    echo "   failed (exit $rc): $(tail -n 1 "$out/$name.err")" >&2
    rm -f "$out/$name.json"
  fi
}

shape_args() {
  case "$1" in
    mixtral) echo "--d-model 4096 --d-ff 14336 --experts 8 --top-k 2" ;;
    deepseek-v3) echo "--d-model 7168 --d-ff 2048 --experts 256 --top-k 8" ;;
    small) echo "--d-model 512 --d-ff 1024 --experts 8 --top-k 2" ;;
    *) echo "compare_gpu.sh: unknown shape '$1'" >&2; return 1 ;;
  esac
}

run peak "$peak" --device "$device"
IFS=, read -r -a shape_list <<<"$shapes"
for s in "${shape_list[@]}"; do
  args=$(shape_args "$s") || exit 2
  # shellcheck disable=SC2086
  run "libmoe-$s" "$bench" --device cuda --device-index "$device" --dtype bf16 --tokens "$tokens" $args \
    --activation swiglu --iters "$iters" --warmup "$warmup" --json
  if [[ $s == deepseek-v3 ]]; then
    # shellcheck disable=SC2086
    run "libmoe-$s-preset" "$bench" --preset deepseek-v3 --device cuda --device-index "$device" --dtype bf16 \
      --tokens "$tokens" $args --iters "$iters" --warmup "$warmup" --json
  fi
  # shellcheck disable=SC2086
  run "torch-$s" "$python" "$here/torch_moe_gpu.py" --device-index "$device" --dtype bf16 --tokens "$tokens" $args \
    --activation swiglu --iters "$iters" --warmup "$warmup" --json
done

"$python" - "$out" "$shapes" <<'EOF'
import json, os, sys

out, shapes = sys.argv[1], sys.argv[2].split(",")


def load(name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def why(name):
    try:
        with open(os.path.join(out, name + ".err")) as f:
            lines = [l.strip() for l in f if l.strip()]
        return lines[-1] if lines else "no output"
    except OSError:
        return "not run"


peak = load("peak")
if peak:
    gemm, copy = peak["gemm"]["tflops"], peak["copy"]
    print(f"{peak['device']} (sm {peak['compute_capability']}): dense bf16 GEMM {peak['gemm']['m']}^3 "
          f"{gemm:.1f} TFLOP/s; device copy {copy['copy_gbps']:.0f} GB/s copied = "
          f"{copy['traffic_gbps']:.0f} GB/s memory traffic")
else:
    gemm = None
    print(f"moe-gpu-peak failed: {why('peak')}; fractions of the peak rates are left out")
mem = peak["copy"]["traffic_gbps"] * 1e9 if peak else None

for s in shapes:
    m, t = load(f"libmoe-{s}"), load(f"torch-{s}")
    cfg = (m or t or {}).get("config")
    if not cfg:
        print(f"\n{s}: no result (libmoe: {why('libmoe-' + s)}; torch: {why('torch-' + s)})")
        continue
    d, ff, E, k = cfg["d_model"], cfg["d_ff"], cfg["experts"], cfg["top_k"]
    T = (m or t)["tokens"]
    # Expert FLOPs (2 * rows * d * ff * 3 for SwiGLU), the same count for every program; the router
    # is left out (under 1% here). Backward = 2x forward.
    flops = {"fwd": 2.0 * T * k * d * ff * 3}
    flops["fwdbwd"] = 3 * flops["fwd"]
    # The bound of a layer that must read its weights (bf16) once per pass: forward reads them once;
    # forward+backward reads them twice and reads and writes their gradient once.
    wbytes = E * 3 * d * ff * 2
    bound = {}
    if gemm and mem:
        bound["fwd"] = max(flops["fwd"] / (gemm * 1e12), wbytes / mem) * 1e3
        bound["fwdbwd"] = max(flops["fwdbwd"] / (gemm * 1e12), 4 * wbytes / mem) * 1e3
    print(f"\n{s}: d {d}  ff {ff}  E {E}  k {k}  T {T}  bf16  expert FLOPs fwd {flops['fwd']:.3g}"
          f"  weights {wbytes / 1e9:.2f} GB" + (f"  torch {t['torch']}" if t else ""))
    rows = [("libmoe", m.get("fwd") if m else None, m.get("fwdbwd") if m else None,
             None if m else why(f"libmoe-{s}"))]
    impls = (t or {}).get("impls", {})
    for impl, label in (("loop", "torch loop"), ("grouped", "torch grouped_mm")):
        r = impls.get(impl)
        if r is None:
            rows.append((label, None, None, why(f"torch-{s}") if not t else "not run"))
        else:
            rows.append((label, r.get("fwd"), r.get("fwdbwd"), r.get("error")))
    print(f"{'program':<17} {'mode':<8} {'ms':>9} {'TFLOP/s':>8} {'of GEMM':>8}"
          + (f" {'bound ms':>9} {'of bound':>9}" if s == "deepseek-v3" and bound else "")
          + f" {'libmoe speedup':>15}")
    lib = {mode: (m or {}).get(mode) for mode in ("fwd", "fwdbwd")}
    for name, fwd, fb, err in rows:
        if err and not fwd and not fb:
            print(f"{name:<17} {'-':<8} failed: {err}")
            continue
        for mode, r in (("fwd", fwd), ("fwdbwd", fb)):
            label = "fwd" if mode == "fwd" else "fwd+bwd"
            if not r or "ms_median" not in r:
                print(f"{name:<17} {label:<8} failed: {(r or {}).get('error', err or 'not measured')}")
                continue
            ms = r["ms_median"]
            tf = flops[mode] / (ms * 1e-3) / 1e12
            line = f"{name:<17} {label:<8} {ms:9.2f} {tf:8.1f} " + (f"{100 * tf / gemm:7.1f}%" if gemm else f"{'-':>8}")
            if s == "deepseek-v3" and bound:
                line += f" {bound[mode]:9.2f} {100 * bound[mode] / ms:8.1f}%"
            ref = lib.get(mode)
            if name != "libmoe" and ref and "ms_median" in ref:
                line += f" {ms / ref['ms_median']:14.2f}x"
            print(line)
    if s == "deepseek-v3":
        p = load(f"libmoe-{s}-preset")
        if p and "fwd" in p:
            print(f"libmoe, full deepseek-v3 preset (sigmoid, 8 groups keep 4, shared expert; its own FLOP count):"
                  f" fwd {p['fwd']['ms_median']:.2f} ms {p['fwd']['gflops'] / 1e3:.1f} TFLOP/s,"
                  f" fwd+bwd {p['fwdbwd']['ms_median']:.2f} ms {p['fwdbwd']['gflops'] / 1e3:.1f} TFLOP/s")
        else:
            print(f"libmoe, full deepseek-v3 preset: failed: {why('libmoe-' + s + '-preset')}")

print("\nof GEMM: TFLOP/s over the card's dense bf16 GEMM rate; bound: max(FLOPs / GEMM rate, weight bytes /"
      " memory traffic rate), 'of bound' = bound / time;\nlibmoe speedup = PyTorch time / libmoe time"
      " (> 1: libmoe is faster). Times: median wall clock per iteration, device synchronised.")
print(f"raw results: {out}")
EOF
