"""Device kind -> IREE compile flags and op support. (Device speed: targets/profiles.py.)"""

import re

from ..runtime.devices import DeviceSpec

# Element types (torch dialect spelling) and their sizes in bytes.
ELEMENT_BYTES = {
    "f64": 8, "f32": 4, "f16": 2, "bf16": 2,
    "si64": 8, "si32": 4, "si16": 2, "si8": 1, "ui8": 1, "i1": 1,
    "i64": 8, "i32": 4, "i16": 2, "i8": 1,
    "f8E4M3FN": 1, "f8E5M2": 1,
    "complex<f32>": 8, "complex<f64>": 16,
}

_VULKAN_INT64_ARCHS = ("rdna", "cdna", "gfx", "sm_", "ampere", "turing", "ada", "hopper", "rtx", "rx", "mi")


DEFAULT_ARCH = {"cpu": "host", "vulkan": None, "cuda": "sm_80", "rocm": "gfx942"}


def iree_flags(spec: DeviceSpec):
    """iree-compile flags for a device spec (input type and output not included)."""
    arch = spec.arch or DEFAULT_ARCH[spec.kind]
    if spec.kind == "cpu":
        return [
            "--iree-hal-target-device=local",
            "--iree-hal-local-target-device-backends=llvm-cpu",
            f"--iree-llvmcpu-target-cpu={arch}",
            "--iree-opt-data-tiling",
        ]
    if spec.kind == "vulkan":
        flags = ["--iree-hal-target-device=vulkan", "--iree-hal-target-backends=vulkan-spirv"]
        if arch:
            flags.append(f"--iree-vulkan-target={arch}")
        return flags
    if spec.kind == "cuda":
        if re.match(r"^sm_(9\d|1\d\d)", arch):
            from ..errors import PolyarchError

            raise PolyarchError(
                f"IREE 3.13 has no CUDA target '{arch}' (its compiler stops at 'missing GPU target')",
                fix="compile for cuda@sm_89 or plain cuda (sm_80): the bundle carries PTX, which the driver "
                    "compiles for newer GPUs (Hopper, Blackwell) when it loads",
            )
        return ["--iree-hal-target-device=cuda", f"--iree-cuda-target={arch}"]
    if spec.kind == "rocm":
        return ["--iree-hal-target-device=hip", f"--iree-rocm-target={arch}"]
    raise AssertionError(spec.kind)


# Element types that cross segment boundaries as another type on every device: IREE
# demotes f64 to f32 inside a function by default, but a function returning f64 then
# fails at run time ("buffer view byte length 196608 exceeds backing buffer byte length
# 98304", measured on local-task); so segments exchange f64 tensors as f32.
BOUNDARY = {"f64": "f32"}

# Narrow element types and the 32-bit type they travel as on targets without 8/16-bit storage.
WIDEN = {"i1": "si32", "si8": "si32", "ui8": "si32", "si16": "si32", "f16": "f32", "bf16": "f32"}

NARROW_REDUCTIONS = ("all", "any", "sum", "prod", "max", "min", "amax", "amin", "argmax", "argmin", "cumsum", "mean")


def unsupported_reason(spec: DeviceSpec, element_types, op_name="", input_types=()):
    """Why a device cannot run an op touching tensors of `element_types`, or None.

    input_types: element types of the tensors the op reads."""
    if spec.kind == "vulkan":
        arch = spec.arch or ""
        base = op_name.split(".")[2] if op_name.startswith("torch.aten.") else op_name
        narrow_in = sorted(t for t in input_types if t in WIDEN)
        if not arch and base in NARROW_REDUCTIONS and narrow_in:
            return (
                f"reductions over {'/'.join(narrow_in)} tensors come out wrong on the default Vulkan target "
                "(32-bit storage only; measured on lavapipe)"
            )
        # f64 needs no check: IREE demotes f64 to f32 for every target by default.
        wide = sorted(t for t in element_types if t in ("si64", "ui64", "i64"))
        if wide and not arch.lower().startswith(_VULKAN_INT64_ARCHS):
            return (
                f"{'/'.join(wide)} tensors need the Int64 capability, which the default Vulkan target lacks "
                "(name a target with it, e.g. vulkan@rdna3, or keep these ops elsewhere)"
            )
    return None


def has_narrow_storage(spec: DeviceSpec):
    """False where tensors in device memory must be 32-bit: the default Vulkan target
    declares 32-bit storage only, and 8-bit tensors read there come out wrong (measured
    on lavapipe: a bool mask gave softmax errors of 0.6). Segments on such a device get
    their narrow inputs and outputs widened at the boundary by outline-segments."""
    return not (spec.kind == "vulkan" and not spec.arch)


def tunable(device):
    """True for a device this host can measure the choices on: the host's own CPU."""
    spec = DeviceSpec.parse(device)
    return spec.kind == "cpu" and spec.arch in (None, "host")
