"""Who a device is: the identity of each device this host has, as the IREE runtime and the
device's own driver report it.

    identify("vulkan") -> {"device": "vulkan", "kind": "vulkan", "name": "llvmpipe (LLVM 15.0.6, 256 bits)",
                           "type": "cpu-emulation", "driver": "llvmpipe Mesa 22.3.6 (LLVM 15.0.6)", ...,
                           "key": "vulkan-3f9a0c21d4e8"}

The type is one of "discrete-gpu", "integrated-gpu", "virtual-gpu", "cpu-emulation"
(a software Vulkan such as Mesa's lavapipe/llvmpipe or SwiftShader: it runs on the CPU
cores), "cpu" and "unknown". `key` is stable across processes for the same device,
driver and CPU, and is what per-host caches (measured profiles, ops measured wrong) are
keyed by. Uses only the standard library, the Vulkan loader (through ctypes) and the
IREE runtime: a deployment host needs no compiler."""

import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import re

from .devices import DeviceSpec

__all__ = ["identify", "identity_key", "is_software", "describe", "cpu_identity", "vulkan_devices", "iree_version"]

SOFTWARE_VULKAN = re.compile(r"llvmpipe|lavapipe|swiftshader|softpipe", re.I)
_VK_TYPES = {0: "unknown", 1: "integrated-gpu", 2: "discrete-gpu", 3: "virtual-gpu", 4: "cpu-emulation"}
# CPU features that change generated code (what iree-cpuinfo and /proc/cpuinfo call them)
_ISA = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
        "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def iree_version() -> str:
    """The IREE release in use: the runtime's (which runs the code) and the compiler's (which
    made it), when both are installed and differ; what measurements are valid for."""
    from importlib.metadata import PackageNotFoundError, version

    vs = []
    for pkg in ("iree-base-runtime", "iree-base-compiler"):
        try:
            vs.append(version(pkg))
        except PackageNotFoundError:
            pass
    vs = list(dict.fromkeys(vs))
    return "+".join(vs) or "unknown"


def cpu_identity() -> dict:
    """The host CPU: model, logical cores, ISA features that matter for code generation."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return {"kind": "cpu", "name": model, "type": "cpu", "driver": "local-task", "cores": os.cpu_count() or 1,
            "isa": [f for f in _ISA if f in flags], "machine": platform.machine()}


class _AppInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("pApplicationName", ctypes.c_char_p),
                ("applicationVersion", ctypes.c_uint32), ("pEngineName", ctypes.c_char_p),
                ("engineVersion", ctypes.c_uint32), ("apiVersion", ctypes.c_uint32)]


class _InstanceInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.POINTER(_AppInfo)), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]


class _DriverProps(ctypes.Structure):  # VkPhysicalDeviceDriverProperties (Vulkan 1.2)
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("driverID", ctypes.c_uint32),
                ("driverName", ctypes.c_char * 256), ("driverInfo", ctypes.c_char * 256),
                ("conformance", ctypes.c_uint8 * 4)]


class _IDProps(ctypes.Structure):  # VkPhysicalDeviceIDProperties (Vulkan 1.1)
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("deviceUUID", ctypes.c_uint8 * 16),
                ("driverUUID", ctypes.c_uint8 * 16), ("deviceLUID", ctypes.c_uint8 * 8),
                ("deviceNodeMask", ctypes.c_uint32), ("deviceLUIDValid", ctypes.c_uint32)]


class _Props(ctypes.Structure):  # VkPhysicalDeviceProperties, its limits kept opaque
    _fields_ = [("apiVersion", ctypes.c_uint32), ("driverVersion", ctypes.c_uint32), ("vendorID", ctypes.c_uint32),
                ("deviceID", ctypes.c_uint32), ("deviceType", ctypes.c_uint32), ("deviceName", ctypes.c_char * 256),
                ("pipelineCacheUUID", ctypes.c_uint8 * 16), ("rest", ctypes.c_uint64 * 66)]


class _Props2(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("properties", _Props)]


def vulkan_devices() -> list:
    """Every Vulkan physical device as the loader reports it: [{name, type, driver, vendor_id,
    device_id, api_version, driver_version, uuid}] in enumeration order; [] without a loader."""
    lib = ctypes.util.find_library("vulkan") or "libvulkan.so.1"
    try:
        vk = ctypes.CDLL(lib)
    except OSError:
        return []
    app = _AppInfo(0, None, b"polyarch", 1, b"polyarch", 1, (1 << 22) | (2 << 12))  # VK_API_VERSION_1_2
    info = _InstanceInfo(1, None, 0, ctypes.pointer(app), 0, None, 0, None)
    inst = ctypes.c_void_p()
    if vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(inst)) != 0:
        return []
    out = []
    try:
        n = ctypes.c_uint32(0)
        vk.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), None)
        phys = (ctypes.c_void_p * n.value)()
        vk.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), phys)
        for p in phys[: n.value]:
            drv = _DriverProps(1000196000, None)
            ids = _IDProps(1000071004, ctypes.cast(ctypes.pointer(drv), ctypes.c_void_p))
            props = _Props2(1000059001, ctypes.cast(ctypes.pointer(ids), ctypes.c_void_p))
            vk.vkGetPhysicalDeviceProperties2(ctypes.c_void_p(p), ctypes.byref(props))
            pr = props.properties
            api = pr.apiVersion
            out.append({
                "name": pr.deviceName.decode(errors="replace"),
                "type": _VK_TYPES.get(pr.deviceType, "unknown"),
                "driver": " ".join(x for x in (drv.driverName.decode(errors="replace"),
                                               drv.driverInfo.decode(errors="replace")) if x),
                "vendor_id": f"0x{pr.vendorID:04x}", "device_id": f"0x{pr.deviceID:04x}",
                "api_version": f"{api >> 22}.{(api >> 12) & 0x3FF}.{api & 0xFFF}",
                "driver_version": pr.driverVersion,
                "uuid": bytes(ids.deviceUUID).hex(),
            })
    finally:
        vk.vkDestroyInstance(inst, None)
    return out


def _iree_infos(driver):
    import iree.runtime as rt

    try:
        return rt.get_driver(driver).query_available_devices()
    except Exception:
        return []


def identify(spec: DeviceSpec | str) -> dict | None:
    """The identity of a device of this host, or None if the host lacks it."""
    spec = DeviceSpec.parse(spec)
    target = spec.target
    if target.probe == "host":
        ident = cpu_identity()
    else:
        infos = _iree_infos(spec.driver)
        if spec.ordinal >= len(infos):
            return None
        info = infos[spec.ordinal]
        ident = {"kind": spec.kind, "name": info.get("name", ""), "type": target.device_type, "driver": spec.driver,
                 "path": info.get("path", "")}
        if target.probe == "vulkan":
            vks = vulkan_devices()
            # IREE names a Vulkan device by its UUID ("GPU-<hex>"); match on it, else on the name.
            match = [v for v in vks if v["uuid"] and v["uuid"] in ident["path"].lower()] or \
                    [v for v in vks if v["name"] and ident["name"].startswith(v["name"])]
            if match:
                ident.update({k: v for k, v in match[0].items() if k != "uuid"})
            elif SOFTWARE_VULKAN.search(ident["name"]):
                ident["type"] = "cpu-emulation"
        if ident["type"] == "cpu-emulation":
            ident["host_cpu"] = cpu_identity()["name"]
    ident["device"] = spec.name
    ident["key"] = identity_key(ident)
    return ident


def identity_key(ident: dict) -> str:
    """'KIND-<12 hex>': a digest of what makes the device's speed and correctness what it is
    (name, type, driver and its version; for a CPU or a CPU emulation, the CPU model, cores and ISA)."""
    parts = {k: ident.get(k) for k in ("kind", "name", "type", "driver", "driver_version", "vendor_id", "device_id",
                                       "cores", "isa", "host_cpu", "path") if ident.get(k) is not None}
    if ident.get("type") == "cpu-emulation":
        cpu = cpu_identity()
        parts.update(cores=cpu["cores"], isa=cpu["isa"])
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{ident.get('kind', 'device')}-{digest}"


def is_software(ident: dict | None) -> bool:
    """True for a device that runs on the host's CPU cores while posing as a GPU."""
    return bool(ident) and (ident.get("type") == "cpu-emulation" or bool(SOFTWARE_VULKAN.search(ident.get("name", ""))))


def describe(ident: dict | None) -> str:
    """One line: 'llvmpipe (LLVM 15.0.6, 256 bits), CPU emulation (software Vulkan), driver llvmpipe Mesa 22.3.6'."""
    if not ident:
        return "not present on this host"
    if ident["kind"] == "cpu":
        return f"{ident['name']}, {ident['cores']} cores, {'/'.join(ident['isa']) or 'baseline ISA'}"
    kind = {"cpu-emulation": "CPU emulation (software Vulkan: runs on the host's CPU cores)",
            "discrete-gpu": "discrete GPU", "integrated-gpu": "integrated GPU", "virtual-gpu": "virtual GPU"}.get(
        ident.get("type"), ident.get("type", "unknown type"))
    return f"{ident['name']}, {kind}, driver {ident.get('driver', '?')}"
