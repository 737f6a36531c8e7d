"""Verify and measure a compiled plan on the devices at hand.

For one plan of a bundle (compiled, not yet delivered):
1. A reference: the same partitioned module with every segment compiled for llvm-cpu,
   run on the example inputs; every tensor that crosses a segment boundary is kept.
2. Each segment whose device is present and not the CPU runs on the reference's inputs
   and is compared with the reference's outputs (error = max |out - ref| / max |ref|,
   tolerances by dtype below; integers and booleans must match exactly).
3. A segment that disagrees is narrowed down to its ops: a probe module returns every
   intermediate tensor of the segment on llvm-cpu, another holds one function per op for
   the device; each op runs alone on the reference's values of its operands. Ops out of
   tolerance are the culprits (if none is wrong alone, a fused kernel is: every op of the
   segment is then a culprit).
4. The whole plan runs on the example inputs and is compared with PyTorch eager (when the
   model is at hand) or the reference; the call and each segment are timed.

Nothing here changes the plan: compiler/grounding.py turns culprits into "measured wrong"
verdicts, re-plans and recompiles."""

import gc
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..files import temp_dir
from ..dialects import polyarch as pa
from ..runtime.devices import DeviceSpec
from .calibrate import time_median

if TYPE_CHECKING:
    from torch_mlir import ir

# max |out - ref| / max |ref| allowed per dtype; integer and bool tensors must be equal
TOLERANCE = {"float32": 1e-3, "float64": 1e-3, "float16": 1e-2, "bfloat16": 2e-2, "complex64": 1e-3, "complex128": 1e-3}


def tolerance(dtype: Any) -> float:
    return TOLERANCE.get(np.dtype(dtype).name if not isinstance(dtype, str) else dtype, 0.0)


def rel_error(out: Any, ref: Any) -> float:
    """max |out - ref| / max |ref| (0 for equal tensors; inf where shapes or NaNs differ).
    Integer and bool tensors: the fraction of elements that differ."""
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape:
        return float("inf")
    if ref.dtype.kind in "biu" or out.dtype.kind in "biu":
        return float(np.mean(out.astype(np.int64) != ref.astype(np.int64))) if ref.size else 0.0
    wide = np.complex128 if "c" in (out.dtype.kind, ref.dtype.kind) else np.float64
    o, r = out.astype(wide), ref.astype(wide)
    if not np.array_equal(np.isnan(o), np.isnan(r)):
        return float("inf")
    finite = ~np.isnan(r)  # NaN in either part of a complex value
    if not finite.any():
        return 0.0
    diff = np.abs(o[finite] - r[finite])
    if np.isinf(diff).any() or np.isnan(diff).any():
        return float("inf") if not np.array_equal(o[finite], r[finite]) else 0.0
    scale = max(float(np.abs(r[finite]).max()), 1e-30)
    return float(diff.max()) / scale


def reference_module(module: "ir.Module") -> "ir.Module":
    """A copy of a partitioned module whose segments all run on the CPU (the reference)."""
    from torch_mlir import ir

    from .modules import clone_module, segments_of

    with module.context, ir.Location.unknown():
        ref = clone_module(module)
        for _, _, fn in segments_of(ref):
            seg = pa.Segment.of(fn)
            pa.Segment(seg.name, "cpu", seg.predicted_us, fn).put()
        pa.set_devices(ref, ["cpu"])
    return ref


def _host_env(bundle, call):
    from ..runtime.executor import _OnDevice

    return {k: (bundle._to_host(v, call, k) if isinstance(v, _OnDevice) else v) for k, v in call.env.items()}


def _run_segment(bundle, step, env_in):
    """Run one schedule step of a loaded bundle on given host arrays -> (outputs, seconds)."""
    from ..runtime.executor import _Call

    def once():
        env = dict(env_in)
        call = _Call(time.perf_counter(), False)
        bundle._invoke(step, env, call, True)
        return [bundle._to_host(env[r], call, r) for r in step["results"]]

    outs = once()
    return outs, time_median(once, min_s=1.0, max_reps=10)


def verify_plan(module: "ir.Module", plan_name: str, bundle_path: str, inputs: list, expected: list | None,
                present: set, jobs: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Verify and time one plan of a written bundle. inputs: numpy example inputs;
    expected: eager outputs (list of arrays) or None; present: the devices this host has.
    -> record:
      {"status": "verified" | "wrong" | "not verified: ...", "against": ..., "segments": {name: {...}},
       "whole": {"max_rel_error", "tolerance", "against"}, "culprits": [...], "measured_us": float}"""
    from .modules import segments_of

    progress = progress or (lambda m: None)
    gc.collect()  # bundles of earlier rounds release their devices (a live lavapipe slows the CPU)
    segs = segments_of(module)
    devices = list(dict.fromkeys(d for _, d, _ in segs))
    missing = [d for d in devices if d not in present]
    if missing:
        return {"status": f"not verified: {', '.join(missing)} not on this host"}
    record = {"status": "verified", "segments": {}, "culprits": []}
    b = _load_plan(bundle_path, plan_name, devices)
    off_cpu = [n for n, d, _ in segs if DeviceSpec.parse(d).kind != "cpu"]
    with temp_dir(prefix="polyarch-verify-") as tmp:
        env_ref = None
        if off_cpu:
            env_ref = _reference_values(module, plan_name, b, inputs, tmp, jobs)
            record["against"] = "the same segments compiled for llvm-cpu" + (", and PyTorch eager" if expected else "")
        else:
            record["against"] = "PyTorch eager" if expected else "nothing (cpu only, no model at hand)"
        _check_segments(module, plan_name, b, [s for s in segs if s[0] in off_cpu], env_ref, record, tmp, progress)
        if record["status"] == "wrong" or not _check_whole(b, inputs, expected, env_ref, record):
            return record
        _time_plan(b, inputs, segs, record)
    return record


def _load_plan(bundle_path, plan_name, devices):
    from ..errors import PolyarchError
    from ..runtime.executor import Bundle

    try:
        return Bundle(bundle_path, plan=plan_name, strict=True)
    except (ValueError, RuntimeError) as e:  # IREE refused a module or its parameters
        raise PolyarchError(f"plan {plan_name} compiled but does not load on {', '.join(devices)}: "
                            f"{str(e).strip().splitlines()[0]}",
                            fix="report the model to polyarch; `--no-verify` writes the bundle without trying it") from e


def _reference_values(module, plan_name, b, inputs, tmp, jobs):
    """Every value of the plan's schedule as the same segments compute it on llvm-cpu."""
    from ..runtime.executor import Bundle
    from .build import build_bundle

    ref_path = os.path.join(tmp, "reference.pab")
    build_bundle([(plan_name, reference_module(module))], b.manifest["signature"], ref_path, jobs=jobs, externalize=False)
    ref = Bundle(ref_path)
    return _host_env(ref, ref._submit(inputs, wait_each=True))


def _check_segments(module, plan_name, b, segs, env_ref, record, tmp, progress):
    """Each off-CPU segment run alone on the reference's inputs and compared with the reference;
    a wrong one's culprit ops located (locate)."""
    steps = {st["segment"]: st for st in b.plan["schedule"] if st["op"] == "call"}
    for name, device, _ in segs:
        step = steps[name]
        outs, secs = _run_segment(b, step, {a: env_ref[a] for a in step["args"]})
        errs = [rel_error(o, env_ref[r]) for o, r in zip(outs, step["results"])]
        tols = [tolerance(env_ref[r].dtype) for r in step["results"]]
        bad = [i for i, (e, t) in enumerate(zip(errs, tols)) if not e <= t]
        worst = max(errs, default=0.0)
        record["segments"][name] = {"device": device, "max_rel_error": worst, "ok": not bad,
                                    "measured_us": round(secs * 1e6, 3)}
        progress(f"verify {plan_name}: {name} on {device}: max error {worst:.2e} of max output "
                 f"({'ok' if not bad else 'WRONG'}), {secs * 1e3:.3f} ms")
        if bad:
            record["status"] = "wrong"
            culprits = locate(module, name, device, [env_ref[a] for a in step["args"]], tmp, progress)
            record["culprits"].extend(dict(c, segment=name) for c in culprits)


def _check_whole(b, inputs, expected, env_ref, record):
    """The whole plan, end to end, against eager (else the llvm-cpu reference). -> ok."""
    b.trace = True
    outs = b(*inputs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    want = expected if expected is not None else (
        [env_ref[o] for o in b.plan["outputs"]] if env_ref is not None else None)
    if want is None:
        return True
    errs = [rel_error(o, w) for o, w in zip(outs, want)]
    tols = [tolerance(np.asarray(w).dtype) for w in want]
    ok = all(e <= t for e, t in zip(errs, tols))
    record["whole"] = {"max_rel_error": max(errs, default=0.0), "tolerance": max(tols, default=0.0), "ok": ok,
                       "against": "PyTorch eager" if expected is not None else "llvm-cpu reference"}
    if not ok:
        record["status"] = "wrong"
    return ok


def _time_plan(b, inputs, segs, record):
    """The plan timed per call (median) and per segment (from the trace)."""
    b.events = []
    seconds = time_median(lambda: b(*inputs), min_s=2.0, max_reps=20)
    per = {}
    for e in b.events:
        if e["kind"] == "segment":
            per.setdefault(e["name"], []).append(e["dur"])
    for name, device, _ in segs:
        entry = record["segments"].setdefault(name, {"device": device})
        if per.get(name):
            entry["measured_us"] = round(statistics.median(per[name]) * 1e6, 3)
    record["measured_us"] = round(seconds * 1e6, 3)


def locate(module: "ir.Module", seg_name: str, device: str, args: list, tmp: str,
           progress: Callable[[str], None] | None = None) -> list:
    """The ops of a segment that compute wrong on `device`, each run alone on reference
    values of its operands. -> [{"fingerprint", "op", "path", "max_rel_error"}]."""
    from torch_mlir import ir

    from ..passes.common import body_ops, describe, module_path, op_fingerprint, remat_set
    from ..passes.outline_segments import _needs, make_function, program_order
    from .modules import segments_of
    from ..targets import has_narrow_storage

    progress = progress or (lambda m: None)
    fn = next(f for n, _, f in segments_of(module) if n == seg_name)
    spec = DeviceSpec.parse(device)
    with module.context, ir.Location.unknown():
        ops, _ = body_ops(fn)
        remat = remat_set(fn)
        computed = [op for op in ops if op.operation not in remat]
        placed = [op for op in computed if pa.is_placed(op) and any(pa.is_tensor(r) for r in op.results)]
        # llvm-cpu: every intermediate tensor of the segment on the segment's inputs
        trace_vals = [r for op in computed for r in op.results if pa.is_tensor(r)]
        trace = ir.Module.create()
        make_function(ir, "trace", list(fn.regions[0].blocks[0].arguments), trace_vals, ops, False,
                      ir.InsertionPoint(trace.body))
        # the device: one function per op, its operands as arguments (each a segment argument or
        # an intermediate of the trace), with what identifies the op in a culprit record
        probe = ir.Module.create()
        index = {v: ("val", k) for k, v in enumerate(trace_vals)}
        index.update({a: ("arg", k) for k, a in enumerate(fn.regions[0].blocks[0].arguments)})
        probes = []
        for i, op in enumerate(placed):
            inputs, glue = _needs(ir, [op], remat)
            outs = [r for r in op.results if pa.is_tensor(r)]
            make_function(ir, f"op{i}", inputs, outs, program_order(glue + [op], ops), not has_narrow_storage(spec),
                          ir.InsertionPoint(probe.body))
            probes.append({"inputs": [index[v] for v in inputs], "outputs": [index[v][1] for v in outs],
                           "record": {"fingerprint": op_fingerprint(op), "op": op.operation.name, "path": module_path(op),
                                      "describe": describe(op)}})
    progress(f"verify: narrowing {seg_name} on {device} down to its {len(probes)} op(s): the reference trace on llvm-cpu")
    (ref_vals,) = _run_module(trace, DeviceSpec.parse("cpu"), [("trace", args)], tmp, "trace", progress)
    progress(f"verify: narrowing {seg_name}: one probe per op for {device}")
    dev_outs = _run_module(probe, spec, [(f"op{i}", [args[k] if src == "arg" else ref_vals[k] for src, k in p["inputs"]])
                                         for i, p in enumerate(probes)], tmp, "probe", progress)
    culprits = []
    for p, got in zip(probes, dev_outs):
        worst = max((rel_error(g, ref_vals[k]) for g, k in zip(got, p["outputs"])), default=0.0)
        if not worst <= min(tolerance(ref_vals[k].dtype) for k in p["outputs"]):
            culprits.append(dict(p["record"], max_rel_error=worst))
            progress(f"verify: {p['record']['describe']} computes wrong on {device} (max error {worst:.2e} of max output)")
    if not culprits:  # no op is wrong alone: the segment's fused code is; keep all of it off the device
        progress(f"verify: no op of {seg_name} is wrong alone on {device}; keeping the whole segment off it")
        culprits = [dict(p["record"], max_rel_error=None, fused=True) for p in probes]
    return culprits


def _run_module(module, spec, calls, tmp, tag, progress=None):
    """Compile a probe module for a device and run it, saying how far it is (compiled, then
    every tenth of the calls). calls: [(function, arguments)] -> each call's outputs (a list of host arrays)."""
    import iree.runtime as rt

    from ..runtime.executor import to_host
    from .tuning import _compile, _load_module

    progress = progress or (lambda m: None)
    t0 = time.perf_counter()
    out, err = _compile(module, spec.name, tmp, f"{tag}.{spec.kind}")
    progress(f"verify:   {tag} compiled for {spec.name} in {time.perf_counter() - t0:.1f} s; running {len(calls)} call(s)")
    if err:
        from ..errors import PolyarchError

        raise PolyarchError(f"IREE could not compile a verification probe for {spec.name}: {err}")
    dev, mod = _load_module(spec.name, out)

    def call(name, args):
        res = mod[name](*[rt.asdevicearray(dev, np.asarray(a, order="C")) for a in args])
        res = res if isinstance(res, (tuple, list)) else [res]
        return [to_host(dev, x) for x in res]

    results, t0, step = [], time.perf_counter(), max(1, len(calls) // 10)
    for i, (name, args) in enumerate(calls):
        results.append(call(name, args))
        if len(calls) > 1 and ((i + 1) % step == 0 or i + 1 == len(calls)):
            progress(f"verify:   {tag} on {spec.name}: {i + 1}/{len(calls)} run ({time.perf_counter() - t0:.1f} s)")
    return results
