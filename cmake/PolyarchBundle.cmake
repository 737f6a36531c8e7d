# polyarch_add_bundle(NAME <target> SOURCE <model.py> [ENTRY <attr>]
#                     [INPUTS <DIMSxDTYPE>...] [DYNAMIC_DIMS <INPUT:DIM[:MAX]>...]
#                     [DEVICES <spec>...] [PLANS <spec,spec>...]
#                     [PINS <PATTERN=DEVICE>...] [PROFILES <profile.json>...]
#                     [OBJECTIVE <obj>] [NO_VERIFY] [NO_CALIBRATE] [TUNE none|quick|full]
#                     [IREE_FLAGS <flag>...]
#                     [GENERATE [MAX_CONTEXT <n>] [BATCH <b>] [WEIGHTS_DTYPE f32|f16|bf16]
#                      [TOKENIZER <tokenizer.json>]] OUTPUT <bundle.pab>)
#
# GENERATE compiles a causal language model as prefill + decode (polyarch compile --generate;
# the README's "Language models"); INPUTS are not needed then.
#
# By default the compile measures the build host's devices (cached per user) and runs and
# checks the bundle on them (see the README); NO_VERIFY skips the run (cross-compiles for
# another host), NO_CALIBRATE prices an uncalibrated device by estimates. TUNE chooses how
# much of the CPU code's lowering is measured on the build host (default quick);
# IREE_FLAGS are added to every iree-compile.
#
# Adds a target <target> (built by default) that compiles the model into a .pab bundle
# with `polyarch compile --options <target>.options.json`: the options given here as one
# JSON object, the CompileOptions of compiler/options.py. The build re-runs it only when its
# inputs change: the model file and every local Python module it imports (a depfile written
# by polyarch), the profiles, the options and the command line (<target>.command; file(GENERATE)
# rewrites both files only when they change).
#
#   find_package(polyarch REQUIRED)
#   polyarch_add_bundle(NAME m SOURCE model.py ENTRY Model INPUTS 4x64xi64
#                       DEVICES cpu vulkan OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/m.pab)
if(CMAKE_VERSION VERSION_LESS 3.20)
  message(FATAL_ERROR "polyarch_add_bundle needs CMake 3.20 or newer (DEPFILE with every generator)")
endif()

# A JSON string literal for a CMake string.
function(_polyarch_json_string out value)
  string(REPLACE "\\" "\\\\" value "${value}")
  string(REPLACE "\"" "\\\"" value "${value}")
  set(${out} "\"${value}\"" PARENT_SCOPE)
endfunction()

# A JSON array of strings for the CMake list named by list_var.
function(_polyarch_json_array out list_var)
  set(items "")
  foreach(x IN LISTS ${list_var})
    _polyarch_json_string(s "${x}")
    list(APPEND items "${s}")
  endforeach()
  list(JOIN items ", " items)
  set(${out} "[${items}]" PARENT_SCOPE)
endfunction()

# Set key in the JSON object held by json_var to the strings of the list named by list_var
# (nothing when the list is empty).
function(_polyarch_json_list json_var key list_var)
  if(${list_var})
    _polyarch_json_array(arr ${list_var})
    string(JSON j SET "${${json_var}}" ${key} "${arr}")
    set(${json_var} "${j}" PARENT_SCOPE)
  endif()
endfunction()

function(polyarch_add_bundle)
  cmake_parse_arguments(PARSE_ARGV 0 PB "NO_VERIFY;NO_CALIBRATE;GENERATE"
                        "NAME;SOURCE;ENTRY;OUTPUT;OBJECTIVE;TUNE;MAX_CONTEXT;BATCH;WEIGHTS_DTYPE;TOKENIZER"
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
  # The compile options as one JSON object (compiler/options.py's CompileOptions), which
  # `polyarch compile --options` reads; file(GENERATE) rewrites it only when they change,
  # and a change re-runs the compile.
  set(json "{}")
  _polyarch_json_list(json dynamic_dims PB_DYNAMIC_DIMS)
  _polyarch_json_list(json devices PB_DEVICES)
  set(plans "")
  foreach(p IN LISTS PB_PLANS)
    string(REPLACE "," ";" p "${p}")
    _polyarch_json_array(p_json p)
    list(APPEND plans "${p_json}")
  endforeach()
  if(plans)
    list(JOIN plans ", " plans)
    string(JSON json SET "${json}" plans "[${plans}]")
  endif()
  _polyarch_json_list(json pins PB_PINS)
  set(profiles "")
  foreach(x IN LISTS PB_PROFILES)
    get_filename_component(p "${x}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
    list(APPEND profiles "${p}")
  endforeach()
  _polyarch_json_list(json profiles profiles)
  if(PB_OBJECTIVE)
    _polyarch_json_string(v "${PB_OBJECTIVE}")
    string(JSON json SET "${json}" objective "${v}")
  endif()
  if(PB_NO_VERIFY)
    string(JSON json SET "${json}" verify false)
  endif()
  if(PB_NO_CALIBRATE)
    string(JSON json SET "${json}" calibrate false)
  endif()
  if(PB_TUNE)
    _polyarch_json_string(v "${PB_TUNE}")
    string(JSON json SET "${json}" tune "${v}")
  endif()
  _polyarch_json_list(json iree_flags PB_IREE_FLAGS)
  set(tokenizer "")
  if(PB_GENERATE)
    string(JSON json SET "${json}" generate true)
    foreach(n MAX_CONTEXT BATCH)
      if(PB_${n})
        if(NOT PB_${n} MATCHES "^[0-9]+$")
          message(FATAL_ERROR "polyarch_add_bundle(${PB_NAME}): ${n} must be a whole number, not '${PB_${n}}'")
        endif()
        string(TOLOWER "${n}" key)
        string(JSON json SET "${json}" ${key} ${PB_${n}})
      endif()
    endforeach()
    if(PB_WEIGHTS_DTYPE)
      _polyarch_json_string(v "${PB_WEIGHTS_DTYPE}")
      string(JSON json SET "${json}" weights_dtype "${v}")
    endif()
    if(PB_TOKENIZER)
      get_filename_component(tokenizer "${PB_TOKENIZER}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
      _polyarch_json_string(v "${tokenizer}")
      string(JSON json SET "${json}" tokenizer "${v}")
    endif()
  elseif(PB_MAX_CONTEXT OR PB_BATCH OR PB_WEIGHTS_DTYPE OR PB_TOKENIZER)
    message(FATAL_ERROR "polyarch_add_bundle(${PB_NAME}): MAX_CONTEXT, BATCH, WEIGHTS_DTYPE and TOKENIZER go with GENERATE")
  endif()
  set(options "${CMAKE_CURRENT_BINARY_DIR}/${PB_NAME}.options.json")
  file(GENERATE OUTPUT "${options}" CONTENT "${json}\n")
  set(args compile "${model}" -o "${output}" --depfile "${output}.d" -q --options "${options}")
  foreach(x IN LISTS PB_INPUTS)
    list(APPEND args -i "${x}")
  endforeach()
  # The command line as a file too: a change of inputs or of the polyarch executable re-runs it.
  set(command "${CMAKE_CURRENT_BINARY_DIR}/${PB_NAME}.command")
  list(JOIN args "\n" command_text)
  file(GENERATE OUTPUT "${command}" CONTENT "${POLYARCH_EXECUTABLE}\n${command_text}\n")
  add_custom_command(
    OUTPUT "${output}"
    COMMAND "${POLYARCH_EXECUTABLE}" ${args}
    DEPENDS "${source}" "${options}" "${command}" ${profiles} ${tokenizer}
    DEPFILE "${output}.d"
    COMMENT "polyarch: compiling ${PB_SOURCE} into ${PB_OUTPUT}"
    VERBATIM)
  add_custom_target(${PB_NAME} ALL DEPENDS "${output}")
  set_target_properties(${PB_NAME} PROPERTIES POLYARCH_BUNDLE "${output}")
endfunction()
