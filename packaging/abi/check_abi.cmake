# ABI check of libmoe.so against the committed baseline (packaging/abi/libmoe.abi), with
# libabigail (Debian's abigail-tools). Run with cmake -P:
#
#   -DMODE=check    abidw the built library, abidiff it against BASELINE; fail on an incompatible
#                   change (abidiff bit 8), on an error (bits 1, 2), on a SONAME that differs from
#                   the baseline's, or when the library has no debug information. abidiff sets
#                   only bit 4 for changes it cannot prove incompatible, such as a struct member
#                   inserted in the middle, so a bit-4 report fails too unless all it lists are
#                   added functions or variables (or changes libmoe.abignore declares compatible:
#                   members appended to the struct_size-versioned structs).
#   -DMODE=refresh  write BASELINE from the built library. Refuses when the new ABI is incompatible
#                   with the old baseline but the SONAME did not change (-DFORCE=ON overrides).
#
# Other variables: ABIDW, ABIDIFF (programs), LIBRARY (the built libmoe.so.X.Y.Z), HEADERS (the
# public header directory, include/moe: only types declared there are part of the ABI),
# SOURCE_DIR (stripped from the paths in the XML), WORK_DIR (scratch).
cmake_minimum_required(VERSION 3.22)
foreach(v MODE ABIDW ABIDIFF LIBRARY HEADERS SOURCE_DIR BASELINE WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "check_abi.cmake: -D${v}=... is required")
  endif()
endforeach()
file(MAKE_DIRECTORY ${WORK_DIR})
set(current ${WORK_DIR}/libmoe.current.abi)

# abidw: public types only, no absolute paths, no source locations (so the baseline only changes
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
  message(FATAL_ERROR "${LIBRARY} has no debug information (no function types in the abidw output); "
          "configure with -DMOE_ABI_CHECK=ON (adds -g; the packages are stripped anyway)")
endif()

if(EXISTS ${BASELINE})
  abi_soname(${BASELINE} base_soname)
  get_filename_component(abi_dir ${CMAKE_CURRENT_LIST_FILE} DIRECTORY)
  execute_process(COMMAND ${ABIDIFF} --no-redundant --suppressions ${abi_dir}/libmoe.abignore
                          ${BASELINE} ${current}
    RESULT_VARIABLE diff_rc OUTPUT_VARIABLE diff_out ERROR_VARIABLE diff_out)
else()
  set(base_soname "")
  set(diff_rc 0)
  set(diff_out "")
endif()
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

if(MODE STREQUAL "refresh")
  if(err)
    message(FATAL_ERROR "abidiff failed (${diff_rc}):\n${diff_out}")
  endif()
  if(incompatible AND base_soname STREQUAL cur_soname AND NOT FORCE)
    message(FATAL_ERROR "${diff_out}\nThe ABI changed incompatibly but the SONAME is still ${cur_soname}. "
            "Bump the SONAME first (the major of project(libmoe VERSION ...)), then refresh "
            "(or pass -DFORCE=ON if you are sure).")
  endif()
  file(COPY_FILE ${current} ${BASELINE})
  message(STATUS "ABI baseline written: ${BASELINE} (SONAME ${cur_soname}, ${nfns} functions)")
  if(diff_out)
    message(STATUS "changes against the previous baseline:\n${diff_out}")
  endif()
  return()
endif()

if(NOT EXISTS ${BASELINE})
  message(FATAL_ERROR "no ABI baseline ${BASELINE}; create it with `make abi-baseline`")
endif()
message(STATUS "ABI of ${LIBRARY}: SONAME ${cur_soname}, ${nfns} public functions; baseline SONAME ${base_soname}")
if(NOT base_soname STREQUAL cur_soname)
  message(FATAL_ERROR "SONAME changed from ${base_soname} to ${cur_soname}: refresh the baseline "
          "(`make abi-baseline`) and commit it together with the SONAME bump.\n${diff_out}")
endif()
if(err)
  message(FATAL_ERROR "abidiff failed (exit ${diff_rc}):\n${diff_out}")
endif()
if(incompatible)
  message(FATAL_ERROR "INCOMPATIBLE (or unreviewed) ABI change against ${BASELINE} (abidiff exit ${diff_rc}):\n${diff_out}\n"
          "Either keep the ABI compatible, or bump the SONAME (major version) and refresh the "
          "baseline (see packaging/README.md).")
endif()
if(changed)
  message(STATUS "compatible ABI change (abidiff exit ${diff_rc}), e.g. added functions:\n${diff_out}\n"
          "Refresh the baseline (`make abi-baseline`) when this change is released.")
else()
  message(STATUS "no ABI change against the baseline")
endif()
