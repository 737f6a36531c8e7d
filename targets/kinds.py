"""One record per device kind: everything polyarch knows about a kind of device.

Adding a device kind is adding one `Target` to TARGETS below: the spec parser, the HAL
driver the runtime opens, the iree-compile flags, op support, storage widths, the built-in
spec-sheet profile, the retries of known IREE refusals and how the runtime identifies a
device of the kind all read it. Nothing here imports beyond the standard library (and
errors.py), so the runtime (a deployment host) reads the same records as the compiler.

The host CPU is kind "cpu": the reference segments are verified against, where tuning
measures, and where ops no other device can run are placed."""

import re
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Target", "TARGETS", "CPU", "VULKAN", "CUDA", "ROCM"]

GiB = 1 << 30


def _no_limit(arch: str | None, element_types, op_name: str, input_types) -> str | None:
    return None


def _all_widths(arch: str | None) -> bool:
    return True


@dataclass(frozen=True)
class Target:
    """A device kind. `flags(arch)`: iree-compile flags for the arch (the default one when the
    spec names none); `unsupported(arch, element_types, op_name, input_types)`: why the kind
    cannot run an op, or None; `narrow_storage(arch)`: whether 8/16-bit tensors may live in
    its memory (else they cross segment boundaries widened to 32 bits); `probe`: how the
    runtime identifies a device ("host": /proc/cpuinfo; "vulkan": the Vulkan loader's
    properties, telling software Vulkan apart; "hal": the IREE HAL's device list, the device
    taken to be of `device_type`); `known_retries`: (pattern in iree-compile's stderr, flags
    that get past it, why), each retried once; `install_hint`: what a host lacking the device
    needs, said when a bundle asks for it."""

    kind: str
    hal_driver: str
    default_arch: str | None
    flags: Callable[[str | None], list]
    spec_sheet: dict
    unsupported: Callable = _no_limit
    narrow_storage: Callable[[str | None], bool] = _all_widths
    probe: str = "hal"
    device_type: str = "discrete-gpu"
    known_retries: tuple = field(default=())
    install_hint: str = ""


# ---- cpu: the host's CPU through IREE's llvm-cpu and the local-task driver -------------------

def _cpu_flags(arch):
    return ["--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
            f"--iree-llvmcpu-target-cpu={arch}", "--iree-opt-data-tiling"]


CPU = Target(
    kind="cpu", hal_driver="local-task", default_arch="host", flags=_cpu_flags, probe="host", device_type="cpu",
    # Generic x86-64 CPU: 4 cores with AVX2 at 3 GHz. Two 256-bit FMA ports per core
    # (Intel 64 and IA-32 Architectures Optimization Reference Manual, "Haswell and later
    # microarchitectures": 2 FMA/cycle x 8 f32 lanes x 2 FLOP) -> 4 x 3e9 x 32 = 3.84e11 FLOP/s.
    # Memory: dual-channel DDR4-3200, 2 x 25.6 GB/s (JEDEC JESD79-4). Power: 65 W desktop TDP
    # class; price: an on-demand 4-vCPU-pair cloud instance (order of magnitude, set your own).
    spec_sheet=dict(
        name="generic-x86-cpu", device="cpu",
        peak_flops={"f32": 3.84e11, "f16": 3.84e11, "bf16": 3.84e11, "i8": 7.68e11},
        mem_bw=5.12e10, launch_s=3e-6, call_s=2e-5, mem_capacity=16 * GiB,
        link_bw=2.0e10, link_latency_s=1e-6, watts=65.0, price_per_hour=0.17,
        source="spec sheet: 4 cores AVX2 FMA @3 GHz (Intel optimization manual), DDR4-3200 x2 (JEDEC JESD79-4)",
    ),
    # IREE 3.13 llvm-cpu refusals that a flag gets past (met on public models, docs/cpu-speed.md)
    known_retries=(
        (re.compile(r"large vector sizes"), ("--iree-llvmcpu-fail-on-large-vector=false",),
         "llvm-cpu's check on large vectors (EfficientNet's squeeze-excite)"),
        # 64 KiB: half of the runtime's 128 KiB worker stack (--task_worker_stack_size), the rest
        # left to the task system; a dispatch needing more still fails, with the error
        (re.compile(r"exceeded stack allocation limit"), ("--iree-llvmcpu-stack-allocation-limit=65536",),
         "llvm-cpu's 32 KiB stack limit per dispatch (EfficientNet-B0 once the large-vector check is off; MiniLM at -O3)"),
    ),
)


# ---- vulkan: SPIR-V through IREE's vulkan-spirv; the default target is the most portable ------

_VULKAN_INT64_ARCHS = ("rdna", "cdna", "gfx", "sm_", "ampere", "turing", "ada", "hopper", "rtx", "rx", "mi")

# Narrow element types (torch dialect spelling), and reductions that come out wrong over them
# on a target with 32-bit storage only.
NARROW = ("i1", "si8", "ui8", "si16", "f16", "bf16")
NARROW_REDUCTIONS = ("all", "any", "sum", "prod", "max", "min", "amax", "amin", "argmax", "argmin", "cumsum", "mean")


def _vulkan_flags(arch):
    flags = ["--iree-hal-target-device=vulkan", "--iree-hal-target-backends=vulkan-spirv"]
    if arch:
        flags.append(f"--iree-vulkan-target={arch}")
    return flags


def _vulkan_unsupported(arch, element_types, op_name, input_types):
    arch = arch or ""
    base = op_name.split(".")[2] if op_name.startswith("torch.aten.") else op_name
    narrow_in = sorted(t for t in input_types if t in NARROW)
    if not arch and base in NARROW_REDUCTIONS and narrow_in:
        return (f"reductions over {'/'.join(narrow_in)} tensors come out wrong on the default Vulkan target "
                "(32-bit storage only; measured on lavapipe)")
    if not arch and ("bf16" in element_types or "bf16" in input_types):
        return ("IREE 3.13 cannot lower bf16 arithmetic for the default Vulkan target (\"failed to legalize "
                "'vector.bitcast' ... vector<4xbf16>\"); keep these ops elsewhere")
    # f64 needs no check: IREE demotes f64 to f32 for every target by default.
    wide = sorted(t for t in element_types if t in ("si64", "ui64", "i64"))
    if wide and not arch.lower().startswith(_VULKAN_INT64_ARCHS):
        return (f"{'/'.join(wide)} tensors need the Int64 capability, which the default Vulkan target lacks "
                "(name a target with it, e.g. vulkan@rdna3, or keep these ops elsewhere)")
    return None


def _vulkan_narrow_storage(arch):
    # the default target declares 32-bit storage only, and 8-bit tensors read there come out
    # wrong (measured on lavapipe: a bool mask gave softmax errors of 0.6)
    return bool(arch)


VULKAN = Target(
    kind="vulkan", hal_driver="vulkan", default_arch=None, flags=_vulkan_flags, unsupported=_vulkan_unsupported,
    narrow_storage=_vulkan_narrow_storage, probe="vulkan", device_type="unknown",
    install_hint="install a Vulkan driver (on machines without a GPU: Debian's mesa-vulkan-drivers and libvulkan1)",
    # A Vulkan iGPU: AMD Radeon 780M (RDNA3, 12 CUs at 2.7 GHz; AMD Ryzen 7 7840U product
    # page): 768 lanes x 2 FLOP x 2.7 GHz = 4.1 TFLOPS f32 without dual issue (8.3 with).
    # Memory shared with the CPU: LPDDR5-7500 on 128 bits = 120 GB/s; the "link" is a copy
    # within that memory. 30 W package power (shared with the CPU cores).
    spec_sheet=dict(
        name="vulkan-igpu-radeon-780m", device="vulkan",
        peak_flops={"f32": 4.1e12, "f16": 8.2e12, "bf16": 4.1e12, "i8": 8.2e12},
        mem_bw=1.2e11, launch_s=2e-5, call_s=1e-4, mem_capacity=8 * GiB,
        link_bw=2.0e10, link_latency_s=3e-5, watts=30.0, price_per_hour=0.0,
        source="AMD Ryzen 7 7840U product page (Radeon 780M: 12 RDNA3 CUs, 2.7 GHz), LPDDR5-7500 128-bit",
    ),
)


# ---- cuda: NVIDIA GPUs through IREE's cuda target (PTX) ---------------------------------------

def _cuda_flags(arch):
    if re.match(r"^sm_(9\d|1\d\d)", arch):
        from ..errors import PolyarchError

        raise PolyarchError(f"IREE 3.13 has no CUDA target '{arch}' (its compiler stops at 'missing GPU target')",
                            fix="compile for cuda@sm_89 or plain cuda (sm_80): the bundle carries PTX, which the driver "
                                "compiles for newer GPUs (Hopper, Blackwell) when it loads")
    return ["--iree-hal-target-device=cuda", f"--iree-cuda-target={arch}"]


CUDA = Target(
    kind="cuda", hal_driver="cuda", default_arch="sm_80", flags=_cuda_flags,
    install_hint="run on a host with an NVIDIA GPU and driver",
    # NVIDIA H100 SXM5 80 GB (NVIDIA H100 Tensor Core GPU datasheet, 2023): FP32 67 TFLOPS,
    # TF32 494.7 / BF16 and FP16 989.4 / FP8 1979 / INT8 1979 TFLOPS dense, HBM3 3.35 TB/s,
    # 80 GB, up to 700 W; host link PCIe Gen5 x16 (64 GB/s per direction, ~50 effective).
    # IREE's f32 matmuls do not use TF32 unless asked, so f32 is the CUDA-core figure.
    # Device "cuda" (sm_80 code): IREE 3.13 has no sm_90 target; the driver JITs the PTX on Hopper.
    spec_sheet=dict(
        name="nvidia-h100-sxm", device="cuda",
        peak_flops={"f32": 6.7e13, "f16": 9.894e14, "bf16": 9.894e14, "f8": 1.979e15, "i8": 1.979e15},
        mem_bw=3.35e12, launch_s=5e-6, call_s=2e-5, mem_capacity=80e9,
        link_bw=5.0e10, link_latency_s=1e-5, watts=700.0, price_per_hour=3.0,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67 TF, BF16 989 TF dense, HBM3 3.35 TB/s, 80 GB, 700 W, PCIe Gen5 x16",
    ),
)


# ---- rocm: AMD GPUs through IREE's HIP target ------------------------------------------------

def _rocm_flags(arch):
    return ["--iree-hal-target-device=hip", f"--iree-rocm-target={arch}"]


ROCM = Target(
    kind="rocm", hal_driver="hip", default_arch="gfx942", flags=_rocm_flags,
    install_hint="run on a host with an AMD GPU and ROCm",
    # AMD Instinct MI300X (AMD Instinct MI300X accelerator data sheet, 2023): FP32 vector
    # 81.7 TFLOPS (matrix 163.4), FP16/BF16 1307.4 TFLOPS dense, FP8 2614.9, INT8 2614.9 TOPS,
    # HBM3 5.3 TB/s, 192 GB, 750 W; host link PCIe Gen5 x16.
    spec_sheet=dict(
        name="amd-mi300x", device="rocm@gfx942",
        peak_flops={"f32": 8.17e13, "f16": 1.3074e15, "bf16": 1.3074e15, "f8": 2.6149e15, "i8": 2.6149e15},
        mem_bw=5.3e12, launch_s=5e-6, call_s=2e-5, mem_capacity=192e9,
        link_bw=5.0e10, link_latency_s=1e-5, watts=750.0, price_per_hour=3.5,
        source="AMD Instinct MI300X data sheet: FP32 81.7 TF vector, FP16 1307 TF dense, HBM3 5.3 TB/s, 192 GB, 750 W, PCIe Gen5 x16",
    ),
)


TARGETS = {t.kind: t for t in (CPU, VULKAN, CUDA, ROCM)}
