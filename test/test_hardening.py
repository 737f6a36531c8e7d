"""Bad inputs and interruptions: no crash, no data lost, one clear line each (issue 13).
Numerics against eager: atol 1e-5."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import polyarch
from conftest import EXAMPLES, cli, eager
from polyarch.compiler.bundle import write_bundle
from polyarch.runtime.bundle import FORMAT, MANIFEST, read_manifest
from polyarch.errors import BundleError


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x, s):
        return self.fc(x) * s


def test_zero_d_inputs(tmp_path):
    m, x, s = Scaled().eval(), torch.randn(2, 8), torch.tensor(3.0)
    b = polyarch.runtime.load(polyarch.compile(m, (x, s), devices=["cpu"], output=str(tmp_path / "s.pab")))
    np.testing.assert_allclose(b(x.numpy(), s.numpy()), eager(m, (x, s)), atol=1e-5)
    np.testing.assert_allclose(b(x.numpy(), np.float32(3.0)), eager(m, (x, s)), atol=1e-5)
    with pytest.raises(BundleError, match=r"input 1 \('s'\): expected a scalar float32 \(0-d array\), got 1xfloat32"):
        b(x.numpy(), np.ones(1, np.float32))


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u


def test_bundle_mode_is_the_users_default(tmp_path):
    path = tmp_path / "m.pab"
    write_bundle(str(path), {"signature": {}, "plans": []}, {"a": b"x"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()
    os.chmod(path, 0o644)
    write_bundle(str(path), {"signature": {}, "plans": []}, {"a": b"y"})  # recompiled over: still readable by others
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()


def test_schema_version_not_a_number_is_named(tmp_path):
    path = tmp_path / "bad.pab"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MANIFEST, json.dumps({"format": FORMAT, "schema_version": "3"}))
    with pytest.raises(BundleError, match=r"has schema_version '3', not a whole number \(damaged\?\)"):
        read_manifest(str(path))


def test_output_over_the_model_is_refused(tmp_path):
    src = tmp_path / "model.py"
    text = open(os.path.join(EXAMPLES, "mlp.py")).read()
    src.write_text(text)
    r = cli("compile", str(src), "-o", str(src), "--no-verify", "-q")
    assert r.returncode == 1 and "is " + str(src) + ", an input of this compile" in r.stderr, r.stderr
    assert src.read_text() == text
    r = cli("compile", str(src), "-j", "0")
    assert r.returncode == 2 and "0 is not in the range x>=1" in r.stderr


def test_sigterm_cleans_up(tmp_path):
    tmpdir, outdir = tmp_path / "tmp", tmp_path / "out"
    tmpdir.mkdir()
    outdir.mkdir()
    exe = os.path.join(os.path.dirname(sys.executable), "polyarch")
    p = subprocess.Popen([exe, "compile", os.path.join(EXAMPLES, "mlp.py"), "-o", str(outdir / "m.pab"), "-q"],
                         env=dict(os.environ, TMPDIR=str(tmpdir)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(n.startswith("polyarch-") for n in os.listdir(tmpdir)):
        time.sleep(0.05)
    assert any(n.startswith("polyarch-") for n in os.listdir(tmpdir)), "the compile never made its temporary folder"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 128 + signal.SIGTERM
    assert [n for n in os.listdir(tmpdir) if n.startswith("polyarch-")] == []
    assert [n for n in os.listdir(outdir) if n.startswith(".pab-")] == []
