# CPack settings of libmoe: .deb and .rpm packages split per install component, the way Debian
# ships a library (NCCL's libnccl2 / libnccl-dev):
#
#   component  .deb             .rpm             contents
#   runtime    libmoe0          libmoe0          libmoe.so.0 (core + CPU backend)
#   dev        libmoe-dev       libmoe-devel     libmoe.so, headers, libmoe.pc, CMake package files
#   cuda       libmoe-cuda0     libmoe_cuda0     libmoe_cuda.so.0, the CUDA backend module
#   mpi        libmoe-mpi0      libmoe_mpi0      libmoe_mpi.so.0 (when src/comm installs it)
#   nccl       libmoe-nccl0     libmoe_nccl0     libmoe_nccl.so.0 (when src/comm installs it)
#   python     python3-libmoe   python3-libmoe   the Python package (byte-compiled at install)
#   java       libmoe-java      libmoe-java      the jar (no native code inside) and its JNI library
#   javadoc    libmoe-java-doc  libmoe-javadoc   the Java API documentation (Architecture: all)
#
# RPM names follow the shared-library policy of openSUSE (and rpmlint): the runtime package is
# named after the SONAME, like Debian's; -devel for the development files.
#
# A component becomes a package only when some install() rule uses it, so a binding that is
# built later only has to install its files with COMPONENT python or COMPONENT java.
#
# This file must run after every install() rule of the project. packaging/CMakeLists.txt defers
# it to the end of the top-level CMakeLists.txt (cmake_language(DEFER)); including it there
# directly works as well (it runs once).
get_property(_moe_cpack_done GLOBAL PROPERTY MOE_CPACK_SETUP_DONE)
if(_moe_cpack_done)
  return()
endif()
set_property(GLOBAL PROPERTY MOE_CPACK_SETUP_DONE TRUE)

set(_moe_pkg_dir ${MOE_PACKAGING_DIR})
set(_moe_ver ${PROJECT_VERSION})

# The CUDA module: src/cuda installs it into COMPONENT cuda; if it does not, do it here.
get_cmake_property(_moe_components COMPONENTS)
if(TARGET moe_cuda AND NOT "cuda" IN_LIST _moe_components)
  install(TARGETS moe_cuda LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT cuda NAMELINK_SKIP)
  list(APPEND _moe_components cuda)
endif()

# component -> deb name, deb section, rpm name, extra Debian depends, one-line summary, description
set(_moe_known runtime dev cuda mpi nccl python java javadoc)
set(_moe_deb_runtime libmoe${PROJECT_VERSION_MAJOR})
set(_moe_deb_dev libmoe-dev)
set(_moe_deb_cuda libmoe-cuda${PROJECT_VERSION_MAJOR})
set(_moe_deb_mpi libmoe-mpi${PROJECT_VERSION_MAJOR})
set(_moe_deb_nccl libmoe-nccl${PROJECT_VERSION_MAJOR})
set(_moe_deb_python python3-libmoe)
set(_moe_deb_java libmoe-java)
set(_moe_deb_javadoc libmoe-java-doc)
set(_moe_rpm_runtime libmoe${PROJECT_VERSION_MAJOR})
set(_moe_rpm_dev libmoe-devel)
set(_moe_rpm_cuda libmoe_cuda${PROJECT_VERSION_MAJOR})
set(_moe_rpm_mpi libmoe_mpi${PROJECT_VERSION_MAJOR})
set(_moe_rpm_nccl libmoe_nccl${PROJECT_VERSION_MAJOR})
set(_moe_rpm_python python3-libmoe)
set(_moe_rpm_java libmoe-java)
set(_moe_rpm_javadoc libmoe-javadoc)
set(_moe_section_runtime libs)
set(_moe_section_dev libdevel)
set(_moe_section_cuda libs)
set(_moe_section_mpi libs)
set(_moe_section_nccl libs)
set(_moe_section_python python)
set(_moe_section_java java)
set(_moe_section_javadoc doc)
# Debian's Java policy: a library does not depend on a runtime (lintian needless-dependency-on-jre).
set(_moe_rpmdeps_java "java-headless")
# In the .deb the documentation links to Debian's jQuery (deb/finish_debs.cmake).
set(_moe_debdeps_javadoc "libjs-jquery, libjs-jquery-ui")
set(_moe_noarch_javadoc TRUE)

# python3-libmoe holds an extension module built for one Python version: it depends on that
# version as dh_python3 writes it ("python3 (>= 3.11~), python3 (<< 3.12)").
if("python" IN_LIST _moe_components)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_VERSION_MAJOR AND Python3_VERSION_MINOR)
    set(_moe_py "${Python3_VERSION_MAJOR}.${Python3_VERSION_MINOR}")
    math(EXPR _moe_py_next "${Python3_VERSION_MINOR} + 1")
    set(_moe_debdeps_python
      "python3 (>= ${_moe_py}~), python3 (<< ${Python3_VERSION_MAJOR}.${_moe_py_next}), python3-numpy")
    set(_moe_rpmdeps_python "python3, python(abi) = ${_moe_py}, python3-numpy")
  else()
    message(WARNING "libmoe packaging: no Python 3 interpreter found; python3-libmoe depends on any python3")
    set(_moe_debdeps_python "python3, python3-numpy")
    set(_moe_rpmdeps_python "python3, python3-numpy")
  endif()
endif()

# libmoe-cuda0 / libmoe-nccl0 depend on the packages of the CUDA runtime, cuBLAS and NCCL they
# link. dpkg-shlibdeps cannot name them (a toolkit in /usr/local/cuda belongs to no package), so
# the names are derived from each library's SONAME, in the two namings a Debian system meets:
# Debian's own (policy 8.1: libcudart.so.13 -> libcudart13, libnccl.so.2 -> libnccl2) or NVIDIA's
# CUDA repository's, named after the toolkit release (cuda-cudart-13-0, libcublas-13-0).
function(_moe_soname file out)
  set(${out} "" PARENT_SCOPE)
  if(NOT file OR NOT EXISTS "${file}" OR NOT CMAKE_READELF)
    return()
  endif()
  execute_process(COMMAND ${CMAKE_READELF} -d "${file}" OUTPUT_VARIABLE _o ERROR_QUIET)
  if(_o MATCHES "Library soname: \\[([^]]+)\\]")
    set(${out} "${CMAKE_MATCH_1}" PARENT_SCOPE)
  endif()
endfunction()
# _moe_library_depends(<var> <library file> <NVIDIA repository name or "">): the Debian package
# name from the SONAME, or'ed with the NVIDIA repository's when there is one.
function(_moe_library_depends out file nvidia)
  _moe_soname("${file}" _so)
  if(NOT _so MATCHES "^(.+)\\.so\\.([0-9]+)$")
    message(WARNING "libmoe packaging: no SONAME in '${file}': its package is not in the Depends")
    set(${out} "" PARENT_SCOPE)
    return()
  endif()
  set(_name ${CMAKE_MATCH_1})
  set(_ver ${CMAKE_MATCH_2})
  if(_name MATCHES "[0-9]$")
    set(_deb "${_name}-${_ver}")
  else()
    set(_deb "${_name}${_ver}")
  endif()
  string(TOLOWER "${_deb}" _deb)
  string(REPLACE "_" "-" _deb "${_deb}")
  if(nvidia AND NOT nvidia STREQUAL _deb)
    set(${out} "${_deb} | ${nvidia}" PARENT_SCOPE)
  else()
    set(${out} "${_deb}" PARENT_SCOPE)
  endif()
endfunction()
# The toolkit release, e.g. "13-0": from the toolkit's version.json, else from the real path of the
# CUDA runtime (/usr/local/cuda-13.0/..., libcudart.so.13.0.88).
set(_moe_cuda_release "")
if(CUDA_cudart_LIBRARY)
  get_filename_component(_moe_cudart_real "${CUDA_cudart_LIBRARY}" REALPATH)
  get_filename_component(_moe_cuda_root "${_moe_cudart_real}" DIRECTORY)
  get_filename_component(_moe_cuda_root "${_moe_cuda_root}" DIRECTORY)
  if(EXISTS "${_moe_cuda_root}/version.json")
    file(READ "${_moe_cuda_root}/version.json" _moe_json)
    string(JSON _moe_v ERROR_VARIABLE _moe_json_err GET "${_moe_json}" cuda version)
    if(NOT _moe_json_err AND _moe_v MATCHES "^([0-9]+)\\.([0-9]+)")
      set(_moe_cuda_release "${CMAKE_MATCH_1}-${CMAKE_MATCH_2}")
    endif()
  endif()
  if(NOT _moe_cuda_release AND _moe_cudart_real MATCHES "(cuda-|\\.so\\.)([0-9]+)\\.([0-9]+)")
    set(_moe_cuda_release "${CMAKE_MATCH_2}-${CMAKE_MATCH_3}")
  endif()
endif()
set(_moe_cudart_dep "")
set(_moe_cublas_dep "")
set(_moe_nccl_dep "")
if(CUDA_cudart_LIBRARY)
  set(_moe_nv_cudart "")
  set(_moe_nv_cublas "")
  if(_moe_cuda_release)
    set(_moe_nv_cudart "cuda-cudart-${_moe_cuda_release}")
    set(_moe_nv_cublas "libcublas-${_moe_cuda_release}")
  endif()
  _moe_library_depends(_moe_cudart_dep "${CUDA_cudart_LIBRARY}" "${_moe_nv_cudart}")
  _moe_library_depends(_moe_cublas_dep "${CUDA_cublas_LIBRARY}" "${_moe_nv_cublas}")
endif()
if(MOE_NCCL_LIBRARY)
  _moe_library_depends(_moe_nccl_dep "${MOE_NCCL_LIBRARY}" "")
endif()
set(_moe_debdeps_cuda)
foreach(_d IN ITEMS "${_moe_cudart_dep}" "${_moe_cublas_dep}")
  if(_d)
    list(APPEND _moe_debdeps_cuda "${_d}")
  endif()
endforeach()
list(JOIN _moe_debdeps_cuda ", " _moe_debdeps_cuda)
set(_moe_debdeps_nccl)
foreach(_d IN ITEMS "${_moe_nccl_dep}" "${_moe_cudart_dep}")
  if(_d)
    list(APPEND _moe_debdeps_nccl "${_d}")
  endif()
endforeach()
list(JOIN _moe_debdeps_nccl ", " _moe_debdeps_nccl)
foreach(_c cuda nccl)
  if(_c IN_LIST _moe_components)
    message(STATUS "libmoe packaging: ${_moe_deb_${_c}} depends on ${_moe_debdeps_${_c}}")
  endif()
endforeach()

set(_moe_about "libmoe is a Mixture-of-Experts (MoE) layer behind a C ABI: one opaque layer
object does routing (token choice or expert choice, top-k, groups, capacity),
forward, backward and the auxiliary losses, on the CPU (BLAS and OpenMP) or
on a CUDA device through a module loaded on demand.")
set(_moe_summary_runtime "Mixture-of-Experts layer with a C ABI - shared library")
set(_moe_text_runtime "${_moe_about}
.
This package contains the shared library with the CPU backend.")
set(_moe_summary_dev "Mixture-of-Experts layer with a C ABI - development files")
set(_moe_text_dev "${_moe_about}
.
This package contains the C header, the pkg-config file and the CMake
package configuration (find_package(libmoe) gives the target libmoe::moe).")
set(_moe_summary_cuda "Mixture-of-Experts layer with a C ABI - CUDA backend")
set(_moe_text_cuda "${_moe_about}
.
This package contains the CUDA backend module that libmoe loads for layers
created on a CUDA device.")
set(_moe_summary_mpi "Mixture-of-Experts layer with a C ABI - MPI communicator")
set(_moe_text_mpi "${_moe_about}
.
This package contains the MPI adapter for expert-parallel layers.")
set(_moe_summary_nccl "Mixture-of-Experts layer with a C ABI - NCCL communicator")
set(_moe_text_nccl "${_moe_about}
.
This package contains the NCCL adapter for expert-parallel CUDA layers.")
set(_moe_summary_python "Mixture-of-Experts layer with a C ABI - Python 3 binding")
set(_moe_text_python "${_moe_about}
.
This package contains the Python 3 module libmoe (numpy arrays, and a
torch.nn.Module when PyTorch is installed).")
set(_moe_summary_java "Mixture-of-Experts layer with a C ABI - Java binding")
set(_moe_text_java "${_moe_about}
.
This package contains the Java binding (package org.libmoe) and its JNI
library; the jar uses the libmoe of libmoe0.")
set(_moe_summary_javadoc "Mixture-of-Experts layer with a C ABI - Java API documentation")
set(_moe_text_javadoc "${_moe_about}
.
This package contains the API documentation of the Java binding (javadoc),
in /usr/share/doc/libmoe-java/api.")

set(CPACK_COMPONENTS_ALL)
foreach(_c IN LISTS _moe_components)
  if(NOT _c IN_LIST _moe_known)
    message(STATUS "libmoe packaging: install component '${_c}' is not packaged")
  endif()
endforeach()

foreach(_c IN LISTS _moe_known)
  if(NOT _c IN_LIST _moe_components)
    continue()
  endif()
  list(APPEND CPACK_COMPONENTS_ALL ${_c})
  string(TOUPPER ${_c} _C)
  set(CPACK_COMPONENT_${_C}_DISPLAY_NAME "${_moe_summary_${_c}}")
  set(CPACK_COMPONENT_${_C}_DESCRIPTION "${_moe_summary_${_c}}\n${_moe_text_${_c}}")
  if(NOT _c STREQUAL "runtime" AND NOT _moe_noarch_${_c})
    set(CPACK_COMPONENT_${_C}_DEPENDS runtime)
  endif()
  if(_moe_noarch_${_c})
    set(CPACK_DEBIAN_${_C}_PACKAGE_ARCHITECTURE all)
    set(CPACK_RPM_${_C}_PACKAGE_ARCHITECTURE noarch)
  endif()
  # Debian
  set(CPACK_DEBIAN_${_C}_PACKAGE_NAME ${_moe_deb_${_c}})
  set(CPACK_DEBIAN_${_C}_PACKAGE_SECTION ${_moe_section_${_c}})
  set(CPACK_DEBIAN_${_C}_DESCRIPTION "${_moe_summary_${_c}}\n${_moe_text_${_c}}")
  if(_moe_debdeps_${_c})
    set(CPACK_DEBIAN_${_C}_PACKAGE_DEPENDS "${_moe_debdeps_${_c}}")
  endif()
  # RPM
  set(CPACK_RPM_${_C}_PACKAGE_NAME ${_moe_rpm_${_c}})
  set(CPACK_RPM_${_C}_PACKAGE_SUMMARY "${_moe_summary_${_c}}")
  string(REPLACE "\n.\n" "\n\n" _moe_rpm_text "${_moe_text_${_c}}")
  set(CPACK_RPM_${_C}_PACKAGE_DESCRIPTION "${_moe_rpm_text}")
  set(_moe_req)
  if(NOT _c STREQUAL "runtime" AND NOT _moe_noarch_${_c})
    list(APPEND _moe_req "${_moe_rpm_runtime} = ${_moe_ver}-${MOE_PACKAGE_RELEASE}")
  endif()
  if(DEFINED _moe_rpmdeps_${_c})
    list(APPEND _moe_req "${_moe_rpmdeps_${_c}}")
  endif()
  if(_moe_req)
    list(JOIN _moe_req ", " CPACK_RPM_${_C}_PACKAGE_REQUIRES)
  endif()
  # shared libraries in the loader's directories: the ldconfig trigger (lintian
  # lacks-ldconfig-trigger); CPack adds postinst/postrm that run ldconfig as well.
  if(_c MATCHES "^(runtime|cuda|mpi|nccl)$")
    set(CPACK_DEBIAN_${_C}_PACKAGE_CONTROL_EXTRA ${_moe_pkg_dir}/deb/triggers)
  endif()
  # python3-libmoe: byte-compile at install, remove the byte code at removal (what dh_python3's
  # snippets do), so that nothing of it is left under /usr
  if(_c STREQUAL "python")
    foreach(_s postinst prerm)
      configure_file(${_moe_pkg_dir}/deb/python3-libmoe.${_s}.in
        ${MOE_PACKAGING_BINARY_DIR}/deb-python/${_s} @ONLY FILE_PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE
        GROUP_READ GROUP_EXECUTE WORLD_READ WORLD_EXECUTE)
      list(APPEND CPACK_DEBIAN_${_C}_PACKAGE_CONTROL_EXTRA ${MOE_PACKAGING_BINARY_DIR}/deb-python/${_s})
    endforeach()
  endif()
  # Debian policy 12.5, 12.7: /usr/share/doc/<package>/copyright and changelog.Debian.gz
  if(MOE_INSTALL_PACKAGE_DOCS)
    install(FILES ${_moe_pkg_dir}/copyright ${MOE_DEBIAN_CHANGELOG}
      DESTINATION ${CMAKE_INSTALL_DATAROOTDIR}/doc/${_moe_deb_${_c}} COMPONENT ${_c})
  endif()
endforeach()


# libmoe-dev's CMake files must find every library file they name. A module library exported in
# the main export set (libmoeTargets) makes libmoe-dev depend on that module's package;
# CPackProjectConfig.cmake reads the generated export files at cpack time to add exactly those.
set(CPACK_MOE_EXPORT_DIR ${MOE_PACKAGING_BINARY_DIR}/CMakeFiles/Export)
set(CPACK_MOE_RPM_RUNTIME_REQUIRES "= ${_moe_ver}-${MOE_PACKAGE_RELEASE}")

# ---- common ----------------------------------------------------------------------------------------
set(CPACK_PACKAGE_NAME libmoe)
set(CPACK_PACKAGE_VENDOR "libmoe developers")
set(CPACK_PACKAGE_CONTACT "${MOE_PACKAGE_MAINTAINER}")
set(CPACK_PACKAGE_VERSION ${_moe_ver})
set(CPACK_PACKAGE_VERSION_MAJOR ${PROJECT_VERSION_MAJOR})
set(CPACK_PACKAGE_VERSION_MINOR ${PROJECT_VERSION_MINOR})
set(CPACK_PACKAGE_VERSION_PATCH ${PROJECT_VERSION_PATCH})
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "${PROJECT_DESCRIPTION}")
if(MOE_PACKAGE_HOMEPAGE)
  set(CPACK_PACKAGE_HOMEPAGE_URL "${MOE_PACKAGE_HOMEPAGE}")
  set(CPACK_RPM_PACKAGE_URL "${MOE_PACKAGE_HOMEPAGE}")
endif()
set(CPACK_RESOURCE_FILE_LICENSE ${_moe_pkg_dir}/copyright)
set(CPACK_PACKAGE_DIRECTORY ${PROJECT_BINARY_DIR}/packages)
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
if(NOT CMAKE_INSTALL_PREFIX STREQUAL "/usr")
  # The packages install under /usr whatever the prefix, but paths computed from the prefix at
  # configure time (GNUInstallDirs' multiarch libdir, an RPATH) follow CMAKE_INSTALL_PREFIX.
  message(STATUS "libmoe packaging: CMAKE_INSTALL_PREFIX is ${CMAKE_INSTALL_PREFIX}; for release "
                 "packages configure with -DCMAKE_INSTALL_PREFIX=/usr")
endif()
set(CPACK_STRIP_FILES ON)  # libmoe is compiled with -g for the ABI check; packages are stripped
set(CPACK_PROJECT_CONFIG_FILE ${_moe_pkg_dir}/CPackProjectConfig.cmake)
set(CPACK_THREADS 0)

find_program(MOE_DPKG_DEB_EXECUTABLE dpkg-deb)
find_program(MOE_RPMBUILD_EXECUTABLE rpmbuild)
mark_as_advanced(MOE_DPKG_DEB_EXECUTABLE MOE_RPMBUILD_EXECUTABLE)
set(CPACK_GENERATOR)
if(MOE_DPKG_DEB_EXECUTABLE)
  list(APPEND CPACK_GENERATOR DEB)
endif()
if(MOE_RPMBUILD_EXECUTABLE)
  list(APPEND CPACK_GENERATOR RPM)
endif()
if(NOT CPACK_GENERATOR)
  set(CPACK_GENERATOR TGZ)
endif()
set(CPACK_SOURCE_GENERATOR TGZ)
set(CPACK_SOURCE_IGNORE_FILES "/\\\\.git/" "/build[^/]*/" "__pycache__" "/target/" "/\\\\.whl/")

# ---- .deb ------------------------------------------------------------------------------------------
set(CPACK_DEB_COMPONENT_INSTALL ON)
# Finishing touches on the built .deb files only (deb/finish_debs.cmake): CPack's ldconfig
# maintainer scripts out (the trigger does it), lintian overrides in, javadoc's jQuery linked to
# Debian's, md5sums again.
set(CPACK_POST_BUILD_SCRIPTS ${_moe_pkg_dir}/deb/finish_debs.cmake)
set(CPACK_MOE_DPKG_DEB ${MOE_DPKG_DEB_EXECUTABLE})
set(CPACK_MOE_LINTIAN_OVERRIDES ${_moe_pkg_dir}/deb/lintian-overrides.in)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_RELEASE ${MOE_PACKAGE_RELEASE})
set(CPACK_DEBIAN_PACKAGE_MAINTAINER "${MOE_PACKAGE_MAINTAINER}")
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_SECTION libs)
set(CPACK_DEBIAN_COMPRESSION_TYPE xz)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
# Depends computed by dpkg-shlibdeps from the ELF files (libopenblas0, libgomp1, libstdc++6, ...);
# the packages of one build depend on each other with "= version".
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_ENABLE_COMPONENT_DEPENDS ON)
# bindings and modules that link libmoe.so.0 find it in the build tree
get_target_property(_moe_libdir moe LIBRARY_OUTPUT_DIRECTORY)
if(NOT _moe_libdir)
  get_target_property(_moe_libdir moe BINARY_DIR)
endif()
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS_PRIVATE_DIRS ${_moe_libdir})
# DEBIAN/shlibs ("libmoe 0 libmoe0 (>= <version>)") and the ldconfig trigger for libmoe0
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS_POLICY ">=")

# ---- .rpm ------------------------------------------------------------------------------------------
set(CPACK_RPM_COMPONENT_INSTALL ON)
set(CPACK_RPM_FILE_NAME RPM-DEFAULT)
set(CPACK_RPM_PACKAGE_RELEASE ${MOE_PACKAGE_RELEASE})
set(CPACK_RPM_PACKAGE_LICENSE MIT)
set(CPACK_RPM_PACKAGE_GROUP "Development/Libraries")
set(CPACK_RPM_PACKAGE_VENDOR "libmoe developers")
# what Fedora's rpm generates itself (pkgconfig(...), cmake(...)); the rpm of Debian does not
set(CPACK_RPM_DEV_PACKAGE_PROVIDES "pkgconfig(libmoe) = ${_moe_ver}, cmake(libmoe) = ${_moe_ver}")
set(CPACK_RPM_SPEC_MORE_DEFINE "%define packager ${MOE_PACKAGE_MAINTAINER}")
# The library packages: ldconfig after (un)install, and the library executable (CMake installs
# shared libraries 0644 on Debian, as its policy wants; RPM wants 0755).
function(_moe_library_file target out)
  set(${out} "" PARENT_SCOPE)
  if(NOT TARGET ${target})
    return()
  endif()
  get_target_property(_type ${target} TYPE)
  get_target_property(_name ${target} LIBRARY_OUTPUT_NAME)
  if(NOT _name)
    get_target_property(_name ${target} OUTPUT_NAME)
  endif()
  if(NOT _name)
    set(_name ${target})
  endif()
  set(_file "lib${_name}.so")
  if(_type STREQUAL "SHARED_LIBRARY")
    get_target_property(_v ${target} VERSION)
    get_target_property(_sov ${target} SOVERSION)
    if(_v)
      string(APPEND _file ".${_v}")
    elseif(_sov)
      string(APPEND _file ".${_sov}")
    endif()
  endif()
  set(${out} "${_file}" PARENT_SCOPE)
endfunction()
foreach(_pair runtime:moe cuda:moe_cuda mpi:moe_mpi nccl:moe_nccl)
  string(REPLACE ":" ";" _pair "${_pair}")
  list(GET _pair 0 _c)
  list(GET _pair 1 _t)
  if(NOT _c IN_LIST CPACK_COMPONENTS_ALL)
    continue()
  endif()
  string(TOUPPER ${_c} _C)
  set(CPACK_RPM_${_C}_POST_INSTALL_SCRIPT_FILE ${_moe_pkg_dir}/rpm/ldconfig.sh)
  set(CPACK_RPM_${_C}_POST_UNINSTALL_SCRIPT_FILE ${_moe_pkg_dir}/rpm/ldconfig.sh)
  _moe_library_file(${_t} _f)
  if(_f AND NOT IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
    set(CPACK_RPM_${_C}_USER_FILELIST "%attr(0755,root,root) /usr/${CMAKE_INSTALL_LIBDIR}/${_f}")
  endif()
endforeach()
# directories owned by the system (filesystem, pkgconf, cmake, python3, java packages)
set(CPACK_RPM_EXCLUDE_FROM_AUTO_FILELIST_ADDITION)
foreach(_d lib lib64 ${CMAKE_INSTALL_LIBDIR})
  list(APPEND CPACK_RPM_EXCLUDE_FROM_AUTO_FILELIST_ADDITION
    /usr/${_d} /usr/${_d}/pkgconfig /usr/${_d}/cmake /usr/${_d}/jni)
endforeach()
list(APPEND CPACK_RPM_EXCLUDE_FROM_AUTO_FILELIST_ADDITION
  /usr/lib/python3 /usr/lib/python3/dist-packages /usr/share/java /usr/share/licenses)
list(REMOVE_DUPLICATES CPACK_RPM_EXCLUDE_FROM_AUTO_FILELIST_ADDITION)

include(CPack)
