"""Signed bundles (issue 13): an Ed25519 signature over the manifest; `trusted_keys` refuses
unsigned, foreign-signed and altered bundles before any module is mapped."""

import json
import os
import shutil
import stat
import zipfile

import numpy as np
import pytest
import torch

import polyarch
from conftest import cli
from polyarch.errors import BundleError, PolyarchError
from polyarch.runtime.bundle import MANIFEST
from polyarch.runtime.signing import SIGNATURE, keygen, sign


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("sign")
    path = polyarch.compile(Affine().eval(), (torch.randn(2, 8),), devices=["cpu"], output=str(d / "a.pab"), tune="none")
    return d, path


def test_sign_and_trust(made, tmp_path):
    d, original = made
    bundle = str(tmp_path / "a.pab")
    shutil.copy(original, bundle)
    key, pub, kid = keygen(str(tmp_path / "k"))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with pytest.raises(PolyarchError, match="exists; not overwriting a key"):
        keygen(key)
    other = keygen(str(tmp_path / "other"))[1]
    with pytest.raises(BundleError, match="is not signed, and trusted keys were given"):
        polyarch.runtime.load(bundle, trusted_keys=[pub])
    assert sign(bundle, key) == kid
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with torch.no_grad():
        want = Affine().eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(polyarch.runtime.load(bundle, trusted_keys=[other, pub])(x), want, atol=1e-5)
    np.testing.assert_allclose(polyarch.runtime.load(bundle)(x), want, atol=1e-5)  # no keys: no check
    with pytest.raises(BundleError, match=f"is signed by key {kid}, which is not trusted"):
        polyarch.runtime.load(bundle, trusted_keys=[other])
    # the manifest altered after signing (a member's hash swapped, say): refused
    altered = str(tmp_path / "altered.pab")
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(altered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == MANIFEST:
                m = json.loads(data)
                m["created"] = "tampered"
                data = json.dumps(m).encode()
            dst.writestr(info, data)
    with pytest.raises(BundleError, match="or its manifest changed after signing"):
        polyarch.runtime.load(altered, trusted_keys=[pub])


def test_cli_keygen_sign_run(made, tmp_path):
    _, original = made
    bundle = str(tmp_path / "a.pab")
    shutil.copy(original, bundle)
    key = str(tmp_path / "rel.key")
    r = cli("keygen", "-o", key)
    assert r.returncode == 0 and "key id" in r.stdout, r.stderr
    r = cli("run", bundle, "--trusted-key", key + ".pub")
    assert r.returncode == 1 and "is not signed" in r.stderr and "Traceback" not in r.stderr
    r = cli("sign", bundle, "--key", key)
    assert r.returncode == 0, r.stderr
    assert cli("run", bundle, "--trusted-key", key + ".pub").returncode == 0
    r = cli("inspect", bundle)
    assert r.returncode == 0 and "signature: signed, claims key id" in r.stdout, r.stdout + r.stderr
    r = cli("inspect", bundle, "--trusted-key", key + ".pub")
    assert r.returncode == 0 and "signature: ed25519, verified: signed by trusted key" in r.stdout, r.stdout + r.stderr
    with zipfile.ZipFile(bundle) as z:
        assert SIGNATURE in z.namelist()
    r = cli("sign", bundle, "--key", key + ".pub")  # the public key by mistake
    assert r.returncode == 1 and "is not a PEM private key" in r.stderr


def test_keys_as_pem_bytes_and_the_actor_check(made, tmp_path):
    """Ray actors have no key files: the driver sends the keys' PEM bytes, and each actor checks
    the signature again on the bundle bytes it was sent, on the manifest it then checks the
    members against (not a second read of the file, which could have been replaced between)."""
    from polyarch.runtime.ray_executor import _Worker
    from polyarch.runtime.signing import read_keys

    _, original = made
    key, pub, _ = keygen(str(tmp_path / "k"))
    pem = read_keys([pub])
    with open(original, "rb") as f:
        unsigned = f.read()
    with pytest.raises(BundleError, match="is not signed, and trusted keys were given"):
        _Worker("cpu").load(unsigned, "a.pab", None, None, pem)
    with pytest.raises(PolyarchError, match="a trusted key is not a PEM public key"):
        read_keys([b"not a key"])
    bundle = str(tmp_path / "a.pab")
    shutil.copy(original, bundle)
    sign(bundle, key)
    with open(bundle, "rb") as f:
        signed = f.read()
    w = _Worker("cpu")
    w.load(signed, "a.pab", None, None, pem)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(w.bundle(x), polyarch.runtime.load(bundle, trusted_keys=pem)(x), atol=0)
