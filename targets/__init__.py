"""What polyarch knows about device kinds, asked by device spec: IREE compile flags, op
support, storage widths (one record per kind: targets/kinds.py). Device speed:
targets/profiles.py."""

from typing import Iterable

from .kinds import TARGETS, Target
from .spec import DeviceSpec, parse_devices

__all__ = ["TARGETS", "Target", "DeviceSpec", "parse_devices", "ELEMENT_BYTES", "DEFAULT_ARCH", "BOUNDARY", "WIDEN",
           "iree_flags", "unsupported_reason", "has_narrow_storage", "tunable"]

# Element types (torch dialect spelling) and their sizes in bytes.
ELEMENT_BYTES = {
    "f64": 8, "f32": 4, "f16": 2, "bf16": 2,
    "si64": 8, "si32": 4, "si16": 2, "si8": 1, "ui8": 1, "i1": 1,
    "i64": 8, "i32": 4, "i16": 2, "i8": 1,
    "f8E4M3FN": 1, "f8E5M2": 1,
    "complex<f32>": 8, "complex<f64>": 16,
}

DEFAULT_ARCH = {kind: t.default_arch for kind, t in TARGETS.items()}


def iree_flags(spec: DeviceSpec) -> list:
    """iree-compile flags for a device spec (input type and output not included)."""
    spec = DeviceSpec.parse(spec)
    return spec.target.flags(spec.arch or spec.target.default_arch)


# Element types that cross segment boundaries as another type on every device: IREE
# demotes f64 to f32 inside a function by default, but a function returning f64 then
# fails at run time ("buffer view byte length 196608 exceeds backing buffer byte length
# 98304", measured on local-task); so segments exchange f64 tensors as f32, and complex<f64>
# (the same failure: "byte length 96 exceeds backing buffer byte length 48") as complex<f32>.
BOUNDARY = {"f64": "f32", "complex<f64>": "complex<f32>"}

# Narrow element types and the 32-bit type they travel as on targets without 8/16-bit storage.
WIDEN = {"i1": "si32", "si8": "si32", "ui8": "si32", "si16": "si32", "f16": "f32", "bf16": "f32"}


def unsupported_reason(spec: DeviceSpec, element_types: Iterable, op_name: str = "",
                       input_types: Iterable = ()) -> str | None:
    """Why a device cannot run an op touching tensors of `element_types`, or None.

    input_types: element types of the tensors the op reads."""
    spec = DeviceSpec.parse(spec)
    return spec.target.unsupported(spec.arch, element_types, op_name, input_types)


def has_narrow_storage(spec: DeviceSpec) -> bool:
    """False where tensors in device memory must be 32-bit (the default Vulkan target):
    segments on such a device get their narrow inputs and outputs widened at the boundary
    by outline-segments."""
    spec = DeviceSpec.parse(spec)
    return spec.target.narrow_storage(spec.arch)


def tunable(device: DeviceSpec | str) -> bool:
    """True for a device this host can measure the choices on: the host's own CPU."""
    spec = DeviceSpec.parse(device)
    return spec.kind == "cpu" and spec.arch in (None, "host")
