# Writes the list of the Java files SWIG generated in DIR to OUT (one quoted path a line, the
# format of javac @argfiles), for add_jar. Rewritten only when the list changes.
file(GLOB _files "${DIR}/*.java")
list(SORT _files)
set(_text "")
foreach(f IN LISTS _files)
  string(APPEND _text "\"${f}\"\n")
endforeach()
if(EXISTS "${OUT}")
  file(READ "${OUT}" _old)
else()
  set(_old "-")
endif()
if(NOT _old STREQUAL _text)
  file(WRITE "${OUT}" "${_text}")
else()
  # Same files, maybe new contents: make javac run again.
  file(TOUCH "${OUT}")
endif()
