# Shared by the packaging tests; sourced, not run. The environment comes from
# tests/packaging/CMakeLists.txt (MOE_BUILD_DIR, MOE_CONSUMER_DIR, ...).
set -euo pipefail

say() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
need_env() {
  local v
  for v in "$@"; do [[ -n "${!v:-}" ]] || fail "environment variable $v is not set (run through ctest)"; done
}
need_env MOE_BUILD_DIR MOE_CONSUMER_DIR MOE_CONSUMER_SOURCE MOE_VERSION MOE_SOVERSION CMAKE_COMMAND CC

# Arguments of the consumer run: a short run of the demo, nothing for consumer.c.
consumer_args() {
  case "$(basename "$MOE_CONSUMER_SOURCE")" in
    moe_demo.c) echo "--tokens 64 --experts 4 --top-k 2 --d-model 16 --d-ff 32" ;;
    *) echo "" ;;
  esac
}

# configure_consumer BUILD_DIR [cmake args...]: the consumer with find_package(libmoe 0.1 REQUIRED),
# never the user package registry (a build tree could be registered there).
configure_consumer() {
  local dir=$1; shift
  rm -rf "$dir"
  "$CMAKE_COMMAND" -S "$MOE_CONSUMER_DIR" -B "$dir" -DCMAKE_BUILD_TYPE=Release \
    -DMOE_CONSUMER_SOURCE="$MOE_CONSUMER_SOURCE" -DCMAKE_C_COMPILER="$CC" \
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_FIND_PACKAGE_NO_SYSTEM_PACKAGE_REGISTRY=ON "$@"
}

# assert_no_path_under FILE DIR: FILE (a text file) does not mention DIR
assert_no_path_under() {
  if grep -q -- "$2" "$1"; then
    grep -n -- "$2" "$1" | head -5 >&2
    fail "$1 refers to $2"
  fi
}

# which libmoe.so.N a program loads
loaded_libmoe() {
  ldd "$1" | awk -v so="libmoe.so.$MOE_SOVERSION" '$1 == so { print $3 }'
}
