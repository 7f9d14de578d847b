#!/usr/bin/env bash
# Installs the dependencies, builds libmoe with every test suite into build/ and runs them all with
# ctest. Exits with ctest's status.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=/usr/bin/python3
cmake --build build -j"$(nproc)"

cd build
status=0
ctest --output-on-failure -j2 --timeout 1500 --no-tests=error || status=$?
exit "$status"
