"""The staged driver (compiler/driver.py) and its one options object (compiler/options.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import polyarch
from polyarch.compiler.driver import import_model
from polyarch.compiler.options import CompileOptions
from polyarch.errors import PolyarchError


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_stages_plan_twice_on_one_import_and_write(tmp_path):
    m, x = MLP().eval(), torch.randn(4, 32)
    fast = CompileOptions(devices=("cpu",), tune="none", verify=False, calibrate=False)
    imported = import_model(m, (x,), fast)
    assert imported.signature["inputs"][0]["shape"] == [4, 32]
    one = imported.plan()
    assert 'polyarch.device = "cpu"' in one.as_text()
    assert any("seg_0" in line for line in one.explain().lines(explain=True))
    # another plan from the same import: the imported module is left as it was
    two = imported.plan(CompileOptions(devices=("cpu", "cpu:1"), pins=("fc2=cpu:1",), tune="none", verify=False,
                                       calibrate=False))
    assert 'polyarch.device = "cpu:1"' in two.as_text() and len(two.plans) == 1
    assert "polyarch.device" not in str(imported.module)
    path = two.write(str(tmp_path / "m.pab"))
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(polyarch.runtime.load(path)(x.numpy()), ref, atol=1e-5, rtol=0)
    # dynamic dims are fixed at import
    with pytest.raises(PolyarchError, match="dynamic_dims differ from the import's"):
        imported.plan(CompileOptions(dynamic_dims=("input0:0:8",)))


def test_compile_options_json_round_trip_and_refusals(tmp_path):
    o = CompileOptions(plans=(("vulkan", "cpu"), ("cpu",)), pins=("fc1=cpu",), tune="none", iree_flags=("--x=1",))
    path = tmp_path / "o.json"
    o.save(str(path))
    assert "devices" not in json.loads(path.read_text())  # plans say where the plans run
    assert CompileOptions.load(str(path)) == o
    for bad, said in [({"device": ["cpu"]}, r"unknown option\(s\) \['device'\]"),
                      ({"devices": "cpu"}, "'devices' must be a list"),
                      ({"devices": ["cpu"], "plans": [["cpu"]]}, "give devices or plans, not both"),
                      ({"verify": "no"}, "'verify' must be true or false"),
                      ({"tune": "fast"}, "'tune' must be"),
                      ({"iree_flags": ["O3"]}, "iree flag 'O3' is not a flag"),
                      ({"jobs": 0}, "jobs=0")]:
        with pytest.raises(PolyarchError, match=said):
            CompileOptions.from_json(bad, "t.json")
    with pytest.raises(PolyarchError, match="one string"):
        CompileOptions(devices="cpu")
    with pytest.raises(PolyarchError, match="unknown tuning mode 'fast'"):
        CompileOptions(tune="fast")


def test_cli_reads_an_options_file_and_refuses_flags_beside_it(tmp_path):
    opts = tmp_path / "o.json"
    opts.write_text(json.dumps({"devices": ["cpu"], "tune": "none", "verify": False, "calibrate": False}))
    model = tmp_path / "m.py"
    model.write_text("import torch\n\nclass Model(torch.nn.Module):\n    def forward(self, x):\n        return x * 2\n")
    cli = [sys.executable, "-m", "polyarch.tools.cli", "compile", str(model), "-i", "2x3xf32", "-q"]
    r = subprocess.run(cli + ["--options", str(opts), "--tune", "none"], capture_output=True, text=True)
    assert r.returncode == 1 and "--options and --tune both given" in r.stderr, r.stderr
    out = tmp_path / "m.pab"
    r = subprocess.run(cli + ["--options", str(opts), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    b = polyarch.runtime.load(out)
    assert b.manifest["plans"][0]["verification"]["status"].startswith("not verified")
    np.testing.assert_array_equal(b(np.ones((2, 3), np.float32)), np.full((2, 3), 2, np.float32))
