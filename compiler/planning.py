"""Planning: identify and price the devices, then partition the imported module once per
device set (the three passes: annotate-costs, assign-devices, outline-segments)."""

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..dialects import polyarch as pa
from ..runtime.devices import DeviceSpec
from .modules import clone_module

if TYPE_CHECKING:
    from torch_mlir import ir


def import_module(model: Any, example_inputs: Iterable, dynamic_dims: Iterable,
                  progress: Callable[[str], None] | None) -> tuple:
    """-> (torch-dialect module, signature), the index inputs' ranges in the signature."""
    from .importer import import_model

    from ..passes import guard_indices

    t = time.time()
    base, sig = import_model(model, example_inputs, dynamic_dims)
    progress(f"imported {model_name(model)} into the torch dialect in {time.time() - t:.1f}s")
    for note in sig.pop("notes", ()):
        progress(note)
    # inputs used as indices get their valid range in the signature (checked by the runtime);
    # indices computed in the model are marked for a check inside their segment
    for arg, r in guard_indices.mark(base).items():
        sig["inputs"][arg]["index_range"] = r
    for desc in dynamic_summary(sig):
        progress(desc)
    return base, sig


def price_devices(sets: list, profiles: Iterable, calibrate: bool, progress: Callable[[str], None] | None) -> dict:
    """Identify the devices of all plans, choose each one's profile (measured where the
    host has the device: compiler/measured.py) and read what was measured wrong on it.
    -> {"profiles": [DeviceProfile], "devices": {name: info}, "verdicts": {name: verdicts}}"""
    from . import measured

    names = list(dict.fromkeys(s.name for specs in sets for s in specs))
    profs, info = measured.resolve_profiles(names, profiles, calibrate, progress)
    verdicts = {}
    for d in names:
        ident = info[d]["identity"]
        progress(measured.pricing_line(d, info[d]))
        verdicts[d] = measured.load_verdicts(ident) if ident else {"wrong_ops": {}, "corrections": {}}
        if not info[d]["source"].startswith("measured"):
            # corrections are relative to the measured profile's predictions: another profile starts afresh
            verdicts[d]["corrections"] = {}
        if verdicts[d]["wrong_ops"]:
            progress(f"{d}: {len(verdicts[d]['wrong_ops'])} op kind(s) measured wrong there before are kept off it")
    return {"profiles": profs, "devices": info, "verdicts": verdicts}


def partition(base: "ir.Module", sets: list, pins: Iterable, progress: Callable[[str], None] | None, objective: str,
              solver: str, priced: dict, keep_base: bool = False) -> list:
    """Run the three passes once per device set on (a copy of) the imported module."""
    from torch_mlir import ir

    from ..passes import AnnotateCosts, AssignDevices, OutlineSegments, run_pipeline

    names = ["+".join(s.name for s in specs) for specs in sets]
    verdicts = [{"device": d, **v} for d, v in priced["verdicts"].items()]
    out = []
    for i, (name, specs) in enumerate(zip(names, sets)):
        t = time.time()
        plan_pins = list(pins)
        if len(sets) > 1:  # a pin to a device outside this plan's set applies to the other plans only
            plan_pins = [p for p in pins if DeviceSpec.parse(p.rpartition("=")[2]).name in {s.name for s in specs}]
            for p in sorted(set(pins) - set(plan_pins)):
                progress(f"plan {name}: pin {p} does not apply (no such device in this plan)")
        devs = [s.name for s in specs]
        with base.context, ir.Location.unknown():
            module = base if (i == len(sets) - 1 and not keep_base) else clone_module(base)
            profiles = tuple(priced["profiles"])
            run_pipeline(module, [
                AnnotateCosts(devices=devs, profile=profiles, verdicts=verdicts),
                AssignDevices(devices=devs, pin=plan_pins, objective=objective, solver=solver, profile=profiles,
                              verdicts=verdicts),
                OutlineSegments(),
            ])
            info = {d: priced["devices"][d] for d in devs}
            pa.set_device_info(module, info)
        progress(f"partitioned over {', '.join(devs)} in {time.time() - t:.1f}s")
        out.append((name, module))
    return out


def dynamic_summary(sig: dict) -> list:
    """One line per dynamic input dimension: where it is, its bound, the size costs are predicted at."""
    out = []
    for i, inp in enumerate(sig["inputs"]):
        for d in inp.get("dynamic", ()):
            top = "unbounded" if d.get("max") is None else f"up to {d['max']}"
            out.append(f"input {i} ('{inp['name']}') dimension {d['dim']} is dynamic: {d.get('min', 1)} {top}"
                       f" (symbol {d.get('symbol', d.get('expr'))}; costs predicted at {inp['shape'][d['dim']]})")
    return out


def model_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):  # an ONNX file
        return os.path.splitext(os.path.basename(os.fspath(model)))[0]
    return type(model).__name__


