# bench_ep_smoke: moe-bench --ep-ranks RANKS --json on a small shape, its output read by CHECKER.
# cmake -DBENCH=... -DPYTHON=... -DCHECKER=... -DRANKS=... -P run_ep_smoke.cmake
execute_process(
  COMMAND ${BENCH} --ep-ranks ${RANKS} --d-model 64 --d-ff 128 --tokens 256 --iters 2 --warmup 1 --threads 1
          --sgemm-size 64 --json
  OUTPUT_VARIABLE _json RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "moe-bench --ep-ranks ${RANKS} failed (${_rc})")
endif()
file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/bench_ep_smoke.json "${_json}")
execute_process(COMMAND ${PYTHON} ${CHECKER} ${RANKS} ${CMAKE_CURRENT_BINARY_DIR}/bench_ep_smoke.json
                RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "the JSON of moe-bench --ep-ranks ${RANKS} fails its checks")
endif()
