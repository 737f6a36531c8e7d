import json
import zipfile

import numpy as np
import pytest

import polyarch
from polyarch.errors import BundleError, DeviceError
from polyarch.runtime import bundle as fmt


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, mlp):
    model, inputs = mlp
    path = tmp_path_factory.mktemp("b") / "mlp.pab"
    polyarch.compile(model, inputs, devices=["cpu", "vulkan"], pins=["fc1=cpu", "fc2=vulkan"], output=str(path))
    return path


def _rewrite(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))


def test_manifest_lists_and_hashes_every_member(bundle):
    m = fmt.verify(bundle)
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    assert names == set(m["members"]) | {"manifest.json"}
    assert "plan.mlir" in names
    assert m["schema_version"] == fmt.SCHEMA_VERSION
    for s in m["plans"][0]["segments"]:
        assert s["member"].endswith(".vmfb") and s["device"] in m["plans"][0]["devices"]


def test_members_start_on_4096_byte_boundaries_and_load_without_copy(bundle):
    import struct

    with zipfile.ZipFile(bundle) as zf, open(bundle, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset + 26)
            n, e = struct.unpack("<HH", f.read(4))
            assert (info.header_offset + 30 + n + e) % 4096 == 0, info.filename
    b = polyarch.runtime.load(bundle, mmap=True)
    assert all(b._members.aligned.values())


def test_unaligned_bundle_still_loads_and_matches(bundle, tmp_path, mlp):
    from conftest import eager

    plain = tmp_path / "plain.pab"
    _rewrite(bundle, plain, lambda name, data: data)  # plain zip: members unaligned
    model, inputs = mlp
    b = polyarch.runtime.load(plain, mmap=True)
    assert not all(b._members.aligned.values())  # mapped: the modules get copies of their own
    np.testing.assert_allclose(b(*[t.numpy() for t in inputs]), eager(model, inputs), atol=1e-4, rtol=0)
    b = polyarch.runtime.load(plain)  # read into memory: aligned there
    assert all(b._members.aligned.values())
    np.testing.assert_allclose(b(*[t.numpy() for t in inputs]), eager(model, inputs), atol=1e-4, rtol=0)


def test_compressed_member_rejected(bundle, tmp_path):
    bad = tmp_path / "deflated.pab"
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
    with pytest.raises(BundleError, match="is compressed; bundles store members as is"):
        polyarch.runtime.load(bad)


def test_corrupted_member_rejected(bundle, tmp_path):
    bad = tmp_path / "bad.pab"
    vmfb = next(n for n in fmt.read_manifest(bundle)["members"] if n.endswith(".vmfb"))

    def flip(name, data):
        if name != vmfb:
            return data
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        return bytes(b)

    _rewrite(bundle, bad, flip)
    with pytest.raises(BundleError, match=f"member '{vmfb}' .* fails its SHA-256 check"):
        polyarch.runtime.load(bad)


def test_truncated_bundle_rejected(bundle, tmp_path):
    bad = tmp_path / "trunc.pab"
    bad.write_bytes(bundle.read_bytes()[:1000])
    with pytest.raises(BundleError, match="not a polyarch bundle"):
        polyarch.runtime.load(bad)


def test_newer_schema_rejected(bundle, tmp_path):
    bad = tmp_path / "new.pab"

    def bump(name, data):
        if name != "manifest.json":
            return data
        m = json.loads(data)
        m["schema_version"] = fmt.SCHEMA_VERSION + 1
        return json.dumps(m).encode()

    _rewrite(bundle, bad, bump)
    with pytest.raises(BundleError, match="newer than this runtime reads"):
        polyarch.runtime.load(bad)


def test_wrong_input_shape_is_explained(bundle):
    run = polyarch.runtime.load(bundle)
    with pytest.raises(BundleError, match=r"input 0 \('x'\): expected 32x256xfloat32, got 4x256xfloat32"):
        run(np.zeros((4, 256), np.float32))
    with pytest.raises(BundleError, match="takes 1 input"):
        run()


def test_missing_device_at_load(bundle):
    with pytest.raises(DeviceError, match="device 'vulkan:7' is not available on this host"):
        polyarch.runtime.load(bundle, devices={"vulkan": "vulkan:7"})


def test_runtime_imports_no_torch_and_no_compiler():
    import subprocess
    import sys

    code = (
        "import sys, polyarch.runtime; "
        "bad = [m for m in ('torch', 'torch_mlir', 'iree.compiler') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_counters_and_torch_in_torch_out(bundle, mlp):
    import torch

    from conftest import eager

    model, inputs = mlp
    b = polyarch.runtime.load(bundle)
    out = b(*inputs)  # torch in
    assert isinstance(out, torch.Tensor)  # torch out (from the host array, no copy)
    np.testing.assert_allclose(out.numpy(), eager(model, inputs), atol=1e-4, rtol=0)
    c = b.counters
    assert c["calls"] == 1 and c["transfers"] >= 2 and c["bytes_moved"] > 0
    assert set(c["segment_seconds"]) == {"cpu", "vulkan"} and all(t > 0 for t in c["segment_seconds"].values())
    b.reset_counters()
    assert b.counters["calls"] == 0


def test_stream_pipelines_requests_and_matches_sequential_calls(bundle, mlp):
    """Bundle.stream over a cpu -> vulkan -> cpu plan: outputs in order, equal to calls one by one."""
    import torch

    model, _ = mlp
    b = polyarch.runtime.load(bundle)
    assert {s["device"] for s in b.plan["segments"]} == {"cpu", "vulkan"}
    xs = [np.random.default_rng(i).standard_normal((32, 256)).astype(np.float32) for i in range(7)]
    seq = [b(x) for x in xs]
    b.reset_counters()
    b.trace = True
    streamed = list(b.stream(xs, depth=3))
    assert len(streamed) == len(xs)
    for x, s, q in zip(xs, streamed, seq):
        np.testing.assert_array_equal(s, q)
        with torch.no_grad():
            np.testing.assert_allclose(s, model(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=0)
    c = b.counters
    assert c["calls"] == len(xs) and c["transfers"] >= 2 * len(xs)
    segs = [e for e in b.events if e["kind"] == "segment"]
    assert len(segs) == len(xs) * len(b.plan["segments"]) and all(e["dur"] > 0 for e in segs)
    # torch tensors through the stream too
    out = next(b.stream([(torch.from_numpy(xs[0]),)]))
    assert isinstance(out, torch.Tensor) and np.array_equal(out.numpy(), seq[0])


def test_wide_splat_parameters_fill_with_short_patterns():
    """Devices fill parameters with 1-, 2- or 4-byte patterns (Vulkan refuses 8): an i64 splat
    whose bytes repeat is filled with the short pattern; other wide ones are materialised."""
    from polyarch.runtime.executor import _fill_pattern

    assert _fill_pattern(bytes(8)) == bytes(1)
    assert _fill_pattern(bytes.fromhex("0000803f0000803f")) == bytes.fromhex("0000803f")
    assert _fill_pattern(bytes.fromhex("0100000000000000")) == bytes.fromhex("0100000000000000")
    assert _fill_pattern(bytes.fromhex("abab")) == bytes.fromhex("ab")


def test_closed_or_dropped_bundle_lets_go_of_its_devices(bundle):
    """An IREE Vulkan device on lavapipe polls with two threads at 100% of a core each for as
    long as it lives (IREE 3.13): a bundle must let go of its devices when closed, and when
    dropped without the garbage collector (no reference cycle through IREE's SystemContext).
    Checked structurally (the contexts are freed by reference counting alone) and by the
    process's CPU time while idle after close (a held lavapipe device: about 2 cores here)."""
    import gc
    import time
    import weakref

    x = np.zeros((32, 256), np.float32)
    gc.disable()
    try:
        b = polyarch.runtime.load(bundle)
        b(x)
        contexts = [weakref.ref(c) for c in b._contexts]
        assert contexts
        del b
        assert all(c() is None for c in contexts)  # freed without gc.collect()
        b = polyarch.runtime.load(bundle)
        b(x)
        assert set(b.devices) == {"cpu", "vulkan"}
        b.close()
        assert b.devices == {} and b._contexts == []
        t0, c0 = time.perf_counter(), time.process_time()
        time.sleep(1.0)
        busy = (time.process_time() - c0) / (time.perf_counter() - t0)
        assert busy < 0.5, f"an idle process with its bundle closed kept {busy:.2f} cores busy"
    finally:
        gc.enable()


def test_host_waits_poll_then_block_and_report_a_failed_timeline(monkeypatch):
    """runtime.executor.wait_for: the host polls a device's semaphore, yielding its core, for up
    to HOST_SPIN_S, then blocks (a host thread blocked in the kernel came back 2-5 ms late in
    20-30% of decode calls on a VM: docs/cpu-speed.md). A value signalled from another thread is
    seen whether it polls, blocks, or polls then blocks (the polls counted as its yields of the
    core; none with 0); a timeline failed before or during the wait raises the device's error;
    POLYARCH_HOST_SPIN_MS=0 blocks at once; a value that is not a number of milliseconds >= 0
    stops the device from starting, with its name."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from polyarch.runtime import executor

    dev = executor.create_device("cpu")
    yields = []
    real_yield = os.sched_yield
    monkeypatch.setattr(executor.os, "sched_yield", lambda: (yields.append(1), real_yield())[1])
    looks = {}
    for spin in (1.0, 0.0, 0.005):  # polls through the wait, blocks, polls 5 ms then blocks
        monkeypatch.setattr(executor, "HOST_SPIN_S", spin)
        sem = dev.create_semaphore(0)
        timer = threading.Timer(0.1, sem.signal, args=(1,))
        yields.clear()
        t0 = time.perf_counter()
        timer.start()
        executor.wait_for(sem, 1)
        waited = time.perf_counter() - t0
        timer.join()
        looks[spin] = len(yields)
        assert sem.query() == 1 and waited >= 0.09, (spin, waited)
    assert looks[1.0] > 0 and looks[0.005] > 0 and looks[0.0] == 0, looks
    failed = dev.create_semaphore(0)
    failed.fail("failed before the wait")
    with pytest.raises(RuntimeError, match="failed before the wait"):
        executor.wait_for(failed, 1)
    monkeypatch.setattr(executor, "HOST_SPIN_S", 1.0)
    late = dev.create_semaphore(0)
    threading.Timer(0.05, late.fail, args=("failed while waited",)).start()
    with pytest.raises(RuntimeError, match="failed while waited"):
        executor.wait_for(late, 1)
    out = subprocess.run([sys.executable, "-c", "from polyarch.runtime import executor; print(executor.HOST_SPIN_S)"],
                         env={**os.environ, "POLYARCH_HOST_SPIN_MS": "0"}, capture_output=True, text=True, check=True)
    assert float(out.stdout) == 0.0
    probe = ("from polyarch.runtime import executor\ntry:\n    executor.create_device('cpu')\n"
             "except Exception as e:\n    print(type(e).__name__, e)")
    for bad in ("abc", "-1", "inf"):  # not a number of milliseconds: the device refuses to start, naming it
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "POLYARCH_HOST_SPIN_MS": bad},
                             capture_output=True, text=True, check=True)
        assert out.stdout.startswith("DeviceError") and f"POLYARCH_HOST_SPIN_MS='{bad}'" in out.stdout, out.stdout
