"""The demo: compile all-MiniLM-L6-v2 for cpu + vulkan, inspect the bundle, run it, check it.

    make demo        (or: .venv/bin/python examples/demo.py)
"""

import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "out")
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, HERE)


def sh(*args):
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main():
    import torch

    import minilm

    os.makedirs(OUT, exist_ok=True)
    bundle = os.path.join(OUT, "minilm.pab")
    polyarch = os.path.join(BIN, "polyarch")
    sh(polyarch, "compile", os.path.join(HERE, "minilm.py"), "-d", "cpu", "-d", "vulkan", "-o", bundle)
    sh(polyarch, "inspect", bundle)

    import polyarch as pa

    ids, mask = minilm.example_inputs()
    run = pa.runtime.load(bundle)
    t = time.perf_counter()
    out = run(ids.numpy(), mask.numpy())
    ms = (time.perf_counter() - t) * 1000
    with torch.no_grad():
        ref = minilm.build()(ids, mask).numpy()
    err = float(np.abs(out - ref).max())
    print(f"demo: ran {bundle} on {', '.join(run.devices)} in {ms:.1f} ms; max |polyarch - torch eager| = {err:.2e}")
    if err > 1e-4:
        sys.exit(f"demo: FAILED, error {err:.2e} above 1e-4")
    print("demo: OK")


if __name__ == "__main__":
    main()
