"""Issue 21, safe at the edges: the bytes checked are the bytes run, trust that cannot fail open,
no user file overwritten, children and temp folders that do not outlive their compile."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

import polyarch
from conftest import EXAMPLES, cli
from polyarch.errors import BundleError, PolyarchError


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small cpu bundle (the MLP example), compiled once for this module."""
    folder = tmp_path_factory.mktemp("edges")
    r = cli("compile", os.path.join(EXAMPLES, "mlp.py"), "-d", "cpu", "--tune", "none", "-q", "-o", str(folder / "m.pab"))
    assert r.returncode == 0, r.stderr
    return str(folder / "m.pab")


def _copy(src, folder, name="b.pab"):
    dst = os.path.join(folder, name)
    shutil.copyfile(src, dst)
    return dst


CALLER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import polyarch.runtime
    b = polyarch.runtime.load(sys.argv[1])
    x = np.ones(b.inputs[0]["shape"], np.float32)
    want = b(x)
    print("ready", flush=True)
    n, end = 0, time.time() + float(sys.argv[2])
    while time.time() < end:
        assert np.array_equal(b(x), want)
        n += 1
    print("calls", n, flush=True)
""")


def test_a_bundle_rewritten_under_a_running_process(small, tmp_path):
    """One process keeps calling a bundle while this one truncates it, rewrites it with garbage and
    then writes it back in place: the caller sees no signal and the same outputs throughout, and
    the next load of the damaged file is a one-line error."""
    path = _copy(small, tmp_path)
    good = open(path, "rb").read()
    p = subprocess.Popen([sys.executable, "-c", CALLER, path, "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    for _ in range(3):
        with open(path, "r+b") as f:  # in place: the same inode
            f.truncate(100)
        time.sleep(0.3)
        with pytest.raises(BundleError):
            polyarch.runtime.load(path)
        with open(path, "r+b") as f:
            f.write(os.urandom(len(good)))
        time.sleep(0.3)
        with open(path, "r+b") as f:
            f.write(good)
        time.sleep(0.3)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert int(out.split()[-1]) > 10


def test_a_mapped_load_is_what_mmap_true_means(small, tmp_path):
    b = polyarch.runtime.load(_copy(small, tmp_path), mmap=True)
    assert b._members.mmapped and all(b._members.aligned.values())
    x = np.ones(b.inputs[0]["shape"], np.float32)
    np.testing.assert_array_equal(b(x), polyarch.runtime.load(small)(x))
    with pytest.raises(BundleError, match="mmap=True is for local loads"):
        polyarch.runtime.load(small, cluster="ray://127.0.0.1:1", mmap=True)


@pytest.mark.parametrize("keys, match", [([], "trusted_keys is empty"), ((), "trusted_keys is empty"),
                                         ("k.pub", "not a list of keys"), (b"k.pub", "not a list of keys"),
                                         (3, "not a list of keys"), ([3], "not a key path")])
def test_trusted_keys_never_fail_open(small, keys, match):
    with pytest.raises(BundleError, match=match):
        polyarch.runtime.load(small, trusted_keys=keys)


def test_inspect_claims_are_not_verification(small, tmp_path):
    path = _copy(small, tmp_path)
    key = str(tmp_path / "k")
    assert cli("keygen", "-o", key).returncode == 0
    assert cli("sign", path, "--key", key).returncode == 0
    out = cli("inspect", path).stdout
    assert "claims key id" in out and "not verified" in out and "only a verified signature" in out
    r = cli("inspect", path, "--trusted-key", key + ".pub")
    assert r.returncode == 0 and "verified: signed by trusted key" in r.stdout
    # altered after signing, hashes rewritten to match: the claim stays, the check fails
    _edit_manifest(path, lambda m: m["plans"][0].update(name="evil\x1b[2J\x1b[31m"))
    out = cli("inspect", path).stdout
    assert "claims key id" in out and "\x1b" not in out and "\\x1b[2J" in out
    r = cli("inspect", path, "--trusted-key", key + ".pub")
    assert r.returncode == 1 and "manifest changed after signing" in r.stderr


def _edit_manifest(path, change, text=lambda t: t):
    """Rewrite a bundle with its manifest changed (members and the signature kept)."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    m = json.loads(members["manifest.json"])
    change(m)
    members["manifest.json"] = text(json.dumps(m)).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_damaged_manifests_are_one_line(small, tmp_path):
    deep = _copy(small, tmp_path, "deep.pab")
    _edit_manifest(deep, lambda m: m.update(x="DEEP"), lambda t: t.replace('"DEEP"', "[" * 5000 + "]" * 5000))
    with pytest.raises(BundleError, match="nested over 64 levels"):
        polyarch.runtime.load(deep)
    splat = _copy(small, tmp_path, "splat.pab")

    def bad_splat(m):
        seg = m["plans"][0]["segments"][0]
        seg.setdefault("parameters", {"scope": "model", "keys": {}})["keys"]["k"] = "splat:zz:4"
    _edit_manifest(splat, bad_splat)
    with pytest.raises(BundleError, match="bad splat"):
        polyarch.runtime.load(splat)
    member = _copy(small, tmp_path, "member.pab")
    _edit_manifest(member, lambda m: m.update(parameters={"member": "nope.irpa"}))
    with pytest.raises(BundleError, match="'parameters' names no member"):
        polyarch.runtime.load(member)
    # a huge signature member is never inflated
    big = _copy(small, tmp_path, "bigsig.pab")
    with zipfile.ZipFile(big, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.sig", b"{" + b" " * (200 << 20) + b"}")
    t = time.time()
    from polyarch.runtime.signing import signature_of

    assert signature_of(big) == {"damaged": True} and time.time() - t < 5


def test_keys_and_links(small, tmp_path):
    key = str(tmp_path / "k")
    os.symlink(str(tmp_path / "elsewhere"), key + ".pub")  # dangling
    r = cli("keygen", "-o", key)
    assert r.returncode == 1 and "symbolic link" in r.stderr and not os.path.exists(tmp_path / "elsewhere")
    os.unlink(key + ".pub")
    assert cli("keygen", "-o", key).returncode == 0
    assert os.stat(key).st_mode & 0o777 == 0o600
    # sign through a link: the real file is signed, the link stays a link
    real = _copy(small, tmp_path, "real.pab")
    link = str(tmp_path / "link.pab")
    os.symlink(real, link)
    assert cli("sign", link, "--key", key).returncode == 0
    assert os.path.islink(link)
    polyarch.runtime.load(real, trusted_keys=[key + ".pub"])
    # a bundle whose members fail their hashes is not signed
    bad = _copy(small, tmp_path, "bad.pab")
    with open(bad, "r+b") as f:
        f.seek(os.path.getsize(bad) // 2)
        f.write(b"\0" * 64)
    r = cli("sign", bad, "--key", key)
    assert r.returncode == 1 and "SHA-256" in r.stderr
    # a private key others can read is refused, as ssh does
    os.chmod(key, 0o644)
    r = cli("sign", real, "--key", key)
    assert r.returncode == 1 and "too open" in r.stderr and "chmod 600" in r.stderr


def test_no_command_writes_over_its_own_files(small, tmp_path):
    model = tmp_path / "dep.py"
    shutil.copyfile(os.path.join(EXAMPLES, "mlp.py"), model)
    source = model.read_bytes()
    r = cli("compile", str(model), "-o", str(tmp_path / "dep.pab"), "--depfile", str(model), cwd=tmp_path)
    assert r.returncode == 1 and "is an input of this command" in r.stderr and model.read_bytes() == source
    r = cli("compile", str(model), "-o", str(tmp_path / "x.pab"), "--depfile", str(tmp_path / "x.pab"))
    assert r.returncode == 1 and "one file would replace the other" in r.stderr
    bundle = _copy(small, tmp_path)
    before = open(bundle, "rb").read()
    for args in (["--trace", bundle], ["-o", bundle[:-4] + ".npy", "-o", bundle[:-4] + ".npy"]):
        r = cli("run", bundle, *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert open(bundle, "rb").read() == before
    for out in ("/proc/version", "/etc/hostname/x.pab", str(tmp_path / "no" / "x.pab"), str(tmp_path)):
        t = time.time()
        r = cli("compile", str(model), "-o", out)
        assert (r.returncode == 1 and "Fix:" in r.stderr or r.returncode == 2 and "is a directory" in r.stderr) \
            and time.time() - t < 30, r.stderr
    r = cli("plan", str(model), "--trace", str(model))
    assert r.returncode == 1 and model.read_bytes() == source


def test_inspect_into_a_closed_pipe(small):
    exe = os.path.join(os.path.dirname(sys.executable), "polyarch")
    r = subprocess.run(f"'{exe}' inspect '{small}' --ops | head -1", shell=True, capture_output=True, text=True)
    assert r.stderr == "" and r.stdout.startswith(small)


def test_sigkill_mid_compile_leaves_nothing(tmp_path):
    """A compile killed with SIGKILL (no handler runs) leaves its iree-compile children to die with
    it and its temp folders to the next compile, which removes them."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    exe = os.path.join(os.path.dirname(sys.executable), "polyarch")
    args = [exe, "compile", os.path.join(EXAMPLES, "minilm.py"), "-d", "cpu", "--tune", "none", "--no-verify", "-q"]
    p = subprocess.Popen(args + ["-o", str(tmp_path / "a.pab")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    children = []
    while time.time() < deadline and not children:
        children = _iree_children(p.pid)
        time.sleep(0.1)
    assert children, "the compile never started iree-compile"
    p.kill()
    p.wait()
    time.sleep(1.0)
    assert all(not _alive(c) for c in children)
    assert any(n.startswith("polyarch-") for n in os.listdir(tmpdir))  # left by the killed compile
    r = subprocess.run([exe, "compile", os.path.join(EXAMPLES, "mlp.py"), "-d", "cpu", "--tune", "none", "--no-verify",
                        "-q", "-o", str(tmp_path / "b.pab")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [n for n in os.listdir(tmpdir) if n.startswith("polyarch-")] == []


def _iree_children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if any(c.endswith(b"iree-compile") for c in cmd) and _descends(int(d), pid):
                out.append(int(d))
    return out


def _descends(pid, ancestor):
    while pid > 1:
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class DynamicLookup(__import__("torch").nn.Module):
    """An input index into a table of dynamic size (checked on the host), an index computed from
    it (checked in the segment) and a constant index (checked in the segment: the table may be
    smaller than it)."""

    def forward(self, table, idx):
        import torch

        return torch.index_select(table, 0, idx), table[idx + 1], table[torch.tensor([2])]


@pytest.fixture(scope="module")
def dynamic_lookup(tmp_path_factory):
    import torch

    path = str(tmp_path_factory.mktemp("dynidx") / "d.pab")
    polyarch.compile(DynamicLookup(), (torch.randn(16, 4), torch.tensor([0, 3, 5])), devices=["cpu"], output=path,
                     tune="none", dynamic_dims=["table:0:64"])
    return polyarch.runtime.load(path)


@pytest.mark.parametrize("bad, where", [(7, "in segment"), (8, "input 1"), (-1, "input 1"), (10**6, "input 1"),
                                        (-10**6, "input 1")])
def test_dynamic_dimension_index_out_of_range(dynamic_lookup, bad, where):
    from polyarch.errors import IndexRangeError

    table = np.arange(32, dtype=np.float32).reshape(8, 4)
    with pytest.raises(IndexRangeError, match=where):
        dynamic_lookup(table, np.array([bad, 0, 0]))


def test_dynamic_dimension_index_in_range_matches_eager(dynamic_lookup):
    import torch

    from polyarch.errors import IndexRangeError

    for rows in (3, 8, 64):
        table = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
        idx = np.array([0, rows - 2, 1])
        want = DynamicLookup()(torch.from_numpy(table), torch.from_numpy(idx))
        for got, w in zip(dynamic_lookup(table, idx), want):
            np.testing.assert_array_equal(got, w.numpy())
    with pytest.raises(IndexRangeError, match="in segment"):  # the constant index 2 into a 2-row table
        dynamic_lookup(np.zeros((2, 4), np.float32), np.array([0, 0, 0]))
