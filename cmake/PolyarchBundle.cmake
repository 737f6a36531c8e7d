# polyarch_add_bundle(NAME <target> SOURCE <model.py> [ENTRY <attr>]
#                     [INPUTS <DIMSxDTYPE>...] [DYNAMIC_DIMS <INPUT:DIM[:MAX]>...]
#                     [DEVICES <spec>...] [PLANS <spec,spec>...]
#                     [PINS <PATTERN=DEVICE>...] [PROFILES <profile.json>...]
#                     [OBJECTIVE <obj>] [NO_VERIFY] [NO_CALIBRATE] [TUNE none|quick|full]
#                     [IREE_FLAGS <flag>...] OUTPUT <bundle.pab>)
#
# By default the compile measures the build host's devices (cached per user) and runs and
# checks the bundle on them (see the README); NO_VERIFY skips the run (cross-compiles for
# another host), NO_CALIBRATE prices an uncalibrated device by estimates. TUNE chooses how
# much of the CPU code's lowering is measured on the build host (default quick);
# IREE_FLAGS are added to every iree-compile.
#
# Adds a target <target> (built by default) that compiles the model into a .pab bundle
# with `polyarch compile`. The build re-runs it only when its inputs change: the model
# file and every local Python module it imports (a depfile written by polyarch), the
# profiles, and the options given here (kept in <target>.options; file(GENERATE)
# rewrites that file only when they change).
#
#   find_package(polyarch REQUIRED)
#   polyarch_add_bundle(NAME m SOURCE model.py ENTRY Model INPUTS 4x64xi64
#                       DEVICES cpu vulkan OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/m.pab)
if(CMAKE_VERSION VERSION_LESS 3.20)
  message(FATAL_ERROR "polyarch_add_bundle needs CMake 3.20 or newer (DEPFILE with every generator)")
endif()

function(polyarch_add_bundle)
  cmake_parse_arguments(PARSE_ARGV 0 PB "NO_VERIFY;NO_CALIBRATE" "NAME;SOURCE;ENTRY;OUTPUT;OBJECTIVE;TUNE"
                        "INPUTS;DYNAMIC_DIMS;DEVICES;PLANS;PINS;PROFILES;IREE_FLAGS")
  if(PB_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "polyarch_add_bundle: unknown arguments: ${PB_UNPARSED_ARGUMENTS}")
  endif()
  foreach(req NAME SOURCE OUTPUT)
    if(NOT PB_${req})
      message(FATAL_ERROR "polyarch_add_bundle: ${req} is required (see cmake/PolyarchBundle.cmake)")
    endif()
  endforeach()
  if(PB_DEVICES AND PB_PLANS)
    message(FATAL_ERROR "polyarch_add_bundle(${PB_NAME}): give DEVICES or PLANS, not both")
  endif()
  get_filename_component(source "${PB_SOURCE}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
  get_filename_component(output "${PB_OUTPUT}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_BINARY_DIR}")
  if(NOT EXISTS "${source}")
    message(FATAL_ERROR "polyarch_add_bundle(${PB_NAME}): no model file ${source}")
  endif()
  set(model "${source}")
  if(PB_ENTRY)
    set(model "${source}:${PB_ENTRY}")
  endif()
  set(args compile "${model}" -o "${output}" --depfile "${output}.d" -q)
  foreach(x IN LISTS PB_INPUTS)
    list(APPEND args -i "${x}")
  endforeach()
  foreach(x IN LISTS PB_DYNAMIC_DIMS)
    list(APPEND args --dynamic-dim "${x}")
  endforeach()
  foreach(x IN LISTS PB_DEVICES)
    list(APPEND args -d "${x}")
  endforeach()
  foreach(x IN LISTS PB_PLANS)
    list(APPEND args --plans "${x}")
  endforeach()
  foreach(x IN LISTS PB_PINS)
    list(APPEND args --pin "${x}")
  endforeach()
  set(profiles "")
  foreach(x IN LISTS PB_PROFILES)
    get_filename_component(p "${x}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
    list(APPEND args --profile "${p}")
    list(APPEND profiles "${p}")
  endforeach()
  if(PB_OBJECTIVE)
    list(APPEND args --objective "${PB_OBJECTIVE}")
  endif()
  if(PB_NO_VERIFY)
    list(APPEND args --no-verify)
  endif()
  if(PB_NO_CALIBRATE)
    list(APPEND args --no-calibrate)
  endif()
  if(PB_TUNE)
    list(APPEND args --tune "${PB_TUNE}")
  endif()
  foreach(x IN LISTS PB_IREE_FLAGS)
    list(APPEND args "--iree-flag=${x}")
  endforeach()
  # The options as a file: a change of options changes it, and so re-runs the compile.
  set(options "${CMAKE_CURRENT_BINARY_DIR}/${PB_NAME}.options")
  list(JOIN args "\n" options_text)
  file(GENERATE OUTPUT "${options}" CONTENT "${POLYARCH_EXECUTABLE}\n${options_text}\n")
  add_custom_command(
    OUTPUT "${output}"
    COMMAND "${POLYARCH_EXECUTABLE}" ${args}
    DEPENDS "${source}" "${options}" ${profiles}
    DEPFILE "${output}.d"
    COMMENT "polyarch: compiling ${PB_SOURCE} into ${PB_OUTPUT}"
    VERBATIM)
  add_custom_target(${PB_NAME} ALL DEPENDS "${output}")
  set_target_properties(${PB_NAME} PROPERTIES POLYARCH_BUNDLE "${output}")
endfunction()
