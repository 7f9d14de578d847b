#!/usr/bin/env bash
# Builds the libFuzzer harness of the C API (tests/fuzz/fuzz_api.cpp) with clang, libFuzzer,
# AddressSanitizer and UndefinedBehaviorSanitizer in its own build folder, then fuzzes for a bounded
# number of executions starting from the committed corpus (tests/fuzz/corpus) and the inputs of
# past crashes (tests/fuzz/regressions). New inputs go to <build>/fuzz-work, never into the source
# tree. Exit status: 0 when no crash was found; otherwise the crashing input is in
# <build>/fuzz-artifacts: fix the bug, then add the input to tests/fuzz/regressions/.
#
#   tests/fuzz/run.sh [--build DIR] [--runs N] [--max-time SECONDS] [--jobs N]
#   tests/fuzz/run.sh --update-corpus [--max-time SECONDS]   (fuzz longer, then merge into corpus/)
#
# Defaults: --build build-fuzz, --runs 20000, --max-time 360, --jobs $(nproc). CC and CXX name the
# compilers (default clang, clang++). ctest runs this as fuzz.libfuzzer (tests/fuzz/CMakeLists.txt).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

build=$root/build-fuzz
runs=20000
max_time=360
jobs=$(nproc)
update=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --build) build=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --max-time) max_time=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --update-corpus) update=1; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cc=${CC:-clang}
cxx=${CXX:-clang++}
case $(basename "$cxx") in
  clang*) ;;
  *) cc=clang; cxx=clang++ ;;  # libFuzzer needs clang whatever the surrounding build uses
esac

# OpenMP from GNU libgomp, like the rest of the process (oneDNN and OpenBLAS are built against it):
# clang's default, LLVM libomp, would put two OpenMP runtimes in one process.
gomp=$(gcc -print-file-name=libgomp.so)
flags="-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"

echo "fuzz: configuring $build with $cxx"
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
mkdir -p "$work" "$artifacts"
# Huge requested sizes must come back as NULL (libmoe then reports MOE_ERR_OUT_OF_MEMORY), not abort.
export ASAN_OPTIONS=${ASAN_OPTIONS:-allocator_may_return_null=1:detect_leaks=1:handle_abort=1:quarantine_size_mb=64}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fuzzer=$build/tests/fuzz/moe_fuzz
common=(-max_len=1024 -rss_limit_mb=2560 -timeout=60 -print_final_stats=1 -artifact_prefix="$artifacts/")

if [[ $update -eq 1 ]]; then
  # Fuzz for max_time, then keep a minimal set covering everything found in tests/fuzz/corpus.
  "$fuzzer" "${common[@]}" -max_total_time="$max_time" "$work" "$here/corpus" "$here/regressions"
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
"$fuzzer" "${common[@]}" -runs="$runs" -max_total_time="$max_time" \
  "$work" "$here/corpus" "$here/regressions" >"$log" 2>&1 || status=$?
grep -E '^#[0-9]+ +(INITED|DONE)|^Done|stat::|moe_fuzz:' "$log" || true
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
if [[ $status -ne 0 ]]; then
  tail -n 80 "$log"
  echo "fuzz: FAILED (status $status) after ${execs:-?} executions; crashing input(s) in $artifacts:" >&2
  ls -l "$artifacts" >&2 || true
  echo "fix the bug, then copy the input into tests/fuzz/regressions/ so that fuzz.replay keeps it fixed" >&2
  exit 1
fi
echo "fuzz: ${execs:-?} executions, ${rate:-?} exec/s, no crash ($(ls "$here/corpus" | wc -l) corpus + $(ls "$here/regressions" | wc -l) regression inputs replayed first)"
