"""Device profiles: the figures the cost model and the partitioner reason with.

A profile file is JSON, either one profile or {"schema": SCHEMA, "profiles": [...]}:

    {
      "schema": "polyarch-device-profile/1",
      "name": "nvidia-h100-sxm",          # free text, shown in plans
      "device": "cuda@sm_80",             # the device spec it describes (KIND[:ORDINAL][@ARCH])
      "peak_flops": {"f32": 6.7e13, "bf16": 9.89e14},   # FLOP/s per element type; f32 is required
      "mem_bw": 3.35e12,                  # device memory bandwidth, bytes/s
      "launch_s": 5e-6,                   # per-dispatch overhead, s
      "call_s": 2e-5,                     # per-segment call overhead (submit + wait), s
      "mem_capacity": 8.0e10,             # bytes available to weights + activations
      "link_bw": 5.0e10,                  # host link bandwidth, bytes/s (cpu: unused)
      "link_latency_s": 1e-5,             # per host transfer, s
      "watts": 700,                       # board power while busy, W
      "price_per_hour": 3.0,              # $ per device-hour
      "source": "...",                    # where the figures come from
      "calibrated": null,                 # or what `polyarch calibrate` measured, and when
      "op_efficiency": {"conv": 0.5},     # optional: FLOP/s of an op class relative to peak (matmul)
      "half_flops": 1e7,                  # optional: FLOPs at which a matmul/conv reaches half its
                                          #   rate (rate x flops / (flops + half_flops)); 0: none
      "weight_bw": {"f32": 2.5e10},       # optional: bytes/s at which a matrix-vector product (one
                                          #   token's decode) reads its weights, per weight dtype;
                                          #   a dtype without one is priced at mem_bw
      "row_cost": {"f32": 0.1}            # optional: the time a product of a few rows (a batch, a
    }                                     #   verify call; up to 8) adds per row past the first,
                                          #   relative to one row's; 0 where absent

Element types without an entry in peak_flops use the f32 figure. The built-in
profiles are spec-sheet figures (their sources are cited below and in `source`);
`polyarch calibrate` replaces them with measurements of the devices at hand."""

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

from ..errors import PolyarchError
from .kinds import TARGETS
from .spec import DeviceSpec

__all__ = ["DeviceProfile", "BUILTIN", "SCHEMA", "from_json", "load", "save", "load_all", "match", "resolve", "host_profile"]

SCHEMA = "polyarch-device-profile/1"

FIELDS_HELP = "see `polyarch calibrate --help` or targets/profiles.py for the schema"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    device: str
    peak_flops: dict
    mem_bw: float
    launch_s: float
    call_s: float
    mem_capacity: float
    link_bw: float
    link_latency_s: float
    watts: float
    price_per_hour: float
    source: str
    calibrated: dict | None = field(default=None)
    op_efficiency: dict = field(default_factory=dict)
    half_flops: float = 0.0
    weight_bw: dict = field(default_factory=dict)
    row_cost: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return DeviceSpec.parse(self.device).kind

    def peak(self, element_type: str = "f32", op_class: str | None = None) -> float:
        """FLOP/s for an element type, scaled by the op class's efficiency (e.g. "conv")."""
        p = self.peak_flops.get(_FLOP_KEY.get(element_type, element_type), self.peak_flops["f32"])
        return p * self.op_efficiency.get(op_class, 1.0) if op_class else p

    def stream_bw(self, element_type: str = "f32") -> float:
        """Bytes/s at which a matrix-vector product reads weights of this element type: what
        `polyarch calibrate` measured (weight_bw), else the memory bandwidth."""
        return self.weight_bw.get(element_type) or self.mem_bw

    def rows_factor(self, element_type: str, rows: int) -> float:
        """How much longer a product of `rows` rows reads its weights than one row (row_cost,
        counted up to 8 rows: past them a call is priced by its FLOPs)."""
        return 1.0 + self.row_cost.get(element_type, 0.0) * (min(rows, 8) - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA
        return d


# Element types (torch dialect spelling) -> the peak_flops key that prices them.
_FLOP_KEY = {"f32": "f32", "f64": "f32", "f16": "f16", "bf16": "bf16", "si8": "i8", "ui8": "i8", "i8": "i8",
             "f8E4M3FN": "f8", "f8E5M2": "f8"}

# The built-in spec-sheet profile of each device kind (its record in targets/kinds.py, where
# the figures' sources are cited).
BUILTIN = {kind: DeviceProfile(**t.spec_sheet) for kind, t in TARGETS.items()}

_REQUIRED = ("name", "device", "peak_flops", "mem_bw", "launch_s", "mem_capacity", "link_bw", "link_latency_s")
_DEFAULTS = {"call_s": 0.0, "watts": 0.0, "price_per_hour": 0.0, "source": "", "calibrated": None, "op_efficiency": {},
             "half_flops": 0.0, "weight_bw": {}, "row_cost": {}}


def from_json(obj: dict, where: str = "profile", prediction_only: bool = False) -> "DeviceProfile":
    """A DeviceProfile from a parsed JSON object, or PolyarchError naming the bad field.
    prediction_only: the device may be of a kind polyarch cannot compile for (a fleet
    prediction's accelerator, `polyarch plan --generate`): its spec is checked for form only."""
    if not isinstance(obj, dict):
        raise PolyarchError(f"{where} is not a JSON object", fix=FIELDS_HELP)
    schema = obj.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise PolyarchError(f"{where} has schema '{schema}'; this polyarch reads '{SCHEMA}'", fix="re-run polyarch calibrate, or upgrade polyarch")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise PolyarchError(f"{where} lacks {', '.join(missing)}", fix=FIELDS_HELP)
    unknown = set(obj) - set(_REQUIRED) - set(_DEFAULTS) - {"schema"}
    if unknown:
        raise PolyarchError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}", fix=FIELDS_HELP)
    vals = {**_DEFAULTS, **{k: v for k, v in obj.items() if k != "schema"}}
    if not prediction_only:
        DeviceSpec.parse(vals["device"])
    elif not isinstance(vals["device"], str) or not vals["device"].strip():
        raise PolyarchError(f"{where}: device must name the device (a string)", fix=FIELDS_HELP)
    pf = vals["peak_flops"]
    if not isinstance(pf, dict) or "f32" not in pf:
        raise PolyarchError(f"{where}: peak_flops must be an object with at least an 'f32' entry", fix=FIELDS_HELP)
    for k in ("mem_bw", "link_bw", "mem_capacity", *(f"peak_flops.{t}" for t in pf)):
        v = pf[k.split(".", 1)[1]] if k.startswith("peak_flops.") else vals[k]
        if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
            raise PolyarchError(f"{where}: {k} must be a positive number, not {v!r}", fix=FIELDS_HELP)
    for k in ("launch_s", "call_s", "link_latency_s", "watts", "price_per_hour", "half_flops"):
        if not isinstance(vals[k], (int, float)) or vals[k] < 0:
            raise PolyarchError(f"{where}: {k} must be a number >= 0, not {vals[k]!r}", fix=FIELDS_HELP)
    vals["peak_flops"] = {k: float(v) for k, v in pf.items()}
    eff = vals["op_efficiency"]
    if not isinstance(eff, dict) or any(not isinstance(v, (int, float)) or not v > 0 for v in eff.values()):
        raise PolyarchError(f"{where}: op_efficiency must map op classes to positive numbers", fix=FIELDS_HELP)
    wbw = vals["weight_bw"]
    if not isinstance(wbw, dict) or any(not isinstance(v, (int, float)) or not v > 0 or math.isinf(v)
                                        for v in wbw.values()):
        raise PolyarchError(f"{where}: weight_bw must map weight dtypes (f32, f16, bf16) to positive bytes/s",
                            fix=FIELDS_HELP)
    vals["weight_bw"] = {k: float(v) for k, v in wbw.items()}
    rc = vals["row_cost"]
    if not isinstance(rc, dict) or any(not isinstance(v, (int, float)) or not 0 <= v < 10 for v in rc.values()):
        raise PolyarchError(f"{where}: row_cost must map weight dtypes to numbers from 0 to 10", fix=FIELDS_HELP)
    vals["row_cost"] = {k: float(v) for k, v in rc.items()}
    return DeviceProfile(**vals)


def load(path: str, prediction_only: bool = False) -> list:
    """[DeviceProfile] from a profile file (one profile or {"profiles": [...]}); prediction_only:
    see from_json."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise PolyarchError(f"profile file not found: {path}", fix="write one with `polyarch calibrate -o FILE`") from None
    except json.JSONDecodeError as e:
        raise PolyarchError(f"profile file {path} is not JSON: {e.msg} at line {e.lineno}",
                            fix="mend it, or write a new one with `polyarch calibrate -o FILE`") from None
    if isinstance(obj, dict) and "profiles" in obj:
        if obj.get("schema", SCHEMA) != SCHEMA:
            raise PolyarchError(f"{path} has schema '{obj.get('schema')}'; this polyarch reads '{SCHEMA}'",
                                fix="write a new one with `polyarch calibrate -o FILE`")
        if not isinstance(obj["profiles"], list) or not all(isinstance(p, dict) for p in obj["profiles"]):
            raise PolyarchError(f"profile file {path}: 'profiles' must be a list of profiles (objects), "
                                f"not {json.dumps(obj['profiles'])[:60]}", fix="write it with `polyarch calibrate -o FILE`")
        return [from_json(p, f"{path}: profile {i}", prediction_only) for i, p in enumerate(obj["profiles"])]
    if not isinstance(obj, dict):
        raise PolyarchError(f"profile file {path} holds {type(obj).__name__}, not a profile (an object)",
                            fix="write it with `polyarch calibrate -o FILE`")
    return [from_json(obj, path, prediction_only)]


def save(path: str, profiles: list) -> None:
    from ..files import atomic_write

    with atomic_write(path) as f:
        json.dump({"schema": SCHEMA, "profiles": [p.to_json() for p in profiles]}, f, indent=2)
        f.write("\n")


def load_all(paths: Iterable) -> list:
    out = []
    for p in paths or ():
        if isinstance(p, DeviceProfile):
            out.append(p)
        else:
            out.extend(load(p))
    return out


def match(spec: DeviceSpec | str, given: list) -> "DeviceProfile | None":
    """The given profile that best describes a device spec (same name, then same kind and
    arch, then same kind), or None."""
    s = DeviceSpec.parse(spec)
    best, rank = None, 0
    for p in given:
        ps = DeviceSpec.parse(p.device)
        r = 3 if ps == s else 2 if (ps.kind, ps.arch) == (s.kind, s.arch) else 1 if ps.kind == s.kind else 0
        if r > rank:
            best, rank = p, r
    return best


def resolve(specs: Iterable, profiles: Iterable = ()) -> dict:
    """{spec name: DeviceProfile} for each target: the given profile that matches it best
    (see match), else the built-in one."""
    given = load_all(profiles)
    out = {}
    for s in specs:
        s = DeviceSpec.parse(s)
        out[s.name] = match(s, given) or replace(BUILTIN[s.kind], device=s.name)
    return out


def host_profile(resolved: dict) -> "DeviceProfile":
    """The profile of the host CPU: the cpu target's, else the built-in one."""
    for name, p in resolved.items():
        if DeviceSpec.parse(name).kind == "cpu":
            return p
    return BUILTIN["cpu"]
