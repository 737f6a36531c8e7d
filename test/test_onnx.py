"""ONNX input: torch.onnx exports of the CNN and of MiniLM, compiled by polyarch, against
ONNX Runtime on the same file. Tolerance: atol 1e-4 (f32)."""

import os

import numpy as np
import pytest
import torch

import polyarch
from conftest import cli
from polyarch.errors import PolyarchError

ATOL = 1e-4


def export(model, inputs, path, names):
    torch.onnx.export(model, inputs, str(path), input_names=names, dynamo=True, optimize=True)
    return str(path)


def ort(path, feeds):
    import onnxruntime

    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_cnn_onnx_split_cpu_vulkan_matches_onnxruntime(tmp_path, cnn):
    model, x = cnn
    path = export(model, x, tmp_path / "cnn.onnx", ["x"])
    out = str(tmp_path / "cnn.pab")
    r = cli("compile", path, "-d", "cpu", "-d", "vulkan", "--pin", "torch.aten.convolution=vulkan", "-o", out)
    assert r.returncode == 0, r.stderr
    b = polyarch.runtime.load(out)
    # the convolutions on vulkan; the rest wherever measurement put it (moving tensors off lavapipe is slow)
    assert "vulkan" in {s["device"] for s in b.plan["segments"]}
    assert b.plan["verification"]["status"] == "verified"
    xs = x[0].numpy()
    np.testing.assert_allclose(b(xs), ort(path, {"x": xs}), atol=ATOL, rtol=0)


def test_minilm_onnx_matches_onnxruntime(tmp_path, minilm):
    model, (ids, mask) = minilm
    path = export(model, (ids, mask), tmp_path / "minilm.onnx", ["input_ids", "attention_mask"])
    b = polyarch.runtime.load(polyarch.compile(path, devices=["cpu"], output=str(tmp_path / "m.pab")))
    assert [i["name"] for i in b.inputs] == ["input_ids", "attention_mask"]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    np.testing.assert_allclose(b(ids.numpy(), mask.numpy()), ort(path, feeds), atol=ATOL, rtol=0)


def test_symbolic_dims_need_shapes_and_errors_name_the_input(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = str(tmp_path / "relu.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(PolyarchError, match="input 'x' of .* has symbolic dimension\\(s\\) batch.*--input"):
        polyarch.compile(path, output=str(tmp_path / "r.pab"))
    b = polyarch.runtime.load(polyarch.compile(path, ("3x8xf32",), output=str(tmp_path / "r.pab")))
    v = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)
    np.testing.assert_array_equal(b(v), np.maximum(v, 0))
    with pytest.raises(PolyarchError, match="no ONNX model"):
        polyarch.compile(str(tmp_path / "missing.onnx"))
