"""CMake integration: install the polyarch package, then configure, build and test the
consumer project in test/cmake/ (a copy, so that files can be touched). Checks that the
build re-runs the compile only when the model, a module it imports, or the options change.
Numerics: the bundle against PyTorch eager, atol 1e-5 (f32, cpu)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

CMAKE = shutil.which("cmake") or "cmake"  # scripts/setup.sh installs it
POLYARCH = os.path.join(os.path.dirname(sys.executable), "polyarch")


def sh(*cmd, cwd=None):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmake")
    sh(CMAKE, "-S", ROOT, "-B", tmp / "pkg", f"-DPOLYARCH_EXECUTABLE={POLYARCH}")
    sh(CMAKE, "--install", tmp / "pkg", "--prefix", tmp / "prefix")
    assert (tmp / "prefix" / "lib" / "cmake" / "polyarch" / "polyarchConfig.cmake").exists()
    src = tmp / "src"
    shutil.copytree(os.path.join(ROOT, "test", "cmake"), src)
    build = tmp / "build"
    sh(CMAKE, "-S", src, "-B", build, f"-DCMAKE_PREFIX_PATH={tmp / 'prefix'}")
    return src, build


def build_and_stamp(build):
    out = sh(CMAKE, "--build", build)
    return out, os.stat(build / "mlp.pab").st_mtime_ns


def test_consumer_builds_runs_and_rebuilds_only_on_change(consumer):
    src, build = consumer
    out, first = build_and_stamp(build)
    assert "polyarch: compiling model.py" in out
    sh("ctest", "--test-dir", build, "--output-on-failure")

    # bundle matches eager
    import torch

    import polyarch.runtime

    sys.path.insert(0, str(src))
    try:
        spec = importlib.util.spec_from_file_location("consumer_model", src / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(src))
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    with torch.no_grad():
        ref = mod.Model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(polyarch.runtime.load(build / "mlp.pab")(x), ref, atol=1e-5, rtol=0)
    assert polyarch.runtime.load(build / "mlp.pab").plan["verification"]["status"] == "verified"
    assert polyarch.runtime.load(build / "mlp_unverified.pab").plan["verification"]["status"].startswith("not verified")
    llm = polyarch.runtime.load(build / "llm.pab")  # GENERATE MAX_CONTEXT 32 BATCH 2
    assert llm.manifest["generate"]["max_context"] == 32 and llm.manifest["generate"]["batch"] == 2
    assert llm.plan["verification"]["status"] == "verified"

    # nothing changed: no compile
    out, again = build_and_stamp(build)
    assert "polyarch: compiling" not in out and again == first

    # a module the model imports changed (found through polyarch's depfile): compile again
    time.sleep(1.1)
    (src / "layers.py").write_text((src / "layers.py").read_text() + "\n# touched\n")
    out, after_dep = build_and_stamp(build)
    assert "polyarch: compiling" in out and after_dep != again

    # an option changed: compile again, with it
    sh(CMAKE, "-S", src, "-B", build, "-DMLP_INPUTS=4x64xf32")
    out, after_opt = build_and_stamp(build)
    assert "polyarch: compiling" in out and after_opt != after_dep
    assert polyarch.runtime.load(build / "mlp.pab").inputs[0]["shape"] == [4, 64]
