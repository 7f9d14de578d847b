# Runs at install time (install(CODE) in packaging/CMakeLists.txt): writes libmoe.pc with the
# prefix the tree is installed to. Inputs: _moe_pc_template (libmoe.pc with %MOE_PC_PREFIX%),
# _moe_pc_destination (the pkgconfig directory, relative to the prefix or absolute), _moe_pc_up
# (the path from that directory back to the prefix, e.g. "../..").
string(REGEX REPLACE "(.)/+$" "\\1" _moe_prefix "${CMAKE_INSTALL_PREFIX}")
if(_moe_prefix MATCHES "^/usr(/local)?$" OR _moe_pc_up STREQUAL "")
  set(_moe_pc_prefix "${_moe_prefix}")
else()
  set(_moe_pc_prefix "\${pcfiledir}/${_moe_pc_up}")
endif()
if(IS_ABSOLUTE "${_moe_pc_destination}")
  set(_moe_pc_dest "${_moe_pc_destination}")
else()
  set(_moe_pc_dest "${_moe_prefix}/${_moe_pc_destination}")
endif()
file(READ "${_moe_pc_template}" _moe_pc)
string(REPLACE "%MOE_PC_PREFIX%" "${_moe_pc_prefix}" _moe_pc "${_moe_pc}")
# a private scratch file: installs may run concurrently (cpack -G DEB and -G RPM)
string(RANDOM LENGTH 12 _moe_pc_tag)
set(_moe_pc_tmp "${_moe_pc_template}.${_moe_pc_tag}/libmoe.pc")
file(WRITE "${_moe_pc_tmp}" "${_moe_pc}")
# file(INSTALL) adds DESTDIR and records the file in install_manifest.txt
file(INSTALL DESTINATION "${_moe_pc_dest}" TYPE FILE FILES "${_moe_pc_tmp}")
get_filename_component(_moe_pc_tmpdir "${_moe_pc_tmp}" DIRECTORY)
file(REMOVE_RECURSE "${_moe_pc_tmpdir}")
