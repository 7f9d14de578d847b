# Runs the C, Rust and Java moe_demo programs with the same flags and checks that they print the
# same standard output and exit with the same status.
#   cmake -DC_DEMO=<exe> [-DRUST_DEMO=<exe>] [-DJAVA=<java> -DJAVA_CP=<class path>]
#         -DLIB_DIR=<dir of libmoe.so> -DOUT_DIR=<dir for the outputs> -P compare.cmake
set(cases
  "--tokens 256 --seed 7"
  ""
  "--tokens 0"
  "--tokens 300 --experts 5 --top-k 3 --d-model 32 --d-ff 48 --seed -1"
  "--tokens=17 --experts=1 --top-k=1 --seed 123456789"
  "--tokens 64 --experts 16 --top-k 4 --d-model 8 --d-ff 8 --seed 3"
  "--help"
  "--experts 0"
  "--seed abc")

set(ENV{LD_LIBRARY_PATH} "${LIB_DIR}:$ENV{LD_LIBRARY_PATH}")
set(programs C)
set(cmd_C ${C_DEMO})
if(RUST_DEMO)
  list(APPEND programs Rust)
  set(cmd_Rust ${RUST_DEMO})
endif()
if(JAVA_CP)
  list(APPEND programs Java)
  set(cmd_Java ${JAVA} -cp ${JAVA_CP} MoeDemo)
endif()
list(LENGTH programs n)
if(n LESS 2)
  message(FATAL_ERROR "only ${programs} available: nothing to compare")
endif()

file(MAKE_DIRECTORY ${OUT_DIR})
set(failed 0)
set(i 0)
foreach(case IN LISTS cases)
  math(EXPR i "${i} + 1")
  separate_arguments(args UNIX_COMMAND "${case}")
  set(ref_out "")
  set(ref_rc "")
  foreach(p IN LISTS programs)
    execute_process(COMMAND ${cmd_${p}} ${args}
      OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
    file(WRITE ${OUT_DIR}/case${i}.${p}.txt "${out}")
    if(p STREQUAL "C")
      set(ref_out "${out}")
      set(ref_rc "${rc}")
      if(out STREQUAL "" AND rc EQUAL 0)
        message(FATAL_ERROR "the C demo printed nothing for '${case}'")
      endif()
    elseif(NOT out STREQUAL ref_out OR NOT rc STREQUAL ref_rc)
      message(SEND_ERROR "'moe_demo ${case}': ${p} (exit ${rc}) differs from C (exit ${ref_rc}); "
                         "outputs in ${OUT_DIR}/case${i}.C.txt and case${i}.${p}.txt\n${p} stderr: ${err}")
      set(failed 1)
    endif()
  endforeach()
  string(REGEX MATCHALL "\n" lines "${ref_out}")
  list(LENGTH lines nlines)
  message(STATUS "moe_demo ${case}: ${programs} agree (exit ${ref_rc}, ${nlines} lines)")
endforeach()
if(failed)
  message(FATAL_ERROR "the examples disagree")
endif()
