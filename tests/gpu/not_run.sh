#!/bin/sh
# Stands in for GPU tests that cannot run in this build (the CUDA backend or compute-sanitizer is
# missing): reports SKIPPED with the reason and exits 77 (ctest's skip code), or, when
# MOE_REQUIRE_GPU is set to anything but "" or "0", reports the reason as a failure and exits 1.
case "${MOE_REQUIRE_GPU:-0}" in
  0) echo "SKIPPED: $1"; exit 77 ;;
  *) echo "FAILED: MOE_REQUIRE_GPU is set, but $1"; exit 1 ;;
esac
