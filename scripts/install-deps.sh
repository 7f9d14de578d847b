#!/usr/bin/env bash
# Installs, with apt-get, everything libmoe's build and tests need on Debian 12 (bookworm).
# Does nothing when every package is already installed, so it is cheap to run again.
# Runs apt-get through sudo when not root.
set -euo pipefail

packages=(
  # compilers, build tools, BLAS for the CPU backend
  build-essential cmake pkg-config
  libdnnl-dev
  # safetensors checkpoint headers (header-only JSON parser; no runtime dependency)
  nlohmann-json3-dev
  # tests: GoogleTest, the PyTorch oracle, sanitizers/fuzzing, valgrind
  libgtest-dev python3-dev python3-numpy python3-pytest python3-torch python3-matplotlib
  clang libclang-rt-14-dev libomp-dev valgrind
  # the Python suites against today's PyPI numpy/torch (a venv), and pip install ./bindings/python
  python3-venv python3-pip
  # bindings: SWIG (Python, Java), JUnit 5, Rust with bindgen
  swig default-jdk-headless junit5 cargo rustc bindgen librust-bindgen-dev libclang-dev
  # expert parallelism over MPI; iproute2 for the multi-host tests (hosts as network namespaces)
  libopenmpi-dev openmpi-bin iproute2
  # packaging: ABI checks and the .rpm
  abigail-tools rpm file lintian rpmlint
  # libmoe-java-doc links to Debian's jQuery (its Depends; packaging.deb installs it)
  libjs-jquery libjs-jquery-ui
)

missing=()
installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${packages[@]}" 2>/dev/null || true)
for p in "${packages[@]}"; do
  grep -qx "$p installed" <<<"$installed" || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#packages[@]} packages are already installed"
  exit 0
fi

echo "install-deps: installing ${#missing[@]} missing package(s): ${missing[*]}"
as_root=()
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: not root and sudo is not installed; run this script as root" >&2
    exit 1
  fi
  as_root=(sudo)
fi
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0)
"${apt[@]}" update </dev/null
"${apt[@]}" install "${missing[@]}" </dev/null
echo "install-deps: done"
