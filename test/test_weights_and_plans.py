"""Weights stored once (shared parameter archive) and several placement plans per bundle.

Numerics against PyTorch eager: atol 1e-4 (f32, cpu and lavapipe)."""

import logging
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import polyarch
from conftest import eager
from polyarch.compiler import parameters
from polyarch.errors import DeviceError
from polyarch.runtime import bundle as fmt

ATOL = 1e-4


class Use(torch.nn.Module):
    def __init__(self, w, transpose):
        super().__init__()
        self.w, self.transpose = w, transpose

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w) if self.transpose else torch.matmul(x, self.w)


class Tied(torch.nn.Module):
    """One weight matrix used by two submodules (as tied embeddings are)."""

    def __init__(self, d=256):
        super().__init__()
        w = torch.nn.Parameter(torch.randn(d, d) / d**0.5)
        self.first, self.mid, self.last = Use(w, True), torch.nn.Linear(d, d), Use(w, False)

    def forward(self, x):
        return self.last(torch.relu(self.mid(torch.relu(self.first(x)))))


def _weight_bytes(model):
    seen = {}
    for p in list(model.parameters()) + list(model.buffers()):
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def test_a_weight_used_by_two_segments_is_stored_once(tmp_path):
    torch.manual_seed(0)
    model, x = Tied().eval(), (torch.randn(8, 256),)
    path = str(tmp_path / "tied.pab")
    polyarch.compile(model, x, devices=["cpu", "vulkan"], pins=["first=vulkan", "last=cpu"],
                     output=path)
    m = fmt.verify(path)
    segs = m["plans"][0]["segments"]
    assert {s["device"] for s in segs} == {"cpu", "vulkan"}
    w_key = {k for s in segs for k in s.get("parameters", {}).get("keys", {}).values()}
    users = [s["name"] for s in segs if set(s.get("parameters", {}).get("keys", {}).values()) & w_key]
    # w is read by the vulkan segment (linear) and the cpu segment (matmul): two references, one copy
    p = m["parameters"]
    assert p["references"] > p["count"]
    assert len(users) >= 2
    assert m["members"]["weights.irpa"]["size"] < p["referenced_bytes"]
    out = polyarch.runtime.load(path)(*[t.numpy() for t in x])
    np.testing.assert_allclose(out, eager(model, x), atol=ATOL, rtol=0)


def test_bundle_size_is_weights_once_plus_code_for_three_plans(tmp_path, mlp):
    model, x = mlp
    path = str(tmp_path / "multi.pab")
    polyarch.compile(model, x, plans=[["cpu"], ["cpu", "vulkan"], ["vulkan"]], output=path)
    m = fmt.verify(path)
    assert [p["name"] for p in m["plans"]] == ["cpu", "cpu+vulkan", "vulkan"]
    code = sum(v["size"] for k, v in m["members"].items() if k.endswith(".vmfb"))
    raw = _weight_bytes(model)
    size = os.path.getsize(path)
    big = [p for p in model.parameters() if p.numel() * p.element_size() >= parameters.MIN_BYTES]
    assert m["parameters"]["count"] == len(big) == 5  # whatever the number of plans (fc3's bias is inline)
    assert size <= 1.05 * (raw + code), (size, raw, code)
    assert code < 0.2 * raw  # the modules hold code, not weights
    with zipfile.ZipFile(path) as zf:
        assert {"cpu/plan.mlir", "cpu+vulkan/plan.mlir", "vulkan/plan.mlir"} <= set(zf.namelist())
    for name in ("cpu", "vulkan"):
        b = polyarch.runtime.load(path, plan=name)
        assert b.plan_name == name and set(b.devices) == {name}
        np.testing.assert_allclose(b(x[0].numpy()), eager(model, x), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def fleet_bundle(tmp_path_factory, mlp):
    """Plans for a device this host lacks (cuda), for vulkan + cpu, and for cpu alone."""
    model, x = mlp
    path = str(tmp_path_factory.mktemp("fleet") / "fleet.pab")
    # the pin puts fc2 on vulkan in the vulkan+cpu plan (and does not apply to the others)
    polyarch.compile(model, x, plans=[["cuda", "cpu"], ["vulkan", "cpu"], ["cpu"]], pins=["fc2=vulkan"], output=path)
    return path


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_missing_device_falls_back_to_the_best_plan_that_fits_and_says_so(fleet_bundle, mlp):
    model, x = mlp
    m = fmt.read_manifest(fleet_bundle)
    assert {s["device"] for s in m["plans"][0]["segments"]} >= {"cuda"}
    logger, seen = logging.getLogger("polyarch.runtime"), Records()
    logger.addHandler(seen)
    try:
        b = polyarch.runtime.load(fleet_bundle, plan="cuda+cpu")
    finally:
        logger.removeHandler(seen)
    assert b.plan_name in ("vulkan+cpu", "cpu")
    assert "skipped 'cuda+cpu'" in b.choice and "device 'cuda' is not available" in b.choice
    assert any(r.levelno == logging.WARNING and "skipped 'cuda+cpu'" in r.getMessage() for r in seen.records)
    np.testing.assert_allclose(b(x[0].numpy()), eager(model, x), atol=ATOL, rtol=0)


def test_strict_makes_a_missing_device_an_error(fleet_bundle):
    with pytest.raises(DeviceError, match="plan 'cuda\\+cpu' of .* cannot run here: device 'cuda' is not available"):
        polyarch.runtime.load(fleet_bundle, plan="cuda+cpu", strict=True)
    with pytest.raises(DeviceError, match="has no plan 'tpu'.*choose one of: cuda\\+cpu, vulkan\\+cpu, cpu"):
        polyarch.runtime.load(fleet_bundle, plan="tpu")


def test_plan_choice_with_vulkan_hidden(fleet_bundle, tmp_path, mlp):
    """A host without Vulkan (the ICD list points nowhere): the cpu plan runs, via the CLI."""
    model, x = mlp
    m = fmt.read_manifest(fleet_bundle)
    vk = next(p for p in m["plans"] if p["name"] == "vulkan+cpu")
    assert "vulkan" in {s["device"] for s in vk["segments"]}
    np.save(tmp_path / "x.npy", x[0].numpy())
    env = dict(os.environ, VK_ICD_FILENAMES=str(tmp_path / "none.json"), VK_DRIVER_FILES=str(tmp_path / "none.json"))
    polyarch_cli = os.path.join(os.path.dirname(sys.executable), "polyarch")
    run = lambda *a: subprocess.run([polyarch_cli, "run", fleet_bundle, "-i", str(tmp_path / "x.npy"), *a],
                                    capture_output=True, text=True, env=env)
    r = run("--plan", "vulkan+cpu", "-o", str(tmp_path / "y.npy"))
    assert r.returncode == 0, r.stderr
    assert "running plan 'cpu'" in r.stdout and "skipped 'vulkan+cpu'" in r.stdout
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), eager(model, x), atol=ATOL, rtol=0)
    r = run("--plan", "vulkan+cpu", "--strict")
    assert r.returncode != 0 and "device 'vulkan' is not available" in r.stderr
