# CPACK_POST_BUILD_SCRIPTS (packaging/CPackSetup.cmake): what makes CPack's .deb files Debian
# packages, done on each built .deb (the .rpm files and `cmake --install` trees are left alone):
#   - CPack gives every package with a library under /usr/lib a postinst and a postrm that call
#     ldconfig; the library packages carry the ldconfig trigger instead (deb/triggers) and the
#     others need none (lintian maintscript-calls-ldconfig): CPack's scripts, when they are exactly
#     CPack's, are taken out;
#   - usr/share/lintian/overrides/<package> from deb/lintian-overrides.in: the few deliberate
#     exceptions, each explained there;
#   - libmoe-java-doc: the copies of jQuery and jQuery UI that javadoc bundles become relative
#     links to Debian's libjs-jquery and libjs-jquery-ui, which the package depends on (lintian
#     embedded-javascript-library);
#   - DEBIAN/md5sums written again for the files as they now are.
# Variables (from CPackConfig.cmake): CPACK_PACKAGE_FILES, CPACK_MOE_DPKG_DEB (dpkg-deb),
# CPACK_MOE_LINTIAN_OVERRIDES (the template).
if(NOT CPACK_MOE_DPKG_DEB)
  return()
endif()
set(_cpack_postinst "#!/bin/sh\n\nset -e\n\nif [ \"$1\" = \"configure\" ]; then\n\tldconfig\nfi\n")
set(_cpack_postrm "#!/bin/sh\n\nset -e\n\nif [ \"$1\" = \"remove\" ]; then\n\tldconfig\nfi\n")

# jQuery files of a javadoc tree -> Debian's, relative to /usr/share/javascript
function(_moe_link_jquery root)
  file(GLOB_RECURSE _files LIST_DIRECTORIES false "${root}/usr/share/doc/*")
  list(FILTER _files INCLUDE REGEX "/script-dir/jquery[^/]*$")
  foreach(f IN LISTS _files)
    get_filename_component(n "${f}" NAME)
    if(n MATCHES "^jquery-[0-9.]+\\.min\\.js$")
      set(target jquery/jquery.min.js)
    elseif(n STREQUAL "jquery-ui.min.js")
      set(target jquery-ui/jquery-ui.min.js)
    elseif(n STREQUAL "jquery-ui.min.css")
      set(target jquery-ui/themes/base/jquery-ui.min.css)
    else()
      continue()
    endif()
    get_filename_component(d "${f}" DIRECTORY)
    file(RELATIVE_PATH rel "${d}" "${root}/usr/share/javascript/${target}")
    file(REMOVE "${f}")
    file(CREATE_LINK "${rel}" "${f}" SYMBOLIC)
  endforeach()
endfunction()

foreach(deb IN LISTS CPACK_PACKAGE_FILES)
  if(NOT deb MATCHES "\\.deb$")
    continue()
  endif()
  set(root "${deb}.raw")
  file(REMOVE_RECURSE "${root}")
  execute_process(COMMAND ${CPACK_MOE_DPKG_DEB} --raw-extract "${deb}" "${root}" RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "dpkg-deb --raw-extract ${deb} failed")
  endif()
  file(STRINGS "${root}/DEBIAN/control" pkg REGEX "^Package: ")
  string(REGEX REPLACE "^Package: *" "" pkg "${pkg}")

  foreach(s postinst postrm)
    if(EXISTS "${root}/DEBIAN/${s}")
      file(READ "${root}/DEBIAN/${s}" text)
      if(text STREQUAL "${_cpack_${s}}")
        file(REMOVE "${root}/DEBIAN/${s}")
      endif()
    endif()
  endforeach()

  if(CPACK_MOE_LINTIAN_OVERRIDES)
    set(MOE_DEB_PACKAGE "${pkg}")
    configure_file("${CPACK_MOE_LINTIAN_OVERRIDES}" "${root}/usr/share/lintian/overrides/${pkg}" @ONLY)
    file(CHMOD "${root}/usr/share/lintian/overrides/${pkg}" FILE_PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
    file(CHMOD "${root}/usr/share/lintian" "${root}/usr/share/lintian/overrides"
         DIRECTORY_PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE GROUP_READ GROUP_EXECUTE WORLD_READ WORLD_EXECUTE)
  endif()

  if(pkg MATCHES "-doc$")
    _moe_link_jquery("${root}")
  endif()

  file(GLOB_RECURSE files LIST_DIRECTORIES false RELATIVE "${root}" "${root}/*")
  list(SORT files)
  set(sums "")
  foreach(f IN LISTS files)
    if(f MATCHES "^DEBIAN/" OR IS_SYMLINK "${root}/${f}")
      continue()
    endif()
    file(MD5 "${root}/${f}" sum)
    string(APPEND sums "${sum}  ${f}\n")
  endforeach()
  file(WRITE "${root}/DEBIAN/md5sums" "${sums}")

  execute_process(COMMAND ${CPACK_MOE_DPKG_DEB} --root-owner-group -Zxz --build "${root}" "${deb}"
    RESULT_VARIABLE rc OUTPUT_QUIET)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "dpkg-deb --build ${deb} failed")
  endif()
  file(REMOVE_RECURSE "${root}")
  message(STATUS "${pkg}: finished for Debian (maintainer scripts, lintian overrides, md5sums)")
endforeach()
