"""Cost-model accuracy: predicted vs measured time of model segments, per device.

    .venv/bin/python bench/cost_model.py [--device cpu --device vulkan] [--profile FILE] [--quick]

1. Calibrates the devices (`polyarch calibrate`, in this run) unless --profile is given.
2. Cuts MLP, CNN, a GPT-style decoder block and MiniLM-L6 into contiguous segments of
   about equal predicted time, compiles each segment with IREE for each device, and
   times each segment alone on the device (inputs already there, median of repeats).
3. Compares with the prediction: sum of the ops' roofline times + the call overhead,
   under the built-in spec-sheet profiles and under the calibrated ones.

Reports Spearman rank correlation and median absolute percentage error (targets after
calibration: >= 0.9 and <= 25%). Writes out/bench/cost_model.json."""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

# (example module, input factory, segments per device)
MODELS = {
    "mlp": (lambda m: m.example_inputs(), 3),
    "cnn": (lambda m: m.example_inputs(), 4),
    "gpt_block": (lambda m: m.example_inputs(), 5),
    "minilm": (lambda m: m.example_inputs(batch=2, tokens=32), 8),
}


def np_dtype(et):
    from polyarch.compiler.modules import DTYPE_NAMES as _DTYPE_NAMES

    return np.dtype(_DTYPE_NAMES.get(et, "float32"))


def segment_module(name, device, chunks, profile_files):
    """Import the model and cut it into `chunks` segments for `device` -> (module, ir)."""
    import importlib

    from torch_mlir import ir

    from polyarch.compiler.importer import import_model
    from polyarch.passes.assign_devices import support_reason
    from polyarch.dialects import polyarch as pa
    from polyarch.passes import annotate_costs, outline_segments
    from polyarch.passes.common import element_types, main_func, placeable_ops, remat_set
    from polyarch.runtime.devices import DeviceSpec

    mod = importlib.import_module(name)
    model = mod.build()
    inputs = MODELS[name][0](mod)
    module, _ = import_model(model, inputs)
    spec = DeviceSpec.parse(device)
    other = f"{spec.kind}:1"
    host = "cpu:7" if spec.kind == "cpu" else "cpu"
    with module.context, ir.Location.unknown():
        annotate_costs.run(module, devices=[device], profile=profile_files)
        placed = placeable_ops(main_func(module))
        times = [op.attributes[pa.TIME_US][device].value for op in placed]
        remat = remat_set(main_func(module))
        ok = [support_reason(op, spec, remat) is None for op in placed]
        total = sum(ok)
        seen, last, flip = 0, None, False
        f64 = ir.F64Type.get()
        for op, t, good in zip(placed, times, ok):
            if good:
                k = min(chunks - 1, seen * chunks // total)  # about equal op counts per segment
                seen += 1
                if last is not None and k != last:
                    flip = not flip
                last = k
                label = other if flip else device
            else:
                label = host
            op.attributes[pa.DEVICE] = ir.StringAttr.get(label)
            op.attributes[pa.TIME_US] = ir.DictAttr.get({label: ir.FloatAttr.get(f64, t)})
        outline_segments.run(module)
    return module


def predicted_us(fn, prof):
    from polyarch.dialects import polyarch as pa
    from polyarch.passes.annotate_costs import op_seconds
    from polyarch.passes.common import body_ops

    ops, _ = body_ops(fn)
    t = sum(op_seconds(op, prof) for op in ops if pa.DEVICE in op.attributes)
    return (t + prof.call_s) * 1e6, sum(1 for op in ops if pa.DEVICE in op.attributes)


def measure_segments(name, device, chunks, profile_files, profs_by_label, progress):
    import iree.runtime as rt

    from polyarch.compiler.calibrate import _time
    from polyarch.compiler.build import compile_segments
    from polyarch.compiler.modules import segments_of
    from polyarch.dialects import polyarch as pa
    from polyarch.runtime.devices import DeviceSpec
    from polyarch.runtime.executor import create_device, take_module

    module = segment_module(name, device, chunks, profile_files)
    kind = DeviceSpec.parse(device).kind
    vmfbs = compile_segments(module)
    dev = create_device(device)
    rows = []
    for seg, label, fn in segments_of(module):
        if DeviceSpec.parse(label).kind != kind:
            continue
        ctx = rt.SystemContext(config=rt.Config(device=dev))
        ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, vmfbs[seg][0]))
        f = take_module(ctx)[seg]
        rng = np.random.default_rng(0)
        args = []
        for t in fn.type.inputs:
            shape, et = pa.tensor_info(t)
            dt = np_dtype(et)
            a = (rng.standard_normal(shape) * 0.1).astype(dt) if dt.kind == "f" else np.ones(shape, dt)
            args.append(rt.asdevicearray(dev, a))
        def call():
            r = f(*args)
            return [x._buffer_view for x in (r if isinstance(r, tuple) else (r,))]

        measured = _time(call, min_s=0.3, max_reps=30) * 1e6
        row = {"model": name, "device": device, "segment": seg, "measured_us": measured}
        for key, prof in profs_by_label.items():
            row[f"predicted_us_{key}"], row["ops"] = predicted_us(fn, prof)
        rows.append(row)
        progress(f"{name:10s} {device:7s} {seg:7s} {row['ops']:4d} ops  measured {measured / 1000:9.3f} ms  "
                 + "  ".join(f"{k} {row[f'predicted_us_{k}'] / 1000:9.3f} ms" for k in profs_by_label))
    return rows


def stats(rows, key):
    from scipy.stats import spearmanr

    pred = [r[f"predicted_us_{key}"] for r in rows]
    meas = [r["measured_us"] for r in rows]
    rho = float(spearmanr(pred, meas).statistic) if len(rows) > 2 else float("nan")
    ape = statistics.median(abs(p - m) / m for p, m in zip(pred, meas))
    return {"n": len(rows), "spearman": rho, "median_ape": ape}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", action="append", help="devices to measure (default: cpu, vulkan)")
    ap.add_argument("--profile", help="use this calibrated profile instead of calibrating in this run")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="quick calibration (fewer sizes)")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    devices = args.device or ["cpu", "vulkan"]
    os.makedirs(args.out, exist_ok=True)
    say = lambda m: print(m, flush=True)

    from polyarch.compiler import calibrate
    from polyarch.targets import profiles as P
    from polyarch.runtime.devices import DeviceSpec

    t0 = time.time()
    if args.profile:
        cal_path = args.profile
    else:
        cal_path = os.path.join(args.out, "profile.json")
        P.save(cal_path, calibrate.calibrate(devices, progress=say, quick=args.quick))
        say(f"calibrated {', '.join(devices)} in {time.time() - t0:.0f}s -> {cal_path}")
    rows = []
    for d in devices:
        cal = P.resolve([d], [cal_path])[d]
        profs = {"builtin": P.BUILTIN[DeviceSpec.parse(d).kind], "calibrated": cal}
        for name in args.models.split(","):
            rows += measure_segments(name, d, MODELS[name][1], [cal_path], profs, say)
    report = {"devices": devices, "profile": cal_path, "rows": rows, "summary": {}}
    say("")
    say(f"{'profile':11s} {'device':8s} {'segments':>8s} {'spearman':>9s} {'median err':>11s}")
    for key in ("builtin", "calibrated"):
        for d in devices + ["all"]:
            sel = [r for r in rows if d == "all" or r["device"] == d]
            s = stats(sel, key)
            report["summary"][f"{key}/{d}"] = s
            say(f"{key:11s} {d:8s} {s['n']:8d} {s['spearman']:9.3f} {s['median_ape'] * 100:10.1f}%")
    s = report["summary"]["calibrated/all"]
    say(f"targets after calibration: spearman >= 0.9: {'met' if s['spearman'] >= 0.9 else 'NOT met'}; "
        f"median error <= 25%: {'met' if s['median_ape'] <= 0.25 else 'NOT met'}")
    with open(os.path.join(args.out, "cost_model.json"), "w") as f:
        json.dump(report, f, indent=1)
    say(f"total {time.time() - t0:.0f}s; wrote {os.path.join(args.out, 'cost_model.json')}")


if __name__ == "__main__":
    main()
