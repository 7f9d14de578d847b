#!/usr/bin/env bash
# Installs the dependencies, builds libmoe into build/ and runs the C demo: one training step of an
# MoE layer with its routing summary. On CUDA when a GPU is present and the CUDA module was built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=/usr/bin/python3
cmake --build build -j"$(nproc)"

device=cpu
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "demo: no NVIDIA GPU found (nvidia-smi -L); running on the CPU"
elif [[ ! -e build/libmoe_cuda.so.0 ]]; then
  echo "demo: a GPU is present but the CUDA module (build/libmoe_cuda.so.0) was not built; running on the CPU"
else
  device=cuda
  echo "demo: GPU found and CUDA module built; running on CUDA"
fi
echo
exec ./build/examples/moe_demo --device "$device" "$@"
