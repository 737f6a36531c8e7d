"""Dynamic dimensions (--dynamic-dim INPUT:DIM[:MAX][=NAME]): kept dynamic through torch-mlir,
the passes and IREE; the bundle runs any size from 1 to MAX there, against PyTorch eager.

Tolerances: f32 MLP 1e-5 absolute (as the static end-to-end tests); MiniLM 1e-4 (12-layer
encoder on two devices, as test_end_to_end)."""

import json

import numpy as np
import pytest
import torch

import polyarch
from polyarch.compiler import driver, importer
from polyarch.errors import PolyarchError
from polyarch.runtime import bundle as rb
from polyarch.runtime.bundle import BundleError
from conftest import ROOT, cli, eager, example

MLP_PINS = ["fc1=cpu", "fc2=vulkan", "fc3=cpu"]


@pytest.fixture(scope="module")
def mlp_dynamic(tmp_path_factory, mlp):
    model, (x,) = mlp
    out = tmp_path_factory.mktemp("dyn") / "mlp.pab"
    driver.compile(model, (x,), ["cpu", "vulkan"], output=str(out), pins=MLP_PINS, dynamic_dims=["input0:0:48"])
    return model, out


def test_mlp_any_batch_up_to_the_bound(mlp_dynamic):
    model, path = mlp_dynamic
    b = polyarch.runtime.load(path)
    assert [s["device"] for s in b.plan["segments"]] == ["cpu", "vulkan", "cpu"]
    for n in (1, 7, 32, 48):
        x = torch.randn(n, 256, generator=torch.Generator().manual_seed(n))
        out = b(x.numpy())
        assert out.shape == (n, 64)
        np.testing.assert_allclose(out, eager(model, (x,)), atol=1e-5, rtol=0)


def test_mlp_stream_of_mixed_batches(mlp_dynamic):
    model, path = mlp_dynamic
    b = polyarch.runtime.load(path)
    xs = [torch.randn(n, 256, generator=torch.Generator().manual_seed(n)) for n in (3, 48, 1, 20, 5)]
    outs = list(b.stream([(x,) for x in xs], depth=3))
    for x, out in zip(xs, outs):
        assert isinstance(out, torch.Tensor) and tuple(out.shape) == (x.shape[0], 64)
        np.testing.assert_allclose(out.numpy(), eager(model, (x,)), atol=1e-5, rtol=0)


def test_bound_and_static_dims_are_checked(mlp_dynamic):
    _, path = mlp_dynamic
    b = polyarch.runtime.load(path)
    with pytest.raises(BundleError, match=r"dimension 0 is 49; this bundle accepts 1 to 48 there.*--dynamic-dim x:0:MAX"):
        b(np.zeros((49, 256), np.float32))
    with pytest.raises(BundleError, match=r"expected \?x256xfloat32 \(dim 0: 1\.\.48\), got 4x255xfloat32"):
        b(np.zeros((4, 255), np.float32))


def test_manifest_and_inspect_show_the_dynamic_dim(mlp_dynamic):
    _, path = mlp_dynamic
    sig = rb.verify(str(path))["signature"]
    (inp,) = sig["inputs"]
    assert inp["shape"] == [32, 256]  # the example's size: costs are predicted there
    assert [(d["dim"], d["min"], d["max"]) for d in inp["dynamic"]] == [(0, 1, 48)]
    assert sig["outputs"][0]["dynamic"][0]["dim"] == 0
    r = cli("inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "x ?x256xfloat32 (dim 0: 1..48)" in r.stdout
    assert "output0 ?x64xfloat32" in r.stdout


def test_costs_are_predicted_at_the_example_size(mlp):
    """A dynamic plan's predicted time is the static plan's (sizes recorded at import), not
    that of a batch of 1."""
    model, (x,) = mlp
    static, _ = driver.plan(model, (x,), ["cpu", "vulkan"], pins=MLP_PINS)
    dynamic, _ = driver.plan(model, (x,), ["cpu", "vulkan"], pins=MLP_PINS, dynamic_dims=["input0:0"])
    small, _ = driver.plan(model, (x[:1],), ["cpu", "vulkan"], pins=MLP_PINS)
    t = lambda m: m.operation.attributes["polyarch.plan"]["predicted_us"].value
    assert t(dynamic) == pytest.approx(t(static), rel=0.02)
    assert t(dynamic) > 1.2 * t(small)
    assert "array<i64: 32, 1024>" in str(dynamic)  # polyarch.shapes of the hidden activations


def test_minilm_shared_batch(tmp_path, minilm):
    """On cpu: IREE 3.13's SPIR-V code for dynamic shapes runs MiniLM 16x slower than static
    on lavapipe (120 s a call), too slow for CI; the MLP above covers a Vulkan segment."""
    model, _ = minilm
    ex = example("minilm")
    out = tmp_path / "m.pab"
    driver.compile(model, ex.example_inputs(batch=4), ["cpu"], output=str(out),
                   dynamic_dims=["input_ids:0:8=batch", "attention_mask:0:8=batch"])
    b = polyarch.runtime.load(out)
    for n in (1, 3, 8):
        ids, mask = ex.example_inputs(batch=n, seed=n)
        got = b(ids, mask)
        assert tuple(got.shape) == (n, 64, 384)
        np.testing.assert_allclose(got.numpy(), eager(model, (ids, mask)), atol=1e-4, rtol=0)
    ids, _ = ex.example_inputs(batch=3)
    _, mask = ex.example_inputs(batch=4)
    with pytest.raises(BundleError, match=r"input 1 \('attention_mask'\) dimension 0 is 4 but input 0 dimension 0 is 3; "
                                          r"the model needs them equal \(both are batch\)"):
        b(ids, mask)


class FixedBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.ones(4, 3))

    def forward(self, x):
        return x + self.bias


def test_a_dimension_the_model_fixes_is_refused():
    with pytest.raises(PolyarchError, match=r"a dimension marked dynamic \(x:0\) cannot stay dynamic in FixedBatch.*"
                                            r"drop that --dynamic-dim"):
        importer.import_model(FixedBatch(), (torch.ones(4, 3),), ["x:0"])


@pytest.mark.parametrize("spec, message", [
    ("input0", r"bad dynamic dimension 'input0'.*INPUT:DIM\[:MAX\]\[=NAME\]"),
    ("input0:0:0", r"bad dynamic dimension"),
    ("y:0", r"the model has no input 'y'.*name one of x, or inputN"),
    ("input0:2", r"input 'x' has rank 2, no dimension 2"),
    ("x:0:2", r"the example's size 4 is above the bound 2"),
])
def test_bad_dynamic_dim_specs(spec, message):
    with pytest.raises(PolyarchError, match=message):
        importer.import_model(FixedBatch(), (torch.ones(4, 3),), [spec])


def test_same_name_needs_the_same_bound():
    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    with pytest.raises(PolyarchError, match=r"'n' was given the bound 8 before"):
        importer.import_model(Two(), (torch.ones(4, 3), torch.ones(4, 3)), ["a:0:8=n", "b:0:9=n"])


def test_cli_dynamic_dim_and_onnx_refusal(tmp_path):
    out = tmp_path / "mlp.pab"
    r = cli("compile", "examples/mlp.py", "-i", "8x256xf32", "--dynamic-dim", "input0:0:16", "-o", str(out), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "input 0 ('x') dimension 0 is dynamic: 1 up to 16 (symbol" in r.stderr
    assert "costs predicted at 8" in r.stderr
    np.save(tmp_path / "x.npy", np.ones((13, 256), np.float32))
    r = cli("run", str(out), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "y.npy").shape == (13, 64)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    r = cli("compile", str(onnx), "--dynamic-dim", "input0:0")
    assert r.returncode != 0 and "--dynamic-dim is not supported for ONNX models yet" in r.stderr

