"""Pipelined throughput (Bundle.stream) against sequential calls, on a two-device plan.

    .venv/bin/python bench/stream.py [--devices vulkan,cpu] [--requests 200] [--d 512]

A stack of 8 Linear+ReLU layers, the first --split pinned to the first device and the rest
to the second (two segments, one transfer between them per call). Measures, in one process
and alternating (sequential, stream, sequential, stream ...), requests per second for
  sequential   [b(x) for x in xs]             each segment runs to completion in turn
  stream(d)    list(b.stream(xs, depth=d))     async calls chained with fences
and reports each stream figure as a ratio to the sequential one measured in the same run.
The stage times (per-device seconds per call, from b.counters) say what overlap can give
at most: sequential = stage1 + stage2 + transfers, pipelined >= max(stage1, stage2)."""

import argparse
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def build(path, devices, d, batch, split):
    import torch

    import polyarch

    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(d, d), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).eval()
    first, second = devices
    pins = [f"{i}={first}" for i in range(0, 2 * split)] + [f"{i}={second}" for i in range(2 * split, 16)]
    polyarch.compile(model, (torch.randn(batch, d),), devices=[first, second], pins=pins, output=path, progress=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="vulkan,cpu")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--split", type=int, default=1,
                    help="layers on the first device (of 8); 1 roughly balances lavapipe against the CPU")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    import numpy as np

    import polyarch.runtime

    devices = args.devices.split(",")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"stream-{'-'.join(devices)}-{args.d}-{args.split}.pab")
    if not os.path.exists(path):
        build(path, devices, args.d, args.batch, args.split)
    b = polyarch.runtime.load(path)
    print(f"plan: {' -> '.join(s['device'] for s in b.plan['segments'])}")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((args.batch, args.d)).astype(np.float32) for _ in range(args.requests)]
    for x in xs[:10]:
        b(x)  # warm-up
    b.reset_counters()
    for x in xs[:50]:
        b(x)
    c = b.counters
    stages = {d: t / c["calls"] * 1e3 for d, t in c["segment_seconds"].items()}
    moved = c["transfer_seconds"] / c["calls"] * 1e3
    print("sequential stage times per call: " + ", ".join(f"{d} {t:.3f} ms" for d, t in stages.items())
          + f", transfers {moved:.3f} ms")
    ref = [b(x) for x in xs[:5]]
    for depth in (2, 4):
        got = list(b.stream(xs[:5], depth=depth))
        assert all(np.array_equal(g, r) for g, r in zip(got, ref)), "stream and sequential outputs differ"
    rates = {"sequential": [], "stream(2)": [], "stream(4)": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        for x in xs:
            b(x)
        rates["sequential"].append(len(xs) / (time.perf_counter() - t))
        for depth in (2, 4):
            t = time.perf_counter()
            for _ in b.stream(xs, depth=depth):
                pass
            rates[f"stream({depth})"].append(len(xs) / (time.perf_counter() - t))
    base = statistics.median(rates["sequential"])
    report = {"devices": devices, "split": args.split, "requests": len(xs), "rounds": args.rounds, "stage_ms": stages, "transfer_ms": moved}
    for k, v in rates.items():
        med = statistics.median(v)
        report[k] = {"req_per_s": med, "ratio": med / base}
        print(f"{k:11s} {med:8.1f} req/s  ({med / base:.3f} x sequential; rounds: {', '.join(f'{r:.1f}' for r in v)})")
    bound = (sum(stages.values()) + moved) / max(stages.values())
    print(f"upper bound from stage times (sequential / slowest stage): {bound:.2f} x")
    report["bound"] = bound
    with open(os.path.join(args.out, "stream.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
