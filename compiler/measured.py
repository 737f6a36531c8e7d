"""What this host has measured about its devices, cached per user and per device identity.

    $POLYARCH_CACHE_DIR, else $XDG_CACHE_HOME/polyarch, else ~/.cache/polyarch
      profiles/<identity key>-iree<version>.json   the device's profile (polyarch calibrate)
      verdicts/<identity key>-iree<version>.json   ops measured wrong on the device, and
                                                   per-op-class corrections of predicted times

The key is the device's identity (runtime/identity.py: name, type, driver and version,
CPU model and ISA) and the IREE version: another driver, device or IREE release starts
afresh. `resolve_profiles` is what compile and plan use to price the devices of a plan."""

import datetime
import json
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..errors import PolyarchError
from ..runtime.devices import DeviceSpec
from ..runtime.identity import describe, identify, iree_version, is_software
from ..targets import profiles as P

if TYPE_CHECKING:
    from ..targets.profiles import DeviceProfile

CACHE_ENV = "POLYARCH_CACHE_DIR"
VERDICT_SCHEMA = "polyarch-verdicts/1"
# How the corrections in a verdicts file were measured. 2: each a geometric mean of measured /
# profile-predicted ratios (compiler/grounding.py). Corrections without it were multiplied into
# the corrected predictions compile after compile and could run away (cpu matmul 0.011 in a
# test cache): they are dropped on reading, the ops measured wrong kept.
CORRECTIONS_RULE = 2
OP_CLASSES = ("matmul", "conv", "other")


def cache_dir() -> str:
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "polyarch")


def _path(what, ident):
    return os.path.join(cache_dir(), what, f"{ident['key']}-iree{iree_version()}.json")


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a damaged cache entry is measured again, not trusted


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_profile(ident: dict) -> "DeviceProfile | None":
    """The cached measured profile of this device, or None."""
    from .calibrate import SUITE_VERSION

    obj = _read(_path("profiles", ident))
    if not obj or obj.get("identity", {}).get("key") != ident["key"] or obj.get("iree") != iree_version() \
            or obj.get("suite", 1) != SUITE_VERSION:  # measured by an older suite: measured again
        return None
    try:
        return P.from_json(obj["profile"], f"cached profile {_path('profiles', ident)}")
    except (PolyarchError, KeyError):
        return None


def store_profile(ident: dict, profile: Any) -> None:
    from .calibrate import SUITE_VERSION

    _write(_path("profiles", ident), {"identity": ident, "iree": iree_version(), "suite": SUITE_VERSION,
                                      "profile": profile.to_json()})


def load_verdicts(ident: dict) -> dict:
    """{"wrong_ops": {fingerprint: {op, reason, error, date}}, "corrections": {class: factor}}."""
    obj = _read(_path("verdicts", ident)) if ident else None
    if not obj or obj.get("schema") != VERDICT_SCHEMA or obj.get("identity") != ident["key"]:
        return {"wrong_ops": {}, "corrections": {}}
    corrections = obj.get("corrections", {}) if obj.get("corrections_rule") == CORRECTIONS_RULE else {}
    return {"wrong_ops": dict(obj.get("wrong_ops", {})), "corrections": dict(corrections)}


def store_verdicts(ident: dict, verdicts: Iterable) -> None:
    _write(_path("verdicts", ident), {"schema": VERDICT_SCHEMA, "identity": ident["key"], "iree": iree_version(),
                                      "device": describe(ident), **verdicts, "corrections_rule": CORRECTIONS_RULE})


# A software Vulkan (lavapipe, SwiftShader) priced without calibration: it runs on the
# host's CPU cores, far slower than they do natively (measured here with lavapipe: matmul
# ~1-9 GFLOP/s, a call 0.1-8 ms). Never a GPU's spec sheet.
SOFTWARE_VULKAN = P.DeviceProfile(
    name="vulkan-cpu-emulation", device="vulkan",
    peak_flops={"f32": 2e9, "f16": 2e9, "bf16": 2e9, "i8": 2e9},
    mem_bw=4e9, launch_s=1e-4, call_s=1e-3, mem_capacity=4 * (1 << 30),
    link_bw=2e9, link_latency_s=1e-4, watts=65.0, price_per_hour=0.0, op_efficiency={"conv": 0.1},
    source="estimate for a Vulkan CPU emulation (lavapipe measured at ~1-9 GFLOP/s, 0.1-8 ms a call); run "
           "`polyarch calibrate` to measure it",
)


def resolve_profiles(specs: Iterable, given: Iterable = (), calibrate: bool = True,
                     progress: Callable[[str], None] | None = None) -> tuple:
    """Price every device of a compile. -> ([DeviceProfile] in spec order, {device: info}) with
    info = {"identity": dict or None, "profile": name, "source": how it was chosen}.

    Per device, the first that applies: a --profile file for it; for a device this host
    has, its cached measured profile, else (calibrate=True) a quick calibration now,
    stored in the cache; a software Vulkan without either gets SOFTWARE_VULKAN; a device
    the host lacks gets its built-in spec-sheet profile (cross-compiles, fleet simulation)."""
    from . import calibrate as C

    progress = progress or (lambda m: None)
    files = P.load_all(given)
    out, info = [], {}
    skipped = []
    for spec in [DeviceSpec.parse(s) for s in specs]:
        ident = identify(spec)
        explicit = P.match(spec, files)
        if explicit is not None:
            prof, source = replace(explicit, device=spec.name), "given (--profile)"
        elif ident is None:
            prof, source = replace(P.BUILTIN[spec.kind], device=spec.name), "spec sheet (device not on this host)"
        else:
            cached = load_profile(ident)
            if cached is not None:
                prof, source = replace(cached, device=spec.name), "measured on this host (cached)"
            elif calibrate:
                progress(f"{spec.name}: no measured profile for {describe(ident)}; calibrating it (quick suite, "
                         f"stored in {cache_dir()})")
                measured = C.calibrate([spec.name], progress=progress, quick=True)[0]
                store_profile(ident, measured)
                prof, source = measured, "measured on this host (calibrated now)"
            elif is_software(ident):
                prof, source = replace(SOFTWARE_VULKAN, device=spec.name), "CPU-emulation estimate (not calibrated)"
                skipped.append(spec.name)
            else:
                prof, source = replace(P.BUILTIN[spec.kind], device=spec.name), "spec sheet (not calibrated)"
                skipped.append(spec.name)
        out.append(prof)
        info[spec.name] = {"identity": ident, "profile": prof.name, "source": source}
    if skipped:
        progress(f"not calibrating {', '.join(skipped)} (--no-calibrate): priced by estimates; measure with "
                 f"`polyarch calibrate {' '.join('-d ' + s for s in skipped)}`, or compile without --no-calibrate")
    return out, info


def pricing_line(device: str, info: dict) -> str:
    """'DEVICE: <identity>; priced by PROFILE (SOURCE)', as compile, plan and inspect print it."""
    who = describe(info.get("identity")) if info.get("identity") else "not on the compiling host"
    return f"{device}: {who}; priced by {info.get('profile')} ({info.get('source')})"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
