"""The setuptools hook: a Python project that declares [[tool.polyarch.bundle]] gets the
compiled bundle inside its wheel. Numerics: the shipped bundle against eager, atol 1e-5."""

import os
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import torch

import polyarch.runtime
from polyarch.tools import setuptools_hook as hook

MODEL = """
import torch


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(32, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))
"""


def make_project(root):
    (root / "src" / "mypkg").mkdir(parents=True)
    (root / "src" / "mypkg" / "__init__.py").write_text("")
    (root / "src" / "mypkg" / "model.py").write_text(MODEL)
    (root / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68", "polyarch[compiler]"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "mypkg"
        version = "1.0"

        [tool.setuptools.cmdclass]
        build_py = "polyarch.tools.setuptools_hook.build_py"

        [[tool.polyarch.bundle]]
        source = "src/mypkg/model.py"
        entry = "Model"
        inputs = ["4x32xf32"]
        devices = ["cpu"]
        output = "mypkg/model.pab"
    """))


def test_wheel_ships_the_compiled_bundle(tmp_path):
    proj = tmp_path / "proj"
    make_project(proj)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp_path / "dist"), str(proj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp_path / "dist").glob("mypkg-1.0-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        assert "mypkg/model.pab" in zf.namelist()
        (tmp_path / "model.pab").write_bytes(zf.read("mypkg/model.pab"))
    ns = {}
    exec(MODEL, ns)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    with torch.no_grad():
        ref = ns["Model"]()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(polyarch.runtime.load(tmp_path / "model.pab")(x), ref, atol=1e-5, rtol=0)


def test_bundles_are_rebuilt_only_when_inputs_or_options_change(tmp_path):
    proj = tmp_path / "proj"
    make_project(proj)
    lib, temp, said = tmp_path / "lib", tmp_path / "temp", []
    hook.build_bundles(str(proj), str(lib), str(temp), announce=said.append)
    first = os.path.getmtime(lib / "mypkg" / "model.pab")
    hook.build_bundles(str(proj), str(lib), str(temp), announce=said.append)
    assert said[-1] == "polyarch: mypkg/model.pab is up to date"
    time.sleep(1.1)
    (proj / "src" / "mypkg" / "model.py").write_text(MODEL + "\n# edited\n")
    hook.build_bundles(str(proj), str(lib), str(temp), announce=said.append)
    assert said[-1].startswith("polyarch: compiling") and os.path.getmtime(lib / "mypkg" / "model.pab") > first
    text = (proj / "pyproject.toml").read_text().replace('inputs = ["4x32xf32"]', 'inputs = ["2x32xf32"]')
    (proj / "pyproject.toml").write_text(text)
    hook.build_bundles(str(proj), str(lib), str(temp), announce=said.append)
    assert said[-1].startswith("polyarch: compiling")
    assert polyarch.runtime.load(lib / "mypkg" / "model.pab").inputs[0]["shape"] == [2, 32]


def test_bad_table_is_named(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[[tool.polyarch.bundle]]\nsource = "m.py"\ndevice = ["cpu"]\n')
    try:
        hook.bundles_of(str(tmp_path))
    except ValueError as e:
        assert "unknown keys ['device']" in str(e) and "pyproject.toml" in str(e)
    else:
        raise AssertionError("an unknown key was accepted")


def test_verify_and_calibrate_keys(tmp_path):
    table = {"source": "m.py", "output": "p/m.pab", "devices": ["cpu"], "verify": False, "calibrate": False}
    opts = hook.compile_options(table, str(tmp_path))
    assert opts.verify is False and opts.calibrate is False
    assert hook.compile_options(dict(table, verify=True, calibrate=True), str(tmp_path)).verify is True
    (tmp_path / "pyproject.toml").write_text('[[tool.polyarch.bundle]]\nsource = "m.py"\noutput = "m.pab"\nverify = "no"\n')
    try:
        hook.bundles_of(str(tmp_path))
    except ValueError as e:
        assert "'verify' must be true or false" in str(e)
    else:
        raise AssertionError("a non-boolean verify was accepted")
