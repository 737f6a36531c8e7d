"""The demo: compile all-MiniLM-L6-v2 for cpu + vulkan, inspect the bundle, run it, check it.

    make demo        (or: .venv/bin/python examples/demo.py)

1. The default compile for cpu + vulkan: the devices are identified and measured (once,
   then cached), the plan is verified and timed on them; the chosen plan is run, checked
   against PyTorch eager and timed next to the same model on the CPU alone.
2. A forced split (the last encoder layer's output block pinned to Vulkan), to show that
   numerics hold across devices. On a host whose Vulkan is a CPU emulation (lavapipe) this
   split is slower than the CPU alone: it is there for correctness, not speed.
"""

import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "out")
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, HERE)
SPLIT_PIN = "bert.encoder.layer.5.output=vulkan"


def sh(*args):
    print("$", " ".join(os.path.relpath(a) if os.path.isabs(a) else a for a in args), flush=True)
    subprocess.run(args, check=True)


def timed(run, args, reps=10):
    run(*args)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        run(*args)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def main():
    import torch

    import minilm
    import polyarch as pa

    os.makedirs(OUT, exist_ok=True)
    polyarch = os.path.join(BIN, "polyarch")
    model_file = os.path.join(HERE, "minilm.py")
    bundle, cpu_bundle, split_bundle = (os.path.join(OUT, n) for n in ("minilm.pab", "minilm_cpu.pab", "minilm_split.pab"))
    sh(polyarch, "compile", model_file, "-d", "cpu", "-d", "vulkan", "-o", bundle)
    sh(polyarch, "inspect", bundle)
    sh(polyarch, "compile", model_file, "-d", "cpu", "-q", "-o", cpu_bundle)

    ids, mask = minilm.example_inputs()
    args = (ids.numpy(), mask.numpy())
    with torch.no_grad():
        ref = minilm.build()(ids, mask).numpy()
    run = pa.runtime.load(bundle)
    out = run(*args)
    err = float(np.abs(out - ref).max())
    used = sorted({s["device"] for s in run.plan["segments"]})
    alone = pa.runtime.load(cpu_bundle)
    best = {}
    for b in (run, alone, alone, run):  # A B B A, best of two: neither is always timed first
        best[id(b)] = min(best.get(id(b), float("inf")), timed(b, args))
    chosen_ms, cpu_ms = best[id(run)], best[id(alone)]
    print(f"demo: chosen plan for cpu + vulkan runs on {' + '.join(used)}: {chosen_ms:.1f} ms a call "
          f"(measured at compile: {run.plan.get('measured_us', 0) / 1000:.1f} ms); cpu alone: {cpu_ms:.1f} ms "
          f"-> {chosen_ms / cpu_ms:.2f}x the best single device; max |polyarch - torch eager| = {err:.2e}")
    if err > 1e-4:
        sys.exit(f"demo: FAILED, error {err:.2e} above 1e-4")

    print(f"\ndemo: a forced split ({SPLIT_PIN}) to show numerics across devices; on a CPU-emulated Vulkan it is "
          "slower than the CPU alone")
    sh(polyarch, "compile", model_file, "-d", "cpu", "-d", "vulkan", "--pin", SPLIT_PIN, "-q", "-o", split_bundle)
    split = pa.runtime.load(split_bundle)
    out = split(*args)
    serr = float(np.abs(out - ref).max())
    devs = " -> ".join(s["device"] for s in split.plan["segments"])
    vk = split.plan["device_info"].get("vulkan", {}).get("identity") or {}
    print(f"demo: forced split {devs} on {vk.get('name', 'vulkan')} ({vk.get('type', '?')}): "
          f"{timed(split, args, reps=3):.1f} ms a call; max |polyarch - torch eager| = {serr:.2e}")
    if serr > 1e-4:
        sys.exit(f"demo: FAILED, split error {serr:.2e} above 1e-4")
    print("demo: OK")


if __name__ == "__main__":
    main()
