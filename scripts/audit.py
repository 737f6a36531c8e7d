"""The hardening audit of issues 13 and 21, rerun on demand: `make audit` (a few minutes).

Bad inputs of every kind a user can give (damaged bundles, bad input specs and options, bad
model files, bad arrays, concurrent use, signals) go through the CLI and the Python API, each
in a process of its own, and each outcome is classified:

  ok         a valid input did what it should (outputs compared where there are any)
  clear      a bad input was refused with one error line that says what and how to fix it
  unclear    refused, but with a traceback of polyarch's insides or no fix to follow
  crash      the process died of a signal, hung, or left an uncaught error
  wrong      a bad input was accepted without an error, or an output is wrong
  data loss  a file the user had (model, old bundle) changed or went, or temp files stayed

Prints one line per case and a summary; exits 1 if there is any crash, wrong output, data
loss (temp files left count as such) or unclear error (issue 21's "Done when")."""

import argparse
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
CLI = [os.path.join(os.path.dirname(PY), "polyarch")]  # the installed console script, as a user runs it
KINDS = ("ok", "clear", "unclear", "crash", "wrong", "data loss")
UNCLEAR_ALLOWED = 0

EMBED = """
import torch


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)

    def forward(self, ids):
        return self.emb(ids).sum(1)


def example_inputs():
    return (torch.randint(0, 50, (2, 8)),)
"""


def _digest(path):
    if os.path.isdir(path):
        return "dir"
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


# a float input cast to indices (issue 21: `polyarch run` without -i once made values out of its range)
FLOAT_INDEX = """
import torch
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
    def forward(self, x):
        return self.emb(x.long())
def example_inputs():
    return (torch.tensor([[1.0, 7.0, 3.0]]),)
"""


def _one_error_line(text):
    lines = [l for l in text.splitlines() if l.startswith("Error")]
    return lines[0] if len(lines) == 1 else None


class Audit:
    def __init__(self, work, verbose):
        self.work, self.verbose = work, verbose
        self.results = []

    def record(self, group, name, kind, detail=""):
        self.results.append((group, name, kind, detail))
        if self.verbose or kind not in ("ok", "clear"):
            print(f"[{kind:>9}] {group}: {name}" + (f"\n            {detail[:300]}" if detail else ""), flush=True)

    def _temp_leftovers(self):
        return set(glob.glob(os.path.join(tempfile.gettempdir(), "polyarch-*")))

    def cli(self, group, name, args, expect="error", protect=(), timeout=300, check=None):
        """Run `polyarch ARGS`; expect 'error' (a bad input) or 'ok'. `protect`: files that must
        be unchanged afterwards. `check(result)`: more checks of an ok run -> '' or what is wrong."""
        before = {p: _digest(p) for p in protect}
        temps = self._temp_leftovers()
        try:
            r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=self.work)
        except subprocess.TimeoutExpired:
            return self.record(group, name, "crash", f"no answer in {timeout} s")
        lost = [p for p, d in before.items() if _digest(p) != d]
        left = self._temp_leftovers() - temps
        if lost or left:
            return self.record(group, name, "data loss", f"changed: {lost}; temp left: {sorted(left)}")
        self._classify(group, name, r.returncode, r.stderr, expect, check(r) if check and r.returncode == 0 else "")

    def _classify(self, group, name, rc, err, expect, problem=""):
        """expect: 'ok' (a valid input), 'error' (a bad one) or 'either' (damage that may not
        matter, such as a flipped byte in a zip header: fine if the result is right)."""
        if rc < 0:
            return self.record(group, name, "crash", f"killed by signal {-rc}: {err.strip()[-300:]}")
        if "Traceback" in err or "Aborted!" in err:
            return self.record(group, name, "crash" if "Error:" not in err else "unclear", err.strip()[-400:])
        if rc == 0:
            if expect == "error":
                return self.record(group, name, "wrong", "accepted without an error")
            return self.record(group, name, "wrong" if problem else "ok", problem)
        line = _one_error_line(err)
        usage = "Try 'polyarch" in err  # click's usage errors: the option and what it takes
        if expect == "ok":
            return self.record(group, name, "wrong", f"a valid input was refused: {err.strip()[-300:]}")
        # 'error' and 'either': a refusal must be clear
        if usage or (line and "Fix:" in line):
            return self.record(group, name, "clear", line or "")
        return self.record(group, name, "unclear", err.strip()[-300:])

    def api(self, group, name, code, expect="error", timeout=300):
        """Run `code` (with `polyarch`, `np` imported; it may set `result` to a problem string)
        in a process of its own. A PolyarchError with a fix is clear; any other exception is
        unclear (a traceback from inside polyarch)."""
        prog = textwrap.dedent("""
            import sys, numpy as np, polyarch, polyarch.runtime
            from polyarch.errors import PolyarchError
            result = ""
            try:
            {code}
            except PolyarchError as e:
                print("POLYARCH-ERROR", "Fix:" in str(e), str(e).splitlines()[0], file=sys.stderr)
                sys.exit(3)
            except BaseException as e:
                import traceback; traceback.print_exc()
                sys.exit(4)
            if result:
                print("PROBLEM", result, file=sys.stderr)
                sys.exit(5)
        """).replace("{code}", textwrap.indent(textwrap.dedent(code), "    "))
        try:
            r = subprocess.run([PY, "-c", prog], capture_output=True, text=True, timeout=timeout, cwd=self.work)
        except subprocess.TimeoutExpired:
            return self.record(group, name, "crash", f"no answer in {timeout} s")
        err = r.stderr
        if r.returncode < 0:
            return self.record(group, name, "crash", f"killed by signal {-r.returncode}")
        if r.returncode == 0:
            return self.record(group, name, "wrong" if expect == "error" else "ok",
                               "accepted without an error" if expect == "error" else "")
        if r.returncode == 5:
            return self.record(group, name, "wrong", err.split("PROBLEM", 1)[1].strip())
        if r.returncode == 3:
            line = err.split("POLYARCH-ERROR", 1)[1].strip()
            if expect == "ok":
                return self.record(group, name, "wrong", f"a valid input was refused: {line}")
            return self.record(group, name, "clear" if line.startswith("True") else "unclear", line)
        return self.record(group, name, "unclear" if r.returncode == 4 else "crash", err.strip()[-400:])

    def summary(self):
        counts = {k: sum(1 for r in self.results if r[2] == k) for k in KINDS}
        print(f"\n{len(self.results)} cases: " + ", ".join(f"{counts[k]} {k}" for k in KINDS))
        bad = counts["crash"] + counts["wrong"] + counts["data loss"]
        verdict = bad == 0 and counts["unclear"] <= UNCLEAR_ALLOWED
        print("audit: " + ("PASSED" if verdict else "FAILED") +
              f" (0 crashes, 0 wrong outputs, 0 data loss and at most {UNCLEAR_ALLOWED} unclear errors asked)")
        return verdict


# --- damaged bundles -------------------------------------------------------------------------

def _rewrite(src, dst, manifest=None, drop=(), compress=(), extra=None):
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            if info.filename in drop:
                continue
            data = zi.read(info)
            if info.filename == "manifest.json" and manifest is not None:
                m = json.loads(data)
                data = manifest(m) if callable(manifest) else manifest
                data = data if isinstance(data, (bytes, str)) else json.dumps(data)
            if info.filename in compress:
                zo.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                zo.writestr(info, data)
        for k, v in (extra or {}).items():
            zo.writestr(k, v)


def _set(path, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return m
    return edit


_DELETE = object()


def damaged_bundles(a, good, x_npy):
    d = os.path.join(a.work, "damaged")
    os.makedirs(d, exist_ok=True)
    raw = open(good, "rb").read()
    cases = {}

    def put(name, data):
        p = os.path.join(d, name + ".pab")
        with open(p, "wb") as f:
            f.write(data)
        cases[name] = p

    put("empty", b"")
    for frac in (0.1, 0.5, 0.9):
        put(f"truncated at {int(frac * 100)}%", raw[:int(len(raw) * frac)])
    put("last byte cut", raw[:-1])
    put("central directory end cut", raw[:-22])
    put("random bytes", np.random.default_rng(0).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    put("a text file", b"hello\n")
    for i, off in enumerate(np.linspace(64, len(raw) - 64, 10).astype(int)):
        b = bytearray(raw)
        b[off] ^= 0x55
        put(f"byte {off} flipped", bytes(b))
    members = zipfile.ZipFile(good).namelist()
    seg = next(n for n in members if n.endswith(".vmfb"))
    edits = {
        "manifest not JSON": b"{not json",
        "manifest a list": b"[]",
        "manifest empty object": b"{}",
        "format wrong": _set(["format"], "other"),
        "schema_version '3'": _set(["schema_version"], "3"),
        "schema_version 99": _set(["schema_version"], 99),
        "schema_version true": _set(["schema_version"], True),
        "schema_version -1": _set(["schema_version"], -1),
        "no plans": _set(["plans"], _DELETE),
        "plans empty": _set(["plans"], []),
        "plans not a list": _set(["plans"], 5),
        "members missing": _set(["members"], _DELETE),
        "members not a dict": _set(["members"], []),
        "signature missing": _set(["signature"], _DELETE),
        "signature inputs not a list": _set(["signature", "inputs"], 3),
        "input dtype unknown": _set(["signature", "inputs", 0, "dtype"], "float128x"),
        "input shape not a list": _set(["signature", "inputs", 0, "shape"], "32x256"),
        "segment device unknown": _set(["plans", 0, "segments", 0, "device"], "tpu"),
        "segment member missing": _set(["plans", 0, "segments", 0, "member"], "nope.vmfb"),
        "schedule names no segment": _set(["plans", 0, "schedule", 0, "segment"], "seg_99"),
        "schedule step unknown": _set(["plans", 0, "schedule", 0, "op"], "teleport"),
        "outputs name unknown values": _set(["plans", 0, "outputs"], ["v999"]),
        "member hash wrong": lambda m: (m["members"][seg].update(sha256="0" * 64), m)[1],
        "member size wrong": lambda m: (m["members"][seg].update(size=1), m)[1],
    }
    for name, edit in edits.items():
        p = os.path.join(d, name.replace(" ", "_").replace("'", "") + ".pab")
        _rewrite(good, p, manifest=edit)
        cases[name] = p
    p = os.path.join(d, "member_removed.pab")
    _rewrite(good, p, drop=(seg,))
    cases["member removed"] = p
    p = os.path.join(d, "member_compressed.pab")
    _rewrite(good, p, compress=(seg,))
    cases["member compressed"] = p
    p = os.path.join(d, "signature_garbage.pab")
    _rewrite(good, p, extra={"manifest.sig": b"\x00garbage"})
    cases["signature member garbage"] = p
    cases["a folder"] = d
    cases["no such file"] = os.path.join(d, "absent.pab")
    ref, out = os.path.join(d, "ref.npy"), os.path.join(d, "out.npy")
    subprocess.run([*CLI, "run", good, "-i", x_npy, "-o", ref], check=True, capture_output=True)

    def same_output(r):  # a damaged bundle that still runs must give the good bundle's output
        same = os.path.exists(out) and np.array_equal(np.load(out), np.load(ref))
        if os.path.exists(out):
            os.unlink(out)
        return "" if same else "ran, with an output that differs from the intact bundle's"

    for name, p in cases.items():
        a.cli("damaged bundle: run", name, ["run", p, "-i", x_npy, "-o", out], expect="either", check=same_output)
    for name in ("empty", "truncated at 50%", "random bytes", "manifest a list", "schema_version '3'", "plans empty",
                 "segment device unknown"):
        a.cli("damaged bundle: inspect", name, ["inspect", cases[name]])
    a.cli("damaged bundle: inspect", "signature member garbage", ["inspect", cases["signature member garbage"]],
          expect="ok", check=lambda r: "" if "damaged" in r.stdout else "the damaged signature is not shown")
    for name in ("member hash wrong", "segment member missing", "schedule names no segment", "plans empty"):
        a.api("damaged bundle: load()", name, f"polyarch.runtime.load({cases[name]!r})(np.zeros((32, 256), np.float32))")
    key = os.path.join(a.work, "audit.key")
    if not os.path.exists(key):
        subprocess.run([*CLI, "keygen", "-o", key], check=True, capture_output=True)
    a.cli("damaged bundle: trust", "garbage signature", ["run", cases["signature member garbage"], "--trusted-key", key + ".pub"])
    a.cli("damaged bundle: trust", "unsigned", ["run", good, "--trusted-key", key + ".pub"])
    a.cli("damaged bundle: trust", "private key given as trusted", ["run", good, "--trusted-key", key])
    a.cli("damaged bundle: trust", "missing key file", ["run", good, "--trusted-key", os.path.join(d, "none.pub")])


# --- bad specs, options and model files --------------------------------------------------------

def bad_compiles(a, mlp, embed, good):
    out = os.path.join(a.work, "out.pab")
    plan = lambda *args: ["plan", mlp, *args]
    a.cli("input spec", "zero rows (a valid empty batch)", plan("-i", "0x256xf32"), expect="either")
    specs = {"empty spec": "", "no dims": "f32", "bad dtype": "32x256xf33", "no dtype": "32x256",
             "negative dim": "-1x256xf32", "wrong feature size": "32x8xf32", "huge": "99999999999x256xf32",
             "letters": "axbxf32"}
    for name, s in specs.items():
        a.cli("input spec", name, plan("-i", s))
    a.cli("input spec", "two inputs for one", plan("-i", "32x256xf32", "-i", "32x256xf32"))
    a.cli("input spec", "ids as floats", ["plan", embed, "-i", "2x8xf32"])
    for s in ("input0", "input5:0", "input0:9", "input0:0:0", "zz:0", "input0:0:abc", "input0:0=1bad"):
        a.cli("dynamic dim", s, plan("--dynamic-dim", s))
    for dev in ("tpu", "cpu:cpu", ""):
        a.cli("device", repr(dev), plan("-d", dev))
    for dev in ("cuda", "vulkan:7"):  # absent here: planned from the spec sheet (cross-compiling), or refused clearly
        a.cli("device", f"{dev} (absent)", plan("-d", dev), expect="either")
    for pin in ("fc1", "fc1=tpu", "nomatch=cpu", "=cpu", "fc1=vulkan:9"):
        a.cli("pin", pin, plan("--pin", pin))
    for opt in (["-j", "0"], ["-j", "-1"], ["-j", "abc"], ["--objective", "bogus"], ["--solver", "bogus"],
                ["--plans", "tpu"], ["--tune", "bogus"]):
        a.cli("option", " ".join(opt), ["compile", mlp, *opt, "-o", out])
    a.cli("option", "--iree-flag nonsense", ["compile", mlp, "--iree-flag=--no-such-flag", "-o", out, "--tune", "none"])
    pdir = os.path.join(a.work, "profiles")
    os.makedirs(pdir, exist_ok=True)
    profiles = {"missing file": None, "not JSON": "{", "profiles a number": '{"profiles": 5}', "a list": "[]",
                "a device without numbers": '{"profiles": [{"device": "cpu"}]}', "a string": '"cpu"',
                "negative peak": '{"profiles": [{"device": "cpu", "peak_flops": {"f32": -1}, "mem_bw": 1e9}]}'}
    for name, text in profiles.items():
        p = os.path.join(pdir, name.replace(" ", "_") + ".json")
        if text is not None:
            open(p, "w").write(text)
        a.cli("profile", name, plan("--profile", p))
    mdir = os.path.join(a.work, "models")
    os.makedirs(mdir, exist_ok=True)
    models = {
        "empty file": "",
        "no model in it": "import torch\nx = 1\n",
        "Model is an int": "Model = 3\n",
        "forward raises": "import torch\nclass Model(torch.nn.Module):\n    def forward(self, x):\n        raise ValueError('boom')\n",
        "syntax error": "class Model(:\n",
        "import error": "import no_such_module_anywhere\n",
        "data-dependent shape": "import torch\nclass Model(torch.nn.Module):\n    def forward(self, x):\n        return x[x > 0]\n",
        "calls sys.exit": "import sys\nsys.exit(0)\n",
    }
    for name, text in models.items():
        p = os.path.join(mdir, name.replace(" ", "_") + ".py")
        open(p, "w").write(text)
        a.cli("model file", name, ["plan", p, "-i", "4x4xf32"], protect=[p])
    # outputs that are not one tensor: compiled as what they flatten to (or refused clearly)
    for name, ret in {"returns None": "None", "returns a dict": "{'y': x * 2}", "returns an int": "3"}.items():
        p = os.path.join(mdir, name.replace(" ", "_") + ".py")
        open(p, "w").write(f"import torch\nclass Model(torch.nn.Module):\n    def forward(self, x):\n        return {ret}\n")
        a.cli("model file", name, ["compile", p, "-i", "4x4xf32", "-o", out, "--tune", "none"], expect="either")
    junk = os.path.join(mdir, "junk.onnx")
    open(junk, "wb").write(b"\x08\x01junk")
    a.cli("model file", "ONNX garbage", ["plan", junk, "-i", "4x4xf32"])
    a.cli("model file", "missing", ["plan", os.path.join(mdir, "absent.py")])
    a.cli("model file", ":ATTR missing", ["plan", mlp + ":Nope"])
    # outputs: never over a source, never a half-written bundle; the old bundle survives a failure
    mine = os.path.join(a.work, "mine.py")
    shutil.copy(mlp, mine)
    a.cli("output", "-o over the model", ["compile", mine, "-o", mine, "--tune", "none"], protect=[mine])
    a.cli("output", "-o a folder", ["compile", mlp, "-o", a.work, "--tune", "none"])
    deep = os.path.join(a.work, "no", "such", "m.pab")
    a.cli("output", "-o in a missing folder (made)", ["compile", mlp, "-o", deep, "--tune", "none"], expect="either",
          check=lambda r: "" if os.path.isfile(deep) else "rc 0 but no bundle")
    old = os.path.join(a.work, "old.pab")
    shutil.copy(good, old)
    a.cli("output", "failed compile over an old bundle", ["compile", mlp, "--pin", "fc1=tpu", "-o", old], protect=[old])
    a.cli("output", "failed verification over an old bundle",
          ["compile", os.path.join(mdir, "forward_raises.py"), "-i", "4x4xf32", "-o", old], protect=[old])


# --- bad arrays ---------------------------------------------------------------------------------

def bad_arrays(a, good, ids_bundle):
    d = os.path.join(a.work, "arrays")
    os.makedirs(d, exist_ok=True)
    arrays = {"float64": np.zeros((32, 256)), "int64": np.zeros((32, 256), np.int64), "rank 1": np.zeros(256, np.float32),
              "rank 3": np.zeros((1, 32, 256), np.float32), "wrong width": np.zeros((32, 255), np.float32),
              "zero rows": np.zeros((0, 256), np.float32), "bool": np.zeros((32, 256), bool),
              "complex": np.zeros((32, 256), np.complex64), "0-d": np.float32(1)}
    for name, arr in arrays.items():
        p = os.path.join(d, name.replace(" ", "_") + ".npy")
        np.save(p, arr)
        a.cli("run -i", name, ["run", good, "-i", p])
    obj = os.path.join(d, "object.npy")
    np.save(obj, np.array([None, {}], dtype=object), allow_pickle=True)
    a.cli("run -i", "object array", ["run", good, "-i", obj])
    txt = os.path.join(d, "text.npy")
    open(txt, "w").write("not an array")
    a.cli("run -i", "not an .npy", ["run", good, "-i", txt])
    a.cli("run -i", "missing file", ["run", good, "-i", os.path.join(d, "absent.npy")])
    x = os.path.join(d, "x.npy")
    np.save(x, np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32))
    a.cli("run -i", "two arrays for one input", ["run", good, "-i", x, "-i", x])
    a.cli("run -o", "into a missing folder (made, as for every output)", ["run", good, "-i", x, "-o",
                                                                       os.path.join(d, "no", "o.npy")], expect="ok",
          check=lambda r: "" if os.path.isfile(os.path.join(d, "no", "o.npy")) else "rc 0 but no file")
    a.cli("run -o", "under a file", ["run", good, "-i", x, "-o", os.path.join(x, "o.npy")])
    a.cli("run", "--repeat 0", ["run", good, "-i", x, "--repeat", "0"])
    a.cli("run", "--plan nope", ["run", good, "--plan", "nope"])
    for v in (50, -1, 2 ** 40, -(2 ** 62)):
        p = os.path.join(d, f"ids_{v}.npy")
        ids = np.zeros((2, 8), np.int64)
        ids[1, 3] = v
        np.save(p, ids)
        a.cli("token ids", f"id {v} (vocabulary 50)", ["run", ids_bundle, "-i", p])
    a.cli("token ids", "run without -i", ["run", ids_bundle], expect="ok")
    call = f"b = polyarch.runtime.load({good!r})\nx = np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32)\n"
    a.api("API call", "a list of lists", call + "b(x.tolist())", expect="ok")
    a.api("API call", "a string", call + "b('hello')")
    a.api("API call", "None", call + "b(None)")
    a.api("API call", "no arguments", call + "b()")
    a.api("API call", "two arrays for one input", call + "b(x, x)")
    a.api("API call", "by name", call + "result = '' if np.array_equal(b(x=x), b(x)) else 'differs from by position'",
          expect="ok")
    a.api("API call", "an unknown name", call + "b(y=x)")
    a.api("API call", "by position and by name", call + "b(x, x=x)")
    for name, make in {"non-contiguous": "np.ascontiguousarray(np.concatenate([x, x], 1))[:, ::2]",
                       "Fortran order": "np.asfortranarray(x)", "big-endian": "x.astype('>f4')",
                       "read-only": "(lambda y: (y.setflags(write=False), y)[1])(x.copy())",
                       "NaN and inf": "np.where(x > 1, np.nan, np.where(x < -1, np.inf, x)).astype(np.float32)"}.items():
        a.api("API call", name, call + f"y = {make}\nwant = b(np.ascontiguousarray(y, dtype=np.float32))\n"
              "got = b(y)\nresult = '' if np.array_equal(got, want, equal_nan=True) else 'differs from the contiguous call'",
              expect="ok")
    a.api("API call", "after close", call + "b.close()\nb(x)")
    a.api("API load", "plan='nope'", f"polyarch.runtime.load({good!r}, plan='nope')")
    a.api("API load", "devices={'tpu': 'x'}", f"polyarch.runtime.load({good!r}, devices={{'tpu': 'x'}})")
    a.api("API load", "trusted key missing", f"polyarch.runtime.load({good!r}, trusted_keys=['/nonexistent.pub'])")
    a.api("API load", "a path object", f"import pathlib\npolyarch.runtime.load(pathlib.Path({good!r}))", expect="ok")


# --- issue 21: the edges (trust, writes, files changing under a process, indices, values) --------

def _edit_manifest_text(src, dst, change):
    """A copy of `src` whose manifest text is change(text) (members and signature kept)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = zi.read(info)
            zo.writestr(info, change(data.decode()).encode() if info.filename == "manifest.json" else data)


def edges_trust(a, good):
    d = os.path.join(a.work, "edges")
    os.makedirs(d, exist_ok=True)
    key = os.path.join(d, "k")
    subprocess.run([*CLI, "keygen", "-o", key], check=True, capture_output=True)
    for name, keys in (("trusted_keys=[]", "[]"), ("trusted_keys a string", repr(key + ".pub")),
                       ("trusted_keys a number", "3"), ("trusted_keys=[None]", "[None]")):
        a.api("edges: trust", name, f"polyarch.runtime.load({good!r}, trusted_keys={keys})")
    signed = os.path.join(d, "signed.pab")
    shutil.copy(good, signed)
    subprocess.run([*CLI, "sign", signed, "--key", key], check=True, capture_output=True)
    altered = os.path.join(d, "altered.pab")
    _edit_manifest_text(signed, altered, lambda t: t.replace('"name": "cpu"', '"name": "evil\\u001b[2J\\u001b[31m"', 1))
    a.cli("edges: trust", "inspect an altered signed bundle", ["inspect", altered], expect="ok",
          check=lambda r: "" if "not verified" in r.stdout and "\x1b" not in r.stdout
          else "claims verification, or prints control characters raw")
    a.cli("edges: trust", "inspect --trusted-key on an altered bundle", ["inspect", altered, "--trusted-key", key + ".pub"])
    a.cli("edges: trust", "inspect --trusted-key on the signed bundle", ["inspect", signed, "--trusted-key", key + ".pub"],
          expect="ok", check=lambda r: "" if "verified: signed by trusted key" in r.stdout else "not shown as verified")
    big = os.path.join(d, "bigsig.pab")
    shutil.copy(good, big)
    with zipfile.ZipFile(big, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.sig", b"{" + b" " * (1 << 30) + b"}")
    t = time.time()
    a.cli("edges: trust", "a 1 GiB signature member", ["inspect", big], expect="ok",
          check=lambda r: "" if time.time() - t < 20 and "damaged" in r.stdout else "slow, or not shown as damaged")
    link, real = os.path.join(d, "link.pab"), os.path.join(d, "real.pab")
    shutil.copy(good, real)
    os.symlink(real, link)
    a.cli("edges: trust", "sign through a symbolic link", ["sign", link, "--key", key], expect="ok",
          check=lambda r: "" if os.path.islink(link) and subprocess.run(
              [*CLI, "run", real, "--trusted-key", key + ".pub"], capture_output=True).returncode == 0
          else "the link was replaced or the real file left unsigned")
    dangling = os.path.join(d, "new.key")
    os.symlink(os.path.join(d, "target-of-link"), dangling + ".pub")
    a.cli("edges: trust", "keygen through a dangling link", ["keygen", "-o", dangling],
          check=lambda r: "" if not os.path.exists(os.path.join(d, "target-of-link")) else "wrote through the link")
    if os.path.exists(os.path.join(d, "target-of-link")):
        a.record("edges: trust", "keygen through a dangling link", "data loss", "wrote through the link")
    bad = os.path.join(d, "bad.pab")
    raw = bytearray(open(good, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(bad, "wb").write(bytes(raw))
    a.cli("edges: trust", "sign a bundle that fails its hashes", ["sign", bad, "--key", key])
    loose = os.path.join(d, "loose.key")
    subprocess.run([*CLI, "keygen", "-o", loose], check=True, capture_output=True)
    os.chmod(loose, 0o644)
    a.cli("edges: trust", "a private key everyone can read", ["sign", real, "--key", loose])
    deep = os.path.join(d, "deep.pab")
    _edit_manifest_text(good, deep, lambda t: t[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    a.cli("edges: manifest", "nested 100000 deep", ["run", deep])
    deep = os.path.join(d, "deep5000.pab")
    _edit_manifest_text(good, deep, lambda t: t[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}")
    a.api("edges: manifest", "nested 5000 deep (valid JSON)", f"polyarch.runtime.load({deep!r})")
    member = next(n for n in zipfile.ZipFile(good).namelist() if n.endswith(".vmfb"))
    broken = os.path.join(d, "broken_module.pab")  # a module of garbage whose hash the manifest agrees with
    junk = os.urandom(4096)
    import hashlib
    with zipfile.ZipFile(good) as zi, zipfile.ZipFile(broken, "w") as zo:
        m = json.loads(zi.read("manifest.json"))
        m["members"][member] = {"sha256": hashlib.sha256(junk).hexdigest(), "size": len(junk)}
        for info in zi.infolist():
            zo.writestr(info, json.dumps(m) if info.filename == "manifest.json" else junk if info.filename == member
                        else zi.read(info))
    a.api("edges: manifest", "a hash-valid but broken module", f"polyarch.runtime.load({broken!r})")
    for name, edit in (("signature shape disagrees with the module", _set(["signature", "inputs", 0, "shape"], [4, 256])),
                       ("signature dtype disagrees with the module", _set(["signature", "inputs", 0, "dtype"], "int32"))):
        p = os.path.join(d, name.replace(" ", "_") + ".pab")
        _rewrite(good, p, manifest=edit)
        dt = "np.int32" if "dtype" in name else "np.float32"
        shape = "(4, 256)" if "shape" in name else "(32, 256)"
        a.api("edges: manifest", name, f"polyarch.runtime.load({p!r})(np.zeros({shape}, {dt}))")
    for name, edit in (("bad splat hex", lambda m: (m["plans"][0]["segments"][0].setdefault(
            "parameters", {"scope": "model", "keys": {}})["keys"].update(k="splat:zz:4"), m)[1]),
                       ("parameters.member names no member", _set(["parameters"], {"member": "nope.irpa"}))):
        p = os.path.join(d, name.replace(" ", "_").replace(".", "_") + ".pab")
        _rewrite(good, p, manifest=edit)
        a.api("edges: manifest", name, f"polyarch.runtime.load({p!r})")
    r = subprocess.run(f"'{CLI[0]}' inspect '{good}' --ops | head -1", shell=True, capture_output=True, text=True)
    a._classify("edges: manifest", "inspect into a closed pipe", 0 if not r.stderr else 1, r.stderr, "ok")


def edges_writes(a, mlp, good):
    d = os.path.join(a.work, "writes")
    os.makedirs(d, exist_ok=True)
    dep = os.path.join(d, "dep.py")
    shutil.copy(mlp, dep)
    a.cli("edges: writes", "--depfile over the model", ["compile", dep, "-o", os.path.join(d, "dep.pab"), "--depfile", dep],
          protect=[dep])
    x = os.path.join(d, "x.pab")
    shutil.copy(good, x)
    a.cli("edges: writes", "--depfile over the bundle (-o)", ["compile", dep, "-o", x, "--depfile", x], protect=[x])
    a.cli("edges: writes", "run --trace over the bundle run", ["run", x, "--trace", x], protect=[x])
    a.cli("edges: writes", "run -o twice the same file", ["run", x, "-o", os.path.join(d, "o.npy"), "-o",
                                                         os.path.join(d, "o.npy")])
    a.cli("edges: writes", "plan --trace over the model", ["plan", dep, "--trace", dep], protect=[dep])
    a.cli("edges: writes", "plan --gantt over the model", ["plan", dep, "--gantt", dep], protect=[dep])
    a.cli("edges: writes", "generate --trace over the bundle", ["generate", x, "--ids", "1", "--trace", x], protect=[x])
    a.cli("edges: writes", "plan --generate --pareto over the model", ["plan", dep, "--generate", "-d", "cuda",
                                                                      "--pareto", dep], protect=[dep])
    a.cli("edges: writes", "compile -o over the --draft model", ["compile", os.path.join(ROOT, "examples", "tiny_llama.py"),
                                                                "--generate", "--draft", dep, "-o", dep], protect=[dep])
    like = os.path.join(d, "like.json")
    open(like, "w").write('{"profiles": []}')
    a.cli("edges: writes", "calibrate -o over its --like profile", ["calibrate", "--like", like, "-o", like], protect=[like])
    a.cli("edges: writes", "calibrate -o in /proc", ["calibrate", "-o", "/proc/x.json"])
    for out in ("/proc/version", "/etc/hostname/x.pab", os.path.join(dep, "x.pab")):
        t = time.time()
        a.cli("edges: writes", f"-o {out}", ["compile", dep, "-o", out],
              check=None)
        if time.time() - t > 30:
            a.record("edges: writes", f"-o {out} (checked first)", "unclear", f"took {time.time() - t:.0f} s to refuse")
    a.api("edges: files", "a bundle truncated and rewritten under a running process", f"""
        import subprocess, sys, time, os, shutil
        p = {os.path.join(d, "live.pab")!r}
        shutil.copy({good!r}, p)
        good = open(p, "rb").read()
        code = ("import sys, time, numpy as np, polyarch.runtime\\n"
                "b = polyarch.runtime.load(sys.argv[1]); x = np.ones((32, 256), np.float32); w = b(x)\\n"
                "print('ready', flush=True); end = time.time() + 5\\n"
                "while time.time() < end:\\n    assert np.array_equal(b(x), w)\\n")
        c = subprocess.Popen([sys.executable, "-c", code, p], stdout=subprocess.PIPE, text=True)
        c.stdout.readline()
        sys.path.insert(0, {HERE!r})
        from audit import damage_in_place
        damage_in_place(p, good)
        c.wait(60)
        result = "" if c.returncode == 0 else f"the running process ended with {{c.returncode}}"
    """, expect="ok")
    big = os.path.join(d, "killed.pab")
    temps = a._temp_leftovers()
    p = subprocess.Popen([*CLI, "compile", os.path.join(ROOT, "examples", "minilm.py"), "-d", "cpu", "--tune", "none",
                          "--no-verify", "-q", "-o", big], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=a.work)
    children, t = [], time.time()
    while time.time() - t < 300 and not children and p.poll() is None:
        children = [int(x) for x in os.listdir("/proc") if x.isdigit() and _cmd_has(int(x), "iree-compile")
                    and _descends(int(x), p.pid)]
        time.sleep(0.1)
    p.kill()
    p.wait()
    time.sleep(1.0)
    alive = [c for c in children if _cmd_has(c, "iree-compile")]
    subprocess.run([*CLI, "compile", mlp, "--tune", "none", "--no-verify", "-q", "-o", os.path.join(d, "after.pab")],
                   capture_output=True, cwd=a.work)
    left = a._temp_leftovers() - temps
    if not children:
        a.record("edges: files", "SIGKILL mid-compile", "unclear", "no iree-compile child seen to kill")
    elif alive or left:
        a.record("edges: files", "SIGKILL mid-compile, then a compile", "data loss",
                 f"iree-compile alive: {alive}; temp left: {sorted(left)}")
    else:
        a.record("edges: files", "SIGKILL mid-compile, then a compile", "ok")


def _descends(pid, ancestor):
    while pid > 1:
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def damage_in_place(path, good, rounds=3, pause=0.3, while_truncated=lambda: None):
    """Truncate the file at `path`, scramble it, write `good` back, all in place (the same inode, as
    `cp` over a file does), `rounds` times, `pause` seconds after each step; while_truncated() runs
    in each round while the file is cut short."""
    for _ in range(rounds):
        with open(path, "r+b") as f:
            f.truncate(100)
        time.sleep(pause)
        while_truncated()
        with open(path, "r+b") as f:
            f.write(os.urandom(len(good)))
        time.sleep(pause)
        with open(path, "r+b") as f:
            f.write(good)
        time.sleep(pause)


def _cmd_has(pid, word):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        return state != "Z" and any(c.endswith(word.encode()) for c in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0"))
    except OSError:
        return False


def edges_values(a, mlp):
    d = os.path.join(a.work, "values")
    os.makedirs(d, exist_ok=True)
    a.cli("edges: values", "mlp -i 32x256xi64 (eager refuses it)", ["compile", mlp, "-i", "32x256xi64", "--tune", "none",
                                                                  "-o", os.path.join(d, "i.pab")])
    def model(name, text):
        p = os.path.join(d, name + ".py")
        open(p, "w").write(textwrap.dedent(text))
        return p
    a.cli("edges: values", "plan --ops: no third-party warnings, the model's own lines",
          ["plan", mlp, "--ops", "--no-calibrate"], expect="ok",
          check=lambda r: "" if "Warning" not in r.stderr and f"at {mlp}:" in r.stdout and "linear.py" not in r.stdout
          else "warnings printed, or ops located in torch's files")
    fidx = model("fidx", FLOAT_INDEX)
    out = os.path.join(d, "fidx.pab")
    subprocess.run([*CLI, "compile", fidx, "--tune", "none", "-q", "-o", out], capture_output=True, cwd=a.work)
    a.cli("edges: values", "run without -i: a float input used as an index", ["run", out], expect="ok")
    api = f"""
        import torch
        torch.manual_seed(0)
        def check(model, inputs, name, **kw):
            path = polyarch.compile(model, inputs, devices=["cpu"], output={d!r} + "/" + name + ".pab", tune="none", **kw)
            b = polyarch.runtime.load(path)
            with torch.no_grad():
                want = model(*[t.clone() for t in inputs])
            got = b(*[t.clone() for t in inputs])
            want = want if isinstance(want, tuple) else (want,)
            got = got if isinstance(got, tuple) else (got,)
            for g, w in zip(got, want):
                g, w = (g.float() if hasattr(g, "float") else torch.as_tensor(np.asarray(g, np.float64))), torch.as_tensor(w).float()
                if not torch.allclose(g.double(), w.double(), atol=3e-2, rtol=3e-2):
                    return "differs from eager"
            return ""
    """
    cases = {
        "bf16 inputs and outputs": "m = torch.nn.Linear(16, 8).to(torch.bfloat16).eval()\n"
                                   "result = check(m, (torch.randn(4, 16).to(torch.bfloat16),), 'bf16')",
        "f16 inputs and outputs": "m = torch.nn.Linear(16, 8).to(torch.float16).eval()\n"
                                  "result = check(m, (torch.randn(4, 16).to(torch.float16),), 'f16')",
        "complex128 across a boundary": "class M(torch.nn.Module):\n"
                                        "    def forward(self, x):\n"
                                        "        z = torch.view_as_complex(x.double().reshape(2, 8, 2))\n"
                                        "        return torch.view_as_real(z[:, 1:4]).float(), z[:, :2].real.float()\n"
                                        "result = check(M(), (torch.randn(2, 16),), 'c128')",
        "int() of a buffer (strict export)": "class M(torch.nn.Module):\n"
                                             "    def __init__(self):\n"
                                             "        super().__init__(); self.register_buffer('n', torch.tensor(3))\n"
                                             "    def forward(self, x):\n"
                                             "        return x * int(self.n)\n"
                                             "result = check(M(), (torch.randn(2, 8),), 'strict')",
        "number and bool outputs": "class M(torch.nn.Module):\n"
                                   "    def forward(self, x):\n"
                                   "        return x * 2, 3, 2.5, True\n"
                                   "result = check(M(), (torch.randn(2, 8),), 'numbers')",
        "an input written in place and returned": "class M(torch.nn.Module):\n"
                                                  "    def forward(self, x):\n"
                                                  "        x.mul_(2)\n"
                                                  "        return x\n"
                                                  "result = check(M(), (torch.randn(2, 8),), 'inplace')",
        "a constant index tensor in an index list (LeViT)": "class M(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__(); self.b = torch.nn.Parameter(torch.randn(4, 9))\n"
            "        self.register_buffer('i', torch.randint(0, 9, (16, 16)), persistent=False)\n"
            "    def forward(self, x):\n"
            "        return x + self.b[:, self.i]\n"
            "result = check(M(), (torch.randn(1, 4, 16, 16),), 'levit')",
    }
    for name, code in cases.items():
        a.api("edges: values", name, textwrap.dedent(api) + "\n" + code, expect="ok")
    dyn = """
        import torch
        class M(torch.nn.Module):
            def forward(self, table, idx):
                return torch.index_select(table, 0, idx), table[idx + 1]
        path = polyarch.compile(M(), (torch.randn(16, 4), torch.tensor([0, 3, 5])), devices=["cpu"],
                                output=%r, tune="none", dynamic_dims=["table:0:64"])
        polyarch.runtime.load(path)(np.zeros((8, 4), np.float32), np.array([%s, 0, 0]))
    """
    for bad in ("8", "-1", "10**6", "7"):
        a.api("edges: dynamic index", f"index {bad} into 8 rows", dyn % (os.path.join(d, f"dyn{len(bad)}.pab"), bad))


# --- concurrency and signals --------------------------------------------------------------------

def concurrency_and_signals(a, mlp, good):
    a.api("concurrency", "8 threads x 200 calls", f"""
        import threading
        b = polyarch.runtime.load({good!r})
        xs = [np.random.default_rng(i).standard_normal((32, 256)).astype(np.float32) for i in range(8)]
        want = [b(x) for x in xs]
        bad = []
        def work(i):
            for _ in range(200):
                if not np.array_equal(b(xs[i]), want[i]):
                    bad.append(i)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        [t.start() for t in ts]; [t.join() for t in ts]
        result = f"{{len(bad)}} calls differ" if bad else ""
    """, expect="ok")
    a.api("concurrency", "two bundles loaded at once, one closed", f"""
        b1, b2 = polyarch.runtime.load({good!r}), polyarch.runtime.load({good!r})
        x = np.ones((32, 256), np.float32)
        y = b1(x); b1.close()
        result = "" if np.array_equal(b2(x), y) else "the second bundle changed"
    """, expect="ok")
    # two compiles to one output at once: both succeed (the last rename wins) and the bundle loads
    out = os.path.join(a.work, "race.pab")
    temps = a._temp_leftovers()
    procs = [subprocess.Popen([*CLI, "compile", mlp, "-o", out, "--tune", "none", "-q"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=a.work) for _ in range(2)]
    rcs = [p.wait(timeout=600) for p in procs]
    errs = [p.stderr.read() for p in procs]
    if a._temp_leftovers() - temps or glob.glob(os.path.join(a.work, ".pab-*")):
        a.record("concurrency", "two compiles to one output", "data loss", "temporary files left")
    else:
        for rc, err in zip(rcs, errs):
            a._classify("concurrency", "two compiles to one output", rc, err, "ok")
        a.api("concurrency", "the raced bundle loads", f"polyarch.runtime.load({out!r})(np.ones((32, 256), np.float32))",
              expect="ok")
    for sig in (signal.SIGTERM, signal.SIGINT):
        old = os.path.join(a.work, f"sig{int(sig)}.pab")
        shutil.copy(good, old)
        before = _digest(old)
        temps = a._temp_leftovers()
        p = subprocess.Popen([*CLI, "compile", mlp, "-o", old, "--tune", "none"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, cwd=a.work)
        for line in p.stderr:  # the signal comes while IREE compiles the segments
            if "partitioned" in line:
                break
        time.sleep(0.5)
        p.send_signal(sig)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            a.record("signals", sig.name + " during compile", "crash", "did not stop within 60 s")
            continue
        p.stderr.close()
        left = a._temp_leftovers() - temps
        hidden = glob.glob(os.path.join(a.work, ".pab-*"))
        if p.returncode == 0:  # finished first: the new bundle replaced the old one whole
            a.api("signals", sig.name + " after the compile ended", f"polyarch.runtime.load({old!r})", expect="ok")
        elif left or hidden or _digest(old) != before:
            a.record("signals", sig.name + " during compile", "data loss", f"left {sorted(left) + hidden}")
        else:
            a.record("signals", sig.name + " during compile", "clear" if p.returncode else "ok", f"rc {p.returncode}")


def bad_serves(a, good):
    """`polyarch serve` started wrongly: each a one-line error before anything listens."""
    import socket

    g = "serve"
    junk = os.path.join(a.work, "junk.pab")
    with open(junk, "w") as f:
        f.write("not a bundle")
    a.cli(g, "a bundle that is not there", ["serve", os.path.join(a.work, "nope.pab"), "--port", "0"])
    a.cli(g, "a file that is no bundle", ["serve", junk, "--port", "0"], protect=[junk])
    a.cli(g, "a plan the bundle has not", ["serve", good, "--plan", "nope", "--port", "0"], protect=[good])
    a.cli(g, "--replicas without --ray", ["serve", good, "--replicas", "2", "--port", "0"], protect=[good])
    a.cli(g, "--ray with --port 0", ["serve", good, "--ray", "127.0.0.1:1", "--port", "0"], protect=[good])
    a.cli(g, "--max-queue 0", ["serve", good, "--max-queue", "0"], protect=[good])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        a.cli(g, "a port already taken", ["serve", good, "--port", str(taken.getsockname()[1])], protect=[good])
    key = os.path.join(a.work, "serve-key")
    subprocess.run([*CLI, "keygen", "-o", key], check=True, capture_output=True, cwd=a.work)
    a.cli(g, "an unsigned bundle with --trusted-key", ["serve", good, "--trusted-key", key + ".pub", "--port", "0"],
          protect=[good])
    a.cli(g, "an address that is not one", ["serve", good, "--host", "no.such.host.invalid", "--port", "0"],
          protect=[good])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case, not only the unexpected ones")
    ap.add_argument("--only", help="run only groups whose name contains this")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="audit-")
    # polyarch's temporary folders go to a folder of the audit's own (it and every process it
    # starts), so that what another compile on this machine leaves meanwhile is not counted
    os.environ["TMPDIR"] = tempfile.tempdir = os.path.join(work, "tmp")
    os.makedirs(tempfile.tempdir)
    a = Audit(work, args.verbose)
    t0 = time.time()
    try:
        mlp = os.path.join(work, "mlp.py")
        shutil.copy(os.path.join(ROOT, "examples", "mlp.py"), mlp)
        embed = os.path.join(work, "embed.py")
        open(embed, "w").write(EMBED)
        good, ids_bundle = os.path.join(work, "mlp.pab"), os.path.join(work, "embed.pab")
        for src, dst in ((mlp, good), (embed, ids_bundle)):
            subprocess.run([*CLI, "compile", src, "-o", dst, "--tune", "none", "-q"], check=True, cwd=work, capture_output=True)
        x_npy = os.path.join(work, "x.npy")
        np.save(x_npy, np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32))
        groups = {"bundles": lambda: damaged_bundles(a, good, x_npy),
                  "compiles": lambda: bad_compiles(a, mlp, embed, good),
                  "arrays": lambda: bad_arrays(a, good, ids_bundle),
                  "concurrency": lambda: concurrency_and_signals(a, mlp, good),
                  "edges trust": lambda: edges_trust(a, good),
                  "edges writes": lambda: edges_writes(a, mlp, good),
                  "edges values": lambda: edges_values(a, mlp),
                  "serve": lambda: bad_serves(a, good)}
        for name, run in groups.items():
            if not args.only or args.only in name:
                print(f"== {name}", flush=True)
                run()
    finally:
        if args.keep:
            print("work folder:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"({time.time() - t0:.0f} s)")
    sys.exit(0 if a.summary() else 1)


if __name__ == "__main__":
    main()
