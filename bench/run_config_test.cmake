# bench_config: moe-bench --config FILE and its flags come from libmoe's table of moe_config.
#  - a file of 'name = value' lines (comments, blank lines, spaces, any case, aliases) sets the layer,
#    and flags given after it override it; the JSON "fields" report what the layer got;
#  - the older flag spellings (--experts, --capacity, --aux) still set their fields;
#  - a bad line stops the bench with the file, the line number and libmoe's message;
#  - --help lists every field as a flag with its values.
# cmake -DBENCH=<moe-bench> -DWORK=<dir> -P run_config_test.cmake
set(_run --tokens 32 --iters 1 --warmup 0 --threads 1 --sgemm-size 32 --json)

function(expect haystack needle what)
  string(FIND "${haystack}" "${needle}" _at)
  if(_at EQUAL -1)
    message(FATAL_ERROR "${what}: expected to find\n  ${needle}\nin\n${haystack}")
  endif()
endfunction()

# 1. A good file, then a flag that overrides one of its lines.
file(WRITE ${WORK}/good.cfg [=[
# a small layer
d_model = 64
d_ff=128
num_experts = 4      # four experts
top_k = 1

activation = GeGLU
dtype = bf16
capacity_factor = 1.5
normalize_topk = no
seed = 18446744073709551615
]=])
execute_process(COMMAND ${BENCH} --config ${WORK}/good.cfg --top-k 2 ${_run}
                OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "moe-bench --config good.cfg failed (${_rc}): ${_err}")
endif()
foreach(_kv "\"d_model\": 64," "\"d_ff\": 128," "\"num_experts\": 4," "\"top_k\": 2," "\"activation\": \"geglu\""
        "\"dtype\": \"bfloat16\"" "\"capacity_factor\": 1.5," "\"normalize_topk\": false"
        "\"seed\": 18446744073709551615")
  expect("${_out}" "${_kv}" "moe-bench --config good.cfg --top-k 2")
endforeach()

# 2. The older spellings of the flags.
execute_process(COMMAND ${BENCH} --d-model 32 --d-ff 64 --experts 4 --capacity 2 --aux 0.05 --tf32 0 ${_run}
                OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "moe-bench with the older flag spellings failed (${_rc}): ${_err}")
endif()
foreach(_kv "\"num_experts\": 4," "\"capacity_factor\": 2," "\"aux_loss_coef\": 0.05," "\"allow_tf32\": false")
  expect("${_out}" "${_kv}" "moe-bench --experts 4 --capacity 2 --aux 0.05 --tf32 0")
endforeach()

# 3. Bad files: each names the file, the line and what is wrong, and the bench stops.
file(WRITE ${WORK}/bad_value.cfg "d_model = 64\n# fine so far\nactivation = swish\n")
file(WRITE ${WORK}/bad_name.cfg "d_modle = 64\n")
file(WRITE ${WORK}/bad_line.cfg "d_model = 64\nd_ff 128\n")
file(WRITE ${WORK}/bad_number.cfg "\n\n\n\ntop_k = two\n")
foreach(_case "bad_value.cfg:3: moe_config_set: activation='swish' is not one of 'swiglu', 'geglu'"
              "bad_name.cfg:1: moe_config_set: name: moe_config has no field 'd_modle' (the fields are: d_model"
              "bad_line.cfg:2: expected 'name = value', got 'd_ff 128'"
              "bad_number.cfg:5: moe_config_set: top_k='two' is not a decimal integer")
  string(REGEX MATCH "^[a-z_]+\\.cfg" _file "${_case}")
  execute_process(COMMAND ${BENCH} --config ${WORK}/${_file} ${_run}
                  OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc)
  if(_rc EQUAL 0)
    message(FATAL_ERROR "moe-bench --config ${_file} succeeded; expected a failure")
  endif()
  expect("${_err}" "${WORK}/${_case}" "moe-bench --config ${_file}")
endforeach()
execute_process(COMMAND ${BENCH} --config ${WORK}/missing.cfg ${_run}
                OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc)
if(_rc EQUAL 0)
  message(FATAL_ERROR "moe-bench --config missing.cfg succeeded")
endif()
expect("${_err}" "--config ${WORK}/missing.cfg: cannot open the file" "moe-bench --config missing.cfg")

# 4. A bad flag value names the flag and the allowed values.
execute_process(COMMAND ${BENCH} --dtype f64 ${_run} OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc)
if(_rc EQUAL 0)
  message(FATAL_ERROR "moe-bench --dtype f64 succeeded")
endif()
expect("${_err}" "--dtype: moe_config_set: dtype='f64' is not one of 'float32', 'bfloat16', 'float16'"
       "moe-bench --dtype f64")

# 5. --help: every field is a flag.
execute_process(COMMAND ${BENCH} --help OUTPUT_VARIABLE _out RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "moe-bench --help failed (${_rc})")
endif()
foreach(_flag "--config FILE" "--num-experts N" "--activation swiglu|geglu|relu|gelu|silu"
        "--dtype float32|bfloat16|float16" "--capacity-factor F" "--normalize-topk true|false" "--seed N"
        "--check-finite true|false" "--experts (--num-experts)" "deepseek-v3")
  expect("${_out}" "${_flag}" "moe-bench --help")
endforeach()
message(STATUS "bench_config: PASS")
