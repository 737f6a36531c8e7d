"""Plan quality: the partitioner's choice against every contiguous two-device split, measured.

    .venv/bin/python bench/plan_regret.py --profile out/bench/profile.json [--devices cpu,vulkan]

For each model small enough (MLP, CNN, the GPT-style block), with devices A and B:
every plan "ops [0, k) on A, [k, n) on B" for both orders and every cut k (a grid of
at most --cuts cuts on larger models; ops that cannot run on their side stay on the
other) is compiled to a real bundle and timed end to end (median of repeats, best of two
passes in opposite orders), as is the plan assign-devices chooses with the calibrated
profile (a split with the chosen placement is that same bundle, timed once).

Reports regret = measured(chosen) / best measured (target <= 1.10) and chosen / best
single-device plan (target <= 1.05), and the rank correlation between predicted and
measured plan times. Writes out/bench/plan_regret.json.

For a host without the compiler (e.g. a GPU box): `--export DIR` builds the bundles and
DIR/plans.json here; `--measure DIR` there times them with the runtime alone."""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

MODELS = ("mlp", "cnn", "gpt_block")


def timed(bundle, args, min_s=0.5, max_reps=300):
    bundle(*args)  # warm-up
    ts, start = [], time.perf_counter()
    while len(ts) < 3 or (time.perf_counter() - start < min_s and len(ts) < max_reps):
        t = time.perf_counter()
        bundle(*args)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def build_plans(args, outdir, say):
    """Compile the chosen plan and every contiguous split of each model -> [plan rows]."""
    import importlib

    from torch_mlir import ir

    from polyarch.compiler.build import build_bundle
    from polyarch.compiler.modules import clone_module
    from polyarch.compiler.importer import import_model
    from polyarch.dialects import polyarch as pa
    from polyarch.passes import run_pipeline
    from polyarch.passes.assign_devices import support_reason
    from polyarch.passes.common import main_func, placeable_ops, remat_set
    from polyarch.runtime.devices import DeviceSpec

    A, B = args.devices.split(",")
    rows = []
    for name in args.models.split(","):
        mod = importlib.import_module(name)
        model, ex = mod.build(), mod.example_inputs()
        base, sig = import_model(model, ex)
        inputs = []
        for i, t in enumerate(ex):
            inputs.append(f"{name}-in{i}.npy")
            np.save(os.path.join(outdir, inputs[-1]), t.numpy())
        with base.context, ir.Location.unknown():
            placed = placeable_ops(main_func(base))
            n = len(placed)
            remat = remat_set(main_func(base))
            can = {d: [support_reason(op, DeviceSpec.parse(d), remat) is None for op in placed] for d in (A, B)}
        cuts = sorted(set(round(i * n / min(n, args.cuts)) for i in range(min(n, args.cuts) + 1)))
        plans = {None: "chosen by assign-devices"}
        for first, second in ((A, B), (B, A)):
            for k in cuts:
                assign = tuple(
                    (first if i < k else second) if can[first if i < k else second][i] else (second if i < k else first)
                    for i in range(n)
                )
                if all(can[d][i] for i, d in enumerate(assign)):
                    plans.setdefault(assign, f"[0,{k}) on {first}, rest on {second}")
        chosen_placement = None
        for pins, label in plans.items():
            if pins is not None and pins == chosen_placement:
                rows[-len([r for r in rows if r["model"] == name])]["plan"] += f" (= {label})"
                continue  # the same placement as the chosen plan: one bundle, timed once
            with base.context, ir.Location.unknown():
                m = clone_module(base)
                if pins is not None:
                    for op, d in zip(placeable_ops(main_func(m)), pins):
                        op.attributes[pa.PIN] = ir.StringAttr.get(d)
                run_pipeline(m, [("annotate-costs", {"devices": [A, B], "profile": [args.profile]}),
                                 ("assign-devices", {"devices": [A, B], "profile": [args.profile]})])
                if pins is None:
                    chosen_placement = tuple(op.attributes[pa.DEVICE].value for op in placeable_ops(main_func(m)))
                run_pipeline(m, [("outline-segments", {})])
                bundle = f"{name}-{len([r for r in rows if r['model'] == name])}.pab"
                manifest = build_bundle([(None, m)], sig, os.path.join(outdir, bundle))["plans"][0]
            rows.append({"model": name, "plan": label, "bundle": bundle, "inputs": inputs,
                         "predicted_ms": manifest["plan"]["predicted_us"] / 1e3, "segments": len(manifest["segments"]),
                         "algorithm": manifest["plan"]["algorithm"], "devices": sorted({s["device"] for s in manifest["segments"]})})
            say(f"built {name:10s} {label:34s} {rows[-1]['segments']:3d} seg  predicted {rows[-1]['predicted_ms']:9.3f} ms")
    return rows


def measure(rows, outdir, say, rounds=2):
    """Time every plan in `rounds` passes (forward, then backward order) and keep each
    plan's best median: the first plans timed in a process run slower (warm-up of
    threads, caches, clocks), which would otherwise bias the comparison by order."""
    import gc

    from polyarch.runtime import load

    for k in range(rounds):
        order = rows if k % 2 == 0 else rows[::-1]
        for r in order:
            b = load(os.path.join(outdir, r["bundle"]))
            ms = timed(b, [np.load(os.path.join(outdir, p)) for p in r["inputs"]]) * 1e3
            r.setdefault("measured_rounds_ms", []).append(ms)
            r["measured_ms"] = min(r["measured_rounds_ms"])
            # Release the bundle's devices before the next plan: a live lavapipe device slows
            # CPU work in the same process about 3x (measured), which would bias later plans.
            del b
            gc.collect()
    for r in rows:
        say(f"{r['model']:10s} {r['plan']:34s} {r['segments']:3d} seg  measured {r['measured_ms']:9.3f} ms  "
            f"predicted {r['predicted_ms']:9.3f} ms")


def summarise(rows, say):
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        chosen = next(r for r in rs if r["plan"].startswith("chosen"))
        best = min(r["measured_ms"] for r in rs)
        singles = [r for r in rs if len(r["devices"]) == 1]
        best_single = min(r["measured_ms"] for r in singles) if singles else float("nan")
        s = {"plans": len(rs), "chosen_ms": chosen["measured_ms"], "chosen_devices": chosen["devices"],
             "best_ms": best, "best_plan": min(rs, key=lambda r: r["measured_ms"])["plan"],
             "regret": chosen["measured_ms"] / best, "vs_best_single": chosen["measured_ms"] / best_single,
             "spearman_predicted_measured": spearman([r["predicted_ms"] for r in rs], [r["measured_ms"] for r in rs])}
        out[name] = s
        say(f"{name}: chosen {'+'.join(s['chosen_devices'])} {s['chosen_ms']:.3f} ms; best: {s['best_plan']} "
            f"{s['best_ms']:.3f} ms; regret {s['regret']:.3f} (target <= 1.10); chosen / best single-device "
            f"{s['vs_best_single']:.3f} (target <= 1.05); rank correlation of plan times {s['spearman_predicted_measured']:.3f}")
    ok = all(s["regret"] <= 1.10 and s["vs_best_single"] <= 1.05 for s in out.values())
    say(f"all targets {'met' if ok else 'NOT met'}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", help="calibrated profile (bench/cost_model.py writes one)")
    ap.add_argument("--devices", default="cpu,vulkan")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cuts", type=int, default=12, help="most cut points per model and order")
    ap.add_argument("--export", metavar="DIR", help="only build the bundles (and DIR/plans.json)")
    ap.add_argument("--measure", metavar="DIR", help="only time the bundles of an --export folder")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    say = lambda m: print(m, flush=True)
    t0 = time.time()
    if args.measure:
        with open(os.path.join(args.measure, "plans.json")) as f:
            meta = json.load(f)
        rows, outdir = meta["plans"], args.measure
    else:
        if not args.profile:
            ap.error("--profile is required unless --measure is given")
        outdir = args.export or tempfile.mkdtemp(prefix="polyarch-regret-")
        os.makedirs(outdir, exist_ok=True)
        rows = build_plans(args, outdir, say)
        meta = {"devices": args.devices.split(","), "profile": args.profile, "plans": rows}
        if args.export:
            with open(os.path.join(outdir, "plans.json"), "w") as f:
                json.dump(meta, f, indent=1)
            say(f"exported {len(rows)} bundles to {outdir} in {time.time() - t0:.0f}s")
            return
    measure(rows, outdir, say)
    meta["summary"] = summarise(rows, say)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan_regret.json"), "w") as f:
        json.dump(meta, f, indent=1)
    say(f"{time.time() - t0:.0f}s; wrote {os.path.join(args.out, 'plan_regret.json')}")


if __name__ == "__main__":
    main()
