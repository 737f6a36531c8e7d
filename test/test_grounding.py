"""Plans grounded in the devices at hand: identity, measured profiles (cached), verified
segments (wrong ops found and planned around), measured re-planning.

Real lavapipe and llvm-cpu throughout. Tolerance against eager: 1e-4 absolute on outputs
of magnitude ~1 (f32; the verifier's own bar is 1e-3 of the largest output)."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import polyarch
from conftest import cli, eager
from polyarch.compiler import driver, measured
from polyarch.targets import profiles as P
from polyarch.runtime import identity as I

TOL = 1e-4
SESSION_CACHE = measured.cache_dir()  # conftest's, for this test session


class Depthwise(torch.nn.Module):
    """pointwise -> depthwise 3x3 (groups = channels) -> linear head: MobileNet's pattern."""

    def __init__(self):
        super().__init__()
        self.pw = torch.nn.Conv2d(16, 32, 1)
        self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.head = torch.nn.Linear(32 * 16 * 16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.dw(torch.relu(self.pw(x)))).flatten(1))


# A spec sheet that flatters Vulkan (as the built-in iGPU sheet did lavapipe): the
# partitioner then puts everything it may on Vulkan, and only measurement can correct it.
FLATTERING = replace(P.BUILTIN["vulkan"], peak_flops={"f32": 1e15}, mem_bw=1e13, launch_s=0.0, call_s=0.0,
                     link_bw=1e12, link_latency_s=0.0)


class TanhMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 256)
        self.b = torch.nn.Linear(256, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(measured.CACHE_ENV, str(d))
    return d


def test_identity_of_this_hosts_devices():
    cpu = I.identify("cpu")
    assert cpu["type"] == "cpu" and cpu["cores"] >= 1 and cpu["key"].startswith("cpu-")
    vk = I.identify("vulkan")
    assert vk is not None, "the suite needs a Vulkan device (lavapipe)"
    assert vk["name"] and vk["driver"]
    if "llvmpipe" in vk["name"]:  # Mesa's lavapipe: the loader reports a CPU-type device
        assert vk["type"] == "cpu-emulation" and I.is_software(vk)
        assert "CPU emulation" in I.describe(vk)
    assert I.identify("vulkan")["key"] == vk["key"]  # stable
    assert I.identify("cuda") is None or I.identify("cuda")["kind"] == "cuda"


def test_software_vulkan_is_never_priced_as_a_gpu(fresh_cache):
    details = {}
    ex = (torch.randn(8, 64),)
    driver.plan(_model(TanhMLP), ex, ["cpu", "vulkan"], calibrate=False, details=details)
    vk = details["devices"]["vulkan"]
    if I.is_software(vk["identity"]):
        assert vk["profile"] == "vulkan-cpu-emulation" and "not calibrated" in vk["source"]
    assert not os.path.exists(fresh_cache / "profiles")  # nothing was measured


def test_profile_cache_used_then_invalidated(fresh_cache, monkeypatch, tmp_path):
    model, ex = _model(TanhMLP), (torch.randn(8, 64),)
    lines = []

    def compile_once(name):
        lines.clear()
        polyarch.compile(model, ex, devices=["cpu"], output=str(tmp_path / name), progress=lines.append)
        return " | ".join(lines)

    first = compile_once("a.pab")
    assert "calibrating it" in first and "calibrated now" in first
    stored = list((fresh_cache / "profiles").iterdir())
    assert len(stored) == 1 and I.identify("cpu")["key"] in stored[0].name
    second = compile_once("b.pab")
    assert "calibrating" not in second and "measured on this host (cached)" in second
    m = polyarch.runtime.load(str(tmp_path / "b.pab")).plan
    assert m["device_info"]["cpu"]["source"] == "measured on this host (cached)"
    # another IREE release: measured again
    monkeypatch.setattr(measured, "iree_version", lambda: "99.0.0")
    assert "calibrating it" in compile_once("c.pab")
    monkeypatch.undo()
    monkeypatch.setenv(measured.CACHE_ENV, str(fresh_cache))
    assert "calibrating" not in compile_once("d.pab")
    # another device identity (another CPU or driver): measured again
    real = measured.identify

    def other_cpu(spec):
        ident = real(spec)
        return dict(ident, key=ident["key"] + "x")

    monkeypatch.setattr(measured, "identify", other_cpu)
    assert "calibrating it" in compile_once("e.pab")


@pytest.fixture
def fresh_verdicts(fresh_cache):
    """fresh_cache with the session's calibrated profiles copied (no calibration again): ops
    found wrong on a device and measured corrections are remembered across compiles (the
    session's cache, which earlier tests fill), and a test of finding them starts from none."""
    import shutil

    if os.path.isdir(os.path.join(SESSION_CACHE, "profiles")):
        shutil.copytree(os.path.join(SESSION_CACHE, "profiles"), fresh_cache / "profiles")
    return fresh_cache


def test_depthwise_on_cpu_and_vulkan_matches_eager(tmp_path, fresh_verdicts):
    """The default compile on cpu + vulkan of a MobileNet-style block is right, whatever
    the devices do. With a flattering spec sheet (and the first convolution pinned there) the
    partitioner first puts the convolutions on Vulkan; the depthwise one is wrong there on
    lavapipe (at this shape): found, moved, recompiled (by the first compile, when its plan
    put it there, or by the second; once found it is remembered)."""
    model, x = _model(Depthwise), torch.randn(2, 16, 16, 16)
    first = polyarch.runtime.load(polyarch.compile(model, (x,), devices=["cpu", "vulkan"], output=str(tmp_path / "a.pab")))
    np.testing.assert_allclose(first(x.numpy()), eager(model, (x,)), atol=TOL, rtol=0)

    # pw pinned there: with the flattering sheet, all that follows it is free on Vulkan, whatever this
    # host's calibrated CPU says (unpinned, the CPU's measured call overhead decided, and sometimes kept all on cpu)
    path = polyarch.compile(model, (x,), devices=["cpu", "vulkan"], profiles=[FLATTERING], pins=["pw=vulkan"],
                            output=str(tmp_path / "b.pab"))
    run = polyarch.runtime.load(path)
    np.testing.assert_allclose(run(x.numpy()), eager(model, (x,)), atol=TOL, rtol=0)
    v = run.plan["verification"]
    assert v["status"] == "verified"
    if I.is_software(I.identify("vulkan")):  # the lavapipe bug this guards against
        wrong = [w for r in first.plan["verification"]["rounds"] + v["rounds"] for w in r.get("wrong_ops", [])]
        assert any("torch.aten.convolution (dw)" in w for w in wrong), v["rounds"]
        for seg in run.plan["segments"]:
            if seg["device"] == "vulkan":
                assert not any(op["path"] == "dw" for op in seg["op_list"])


def test_injected_wrong_segment_is_caught_and_replanned(tmp_path, monkeypatch, fresh_cache):
    """A Vulkan back-end that computes tanh as sigmoid: verification must catch the segment,
    name tanh, keep it off Vulkan (remembered for this device) and deliver a right bundle."""
    from torch_mlir import ir

    from polyarch.compiler import iree
    from polyarch.dialects.polyarch import make_context

    real = iree.run_iree_compile

    def miscompiling(cmd):
        if "--iree-hal-target-device=vulkan" in cmd:
            src = cmd[1]
            with make_context():
                with open(src, "rb") as f:
                    text = str(ir.Module.parse(f.read()))
            if "torch.aten.tanh" in text:
                bad = src + ".bad.mlir"
                with open(bad, "w") as f:
                    f.write(text.replace("torch.aten.tanh", "torch.aten.sigmoid"))
                cmd = [cmd[0], bad, *cmd[2:]]
        return real(cmd)

    monkeypatch.setattr(iree, "run_iree_compile", miscompiling)
    model, x = _model(TanhMLP), torch.randn(8, 64)
    path = polyarch.compile(model, (x,), devices=["cpu", "vulkan"], profiles=[FLATTERING], pins=["a=vulkan"],
                            output=str(tmp_path / "m.pab"))
    run = polyarch.runtime.load(path)
    np.testing.assert_allclose(run(x.numpy()), eager(model, (x,)), atol=TOL, rtol=0)
    rounds = run.plan["verification"]["rounds"]
    assert rounds[0]["plans"]["cpu+vulkan"]["status"] == "wrong"
    assert any("torch.aten.tanh" in w for w in rounds[0]["wrong_ops"])
    assert [s["device"] for s in run.plan["segments"]][0] == "vulkan"  # the pinned layer stays there
    for seg in run.plan["segments"]:
        if seg["device"] == "vulkan":
            assert "torch.aten.tanh" not in [op["op"] for op in seg["op_list"]]
    cached = json.loads(next((fresh_cache / "verdicts").glob("vulkan-*.json")).read_text())
    assert any(k.startswith("torch.aten.tanh(") for k in cached["wrong_ops"])
    # the next compile avoids it at once: one round, no wrong segment
    path = polyarch.compile(model, (x,), devices=["cpu", "vulkan"], profiles=[FLATTERING], pins=["a=vulkan"],
                            output=str(tmp_path / "n.pab"))
    assert polyarch.runtime.load(path).plan["verification"]["rounds"][0]["plans"]["cpu+vulkan"]["status"] == "verified"


def test_split_slower_than_cpu_alone_is_replaced(tmp_path, fresh_verdicts):
    """With an iGPU spec sheet the plan puts work on lavapipe; measured, the CPU alone is
    faster, so the bundle runs on the CPU alone and says why."""
    if not I.is_software(I.identify("vulkan")):
        pytest.skip("needs a software Vulkan (slower than the CPU it runs on)")
    model, x = _model(TanhMLP), torch.randn(256, 64)
    path = polyarch.compile(model, (x,), devices=["cpu", "vulkan"], profiles=[P.BUILTIN["vulkan"]],
                            output=str(tmp_path / "m.pab"))
    run = polyarch.runtime.load(path)
    assert {s["device"] for s in run.plan["segments"]} == {"cpu"}
    assert run.plan["measured_us"] > 0
    np.testing.assert_allclose(run(x.numpy()), eager(model, (x,)), atol=TOL, rtol=0)
    r = cli("inspect", path)
    assert r.returncode == 0, r.stderr
    assert "device vulkan: " in r.stdout and "verification: verified" in r.stdout
    assert "measured" in r.stdout


def test_no_verify_and_no_calibrate_from_the_cli(tmp_path, fresh_cache):
    model_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "mlp.py")
    out = tmp_path / "m.pab"
    r = cli("compile", model_file, "-d", "cpu", "-d", "vulkan", "--no-calibrate", "--no-verify", "-o", str(out),
            cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "polyarch calibrate -d cpu -d vulkan" in r.stderr
    r = cli("inspect", str(out))
    assert "verification: not verified" in r.stdout


def test_corrections_stay_within_the_ratios_measured():
    """Measured segment times correct the cost model per op class (compiler/grounding.py). Two
    segments that no per-class correction explains (a matmul-heavy one measured at 0.5x its
    prediction, an elementwise-heavy one at 2.2x), compiled again and again with the
    corrections each compile leaves: the corrections stay between the ratios measured (they
    had run away, in the suite's cache to cpu matmul 0.011 and other 11.9)."""
    from polyarch.compiler import grounding as G

    truth = {"A": ({"torch.aten.mm": 900.0, "torch.aten.add.Tensor": 100.0}, 500.0),
             "B": ({"torch.aten.mm": 100.0, "torch.aten.add.Tensor": 900.0}, 2200.0)}
    prof = replace(P.BUILTIN["cpu"], device="cpu", call_s=0.0)
    corr = {}
    priced = {"profiles": [prof], "devices": {"cpu": {"identity": None, "source": "measured on this host"}},
              "verdicts": {"cpu": {"wrong_ops": {}, "corrections": corr}}}
    klass = {"torch.aten.mm": "matmul", "torch.aten.add.Tensor": "other"}
    for _ in range(60):
        applied = {"cpu": dict(corr)}
        segs = []
        for name, (ops, _) in truth.items():
            # the planner's prediction: the profile's time of each op times its class's correction
            op_list = [{"op": op, "predicted_us": u * corr.get(klass[op], 1.0)} for op, u in ops.items()]
            segs.append({"name": name, "device": "cpu", "op_list": op_list,
                         "predicted_us": sum(o["predicted_us"] for o in op_list)})
        manifest = {"segments": segs, "plan": {"predicted_us": sum(s["predicted_us"] for s in segs)}}
        record = {"segments": {n: {"measured_us": t} for n, (_, t) in truth.items()},
                  "measured_us": sum(t for _, t in truth.values())}
        G._update_corrections(priced, manifest, record, applied)
    assert set(corr) == {"matmul", "other"}
    for k, v in corr.items():
        assert 0.5 <= v <= 2.2, (k, v)
    assert corr["matmul"] < corr["other"]  # the matmul-heavy segment is the one measured fast


def test_corrections_of_the_old_rule_are_dropped_on_reading(fresh_cache):
    """A verdicts file written before corrections were geometric means (no corrections_rule)
    may hold corrections that ran away: they are dropped, the ops measured wrong kept."""
    ident = I.identify("cpu")
    wrong = {"torch.aten.tanh(f32)": {"op": "torch.aten.tanh", "reason": "measured wrong", "date": "2026-12-01"}}
    measured.store_verdicts(ident, {"wrong_ops": wrong, "corrections": {"matmul": 0.5}})
    assert measured.load_verdicts(ident) == {"wrong_ops": wrong, "corrections": {"matmul": 0.5}}
    path = next((fresh_cache / "verdicts").glob("cpu-*.json"))
    old = json.loads(path.read_text())
    del old["corrections_rule"]
    old["corrections"] = {"matmul": 0.0114, "other": 11.85}
    path.write_text(json.dumps(old))
    assert measured.load_verdicts(ident) == {"wrong_ops": wrong, "corrections": {}}
