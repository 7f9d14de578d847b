#!/bin/sh
# libmoe.so must export exactly the functions include/moe/moe.h declares with MOE_API (and nothing
# else: no C++ symbols, no internal moe:: functions, no third-party code), and carry SONAME
# libmoe.so.0 (shared/DESIGN.md sections 3 and 6).
# Usage: check_exports.sh LIBMOE_SO MOE_H [NM] [READELF]
set -eu
lib=$1
header=$2
NM=${3:-nm}
READELF=${4:-readelf}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0

# Declared: every line that starts with MOE_API names one function, moe_xxx(.
grep -E '^[[:space:]]*MOE_API[[:space:]]' "$header" > "$tmp/api_lines" || true
sed -nE 's/^[[:space:]]*MOE_API[^(]*[^A-Za-z0-9_](moe_[A-Za-z0-9_]+)[[:space:]]*\(.*/\1/p' "$tmp/api_lines" \
  | sort > "$tmp/declared"
if [ "$(wc -l < "$tmp/api_lines")" -ne "$(wc -l < "$tmp/declared")" ]; then
  echo "FAIL: some MOE_API lines of $header do not declare a moe_xxx( function on the same line:"
  grep -vE 'MOE_API[^(]*[^A-Za-z0-9_]moe_[A-Za-z0-9_]+[[:space:]]*\(' "$tmp/api_lines" || true
  status=1
fi
if [ "$(sort -u "$tmp/declared" | wc -l)" -ne "$(wc -l < "$tmp/declared")" ]; then
  echo "FAIL: a function is declared twice in $header"
  status=1
fi
if [ ! -s "$tmp/declared" ]; then
  echo "FAIL: found no MOE_API declarations in $header"
  exit 1
fi

# Exported: defined dynamic symbols, without the version node (type A) and version suffixes.
"$NM" -D --defined-only "$lib" > "$tmp/nm"
awk '$(NF-1) != "A" { print $(NF-1), $NF }' "$tmp/nm" | sed -E 's/@.*$//' | sort -k2 > "$tmp/exported_typed"
awk '{ print $2 }' "$tmp/exported_typed" | sort -u > "$tmp/exported"

extra=$(comm -13 "$tmp/declared" "$tmp/exported")
missing=$(comm -23 "$tmp/declared" "$tmp/exported")
if [ -n "$extra" ]; then
  echo "FAIL: libmoe.so exports symbols moe.h does not declare:"
  echo "$extra" | sed 's/^/  /'
  status=1
fi
if [ -n "$missing" ]; then
  echo "FAIL: functions declared in moe.h that libmoe.so does not export:"
  echo "$missing" | sed 's/^/  /'
  status=1
fi
# Every export is a function (text) symbol.
nontext=$(awk '$1 != "T" && $1 != "t" && $1 != "W" && $1 != "i" { print "  " $2 " (type " $1 ")" }' "$tmp/exported_typed")
if [ -n "$nontext" ]; then
  echo "FAIL: exported symbols that are not functions:"
  echo "$nontext"
  status=1
fi

# SONAME.
soname=$("$READELF" -d "$lib" | sed -nE 's/.*\(SONAME\).*\[(.*)\].*/\1/p')
if [ "$soname" != "libmoe.so.0" ]; then
  echo "FAIL: SONAME is '$soname', expected 'libmoe.so.0'"
  status=1
fi

echo "declared $(wc -l < "$tmp/declared") functions, exported $(wc -l < "$tmp/exported") symbols, SONAME '$soname'"
[ $status -eq 0 ] && echo "PASS"
exit $status
