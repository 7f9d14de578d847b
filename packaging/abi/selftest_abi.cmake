# packaging.abi_selftest: the ABI check (check_abi.cmake) still tells a removed function from an
# added one. From the newest committed baseline it makes an ABI without one function and runs the
# check both ways:
#   the library lost the function (baseline has it)    -> the check must fail, naming it;
#   the library gained the function (baseline lacks it) -> the check must pass, reporting an addition;
#   the baseline itself                                  -> the check must pass, no change.
# Run with cmake -P: -DABIDIFF= -DCHECK=check_abi.cmake -DBASELINE=libmoe-<version>.abi -DWORK_DIR=
# [-DFUNCTION=moe_layer_param_dtype]
cmake_minimum_required(VERSION 3.22)
foreach(v ABIDIFF CHECK BASELINE WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "selftest_abi.cmake: -D${v}=... is required")
  endif()
endforeach()
if(NOT DEFINED FUNCTION)
  set(FUNCTION moe_layer_param_dtype)
endif()
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR}/with ${WORK_DIR}/without)

# the baseline without FUNCTION: its ELF symbol line and its <function-decl> element
file(READ ${BASELINE} xml)
set(sym "    <elf-symbol name='${FUNCTION}' ")
string(FIND "${xml}" "${sym}" at)
string(FIND "${xml}" "<function-decl name='${FUNCTION}' " decl)
if(at EQUAL -1 OR decl EQUAL -1)
  message(FATAL_ERROR "${BASELINE} has no function ${FUNCTION}")
endif()
string(SUBSTRING "${xml}" ${at} -1 rest)
string(FIND "${rest}" "\n" eol)
math(EXPR eol "${eol} + 1")
string(SUBSTRING "${xml}" 0 ${at} head)
string(SUBSTRING "${rest}" ${eol} -1 tail)
set(xml "${head}${tail}")
string(FIND "${xml}" "<function-decl name='${FUNCTION}' " decl)
string(SUBSTRING "${xml}" ${decl} -1 rest)
string(FIND "${rest}" "</function-decl>\n" end)
math(EXPR end "${end} + 17")
string(SUBSTRING "${xml}" 0 ${decl} head)
string(SUBSTRING "${rest}" ${end} -1 tail)
string(REGEX REPLACE "[ ]+$" "" head "${head}")
set(xml "${head}${tail}")
if(xml MATCHES "'${FUNCTION}'")
  message(FATAL_ERROR "could not remove ${FUNCTION} from the baseline")
endif()
file(WRITE ${WORK_DIR}/without/libmoe-0.0.1.abi "${xml}")
file(COPY_FILE ${BASELINE} ${WORK_DIR}/with/libmoe-0.0.1.abi)

function(run_check name baseline_dir current expect_ok expect_regex)
  execute_process(COMMAND ${CMAKE_COMMAND} -DMODE=check -DABIDIFF=${ABIDIFF} -DHEADERS=unused -DSOURCE_DIR=unused
                          -DBASELINE_DIR=${baseline_dir} -DVERSION=0.0.1 -DWORK_DIR=${WORK_DIR}/${name}
                          -DCURRENT_ABI=${current} -P ${CHECK}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(expect_ok AND NOT rc EQUAL 0)
    message(FATAL_ERROR "${name}: the ABI check failed where it should pass:\n${out}")
  elseif(NOT expect_ok AND rc EQUAL 0)
    message(FATAL_ERROR "${name}: the ABI check passed where it should fail:\n${out}")
  endif()
  if(NOT out MATCHES "${expect_regex}")
    message(FATAL_ERROR "${name}: the output does not match '${expect_regex}':\n${out}")
  endif()
  message(STATUS "${name}: as expected (exit ${rc})")
endfunction()

run_check(removed ${WORK_DIR}/with ${WORK_DIR}/without/libmoe-0.0.1.abi FALSE "INCOMPATIBLE.*${FUNCTION}")
run_check(added ${WORK_DIR}/without ${BASELINE} TRUE "compatible change \\(additions\\).*${FUNCTION}")
run_check(same ${WORK_DIR}/with ${BASELINE} TRUE "no ABI change")
