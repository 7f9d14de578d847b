#!/bin/bash
# packaging.install_tree: `cmake --install` of the runtime and dev components into a scratch
# prefix has the layout of shared/DESIGN.md section 6, and a program outside the tree builds
# against it with find_package(libmoe 0.1) and with pkg-config, and runs.
#   usage: test_install_tree.sh WORK_DIR     (environment from tests/packaging/CMakeLists.txt)
source "$(dirname "$0")/common.sh"
need_env MOE_LIBDIR MOE_INCLUDEDIR MOE_CMAKEDIR MOE_PKGCONFIGDIR
work=${1:?usage: test_install_tree.sh WORK_DIR}
rm -rf "$work"
mkdir -p "$work"
prefix=$work/prefix

# the libraries and the development files; the optional modules where built (a module in the main
# export set is named by libmoeTargets-*.cmake, so find_package needs its file)
say "cmake --install (components runtime, dev, and cuda/mpi/nccl where built) --prefix $prefix"
for c in runtime dev cuda mpi nccl; do
  "$CMAKE_COMMAND" --install "$MOE_BUILD_DIR" --prefix "$prefix" --component "$c" >"$work/install-$c.log"
done
(cd "$prefix" && find . -mindepth 1 | sort) | tee "$work/files.txt"

# ---- layout ------------------------------------------------------------------------------------
lib=$prefix/$MOE_LIBDIR
real=$lib/libmoe.so.$MOE_VERSION
expect_file() { [[ -f "$1" ]] || fail "missing file $1"; }
expect_link() { [[ -L "$1" && "$(readlink "$1")" == "$2" ]] || fail "$1 should be a symlink to $2 (is: $(readlink "$1" || echo none))"; }
expect_file "$real"
expect_link "$lib/libmoe.so.$MOE_SOVERSION" "libmoe.so.$MOE_VERSION"
expect_link "$lib/libmoe.so" "libmoe.so.$MOE_SOVERSION"
expect_file "$prefix/$MOE_INCLUDEDIR/moe/moe.h"
expect_file "$prefix/$MOE_PKGCONFIGDIR/libmoe.pc"
for f in libmoeConfig.cmake libmoeConfigVersion.cmake libmoeTargets.cmake; do
  expect_file "$prefix/$MOE_CMAKEDIR/$f"
done
ls "$prefix/$MOE_CMAKEDIR"/libmoeTargets-*.cmake >/dev/null || fail "no per-configuration libmoeTargets-<config>.cmake"
soname=$(objdump -p "$real" | awk '$1 == "SONAME" { print $2 }')
[[ "$soname" == "libmoe.so.$MOE_SOVERSION" ]] || fail "SONAME of $real is '$soname', expected libmoe.so.$MOE_SOVERSION"
say "SONAME $soname"
# exported dynamic symbols: moe_* only
bad=$(nm -D --defined-only "$real" | awk '$2 ~ /^[TDBRVW]$/ && $3 !~ /^moe_/ { print $3 }' | grep -v '^LIBMOE_' || true)
[[ -z "$bad" ]] || fail "libmoe.so exports non-moe_ symbols: $bad"
# nothing installed may point back into the build or source tree
for f in "$prefix/$MOE_PKGCONFIGDIR/libmoe.pc" "$prefix/$MOE_CMAKEDIR"/*.cmake; do
  assert_no_path_under "$f" "$MOE_BUILD_DIR"
  [[ -z "${MOE_SOURCE_DIR:-}" ]] || assert_no_path_under "$f" "$MOE_SOURCE_DIR"
done
runpath=$(objdump -p "$real" | awk '$1 == "RUNPATH" || $1 == "RPATH" { print $2 }')
[[ -z "$runpath" ]] || fail "installed libmoe.so keeps a RUNPATH/RPATH: $runpath"

# ---- find_package --------------------------------------------------------------------------------
say "consumer with find_package(libmoe 0.1 REQUIRED) from $prefix"
configure_consumer "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" | tee "$work/cmake.log"
grep -q "libmoe $MOE_VERSION found: $prefix/$MOE_CMAKEDIR" "$work/cmake.log" || fail "find_package did not use $prefix"
"$CMAKE_COMMAND" --build "$work/cmake"
used=$(loaded_libmoe "$work/cmake/moe_consumer")
[[ "$used" == "$lib/libmoe.so.$MOE_SOVERSION" ]] || fail "moe_consumer loads '$used', not the installed library"
# shellcheck disable=SC2046
"$work/cmake/moe_consumer" $(consumer_args)

say "find_package(libmoe 1.0) must fail (SameMajorVersion: 0.x is not 1.x)"
if configure_consumer "$work/cmake-v1" -DCMAKE_PREFIX_PATH="$prefix" -DMOE_MIN_VERSION=1.0 >"$work/cmake-v1.log" 2>&1; then
  fail "find_package(libmoe 1.0) accepted libmoe $MOE_VERSION"
fi
grep -q "considered but not accepted" "$work/cmake-v1.log" || fail "find_package(libmoe 1.0) failed for another reason (see $work/cmake-v1.log)"

# ---- a missing component names its package ------------------------------------------------------
# A second tree with the runtime and dev components only: find_package(... COMPONENTS mpi) must
# fail and say which package holds the MPI adapter.
say "find_package(libmoe COMPONENTS mpi) without the mpi component says what to install"
bare=$work/prefix-bare
for c in runtime dev; do
  "$CMAKE_COMMAND" --install "$MOE_BUILD_DIR" --prefix "$bare" --component "$c" >"$work/install-bare-$c.log"
done
[[ ! -e "$bare/$MOE_LIBDIR/libmoe_mpi.so.$MOE_SOVERSION" ]] || fail "the runtime or dev component installs the MPI adapter"
if configure_consumer "$work/cmake-mpi-missing" -DCMAKE_PREFIX_PATH="$bare" -DMOE_COMPONENTS=mpi >"$work/cmake-mpi-missing.log" 2>&1; then
  fail "find_package(libmoe COMPONENTS mpi) succeeded without libmoe_mpi.so.$MOE_SOVERSION"
fi
grep -q "install the package libmoe-mpi$MOE_SOVERSION" "$work/cmake-mpi-missing.log" \
  || { cat "$work/cmake-mpi-missing.log"; fail "find_package(libmoe COMPONENTS mpi) does not name the package libmoe-mpi$MOE_SOVERSION"; }
grep -q "MOE_WITH_MPI=ON" "$work/cmake-mpi-missing.log" || fail "the message does not say how to build the MPI adapter"
grep -A3 "Reason given by package" "$work/cmake-mpi-missing.log"
# and where the adapter is installed (and MPI is found), the component is there
if [[ -e "$lib/libmoe_mpi.so.$MOE_SOVERSION" ]]; then
  configure_consumer "$work/cmake-mpi" -DCMAKE_PREFIX_PATH="$prefix" -DMOE_COMPONENTS=mpi >"$work/cmake-mpi.log" 2>&1 \
    || { cat "$work/cmake-mpi.log"; fail "find_package(libmoe COMPONENTS mpi) failed with the MPI adapter installed"; }
fi

# ---- pkg-config ----------------------------------------------------------------------------------
if command -v pkg-config >/dev/null; then
  say "consumer with pkg-config (only $prefix/$MOE_PKGCONFIGDIR on the search path)"
  export PKG_CONFIG_LIBDIR="$prefix/$MOE_PKGCONFIGDIR"
  unset PKG_CONFIG_PATH
  pkg-config --exists --print-errors "libmoe >= 0.1"
  # a prefix other than /usr, /usr/local: the .pc locates the tree from its own place
  grep -q '^prefix=${pcfiledir}/' "$prefix/$MOE_PKGCONFIGDIR/libmoe.pc" || fail "libmoe.pc is not relocatable"
  [[ "$(pkg-config --modversion libmoe)" == "$MOE_VERSION" ]] || fail "pkg-config --modversion libmoe is $(pkg-config --modversion libmoe)"
  cflags=$(pkg-config --cflags libmoe)
  libs=$(pkg-config --libs libmoe)
  echo "cflags: $cflags"
  echo "libs:   $libs"
  # shellcheck disable=SC2086
  "$CC" -std=c11 -O1 $cflags "$MOE_CONSUMER_SOURCE" -o "$work/consumer-pc" $libs -lm -ldl
  # the .pc has no rpath: point the loader at the scratch prefix (a system install does not need it)
  used=$(LD_LIBRARY_PATH="$lib" loaded_libmoe "$work/consumer-pc")
  [[ "$used" == "$lib/libmoe.so.$MOE_SOVERSION" ]] || fail "consumer-pc loads '$used', not the installed library"
  # shellcheck disable=SC2046
  LD_LIBRARY_PATH="$lib" "$work/consumer-pc" $(consumer_args)
else
  say "pkg-config not found: pkg-config part skipped"
fi
say "PASS"
