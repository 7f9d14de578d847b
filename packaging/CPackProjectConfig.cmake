# Read by cpack once per generator (CPACK_PROJECT_CONFIG_FILE).
cmake_policy(PUSH)
cmake_policy(VERSION 3.22)  # cpack reads this file with no policies set (IN_LIST)
if(CPACK_GENERATOR STREQUAL "DEB")
  # Each component's Debian description starts with its own synopsis line; without this CPackDeb
  # would put the project summary in front of it as the synopsis of every package.
  unset(CPACK_PACKAGE_DESCRIPTION_SUMMARY)
endif()

# libmoe-dev depends on the module packages whose libraries its libmoeTargets-*.cmake names
# (a module in the main export set: find_package(libmoe) fails without its library file).
file(GLOB _moe_exports "${CPACK_MOE_EXPORT_DIR}/*/libmoeTargets-*.cmake")
set(_moe_export_text "")
foreach(_f IN LISTS _moe_exports)
  file(READ "${_f}" _t)
  string(APPEND _moe_export_text "${_t}")
endforeach()
foreach(_m cuda mpi nccl)
  string(TOUPPER ${_m} _M)
  if(_m IN_LIST CPACK_COMPONENTS_ALL AND _moe_export_text MATCHES "/libmoe_${_m}\\.so")
    if(NOT _m IN_LIST CPACK_COMPONENT_DEV_DEPENDS)
      list(APPEND CPACK_COMPONENT_DEV_DEPENDS ${_m})
      string(APPEND CPACK_RPM_DEV_PACKAGE_REQUIRES
        ", ${CPACK_RPM_${_M}_PACKAGE_NAME} ${CPACK_MOE_RPM_RUNTIME_REQUIRES}")
      message(STATUS "libmoe-dev depends on the ${_m} package: its CMake files export libmoe_${_m}")
    endif()
  endif()
endforeach()
cmake_policy(POP)
