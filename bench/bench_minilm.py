"""MiniLM-L6 (batch 4 x 64 tokens) on this machine's CPU, all in one run:
PyTorch eager, ONNX Runtime CPU, plain IREE (whole model, best CPU flags), polyarch bundle on cpu.

    .venv/bin/python bench/bench_minilm.py [--runs 30]

Prints the median latency of each and its ratio to plain IREE measured in the same run.
Targets (issue 2): polyarch cpu within 5% of plain IREE; faster than ONNX Runtime."""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))


def timeit(fn, runs, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    import torch

    import minilm
    import polyarch
    from polyarch.compiler.importer import import_model
    from polyarch.targets import iree_flags
    from polyarch.runtime.devices import DeviceSpec

    model = minilm.build()
    ids, mask = minilm.example_inputs()
    np_in = [ids.numpy(), mask.numpy()]
    tmp = tempfile.mkdtemp(prefix="polyarch-bench-")
    results = {}
    outputs = {}

    torch.set_num_threads(os.cpu_count())
    with torch.no_grad():
        outputs["torch eager"] = model(ids, mask).numpy()
        results["torch eager"] = timeit(lambda: model(ids, mask), args.runs)

    # ONNX Runtime on the same model.
    import onnxruntime as ort

    onnx_path = os.path.join(tmp, "minilm.onnx")
    torch.onnx.export(model, (ids, mask), onnx_path, input_names=["input_ids", "attention_mask"], dynamo=True, optimize=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": np_in[0], "attention_mask": np_in[1]}
    outputs["onnxruntime cpu"] = sess.run(None, feed)[0]
    results["onnxruntime cpu"] = timeit(lambda: sess.run(None, feed), args.runs)

    # Plain IREE: the same torch-mlir import, compiled whole with the best CPU flags.
    import iree.runtime as rt
    from iree.compiler.tools.binaries import find_tool

    module, _ = import_model(model, (ids, mask))
    src = os.path.join(tmp, "minilm.mlirbc")
    with open(src, "wb") as f:
        module.operation.write_bytecode(f)
    vmfb = os.path.join(tmp, "minilm.vmfb")
    flags = iree_flags(DeviceSpec.parse("cpu"))
    subprocess.run([find_tool("iree-compile"), src, "--iree-input-type=torch", *flags, "-o", vmfb], check=True)
    dev = rt.get_device("local-task")
    ctx = rt.SystemContext(config=rt.Config(device=dev))
    vm = rt.VmModule.mmap(ctx.instance, vmfb)
    ctx.add_vm_module(vm)
    f = ctx.modules[vm.name]["main"]
    outputs["plain IREE cpu"] = f(*np_in).to_host()
    results["plain IREE cpu"] = timeit(lambda: f(*np_in).to_host(), args.runs)

    # polyarch bundle on cpu.
    bundle = polyarch.compile(model, (ids, mask), devices=["cpu"], output=os.path.join(tmp, "minilm.pab"))
    run = polyarch.runtime.load(bundle)
    outputs["polyarch cpu"] = run(*np_in)
    results["polyarch cpu"] = timeit(lambda: run(*np_in), args.runs)

    base = results["plain IREE cpu"]
    print(f"MiniLM-L6 batch 4 x 64 tokens, {os.cpu_count()} cores, median of {args.runs} runs")
    print(f"{'engine':18s} {'ms':>9s} {'/ plain IREE':>13s} {'max|err| vs eager':>18s}")
    for k, v in results.items():
        err = float(np.abs(outputs[k] - outputs["torch eager"]).max())
        print(f"{k:18s} {v:9.2f} {v / base:13.3f} {err:18.2e}")
    print(f"polyarch cpu / plain IREE: {results['polyarch cpu'] / base:.3f} (target <= 1.05)")
    print(f"polyarch cpu / onnxruntime: {results['polyarch cpu'] / results['onnxruntime cpu']:.3f} (target < 1)")


if __name__ == "__main__":
    main()
