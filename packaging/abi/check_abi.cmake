# ABI check of libmoe.so against the committed baselines, one per release
# (packaging/abi/libmoe-<version>.abi), with libabigail (Debian's abigail-tools). Run with cmake -P:
#
#   -DMODE=check    abidw the built library, abidiff it against every baseline of the same SONAME
#                   (a program built against any earlier release of this major must keep working);
#                   fail on an incompatible change (abidiff bit 8), on an error (bits 1, 2), when
#                   no baseline has this SONAME, or when the library has no debug information.
#                   abidiff sets only bit 4 for changes it cannot prove incompatible, such as a
#                   struct member inserted in the middle, so a bit-4 report fails too unless all it
#                   lists are added functions or variables (or changes libmoe.abignore declares
#                   compatible: members appended to the struct_size-versioned structs).
#   -DMODE=refresh  write the baseline of VERSION (libmoe-<VERSION>.abi) from the built library.
#                   Refuses when the new ABI is incompatible with the newest other baseline but the
#                   SONAME did not change (-DFORCE=ON overrides).
#
# Other variables: ABIDW, ABIDIFF (programs), LIBRARY (the built libmoe.so.X.Y.Z), HEADERS (the
# public header directory, include/moe: only types declared there are part of the ABI),
# SOURCE_DIR (stripped from the paths in the XML), BASELINE_DIR (packaging/abi), VERSION (this
# build's version), WORK_DIR (scratch). CURRENT_ABI: an abidw XML to check instead of LIBRARY
# (the self-test, selftest_abi.cmake, uses it).
cmake_minimum_required(VERSION 3.22)
foreach(v MODE ABIDIFF HEADERS SOURCE_DIR BASELINE_DIR VERSION WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "check_abi.cmake: -D${v}=... is required")
  endif()
endforeach()
file(MAKE_DIRECTORY ${WORK_DIR})
set(current ${WORK_DIR}/libmoe.current.abi)

if(DEFINED CURRENT_ABI)
  file(COPY_FILE ${CURRENT_ABI} ${current})
  set(what ${CURRENT_ABI})
else()
  foreach(v ABIDW LIBRARY)
    if(NOT DEFINED ${v})
      message(FATAL_ERROR "check_abi.cmake: -D${v}=... is required")
    endif()
  endforeach()
  set(what ${LIBRARY})
  # abidw: public types only, no absolute paths, no source locations (so a baseline only changes
  # when the ABI does).
  execute_process(
    COMMAND ${ABIDW} --headers-dir ${HEADERS} --drop-private-types --drop-undefined-syms --exported-interfaces-only
            --no-corpus-path --no-comp-dir-path --no-show-locs --type-id-style hash
            --out-file ${current}.tmp ${LIBRARY}
    RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "abidw failed (${rc}) on ${LIBRARY}")
  endif()
  file(READ ${current}.tmp xml)
  string(REPLACE "${SOURCE_DIR}/" "" xml "${xml}")
  file(WRITE ${current} "${xml}")
  file(REMOVE ${current}.tmp)
endif()
file(READ ${current} xml)

function(abi_soname file out)
  file(STRINGS ${file} line LIMIT_COUNT 1 REGEX "<abi-corpus ")
  if(line MATCHES "soname='([^']*)'")
    set(${out} "${CMAKE_MATCH_1}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()
abi_soname(${current} cur_soname)

# Without DWARF abidw only sees symbol names, and the check would miss every change of a type.
string(REGEX MATCHALL "<function-decl " fns "${xml}")
list(LENGTH fns nfns)
if(nfns EQUAL 0)
  message(FATAL_ERROR "${what} has no debug information (no function types in the abidw output); "
          "configure with -DMOE_ABI_CHECK=ON (adds -g; the packages are stripped anyway)")
endif()

# compare(BASELINE): sets diff_rc, diff_out, incompatible, changed in the caller
macro(compare baseline)
  get_filename_component(_abi_dir ${CMAKE_CURRENT_LIST_FILE} DIRECTORY)
  execute_process(COMMAND ${ABIDIFF} --no-redundant --suppressions ${_abi_dir}/libmoe.abignore
                          ${baseline} ${current}
    RESULT_VARIABLE diff_rc OUTPUT_VARIABLE diff_out ERROR_VARIABLE diff_out)
  if(NOT diff_rc MATCHES "^[0-9]+$")
    message(FATAL_ERROR "abidiff did not run: ${diff_rc}")
  endif()
  math(EXPR err "${diff_rc} & 3")
  math(EXPR changed "${diff_rc} & 4")
  math(EXPR incompatible "${diff_rc} & 8")
  # bit 4 alone: compatible only if nothing was removed or changed (additions only)
  if(changed AND diff_out MATCHES "[1-9][0-9]* (Removed|Changed)")
    set(incompatible 1)
  endif()
  if(err)
    message(FATAL_ERROR "abidiff failed (exit ${diff_rc}) against ${baseline}:\n${diff_out}")
  endif()
endmacro()

# The baselines, oldest release first (natural order: 0.10.0 after 0.9.0).
file(GLOB baselines ${BASELINE_DIR}/libmoe-*.abi)
list(SORT baselines COMPARE NATURAL)
set(own ${BASELINE_DIR}/libmoe-${VERSION}.abi)

if(MODE STREQUAL "refresh")
  # the newest baseline other than this version's
  set(previous "")
  foreach(b IN LISTS baselines)
    if(NOT b STREQUAL own)
      set(previous ${b})
    endif()
  endforeach()
  set(diff_out "")
  if(previous)
    abi_soname(${previous} prev_soname)
    compare(${previous})
    if(incompatible AND prev_soname STREQUAL cur_soname AND NOT FORCE)
      message(FATAL_ERROR "${diff_out}\nThe ABI changed incompatibly since ${previous} but the SONAME is still "
              "${cur_soname}. Bump the SONAME first (the major of project(libmoe VERSION ...)), then refresh "
              "(or pass -DFORCE=ON if you are sure).")
    endif()
  endif()
  file(COPY_FILE ${current} ${own})
  message(STATUS "ABI baseline written: ${own} (SONAME ${cur_soname}, ${nfns} functions)")
  if(diff_out)
    message(STATUS "changes since ${previous}:\n${diff_out}")
  endif()
  return()
endif()

set(checked 0)
set(notes "")
foreach(b IN LISTS baselines)
  abi_soname(${b} base_soname)
  get_filename_component(name ${b} NAME)
  if(NOT base_soname STREQUAL cur_soname)
    message(STATUS "${name}: SONAME ${base_soname}, not ${cur_soname}: another major, not compared")
    continue()
  endif()
  compare(${b})
  math(EXPR checked "${checked} + 1")
  if(incompatible)
    message(FATAL_ERROR "INCOMPATIBLE (or unreviewed) ABI change against ${name} (abidiff exit ${diff_rc}):\n${diff_out}\n"
            "A program built against that release would break. Either keep the ABI compatible, or bump "
            "the SONAME (major version) and write a baseline for it (see packaging/README.md).")
  elseif(changed)
    message(STATUS "${name}: compatible change (additions):\n${diff_out}")
    if(b STREQUAL own)
      string(APPEND notes "The ABI grew since the ${VERSION} baseline: refresh it (`make abi-baseline`) while ${VERSION} is unreleased. ")
    endif()
  else()
    message(STATUS "${name}: no ABI change")
  endif()
endforeach()
if(checked EQUAL 0)
  message(FATAL_ERROR "no ABI baseline in ${BASELINE_DIR} has SONAME ${cur_soname}: write one with `make abi-baseline`")
endif()
if(NOT EXISTS ${own})
  string(APPEND notes "No baseline for ${VERSION} yet: write it (`make abi-baseline`) when ${VERSION} is released. ")
endif()
message(STATUS "ABI of ${what}: SONAME ${cur_soname}, ${nfns} public functions; compatible with ${checked} baseline(s). ${notes}")
