"""Plan quality: the partitioner's choice against every contiguous two-device split, measured.

    .venv/bin/python bench/plan_regret.py --profile out/bench/profile.json [--devices cpu,vulkan]

For each model small enough (MLP, CNN, the GPT-style block), with devices A and B:
every plan "ops [0, k) on A, [k, n) on B" for both orders and every cut k (a grid of
at most --cuts cuts on larger models; ops that cannot run on their side stay on the
other) is compiled to a real bundle and timed end to end (median of repeats), as is
the plan assign-devices chooses with the calibrated profile.

Reports regret = measured(chosen) / best measured (target <= 1.10) and chosen / best
single-device plan (target <= 1.05), and the rank correlation between predicted and
measured plan times. Writes out/bench/plan_regret.json."""

import argparse
import io
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


def clone(ir, module):
    buf = io.BytesIO()
    module.operation.write_bytecode(buf)
    return ir.Module.parse(buf.getvalue(), context=module.context)


def timed(bundle, args, min_s=0.4, max_reps=25):
    bundle(*args)  # warm-up
    ts, start = [], time.perf_counter()
    while len(ts) < 3 or (time.perf_counter() - start < min_s and len(ts) < max_reps):
        t = time.perf_counter()
        bundle(*args)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="calibrated profile (bench/cost_model.py writes one)")
    ap.add_argument("--devices", default="cpu,vulkan")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cuts", type=int, default=12, help="most cut points per model and order")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    A, B = args.devices.split(",")
    say = lambda m: print(m, flush=True)

    import importlib

    from scipy.stats import spearmanr
    from torch_mlir import ir

    from polyarch.compiler.bundle import write_bundle
    from polyarch.compiler.driver import build_manifest, compile_segments, plan_text
    from polyarch.compiler.importer import import_model
    from polyarch.passes.assign_devices import support_reason
    from polyarch.dialects import polyarch as pa
    from polyarch.passes import run_pipeline
    from polyarch.passes.common import element_types, main_func, placeable_ops
    from polyarch.runtime import load
    from polyarch.runtime.devices import DeviceSpec

    tmp = tempfile.mkdtemp(prefix="polyarch-regret-")
    report = {"devices": [A, B], "profile": args.profile, "models": {}}
    t0 = time.time()
    for name in args.models.split(","):
        mod = importlib.import_module(name)
        model = mod.build()
        ex = mod.example_inputs()
        base, sig = import_model(model, ex)
        np_args = [t.numpy() for t in ex]
        with base.context, ir.Location.unknown():
            placed = placeable_ops(main_func(base))
            n = len(placed)
            can = {}
            for d in (A, B):
                spec = DeviceSpec.parse(d)
                can[d] = [support_reason(op, spec) is None for op in placed]
        cuts = sorted(set(round(i * n / min(n, args.cuts)) for i in range(min(n, args.cuts) + 1)))
        plans = {}
        for first, second in ((A, B), (B, A)):
            for k in cuts:
                assign = tuple(
                    (first if i < k else second) if can[first if i < k else second][i] else (second if i < k else first)
                    for i in range(n)
                )
                if all(can[d][i] for i, d in enumerate(assign)):
                    plans.setdefault(assign, f"[0,{k}) on {first}, rest on {second}")
        results = []

        def build_and_time(label, pins):
            with base.context, ir.Location.unknown():
                m = clone(ir, base)
                ops = placeable_ops(main_func(m))
                if pins is not None:
                    for op, d in zip(ops, pins):
                        op.attributes[pa.PIN] = ir.StringAttr.get(d)
                run_pipeline(m, [("annotate-costs", {"devices": [A, B], "profile": [args.profile]}),
                                 ("assign-devices", {"devices": [A, B], "profile": [args.profile]}),
                                 ("outline-segments", {})])
                vmfbs = compile_segments(m)
                manifest = build_manifest(m, sig, vmfbs)
                members = {s["member"]: vmfbs[s["name"]][0] for s in manifest["segments"]}
                members["plan.mlir"] = plan_text(m).encode()
            path = os.path.join(tmp, f"{name}-{len(results)}.pab")
            write_bundle(path, manifest, members)
            b = load(path)
            secs = timed(b, np_args)
            row = {"plan": label, "measured_ms": secs * 1e3, "predicted_ms": manifest["plan"]["predicted_us"] / 1e3,
                   "segments": len(manifest["segments"]), "algorithm": manifest["plan"]["algorithm"],
                   "devices": sorted({s["device"] for s in manifest["segments"]})}
            results.append(row)
            say(f"{name:10s} {label:34s} {row['segments']:3d} seg  measured {row['measured_ms']:9.3f} ms  predicted {row['predicted_ms']:9.3f} ms")
            return row

        chosen = build_and_time("chosen by assign-devices", None)
        for assign, label in plans.items():
            build_and_time(label, assign)
        split_rows = results[1:]
        best = min(r["measured_ms"] for r in results)
        singles = [r for r in split_rows if len(r["devices"]) == 1]
        best_single = min(r["measured_ms"] for r in singles) if singles else float("nan")
        rho = float(spearmanr([r["predicted_ms"] for r in results], [r["measured_ms"] for r in results]).statistic)
        summary = {"plans": len(results), "chosen_ms": chosen["measured_ms"], "best_ms": best,
                   "regret": chosen["measured_ms"] / best, "vs_best_single": chosen["measured_ms"] / best_single,
                   "spearman_predicted_measured": rho, "chosen_devices": chosen["devices"]}
        report["models"][name] = {"summary": summary, "plans": results}
        say(f"{name}: regret {summary['regret']:.3f} (target <= 1.10), chosen / best single-device "
            f"{summary['vs_best_single']:.3f} (target <= 1.05), rank correlation of plan times {rho:.3f}")
    ok = all(m["summary"]["regret"] <= 1.10 and m["summary"]["vs_best_single"] <= 1.05 for m in report["models"].values())
    say(f"all targets {'met' if ok else 'NOT met'}; {time.time() - t0:.0f}s")
    with open(os.path.join(args.out, "plan_regret.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
