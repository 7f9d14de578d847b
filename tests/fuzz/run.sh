#!/usr/bin/env bash
# Builds the libFuzzer harness of the C API (tests/fuzz/fuzz_api.cpp) with clang and sanitizers in
# its own build folder, then fuzzes for a bounded number of executions starting from the committed
# corpus (tests/fuzz/corpus) and the inputs of past crashes (tests/fuzz/regressions). New inputs go
# to <build>/fuzz-work, never into the source tree. Exit status: 0 when no crash was found;
# otherwise the crashing input is in <build>/fuzz-artifacts, replayed alone at once to show that it
# reproduces: fix the bug, then add the input to tests/fuzz/regressions/.
#
#   tests/fuzz/run.sh [--sanitizers asan|ubsan] [--build DIR] [--runs N] [--max-time SECONDS]
#                     [--seed N] [--timeout SECONDS] [--fresh] [--jobs N]
#   tests/fuzz/run.sh --update-corpus [--max-time SECONDS] [--seed N]   (fuzz, then merge into corpus/)
#
#   --sanitizers asan   (default) -O1, AddressSanitizer (LeakSanitizer included) + UBSan: memory
#                       errors, leaks, undefined behaviour.
#   --sanitizers ubsan  -O2, UBSan and libstdc++'s assertions
#                       (_GLIBCXX_ASSERTIONS), without ASan: an index past a container's size but
#                       inside its allocation, std::clamp with lo > hi and other precondition
#                       violations ASan cannot see; a failing operator new throws std::bad_alloc
#                       as in production (ASan aborts the run instead), which libmoe must turn
#                       into MOE_ERR_OUT_OF_MEMORY; UB as -O2 code meets it. About 3x the
#                       executions per second.
#   --seed N            libFuzzer's seed (1..4294967295); default random, printed so that a run
#                       can be repeated. ctest's fuzz.libfuzzer passes a fixed one.
#   --fresh             start from corpus/ and regressions/ only (empties <build>/fuzz-work, which
#                       otherwise keeps what earlier runs found); ctest passes it, so that its
#                       result depends on the sources and the seed alone.
#   --timeout SECONDS   one input running longer is reported as a hang (default 60). A run that may
#                       be paused (SIGSTOP) needs more than the longest pause: libFuzzer measures
#                       wall-clock time.
#
# Defaults: --build build-fuzz (build-fuzz-ubsan for ubsan), --runs 20000, --max-time 360,
# --jobs $(nproc) (build parallelism; libFuzzer itself runs one process, OMP_NUM_THREADS=1 unless
# set). CC and CXX name the compilers (default clang, clang++). ctest runs this as fuzz.libfuzzer
# (tests/fuzz/CMakeLists.txt).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

sanitizers=asan
build=
runs=20000
max_time=360
timeout=60
jobs=$(nproc)
update=0
fresh=0
seed=
while [[ $# -gt 0 ]]; do
  case $1 in
    --sanitizers) sanitizers=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --max-time) max_time=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --fresh) fresh=1; shift ;;
    --update-corpus) update=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ -z $seed ]]; then
  seed=$(($(od -An -N4 -tu4 /dev/urandom) % 4294967295 + 1))  # libFuzzer takes 0 as "pick one": never 0
fi
if ! [[ $seed =~ ^[0-9]+$ ]] || ((seed < 1 || seed > 4294967295)); then
  echo "run.sh: --seed must be an integer in [1, 4294967295], not $seed" >&2
  exit 2
fi
cc=${CC:-clang}
cxx=${CXX:-clang++}
case $(basename "$cxx") in
  clang*) ;;
  *) cc=clang; cxx=clang++ ;;  # libFuzzer needs clang whatever the surrounding build uses
esac

case $sanitizers in
  asan)
    flags="-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
    build=${build:-$root/build-fuzz} ;;
  ubsan)
    # Not float-divide-by-zero: IEEE defines it, and in src/cpu/activation.cpp (-ffast-math, which
    # assumes no NaN) the check itself misfires on NaN inputs.
    flags="-O2 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,undefined"
    flags+=" -fno-sanitize-recover=all -D_GLIBCXX_ASSERTIONS"
    build=${build:-$root/build-fuzz-ubsan} ;;
  *) echo "run.sh: --sanitizers is asan or ubsan, not $sanitizers" >&2; exit 2 ;;
esac

# OpenMP from GNU libgomp, like the rest of the process (oneDNN and OpenBLAS are built against it):
# clang's default, LLVM libomp, would put two OpenMP runtimes in one process.
gomp=$(gcc -print-file-name=libgomp.so)

echo "fuzz: configuring $build with $cxx ($sanitizers)"
start=$(date +%s)
mkdir -p "$build"
CC=$cc CXX=$cxx cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Debug \
  "-DCMAKE_C_FLAGS=$flags" "-DCMAKE_CXX_FLAGS=$flags" \
  -DOpenMP_C_FLAGS=-fopenmp=libgomp -DOpenMP_CXX_FLAGS=-fopenmp=libgomp \
  -DOpenMP_C_LIB_NAMES=gomp -DOpenMP_CXX_LIB_NAMES=gomp "-DOpenMP_gomp_LIBRARY=$gomp" \
  -DMOE_WITH_CUDA=OFF -DMOE_WITH_NCCL=OFF -DMOE_WITH_MPI=OFF -DMOE_BUILD_PYTHON=OFF -DMOE_BUILD_JAVA=OFF \
  -DMOE_BUILD_RUST=OFF -DMOE_BUILD_BENCH=OFF -DMOE_BUILD_EXAMPLES=OFF \
  -DMOE_FUZZ=OFF -DMOE_FUZZ_HARNESS=ON >"$build/fuzz-configure.log" 2>&1 ||
  { cat "$build/fuzz-configure.log"; exit 1; }
cmake --build "$build" --target moe_fuzz -j"$jobs" >"$build/fuzz-build.log" 2>&1 || { tail -n 60 "$build/fuzz-build.log"; exit 1; }
echo "fuzz: built in $(($(date +%s) - start)) s"

work=$build/fuzz-work
artifacts=$build/fuzz-artifacts
[[ $fresh -eq 1 ]] && rm -rf "$work"
mkdir -p "$work" "$artifacts"
# Huge requested sizes must come back as NULL (libmoe then reports MOE_ERR_OUT_OF_MEMORY), not abort.
# The harness raises ASan's minimum redzone (see __asan_default_options in fuzz_api.cpp).
export ASAN_OPTIONS=${ASAN_OPTIONS:-allocator_may_return_null=1:detect_leaks=1:handle_abort=1:quarantine_size_mb=64}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fuzzer=$build/tests/fuzz/moe_fuzz
common=(-max_len=1024 -rss_limit_mb=2560 -timeout="$timeout" -print_final_stats=1 -artifact_prefix="$artifacts/")
echo "fuzz: seed $seed (repeat this run with --seed $seed)"

if [[ $update -eq 1 ]]; then
  # Fuzz for max_time, then keep a minimal set covering everything found in tests/fuzz/corpus.
  "$fuzzer" "${common[@]}" -seed="$seed" -max_total_time="$max_time" "$work" "$here/corpus" "$here/regressions"
  mkdir -p "$build/fuzz-merged"
  rm -f "$build/fuzz-merged"/*
  "$fuzzer" "${common[@]}" -set_cover_merge=1 "$build/fuzz-merged" "$here/corpus" "$work" "$here/regressions"
  rm -f "$here/corpus"/*
  cp "$build/fuzz-merged"/* "$here/corpus/"
  echo "fuzz: tests/fuzz/corpus now holds $(ls "$here/corpus" | wc -l) inputs"
  exit 0
fi

log=$build/fuzz.log
status=0
since=$build/fuzz-started
touch "$since"
"$fuzzer" "${common[@]}" -seed="$seed" -runs="$runs" -max_total_time="$max_time" \
  "$work" "$here/corpus" "$here/regressions" >"$log" 2>&1 || status=$?
grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done|stat::|moe_fuzz:' "$log" || true
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
if [[ $status -ne 0 ]]; then
  tail -n 80 "$log"
  echo "fuzz: FAILED (status $status) after ${execs:-?} executions, seed $seed; crashing input(s) in $artifacts:" >&2
  # Each new input alone, in a fresh process with the same options: a crash that depends on what
  # earlier inputs left in the process would not make a regression test.
  while IFS= read -r -d '' f; do
    if "$fuzzer" "${common[@]}" -runs=1 "$f" >"$f.replay.log" 2>&1; then
      echo "  $f: does NOT crash when replayed alone (see $f.replay.log)" >&2
    else
      echo "  $f: replays alone: $(grep -m1 -E 'ERROR|runtime error|libmoe fuzz oracle|deadly signal' "$f.replay.log" || echo crash)" >&2
    fi
  done < <(find "$artifacts" -maxdepth 1 -type f -newer "$since" ! -name '*.log' -print0)
  echo "fix the bug, then copy the input into tests/fuzz/regressions/ so that fuzz.replay keeps it fixed" >&2
  exit 1
fi
echo "fuzz: ${execs:-?} executions, ${rate:-?} exec/s, seed $seed, no crash ($(ls "$here/corpus" | wc -l) corpus + $(ls "$here/regressions" | wc -l) regression inputs replayed first)"
