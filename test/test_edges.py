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

sys.path.insert(0, os.path.join(os.path.dirname(EXAMPLES), "scripts"))
from audit import FLOAT_INDEX, _cmd_has, _descends, damage_in_place  # noqa: E402 (the audit's helpers)


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

    def refused():
        with pytest.raises(BundleError):
            polyarch.runtime.load(path)

    damage_in_place(path, good, while_truncated=refused)
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
    as_json = cli("inspect", path, "--json").stdout  # JSON stays JSON (its own escapes), not one escaped line
    assert "\x1b" not in as_json and json.loads(as_json)["plans"][0]["name"] == "evil\x1b[2J\x1b[31m"
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
    for out in ("/proc/version", "/etc/hostname/x.pab", str(model / "x.pab"), str(tmp_path)):
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
    assert all(not _cmd_has(c, "iree-compile") for c in children)
    assert any(n.startswith("polyarch-") for n in os.listdir(tmpdir))  # left by the killed compile
    r = subprocess.run([exe, "compile", os.path.join(EXAMPLES, "mlp.py"), "-d", "cpu", "--tune", "none", "--no-verify",
                        "-q", "-o", str(tmp_path / "b.pab")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [n for n in os.listdir(tmpdir) if n.startswith("polyarch-")] == []


def _iree_children(pid):
    """The live iree-compile processes below `pid` (the audit's /proc helpers)."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _cmd_has(int(d), "iree-compile")
            and _descends(int(d), pid)]


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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_inputs_and_outputs_match_eager(tmp_path, dtype):
    """A model with 16-bit weights, inputs and outputs compiles, verifies against eager and runs,
    taking torch tensors and (bf16) ml_dtypes arrays."""
    import ml_dtypes
    import torch

    tdt = getattr(torch, dtype)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(tdt).eval()
    x = torch.randn(4, 16).to(tdt)
    path = polyarch.compile(model, (x,), devices=["cpu"], output=str(tmp_path / "m.pab"), tune="none")
    b = polyarch.runtime.load(path)
    assert b.inputs[0]["dtype"] == dtype and b.outputs[0]["dtype"] == dtype
    with torch.no_grad():
        want = model(x).float()
    got = b(x)
    assert got.dtype == tdt
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)  # 16-bit rounding of the sums
    np_dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    arr = b(x.float().numpy().astype(np_dt))
    assert arr.dtype == np.dtype(np_dt)
    np.testing.assert_allclose(arr.astype(np.float32), want.numpy(), atol=3e-2, rtol=3e-2)
    with pytest.raises(BundleError, match="cast it"):
        b(x.float().numpy())


def test_complex128_crosses_segment_boundaries_as_complex64(tmp_path):
    """A segment returning complex<f64> failed at run time in IREE (as f64 did): it crosses as
    complex<f32>, and the result matches eager."""
    import torch

    class Complex(torch.nn.Module):
        def forward(self, x):
            z = torch.view_as_complex(x.double().reshape(2, 8, 2))
            return z[:, 1:4], torch.view_as_real(z[:, :2]).float() * 2

    x = torch.randn(2, 16)
    path = polyarch.compile(Complex(), (x,), devices=["cpu"], output=str(tmp_path / "c.pab"), tune="none")
    got = polyarch.runtime.load(path)(x.numpy())
    want = Complex()(x)
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1].numpy(), rtol=1e-6)


def test_a_data_dependent_int_is_exported_strictly(tmp_path):
    """int() of a buffer fails torch.export's non-strict trace (fake tensors have no values); the
    strict export takes it, and the compile retries with it."""
    import torch

    class Narrow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.tensor(3))

        def forward(self, x):
            return x * int(self.n) + 1

    x = torch.randn(2, 8)
    path = polyarch.compile(Narrow(), (x,), devices=["cpu"], output=str(tmp_path / "n.pab"), tune="none")
    np.testing.assert_allclose(polyarch.runtime.load(path)(x.numpy()), Narrow()(x).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("as_buffer", [True, False])
def test_a_constant_index_tensor_in_an_index_list(tmp_path, as_buffer):
    """LeViT's and EfficientFormer's attention biases, `biases[:, self.idxs]` with idxs a
    (non-persistent) buffer or a plain tensor attribute: torch-mlir's frozen import put the raw
    tensor into the op's list of indices and refused it."""
    import torch

    class Biases(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.biases = torch.nn.Parameter(torch.randn(4, 9))
            idxs = torch.randint(0, 9, (16, 16))
            if as_buffer:
                self.register_buffer("idxs", idxs, persistent=False)
            else:
                self.idxs = idxs
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x) + self.biases[:, self.idxs]

    model, x = Biases().eval(), torch.randn(1, 4, 16, 16)
    path = polyarch.compile(model, (x,), devices=["cpu"], output=str(tmp_path / "b.pab"), tune="none")
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(polyarch.runtime.load(path)(x.numpy()), want, rtol=1e-5, atol=1e-5)


def test_python_number_outputs_come_back_as_0d_arrays(tmp_path):
    import torch

    class Numbers(torch.nn.Module):
        def forward(self, x):
            return x * 2, 3, 2.5, True, x.shape[0]

    x = torch.randn(4, 3)
    path = polyarch.compile(Numbers(), (x,), devices=["cpu"], output=str(tmp_path / "n.pab"), tune="none")
    got = polyarch.runtime.load(path)(x.numpy())
    np.testing.assert_allclose(got[0], (x * 2).numpy())
    assert [(g.shape, g.dtype, g.item()) for g in got[1:]] == [((), np.int64, 3), ((), np.float32, 2.5),
                                                              ((), np.bool_, True), ((), np.int64, 4)]


def test_an_input_written_in_place_and_returned(tmp_path):
    import torch

    class Scale(torch.nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x, x + 1

    x = torch.randn(2, 3)
    lines = []
    path = polyarch.compile(Scale(), (x.clone(),), devices=["cpu"], output=str(tmp_path / "s.pab"), tune="none",
                            progress=lines.append)
    assert any("writes into its input 'x' in place and returns it" in l for l in lines)
    arr = x.numpy().copy()
    got = polyarch.runtime.load(path)(arr)
    np.testing.assert_allclose(got[0], x.numpy() * 2, rtol=1e-6)
    np.testing.assert_allclose(got[1], x.numpy() * 2 + 1, rtol=1e-6)
    np.testing.assert_array_equal(arr, x.numpy())  # the caller's array is not written

    class Hidden(torch.nn.Module):  # written and not returned: still refused (the write would be lost)
        def forward(self, x):
            x.mul_(2)
            return x + 1

    with pytest.raises(PolyarchError, match="writes into its input 'x' in place"):
        polyarch.compile(Hidden(), (x.clone(),), devices=["cpu"], output=str(tmp_path / "h.pab"), tune="none")


def test_one_line_errors_and_the_users_own_lines(tmp_path):
    """Inputs eager refuses are one line naming the model's line; `plan --ops` names the model's
    line for each op (not torch/nn/modules/linear.py); a float input cast to indices gets its
    range, so `polyarch run` without -i makes valid values."""
    mlp = os.path.join(EXAMPLES, "mlp.py")
    r = cli("compile", mlp, "-i", "32x256xi64", "-d", "cpu", "--tune", "none", "-q", "-o", str(tmp_path / "i.pab"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "PyTorch eager fails" in r.stderr, r.stderr
    assert "mlp.py:" in r.stderr and "Traceback" not in r.stderr
    r = cli("plan", mlp, "-d", "cpu", "--ops", "--no-calibrate")
    assert r.returncode == 0 and "at " + mlp + ":" in r.stdout and "linear.py" not in r.stdout, r.stdout
    assert "Warning" not in r.stderr  # torch's FutureWarnings are hidden
    model = tmp_path / "fidx.py"
    model.write_text(FLOAT_INDEX)
    out = str(tmp_path / "f.pab")
    assert cli("compile", str(model), "-d", "cpu", "--tune", "none", "-q", "-o", out).returncode == 0
    r = cli("run", out)
    assert r.returncode == 0, r.stderr
    from polyarch.errors import IndexRangeError

    b = polyarch.runtime.load(out)
    for v in (50.0, -1.0, float("nan")):
        with pytest.raises(IndexRangeError, match="input 0"):
            b(np.array([[v, 0, 0]], np.float32))


def test_sigterm_during_an_api_compile_cleans_up(tmp_path):
    """polyarch.compile from Python, SIGTERM while IREE compiles: the process unwinds (exit 143),
    its temporary folders are removed, the old bundle stays as it was."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    old = tmp_path / "m.pab"
    old.write_bytes(b"old bundle")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {EXAMPLES!r})
        import polyarch, mlp
        polyarch.compile(mlp.build(), mlp.example_inputs(), devices=["cpu"], output={str(old)!r}, tune="none",
                         progress=lambda m: print(m, flush=True))
    """)
    p = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TMPDIR=str(tmpdir)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if "partitioned" in line:
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 128 + signal.SIGTERM
    assert [n for n in os.listdir(tmpdir) if n.startswith("polyarch-")] == []
    assert old.read_bytes() == b"old bundle"
