#!/usr/bin/env bash
# The GPU test battery, for a machine with a CUDA device: builds with the CUDA backend into
# build-gpu/ (or the folder given) and runs `ctest -L gpu` with MOE_REQUIRE_GPU=1 and
# --no-tests=error, so that a skip (no device seen, the backend or compute-sanitizer missing) or an
# empty selection fails the run instead of passing it. Exits with ctest's status.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${1:-build-gpu}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOE_WITH_CUDA=ON -DPython3_EXECUTABLE=/usr/bin/python3
cmake --build "$build" -j"$(nproc)"
cd "$build"
MOE_REQUIRE_GPU=1 ctest -L gpu --no-tests=error --output-on-failure
