"""The CLI as a user runs it: real subprocesses of the installed console scripts."""

import os

import numpy as np
import pytest

from conftest import EXAMPLES, cli as polyarch


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mlp.pab"
    r = polyarch("compile", os.path.join(EXAMPLES, "mlp.py"), "--input", "32x256xf32", "-d", "cpu", "-d", "vulkan",
                 "--pin", "fc3=cpu", "--pin", "fc2=vulkan", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "compiled seg_0" in r.stderr and f"wrote {out}" in r.stderr
    return out


def test_run_with_npy_files_matches_eager(mlp_bundle, tmp_path):
    import torch

    from conftest import example

    mlp = example("mlp")

    model, (x,) = mlp.build(), mlp.example_inputs()
    np.save(tmp_path / "x.npy", x.numpy())
    r = polyarch("run", str(mlp_bundle), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "-n", "3")
    assert r.returncode == 0, r.stderr
    assert "output 0: 32x64xfloat32" in r.stdout and "median" in r.stdout
    with torch.no_grad():
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(x).numpy(), atol=1e-4, rtol=0)


def test_inspect(mlp_bundle):
    r = polyarch("inspect", str(mlp_bundle))
    assert r.returncode == 0, r.stderr
    for text in ("inputs:  x 32x256xfloat32", "plan 'cpu+vulkan' over cpu, vulkan", "weights: weights.irpa", "seg_0", "vulkan", "predicted", "each matching the SHA-256 its manifest lists"):
        assert text in r.stdout


def test_plan_explains_without_compiling():
    r = polyarch("plan", os.path.join(EXAMPLES, "cnn.py"), "-d", "cpu", "-d", "vulkan", "--pin", "head=cpu", "--ops")
    assert r.returncode == 0, r.stderr
    assert "exact: enumeration of all placements" in r.stdout  # 14 placeable ops, the head pinned
    assert "pinned by user (head=cpu)" in r.stdout
    assert "torch.aten.convolution (conv1)" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["compile", "examples/mlp.py", "-d", "tpu"], "Error: unknown device kind 'tpu' in 'tpu'. Fix: a device is KIND"),
    (["compile", "examples/mlp.py", "-i", "32x256xq7"], "Error: bad input spec '32x256xq7'"),
    (["compile", "nope.py"], "Error: no model file 'nope.py'"),
    (["run", "missing.pab"], "Error: no bundle at 'missing.pab'"),
])
def test_errors_are_one_line(args, msg):
    r = polyarch(*args, cwd=os.path.dirname(EXAMPLES))
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip() and "Warning" not in l and "warn" not in l]
    assert lines[-1].startswith(msg), r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_bundle_one_line(tmp_path):
    bad = tmp_path / "x.pab"
    bad.write_bytes(b"not a zip")
    r = polyarch("inspect", str(bad))
    assert r.returncode != 0 and "is not a polyarch bundle" in r.stderr and "Traceback" not in r.stderr


def test_help_teaches():
    r = polyarch("compile", "--help")
    assert "KIND[:ORDINAL][@ARCH]" in r.stdout and "Examples:" in r.stdout and "--pin" in r.stdout


def test_run_trace_and_counters(mlp_bundle, tmp_path):
    import json

    trace = tmp_path / "run.json"
    r = polyarch("run", str(mlp_bundle), "-n", "2", "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    assert "per call:" in r.stdout and "MB moved" in r.stdout
    data = json.loads(trace.read_text())
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {e["args"]["call"] for e in xs} == {0, 1}
    segs = [e for e in xs if e["cat"] == "segment"]
    names = {e["args"]["name"] for e in data["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"cpu", "vulkan"} <= names
    from polyarch.runtime.bundle import read_manifest

    assert len(segs) == 2 * len(read_manifest(mlp_bundle)["plans"][0]["segments"])  # every segment, every call
    moves = [e for e in xs if e["cat"] == "transfer"]
    assert moves and all(e["args"]["bytes"] > 0 for e in moves)
    assert data["otherData"]["counters"]["calls"] == 2


def test_inspect_ops_names_source_lines(mlp_bundle):
    r = polyarch("inspect", str(mlp_bundle), "--ops")
    assert r.returncode == 0, r.stderr
    # the model's own line, not torch's (nn.Linear's forward for every Linear)
    assert "torch.aten.mm (fc2) at " in r.stdout and "linear.py" not in r.stdout
    assert "torch.aten.relu at " in r.stdout and "mlp.py:14" in r.stdout
