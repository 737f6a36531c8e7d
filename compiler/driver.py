"""The compile pipeline: import -> passes -> IREE per segment (in parallel) -> bundle.

    polyarch.compile(model, example_inputs, devices=["cpu", "vulkan"], output="m.pab")
"""

import os
import sys
import tempfile
import time

from ..errors import PolyarchError
from .build import build_bundle, rewrite_bundle
from .planning import import_and_price, model_name, parse_device_sets, partition


def _stderr_progress(msg):
    print(f"polyarch: {msg}", file=sys.stderr, flush=True)


def plan(model, example_inputs=(), devices=("cpu",), pins=(), progress=None, objective="latency", solver="auto", profiles=(),
         dynamic_dims=(), calibrate=True, details=None):
    """Import and partition without compiling: -> (ir.Module after the three passes, signature).
    details: a dict to fill with "profiles" (the DeviceProfiles used) and "devices" (per
    device: identity, profile name, where the profile came from)."""
    plans, sig = plan_many(model, example_inputs, [devices], pins=pins, progress=progress, objective=objective,
                           solver=solver, profiles=profiles, dynamic_dims=dynamic_dims, calibrate=calibrate, details=details)
    return plans[0][1], sig


def plan_many(model, example_inputs=(), device_sets=(("cpu",),), pins=(), progress=None, objective="latency",
              solver="auto", profiles=(), dynamic_dims=(), calibrate=True, details=None):
    """Import once, partition once per device set. -> ([(plan name, module)], signature).
    A plan's name is its device set joined by '+', e.g. "vulkan+cpu". dynamic_dims: see
    compile; calibrate, details: see plan."""
    progress = progress or (lambda msg: None)
    sets = parse_device_sets(device_sets)
    base, sig, priced = import_and_price(model, example_inputs, dynamic_dims, sets, profiles, calibrate, progress)
    if details is not None:
        details.update(priced)
    return partition(base, sets, pins, progress, objective, solver, priced), sig


def compile(model, example_inputs=(), devices=("cpu",), output=None, pins=(), jobs=None, progress=None, iree_extra_flags=(),
            objective="latency", solver="auto", profiles=(), plans=None, dynamic_dims=(), calibrate=True, verify=True,
            tune="quick"):
    """Compile a model into a bundle. Returns the bundle's path.

    model          torch.nn.Module (with example_inputs), torch.export.ExportedProgram, or the path of
                   an .onnx file (example_inputs then optional: arrays or "DIMSxDTYPE" specs that fix
                   symbolic input dimensions)
    devices        device specs, e.g. ["cpu", "vulkan"] or ["cpu", "cuda@sm_86"]
    plans          several device sets, one placement plan each, in one bundle sharing the weights,
                   e.g. [["cuda", "cpu"], ["vulkan", "cpu"], ["cpu"]]; the runtime runs the fastest
                   plan whose devices it finds (replaces `devices`)
    output         bundle path (default: <ModelClass>.pab in the current directory)
    pins           ["PATTERN=DEVICE", ...]: op names or module path prefixes forced onto a device
    objective      latency | throughput | cost | energy | "latency:1,energy:0.5" (see passes/assign_devices.py)
    solver         auto | brute | chain-dp | mincut | heft
    profiles       device profile JSON files (polyarch calibrate); a device without one is priced by
                   its measured profile cached on this host (compiler/measured.py), else by its built-in
                   spec-sheet profile if this host lacks it
    calibrate      True: a device of this host with no cached profile is calibrated now (quick suite,
                   about 15 s a device here) and the result cached; False: estimates instead
    verify         True: every plan whose devices this host has is run on the example inputs and checked
                   (each off-CPU segment against the same segment on llvm-cpu, the whole against
                   PyTorch eager) and timed; ops measured wrong are kept off their device (and
                   remembered for this device), the measured times correct the cost model, and the
                   model is re-planned until the plan stops changing (at most MAX_ROUNDS compiles).
                   A bundle known to be wrong is never written. False: cross-compiles.
    tune           none | quick | full: per-segment lowering choices measured on this host's CPU
                   (compiler/tuning.py; quick: each convolution shape as IREE's convolution or
                   im2col + matmul; full: also whole segments with each candidate flag set),
                   cached per host so that a recompile measures nothing
    iree_extra_flags  flags added to every iree-compile command (after polyarch's own)
    jobs           parallel iree-compile processes (default: one per core)
    progress       callable(str) for progress lines; True prints them to stderr
    dynamic_dims   ["INPUT:DIM[:MAX]", ...]: dimensions that stay dynamic (nn.Module only), e.g.
                   ["input0:0:64"]: the bundle then takes any size from 1 to MAX (default 1024) there;
                   costs are predicted at the example's size
    """
    if progress is True:
        progress = _stderr_progress
    progress = progress or (lambda msg: None)
    t0 = time.time()
    output = output or f"{model_name(model)}.pab"
    from .importer import is_onnx
    from .tuning import check_mode

    if is_onnx(model) and os.path.exists(output) and os.path.samefile(model, output):
        raise PolyarchError(f"the output {output} is the ONNX model being compiled: writing the bundle there would "
                            "replace it", fix="write the bundle elsewhere, e.g. output='model.pab'")

    check_mode(tune)
    sets = parse_device_sets(plans or [devices])
    base, sig, priced = import_and_price(model, example_inputs, dynamic_dims, sets, profiles, calibrate, progress)
    example_inputs = _fit_index_examples(example_inputs, sig, progress)
    if verify:
        from . import grounding

        with tempfile.TemporaryDirectory(prefix="polyarch-rounds-") as tmp:
            path, manifest = grounding.ground(model, example_inputs, base, sig, sets, pins, objective, solver, priced,
                                              tmp, jobs=jobs, progress=progress, extra_flags=iree_extra_flags, tune=tune)
            rewrite_bundle(path, output, manifest)  # with what was verified and measured
    else:
        manifest = build_bundle(partition(base, sets, pins, progress, objective, solver, priced), sig, output, jobs=jobs,
                                progress=progress, extra_flags=iree_extra_flags, tune=tune,
                                verification={"status": "not verified (verify=False / --no-verify)"})
    size = os.path.getsize(output)
    segs = sum(len(p["segments"]) for p in manifest["plans"])
    progress(f"wrote {output} ({size / 1e6:.1f} MB, {len(manifest['plans'])} plan(s), {segs} segments) in {time.time() - t0:.1f}s")
    return output


def _fit_index_examples(examples, sig, progress):
    """Example inputs used as indices must be valid ones: PyTorch raises IndexError on the
    others when the model is verified against it. Examples made from a DIMSxDTYPE spec (ints
    in [0, 100), the table's size unknown then) are folded into the range, said in the
    progress; the user's own arrays are refused with the value and the range."""
    import numpy as np

    from ..runtime.executor import first_out_of_range

    out = list(examples)
    for i, spec in enumerate(sig["inputs"]):
        r = spec.get("index_range")
        if r is None or i >= len(out) or isinstance(out[i], str):
            continue
        a = np.asarray(out[i].detach().cpu() if hasattr(out[i], "detach") else out[i])
        bad = first_out_of_range(a, r["min"], r["max"])
        if bad is None:
            continue
        if getattr(out[i], "polyarch_made_from_spec", False):
            n = r["max"] + 1 - max(r["min"], 0)
            out[i] = out[i] % n + max(r["min"], 0)
            progress(f"example input {i} ('{spec['name']}') made from its spec holds indices up to {int(a.max())}; "
                     f"{r['op']} takes {r['min']} to {r['max']}: verifying with them taken modulo {n}")
            continue
        raise PolyarchError(f"example input {i} ('{spec['name']}') holds {bad[0]} at {bad[1]}, "
                            f"outside the {r['min']} to {r['max']} that {r['op']} takes (PyTorch raises IndexError on it)",
                            fix=f"give example indices in [{r['min']}, {r['max']}]")
    return tuple(out)


