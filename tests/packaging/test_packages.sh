#!/bin/bash
# packaging.deb: build the .deb (and .rpm) packages with CPack, check them (control fields,
# lintian, rpmlint), install with dpkg every package whose dependencies this machine has (libmoe0,
# libmoe-dev, python3-libmoe, libmoe-java, libmoe-java-doc, libmoe-mpi0; the CUDA and NCCL
# modules need NVIDIA's packages), build the consumer against the installed files only
# (find_package and pkg-config) and run it, import the Python package (byte-compiled at install),
# run the Java tests on the installed jar (the system's libmoe, no native code in the jar), purge
# the packages and check that the list of files under /usr (but /usr/local) is what it was before. lintian/rpmlint
# errors and warnings fail the test at the end, after the install checks (lintian overrides in
# the packages explain the few deliberate exceptions).
#   usage: test_packages.sh WORK_DIR     (environment from tests/packaging/CMakeLists.txt)
# Needs root and dpkg: otherwise it exits 77 (ctest reports the test as skipped).
# MOE_LINTIAN_STRICT=0 lets lintian warnings pass (errors always fail).
source "$(dirname "$0")/common.sh"
need_env CPACK_COMMAND
work=${1:?usage: test_packages.sh WORK_DIR}

if [[ $(id -u) -ne 0 ]]; then echo "SKIP: installing packages needs root"; exit 77; fi
for tool in dpkg dpkg-deb dpkg-shlibdeps; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool not found (Debian's dpkg / dpkg-dev)"; exit 77; }
done

rt=libmoe$MOE_SOVERSION  # the runtime package, named after the SONAME
pkgs=("$rt" libmoe-dev libmoe-cuda$MOE_SOVERSION libmoe-mpi$MOE_SOVERSION libmoe-nccl$MOE_SOVERSION
      python3-libmoe libmoe-java libmoe-java-doc)  # what the test may install
installed_by_us=0
present() { # present PKG: PKG is installed, or its configuration files are
  local st
  st=$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)
  [[ -n "$st" && "$st" != not-installed ]]
}
purge() {
  local p present=()
  for p in "${pkgs[@]}"; do
    if present "$p"; then present+=("$p"); fi
  done
  if ((${#present[@]})); then dpkg -P "${present[@]}"; fi
}
cleanup() {
  local rc=$?
  if ((installed_by_us)); then
    echo "== cleanup: purging ${pkgs[*]}"
    purge || true
  fi
  exit $rc
}
trap cleanup EXIT

rm -rf "$work"
mkdir -p "$work"
snapshot() { # every path under /usr but /usr/local (no package installs there; others may)
  find /usr -xdev -path /usr/local -prune -o -print 2>/dev/null | LC_ALL=C sort
}

# ---- build the packages --------------------------------------------------------------------------
# (cpack first builds the "preinstall" target: a no-op on the tree ctest is testing)
say "cpack -G DEB"
"$CPACK_COMMAND" -G DEB --config "$MOE_BUILD_DIR/CPackConfig.cmake" -B "$work/deb" >"$work/cpack-deb.log" 2>&1 \
  || { cat "$work/cpack-deb.log"; fail "cpack -G DEB"; }
grep -E '^CPack: - package: ' "$work/cpack-deb.log" || true
deb() { # deb NAME: the file of package NAME
  local f
  f=$(ls "$work/deb/$1"_*.deb 2>/dev/null | head -1)
  [[ -n "$f" ]] || fail "no $1 package in $work/deb"
  echo "$f"
}
runtime_deb=$(deb "$rt")
dev_deb=$(deb libmoe-dev)
debver=$(dpkg-deb -f "$runtime_deb" Version)
for f in "$work"/deb/*.deb; do
  echo "--- $(basename "$f")"
  dpkg-deb -f "$f" Package Version Architecture Section Depends
  dpkg-deb -c "$f" | awk '{ print "    " $6 ($7 ? " " $7 " " $8 : "") }'
done

# control fields
field() { dpkg-deb -f "$1" "$2"; }
[[ "$debver" == "$MOE_VERSION"-* ]] || fail "$rt version $debver does not start with $MOE_VERSION"
rdeps=$(field "$runtime_deb" Depends)
# dpkg-shlibdeps: the toolchain libraries, and a package for each other library libmoe.so links
# (the BLAS: libopenblas0, libblis4 or libdnnl2, whichever the build chose)
for d in libc6 libgomp1 libstdc++6; do
  [[ "$rdeps" == *"$d "* || "$rdeps" == *"$d," || "$rdeps" == *"$d" ]] || fail "$rt Depends ($rdeps) lacks $d: dpkg-shlibdeps did not run?"
done
objdump -p "$MOE_BUILD_DIR/libmoe.so.$MOE_VERSION" >"$work/objdump.txt"
other_needed=$(awk '$1 == "NEEDED" { print $2 }' "$work/objdump.txt" \
  | grep -cvE '^(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|libgomp|ld-linux.*)\.so' || true)
other_deps=$(tr ',' '\n' <<<"$rdeps" | awk '{ print $1 }' | grep -cvE '^(libc6|libgcc-s1|libstdc\+\+6|libgomp1)$' || true)
((other_deps >= (other_needed > 0 ? 1 : 0))) || fail "$rt Depends ($rdeps) has no package for the $other_needed other libraries libmoe.so needs"
devdeps=$(field "$dev_deb" Depends)
[[ "$devdeps" == *"$rt (= $debver)"* ]] || fail "libmoe-dev does not depend on $rt (= $debver)"
# what to install: every package of this build whose dependencies are installed or among the
# packages installed with it (alternatives "a | b" need one; versions are not compared)
built=()
for f in "$work"/deb/*.deb; do built+=("$(dpkg-deb -f "$f" Package)"); done
have() { # have NAME: installed, or one of the packages of this build
  local b
  for b in "${built[@]}"; do [[ "$b" == "$1" ]] && return 0; done
  [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}
installable() { # installable DEB: every dependency of DEB is satisfied
  local dep alt ok
  while IFS= read -r dep; do
    [[ -n "$dep" ]] || continue
    ok=0
    IFS='|' read -ra alts <<<"$dep"
    for alt in "${alts[@]}"; do
      alt=$(awk '{ print $1 }' <<<"$alt")
      if have "${alt%%:*}"; then ok=1; break; fi
    done
    ((ok)) || { echo "$dep"; return 1; }
  done < <(dpkg-deb -f "$1" Depends | tr ',' '\n' | sed 's/^ *//')
}
install_debs=()
for f in "$work"/deb/*.deb; do
  if missing=$(installable "$f"); then
    install_debs+=("$f")
  else
    echo "NOTE: $(basename "$f") is not installed by this test: this machine lacks '$missing'"
  fi
done
for d in "$rt" libmoe-dev; do
  printf '%s\n' "${install_debs[@]}" | grep -q "/${d}_" || fail "$d cannot be installed on this machine"
done
dpkg-deb -e "$runtime_deb" "$work/runtime.control"
cp "$work/runtime.control/shlibs" "$work/shlibs" 2>/dev/null || fail "$rt has no DEBIAN/shlibs"
[[ -f "$work/runtime.control/triggers" ]] || fail "$rt has no ldconfig trigger"
grep -q "^libmoe $MOE_SOVERSION $rt " "$work/shlibs" || fail "$rt shlibs: $(cat "$work/shlibs")"
# (lists in files: grep -q on a pipe would kill dpkg-deb with SIGPIPE under pipefail)
dpkg-deb -c "$runtime_deb" >"$work/runtime.list"
dpkg-deb -c "$dev_deb" >"$work/dev.list"
grep -q "libmoe.so.$MOE_SOVERSION -> " "$work/runtime.list" || fail "$rt lacks the SONAME link"
if grep -qE 'libmoe\.so -> |include/|pkgconfig|cmake/' "$work/runtime.list"; then fail "$rt holds development files"; fi
grep -q 'libmoe.so -> ' "$work/dev.list" || fail "libmoe-dev lacks the libmoe.so link"
if grep -q "libmoe.so.$MOE_VERSION" "$work/dev.list"; then fail "libmoe-dev holds the shared library"; fi
# the CUDA and NCCL modules depend on the packages of the CUDA libraries they link, named after
# their SONAMEs (libcudart.so.13 -> libcudart13, libnccl.so.2 -> libnccl2), which dpkg-shlibdeps
# cannot name
for m in cuda nccl; do
  f=$(ls "$work/deb/libmoe-$m${MOE_SOVERSION}"_*.deb 2>/dev/null | head -1 || true)  # (not built: none)
  [[ -n "$f" ]] || continue
  mkdir -p "$work/x-$m" && dpkg-deb -x "$f" "$work/x-$m"
  so=$(find "$work/x-$m" -name "libmoe_$m.so.$MOE_VERSION" -type f | head -1)
  deps=$(field "$f" Depends)
  while IFS= read -r needed; do
    [[ "$needed" =~ ^lib(cudart|cublas|cublasLt|nccl)\.so\.([0-9]+)$ ]] || continue
    want=$(tr 'A-Z' 'a-z' <<<"lib${BASH_REMATCH[1]}${BASH_REMATCH[2]}")
    [[ ", $deps," == *", $want "* || ", $deps," == *", $want,"* ]] || fail "libmoe-$m$MOE_SOVERSION links $needed but does not depend on $want (Depends: $deps)"
    echo "libmoe-$m$MOE_SOVERSION: $needed -> $want"
  done < <(objdump -p "$so" | awk '$1 == "NEEDED" { print $2 }')
done

# unversioned .so links (for the linker) belong in -dev only (lintian link-to-shared-library-in-wrong-package)
for f in "$work"/deb/*.deb; do
  [[ "$(dpkg-deb -f "$f" Package)" == libmoe-dev ]] && continue
  dpkg-deb -c "$f" >"$work/pkg.list"
  if grep -E '\.so -> ' "$work/pkg.list"; then fail "$(basename "$f") holds a development link to a library"; fi
done
mkdir -p "$work/x" && dpkg-deb -x "$runtime_deb" "$work/x"
find "$work/x" -name "libmoe.so.$MOE_VERSION" -type f -exec file {} + >"$work/file.txt"
if grep -q 'not stripped' "$work/file.txt"; then
  fail "$rt ships an unstripped library"
fi

# ---- lintian / rpmlint: report; errors fail ------------------------------------------------------
lint_fail=0
if command -v lintian >/dev/null; then
  say "lintian"
  lintian --tag-display-limit 0 --display-info "$work"/deb/*.deb >"$work/lintian.log" 2>&1 || true
  cat "$work/lintian.log"
  if grep -q '^E: ' "$work/lintian.log"; then echo "lintian reports errors"; lint_fail=1; fi
  if [[ "${MOE_LINTIAN_STRICT:-1}" == 1 ]] && grep -q '^W: ' "$work/lintian.log"; then echo "lintian reports warnings"; lint_fail=1; fi
else
  say "lintian not found: skipped"
fi

if command -v rpmbuild >/dev/null; then
  say "cpack -G RPM"
  "$CPACK_COMMAND" -G RPM --config "$MOE_BUILD_DIR/CPackConfig.cmake" -B "$work/rpm" >"$work/cpack-rpm.log" 2>&1 \
    || { cat "$work/cpack-rpm.log"; fail "cpack -G RPM"; }
  for f in "$work"/rpm/*.rpm; do
    echo "--- $(basename "$f")"
    rpm -qp --qf '%{NAME} %{VERSION}-%{RELEASE} %{ARCH} %{LICENSE}\n' "$f" 2>/dev/null
    { rpm -qpR "$f" 2>/dev/null | grep -v '^rpmlib(' || true; } | sed 's/^/    requires /'
    rpm -qpl "$f" 2>/dev/null | sed 's/^/    /'
  done
  rpm_dev=$(ls "$work"/rpm/libmoe-devel-*.rpm | head -1)
  rpm -qpR "$rpm_dev" 2>/dev/null >"$work/rpm-dev.requires"
  grep -q "^$rt = $MOE_VERSION" "$work/rpm-dev.requires" || fail "libmoe-devel does not require $rt = $MOE_VERSION"
  if command -v rpmlint >/dev/null; then
    say "rpmlint"
    rpmlint "$work"/rpm/*.rpm >"$work/rpmlint.log" 2>&1 || true
    cat "$work/rpmlint.log"
    # Errors that are no fault of the packages: unsigned test builds; missing-hash-section (the
    # openSUSE profile wants a SysV .hash; every current toolchain links .gnu.hash only);
    # no-binary on -devel (its CMake files name the arch-specific libdir, so it is not noarch);
    # outside-libdir-files on the Java package (rpmlint takes "lib" in its name for a shared
    # library package; jars belong in /usr/share/java); no-dependency-on python-base 3 (a Debian
    # build host installs the module in Debian's /usr/lib/python3/dist-packages, which rpmlint
    # reads as Python "3"; the package requires python(abi) = the X.Y its extension was built for).
    nerr=$(grep ': E: ' "$work/rpmlint.log" \
      | grep -cvE 'E: (no-signature|invalid-signature|unknown-key|missing-hash-section)|-devel[^:]*: E: no-binary|java[^:]*: E: outside-libdir-files /usr/share/java/|python3-libmoe[^:]*: E: no-dependency-on python-base 3$' || true)
    if ((nerr > 0)); then
      echo "rpmlint reports errors"; lint_fail=1
    fi
  else
    say "rpmlint not found: skipped"
  fi
else
  say "rpmbuild not found: RPM packages skipped"
fi

# ---- install -------------------------------------------------------------------------------------
# Packages of this version left by an interrupted earlier run are purged, so every run starts the
# same; another libmoe installed on the machine is not ours to remove: skip.
leftover=()
for p in "${pkgs[@]}"; do
  if present "$p"; then
    v=$(dpkg-query -W -f='${Version}' "$p")
    if [[ "$v" != "$debver" ]]; then echo "SKIP: $p $v is installed on this machine (this build is $debver)"; exit 77; fi
    leftover+=("$p")
  fi
done
if ((${#leftover[@]})); then say "purging ${leftover[*]} left by an earlier run"; purge; fi
# files of libmoe that no package owns (left by something else: a failed removal, a manual install
# into /usr) would make the comparison below meaningless
find /usr -xdev -path /usr/local -prune -o \( -name '*libmoe*' -o -path '*/include/moe' \) -print 2>/dev/null >"$work/strays.raw" || true
strays=()
while IFS= read -r p; do dpkg-query -S "$p" >/dev/null 2>&1 || strays+=("$p"); done <"$work/strays.raw"
((${#strays[@]} == 0)) || fail "paths of libmoe under /usr that no package owns, remove them first: ${strays[*]}"
snapshot >"$work/before.txt"

say "dpkg -i ${install_debs[*]##*/}"
installed_by_us=1
dpkg -i "${install_debs[@]}"
installed=()
for p in "${pkgs[@]}"; do if present "$p"; then installed+=("$p"); fi; done
dpkg -L "${installed[@]}" >"$work/owned.raw.txt" 2>/dev/null
grep '^/.' "$work/owned.raw.txt" | sort -u >"$work/owned.txt"  # no blank lines, no "/."
cat "$work/owned.txt"
ldconfig -p >"$work/ldconfig.txt"
grep -q "libmoe.so.$MOE_SOVERSION " "$work/ldconfig.txt" || fail "ldconfig does not know libmoe.so.$MOE_SOVERSION"

# Only the system: no /usr/local, no environment that could find the build tree.
unset LD_LIBRARY_PATH PKG_CONFIG_PATH CMAKE_PREFIX_PATH libmoe_DIR libmoe_ROOT
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch 2>/dev/null || true)

say "consumer with find_package(libmoe 0.1 REQUIRED) against /usr"
configure_consumer "$work/cmake" -DCMAKE_IGNORE_PREFIX_PATH=/usr/local | tee "$work/cmake.log"
grep -qE "libmoe $MOE_VERSION found: /usr/lib[^ ]*/cmake/libmoe\$" "$work/cmake.log" || fail "find_package did not find the packaged libmoe"
grep -q "include directories: /usr/include\$" "$work/cmake.log" || fail "libmoe::moe does not use /usr/include"
"$CMAKE_COMMAND" --build "$work/cmake" -- VERBOSE=1 | tee "$work/build.log"
# no include or library path, rpath or library file from the libmoe build or source tree
for tree in "$MOE_BUILD_DIR" ${MOE_SOURCE_DIR:+"$MOE_SOURCE_DIR"}; do
  for pat in "-I$tree" "-isystem $tree" "-L$tree" "rpath,$tree" "$tree/libmoe.so"; do
    if grep -qF -- "$pat" "$work/build.log"; then fail "the consumer build uses the libmoe tree: $pat"; fi
  done
done
used=$(loaded_libmoe "$work/cmake/moe_consumer")
[[ "$(readlink -f "$used")" == /usr/lib/* ]] || fail "moe_consumer loads '$used'"
xargs -a "$work/owned.txt" -d '\n' readlink -f >"$work/owned.real.txt"
grep -qxF "$(readlink -f "$used")" "$work/owned.real.txt" || fail "$used is not from $rt"
# shellcheck disable=SC2046
"$work/cmake/moe_consumer" $(consumer_args)

if command -v pkg-config >/dev/null; then
  say "consumer with pkg-config against /usr"
  export PKG_CONFIG_LIBDIR="/usr/lib/${multiarch:+$multiarch/}pkgconfig:/usr/lib/pkgconfig:/usr/share/pkgconfig"
  pkg-config --exists --print-errors "libmoe >= 0.1"
  pcdir=$(pkg-config --variable=pcfiledir libmoe)
  grep -qxF "$(readlink -f "$pcdir")/libmoe.pc" "$work/owned.real.txt" || fail "libmoe.pc in $pcdir is not from libmoe-dev"
  [[ "$(pkg-config --variable=prefix libmoe)" == /usr ]] || fail "libmoe.pc: prefix=$(pkg-config --variable=prefix libmoe), expected /usr"
  cflags=$(pkg-config --cflags libmoe)
  libs=$(pkg-config --libs libmoe)
  echo "cflags: $cflags"
  echo "libs:   $libs"
  # shellcheck disable=SC2086
  "$CC" -std=c11 -O1 $cflags "$MOE_CONSUMER_SOURCE" -o "$work/consumer-pc" $libs -lm -ldl
  used=$(loaded_libmoe "$work/consumer-pc")
  [[ "$(readlink -f "$used")" == /usr/lib/* ]] || fail "consumer-pc loads '$used'"
  # shellcheck disable=SC2046
  "$work/consumer-pc" $(consumer_args)
  unset PKG_CONFIG_LIBDIR
else
  say "pkg-config not found: pkg-config part skipped"
fi

# ---- python3-libmoe: byte-compiled at install, importable from the system's interpreter -----------
if present python3-libmoe; then
  say "python3-libmoe"
  pyfiles=$(dpkg -L python3-libmoe | grep '/libmoe/[^/]*\.py$' || true)
  [[ -n "$pyfiles" ]] || fail "python3-libmoe holds no .py files"
  while IFS= read -r py; do
    pyc=$(dirname "$py")/__pycache__/$(basename "$py" .py).cpython-*.pyc
    # shellcheck disable=SC2086
    ls $pyc >/dev/null 2>&1 || fail "$py was not byte-compiled at install (no $pyc)"
  done <<<"$pyfiles"
  (cd / && env -u PYTHONPATH /usr/bin/python3 -c '
import libmoe, numpy as np
assert libmoe.__file__.startswith("/usr/lib/python3/dist-packages/libmoe/"), libmoe.__file__
layer = libmoe.Layer(d_model=8, d_ff=16, num_experts=4, top_k=2, seed=1)
y = layer.forward(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
assert y.shape == (4, 8) and np.isfinite(y).all()
print("python3-libmoe", libmoe.__version__, "from", libmoe.__file__)') || fail "python3-libmoe does not work"
fi

# ---- libmoe-java: the installed jar has no native code and uses the system's libmoe -------------
if present libmoe-java; then
  say "libmoe-java"
  jar=/usr/share/java/libmoe.jar
  [[ -L "$jar" && -f "$(readlink -f "$jar")" ]] || fail "$jar is not a link to the versioned jar"
  /usr/bin/python3 -m zipfile -l "$(readlink -f "$jar")" >"$work/jar.list"
  if grep -q '\.so' "$work/jar.list"; then fail "$jar carries native libraries"; fi
  if [[ -n "${MOE_JAVA_TESTS_JAR:-}" && -n "${MOE_JUNIT5_CONSOLE:-}" && -n "${JAVA:-}" ]]; then
    # LoaderTest: the JNI library from java.library.path (Debian's default, no option given) and
    # exactly one libmoe.so.0 mapped, the one under /usr/lib; TrainingTest: it trains.
    "$JAVA" -Dorg.libmoe.test.expectSource=java.library.path -Dorg.libmoe.test.expectLibmoe=/usr/lib/ \
      -jar "$MOE_JUNIT5_CONSOLE" --disable-banner --disable-ansi-colors --fail-if-no-tests --details=summary \
      --class-path "$MOE_JAVA_TESTS_JAR:$jar" \
      --select-class org.libmoe.LoaderTest --select-class org.libmoe.TrainingTest || fail "the Java tests fail on the installed jar"
  else
    say "no Java test jar or JUnit: the installed jar is not run"
  fi
fi
if present libmoe-java-doc; then
  index=/usr/share/doc/libmoe-java/api/index.html
  [[ -f "$index" ]] || fail "libmoe-java-doc has no $index"
  while IFS= read -r l; do
    [[ -e "$l" ]] || fail "libmoe-java-doc: $l -> $(readlink "$l") is dangling"
  done < <(dpkg -L libmoe-java-doc | while IFS= read -r f; do [[ -L "$f" ]] && echo "$f"; done)
fi

# ---- remove --------------------------------------------------------------------------------------
say "dpkg -P ${installed[*]}"
dpkg -P "${installed[@]}"
installed_by_us=0
left=()
while IFS= read -r f; do
  [[ -e "$f" && ! -d "$f" ]] && left+=("$f")
done <"$work/owned.txt"
((${#left[@]} == 0)) || fail "files of the packages are left after dpkg -P: ${left[*]}"
while IFS= read -r f; do
  [[ -d "$f" && "$f" == *moe* ]] && left+=("$f")
done <"$work/owned.txt"
((${#left[@]} == 0)) || fail "directories of the packages are left after dpkg -P: ${left[*]}"
snapshot >"$work/after.txt"
# Paths that another package added meanwhile (an apt-get beside this test) are not ours: they
# are reported, not counted. Anything else that differs is.
diff "$work/before.txt" "$work/after.txt" >"$work/usr.diff" || true
bad=0
while IFS= read -r line; do
  case "$line" in
    '> '*) p=${line#> }
           if owner=$(dpkg-query -S "$p" 2>/dev/null); then echo "NOTE: added meanwhile by ${owner%%:*}: $p"; continue; fi
           echo "left behind: $p"; bad=1 ;;
    '< '*) echo "gone: ${line#< }"; bad=1 ;;
  esac
done <"$work/usr.diff"
((bad == 0)) || fail "the files under /usr differ from before the packages were installed"
say "the files under /usr are what they were before the install ($(wc -l <"$work/after.txt") paths)"
ldconfig -p >"$work/ldconfig.txt"
if grep -q "libmoe.so.$MOE_SOVERSION " "$work/ldconfig.txt"; then fail "ldconfig still lists libmoe.so.$MOE_SOVERSION"; fi
((lint_fail == 0)) || fail "lintian/rpmlint errors (see above)"
say "PASS"
