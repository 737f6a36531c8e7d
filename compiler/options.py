"""CompileOptions: everything a compile is asked for beside the model and its example inputs.

Built once by each front end: the Python API (`polyarch.compile(..., options=)` or its
keywords), the CLI (from its flags, or from `--options FILE.json`), the CMake function
`polyarch_add_bundle` and the setuptools hook (both write the JSON file the CLI reads). The
JSON form is `to_json()`: the field names below, lists for tuples; unknown keys are refused."""

import json
import os
from typing import Any
from dataclasses import dataclass, fields

from ..errors import PolyarchError
from ..runtime.devices import parse_devices

__all__ = ["CompileOptions"]

TUNE_MODES = ("none", "quick", "full")
WEIGHTS_DTYPES = ("f32", "f16", "bf16")
SOLVERS = ("auto", "brute", "chain-dp", "mincut", "heft")
_LISTS = ("devices", "pins", "profiles", "dynamic_dims", "iree_flags", "draft_pins", "phase_pins")


@dataclass(frozen=True)
class CompileOptions:
    """devices      device specs, e.g. ("cpu", "vulkan") or ("cpu", "cuda@sm_86")
    plans        several device sets, one placement plan each, in one bundle sharing the weights,
                 e.g. (("cuda", "cpu"), ("vulkan", "cpu"), ("cpu",)); replaces `devices`
    pins         ("PATTERN=DEVICE", ...): op names or module path prefixes forced onto a device
    objective    latency | throughput | cost | energy | "latency:1,energy:0.5"
    solver       auto | brute | chain-dp | mincut | heft
    profiles     device profile JSON files (`polyarch calibrate`), or DeviceProfile objects
    dynamic_dims ("INPUT:DIM[:MAX][=NAME]", ...): dimensions that stay dynamic (nn.Module only)
    calibrate    calibrate a device of this host with no cached profile now (else estimates)
    verify       run, check and time every plan this host can run, re-plan on what is measured
    tune         none | quick | full: lowering choices measured on this host's CPU
    iree_flags   flags added to every iree-compile command (after polyarch's own)
    jobs         parallel iree-compile processes (None: one per core)
    generate     compile a causal language model as prefill + decode over a KV cache kept on its
                 device (compiler/causal_lm.py; the runtime's `generate`)
    max_context  with generate: the longest prompt + generated tokens a sequence may hold
    batch        with generate: sequences decoded together (decode's batch, fixed)
    weights_dtype  with generate: f32 (the model's own), f16 or bf16: weights, activations and
                 the cache stored and computed in 16 bits (decode reads every weight once a token)
    tokenizer    with generate: a tokenizer.json (the `tokenizers` format; or a folder holding one)
                 carried inside the bundle, so that generate takes and gives text
    draft        with generate: a smaller causal LM of the same vocabulary (an nn.Module; the CLI
                 and options files give MODEL.py[:ATTR]) compiled into the same bundle, as its
                 own prefill and decode, for speculative decoding: it drafts up to `speculate`
                 tokens, the model checks them all in one `verify` call
    speculate    with draft: the most tokens drafted per step (verify takes speculate + 1)
    draft_pins   with draft: pins for the draft's phases (the draft's module paths), e.g.
                 ["model.layers=vulkan"]; `pins` apply to the model's phases
    draft_dtype  with draft: its weights' dtype (f32, f16, bf16; None: weights_dtype), e.g. a
                 16-bit draft for an f32 model: each draft call reads half the bytes
    phase_pins   with generate: pins for one phase only, "PHASE:PATTERN=DEVICE" (PHASE: prefill,
                 decode, verify, draft_prefill, draft_decode, draft_verify; draft_decode's apply to
                 draft_verify too), after the others: e.g.
                 ["prefill:model.layers=vulkan", "decode:model=cpu"] runs prefill and decode on
                 different devices (the cache moves once per prompt, between them)"""

    devices: tuple = ("cpu",)
    plans: tuple = ()
    pins: tuple = ()
    objective: str = "latency"
    solver: str = "auto"
    profiles: tuple = ()
    dynamic_dims: tuple = ()
    calibrate: bool = True
    verify: bool = True
    tune: str = "quick"
    iree_flags: tuple = ()
    jobs: int | None = None
    generate: bool = False
    max_context: int = 256
    batch: int = 1
    weights_dtype: str = "f32"
    tokenizer: str | None = None
    draft: Any = None
    speculate: int = 4
    draft_pins: tuple = ()
    phase_pins: tuple = ()
    draft_dtype: str | None = None

    def __post_init__(self):
        for name in _LISTS:
            value = getattr(self, name)
            if isinstance(value, str):
                raise PolyarchError(f"option {name} is one string ({value!r}), not a list",
                                    fix=f"give a list, e.g. {name}=[{value!r}]")
            object.__setattr__(self, name, tuple(value or ()))
        object.__setattr__(self, "plans", tuple(tuple(p) for p in self.plans or ()))
        if self.tune not in TUNE_MODES:
            raise PolyarchError(f"unknown tuning mode {self.tune!r}", fix="use --tune (tune=) none, quick or full")
        if self.solver not in SOLVERS:
            raise PolyarchError(f"unknown solver '{self.solver}'", fix="use " + ", ".join(SOLVERS))
        if self.jobs is not None and (not isinstance(self.jobs, int) or self.jobs < 1):
            raise PolyarchError(f"jobs={self.jobs!r}", fix="give a whole number of 1 or more, or None (one per core)")
        for name, low in (("max_context", 2), ("batch", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise PolyarchError(f"{name}={v!r}", fix=f"give a whole number of {low} or more")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise PolyarchError(f"weights_dtype={self.weights_dtype!r}", fix="use " + ", ".join(WEIGHTS_DTYPES))
        if self.weights_dtype != "f32" and not self.generate:
            raise PolyarchError(f"weights_dtype={self.weights_dtype} applies to --generate compiles only",
                                fix="add --generate (generate=True), or convert the model yourself (model.half())")
        if not isinstance(self.speculate, int) or isinstance(self.speculate, bool) or not 1 <= self.speculate <= 16:
            raise PolyarchError(f"speculate={self.speculate!r}", fix="give a whole number from 1 to 16 (tokens drafted a step)")
        if (self.draft is not None or self.draft_pins) and not self.generate:
            raise PolyarchError("a draft model applies to --generate compiles only", fix="add --generate (generate=True)")
        for pin in self.phase_pins:
            phase, sep, rest = pin.partition(":")
            if not sep or phase not in PHASES or "=" not in rest:
                raise PolyarchError(f"phase pin {pin!r} is not PHASE:PATTERN=DEVICE with PHASE one of {', '.join(PHASES)}",
                                    fix="e.g. prefill:model.layers=vulkan")
            if not self.generate:
                raise PolyarchError("phase pins apply to --generate compiles only", fix="add --generate (generate=True)")
            if phase not in ("prefill", "decode") and self.draft is None:
                raise PolyarchError(f"phase pin {pin!r} names a phase that only a draft model brings",
                                    fix="give the draft: --draft DRAFT.py[:ATTR] (draft=)")
        if self.draft_dtype is not None and (self.draft_dtype not in WEIGHTS_DTYPES or self.draft is None):
            raise PolyarchError(f"draft_dtype={self.draft_dtype!r}" + ("" if self.draft is not None else " without a draft"),
                                fix="use " + ", ".join(WEIGHTS_DTYPES) + " with a draft model (--draft)")
        if self.draft_pins and self.draft is None:
            raise PolyarchError("draft_pins without a draft model", fix="give the draft: --draft DRAFT.py[:ATTR] (draft=)")
        if self.tokenizer is not None and not self.generate:
            raise PolyarchError("a tokenizer applies to --generate compiles only", fix="add --generate (generate=True)")
        bad = next((f for f in self.iree_flags if not isinstance(f, str) or not f.startswith("-")), None)
        if bad is not None:
            raise PolyarchError(f"iree flag {bad!r} is not a flag", fix='write flags such as "--iree-llvmcpu-enable-ukernels=all"')
        # the device specs, parsed once: a bad one is refused here, before any import
        object.__setattr__(self, "_specs", parse_device_sets(self.device_sets))

    @property
    def device_specs(self) -> list:
        """[[DeviceSpec]] per plan, parsed from `device_sets`."""
        return self._specs

    @property
    def device_sets(self) -> tuple:
        """The device set of each plan: `plans`, else one plan over `devices`."""
        return self.plans or (self.devices,)

    def to_json(self) -> dict:
        """The options as JSON values (profiles given as DeviceProfile objects are written inline)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["draft"] is not None and not isinstance(out["draft"], str):
            raise PolyarchError("a draft given as a module has no JSON form", fix="give the draft as a model file path")
        out["profiles"] = [p if isinstance(p, str) else p.to_json() for p in self.profiles]
        del out["devices" if self.plans else "plans"]  # the one that says where the plans run
        return {k: list(map(list, v)) if k == "plans" else list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_json(cls, obj: dict, where: str = "options", base_dir: str | None = None) -> "CompileOptions":
        """Options from parsed JSON (or a TOML table): refuses unknown keys and values of the
        wrong kind, naming `where`; relative profile paths are read from `base_dir`."""
        if not isinstance(obj, dict):
            raise PolyarchError(f"{where}: the options are {type(obj).__name__}, not an object", fix=FIELDS_HELP)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise PolyarchError(f"{where}: unknown option(s) {unknown}", fix=f"known: {sorted(known)}")
        for key in ("verify", "calibrate", "generate"):
            if not isinstance(obj.get(key, True), bool):
                raise PolyarchError(f"{where}: '{key}' must be true or false", fix=FIELDS_HELP)
        for key in _LISTS + ("plans",):
            if not isinstance(obj.get(key, []), list):
                raise PolyarchError(f"{where}: '{key}' must be a list", fix=FIELDS_HELP)
        if not isinstance(obj.get("draft_dtype", ""), (str, type(None))):
            raise PolyarchError(f"{where}: 'draft_dtype' must be f32, f16 or bf16", fix=FIELDS_HELP)
        if not isinstance(obj.get("draft", ""), (str, type(None))):
            raise PolyarchError(f"{where}: 'draft' must be a model file (DRAFT.py[:ATTR])", fix=FIELDS_HELP)
        if not isinstance(obj.get("tokenizer", ""), (str, type(None))):
            raise PolyarchError(f"{where}: 'tokenizer' must be a path", fix=FIELDS_HELP)
        if obj.get("tune", "quick") not in TUNE_MODES:
            raise PolyarchError(f"{where}: 'tune' must be \"none\", \"quick\" or \"full\"", fix=FIELDS_HELP)
        if "devices" in obj and "plans" in obj:
            raise PolyarchError(f"{where}: give devices or plans, not both", fix=FIELDS_HELP)
        vals = dict(obj)
        vals["plans"] = [p.split(",") if isinstance(p, str) else p for p in obj.get("plans", [])]
        if base_dir is not None:
            vals["profiles"] = [os.path.join(base_dir, p) if isinstance(p, str) else p for p in obj.get("profiles", [])]
        vals["profiles"] = [_profile(p, where) if isinstance(p, dict) else p for p in vals.get("profiles", [])]
        for key in ("tokenizer", "draft"):
            if base_dir is not None and isinstance(vals.get(key), str):
                vals[key] = os.path.join(base_dir, vals[key])
        return cls(**vals)

    @classmethod
    def load(cls, path: str) -> "CompileOptions":
        """Options from a JSON file (as `to_json` writes; relative profile paths from its folder)."""
        try:
            with open(path) as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise PolyarchError(f"options file {path} is not JSON: {e.msg} at line {e.lineno}", fix=FIELDS_HELP) from None
        return cls.from_json(obj, path, os.path.dirname(os.path.abspath(path)))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")


def parse_device_sets(device_sets) -> list:
    """[[DeviceSpec]] per device set; refuses a bad spec, a device given twice in a set, a set given twice."""
    sets = [parse_devices(d) for d in device_sets]
    names = ["+".join(s.name for s in specs) for specs in sets]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PolyarchError(f"plan {sorted(dup)[0]} is given twice", fix="give each --plans device set once")
    return sets


PHASES = ("prefill", "decode", "verify", "draft_prefill", "draft_decode", "draft_verify")
FIELDS_HELP = "see `polyarch compile --help` (--options) or compiler/options.py for the fields"


def _profile(obj, where):
    from ..targets import profiles as P

    return P.from_json(obj, f"{where}: profile")
