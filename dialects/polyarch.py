"""The `polyarch` dialect, defined once here.

Attributes (on torch-dialect ops inside @main, and on outlined functions):
  polyarch.cost      {flops, bytes_read, bytes_written : i64}     annotate-costs
  polyarch.device    "cpu" | "vulkan" | ...                         assign-devices
  polyarch.time_us   {<device> = f64, ...} predicted us per device   annotate-costs{devices=...}
  polyarch.reason    why the op is not on its fastest device         assign-devices
  polyarch.pin       "<device>" set by the user on an op              (input)
  polyarch.shapes    [array<i64: ...>, ...] per result: the sizes of dynamic (?) dims
                     at the example inputs, which costs are predicted at  (import)
  polyarch.arg_shapes  the same for a function's arguments                  (import)
  polyarch.lowering  "im2col": compile this convolution as im2col + matmul
                     (compiler/tuning.py marks it, conv-to-matmul rewrites it)
Module attributes:
  polyarch.devices   ["cpu", "vulkan"]                                assign-devices
  polyarch.profiles  {<device> = "profile name"}                     annotate-costs{devices=...}
  polyarch.plan      {algorithm, objective, predicted_us, bottleneck_us,
                      cost_usd_per_1m, energy_j, transfer_bytes}      assign-devices
  polyarch.device_info  JSON text: per device its identity on the compiling host (or
                      null), the profile that priced it and where that came from    driver
Ops:
  %y = "polyarch.transfer"(%x) {from = "vulkan", to = "cpu"} : (T) -> T'
       Moves a tensor between two devices ("host" for @main's inputs); only in @main
       after outline-segments. T' is T, or T with a narrow element type widened to
       32 bits (or back) for a device with 32-bit storage only.

The ops are kept as unregistered operations in the torch-mlir context (this MLIR
build offers no Python-defined dialects beside IRDL, whose ops the printer can't
round-trip without a C++ registration); `verify` enforces their contracts.

Typed accessors own the attributes: `Cost`, `Times`, `Placement` (placed ops), `Segment`
(outlined functions), `Plan` (the module's plan, devices and profiles); each reads with
`of(op)` (None where absent, PolyarchError where malformed) and writes with `put(op)`
(`to_attr()` the attribute). Passes and the compiler go through them; `verify` reads every
one, so a malformed attribute is caught after the pass that wrote it."""

import json
import re
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..errors import PolyarchError

if TYPE_CHECKING:
    from torch_mlir import ir

__all__ = ["Cost", "Times", "Placement", "Segment", "Plan", "verify", "make_context", "tensor_info", "is_tensor",
           "nominal_shape", "set_nominal_shapes", "set_profiles", "set_devices", "set_device_info", "is_placed", "pin_of",
           "lowering_of", "set_lowering", "create_transfer", "attr_to_py", "py_to_attr"]

COST = "polyarch.cost"
DEVICE = "polyarch.device"
TIME_US = "polyarch.time_us"
REASON = "polyarch.reason"
PIN = "polyarch.pin"
DEVICES = "polyarch.devices"
PLAN = "polyarch.plan"
PROFILES = "polyarch.profiles"
DEVICE_INFO = "polyarch.device_info"
LOWERING = "polyarch.lowering"
TRANSFER = "polyarch.transfer"
HOST = "host"

_VTENSOR = re.compile(r"^!torch\.vtensor<\[([^\]]*)\],(.+)>$")


def make_context() -> "ir.Context":
    """An MLIR context with the torch dialect registered and polyarch ops allowed."""
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d

    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    return ctx


def tensor_info(type_: "ir.Type") -> tuple | None:
    """(shape, element type) of a `!torch.vtensor` type, or None for other types.

    Dynamic dims are -1."""
    m = _VTENSOR.match(str(type_))
    if not m:
        return None
    dims = [int(d) if d not in ("?", "") else -1 for d in m.group(1).split(",")] if m.group(1) else []
    return dims, m.group(2)


SHAPES = "polyarch.shapes"
ARG_SHAPES = "polyarch.arg_shapes"


def nominal_shape(value: "ir.Value") -> list | None:
    """The shape of a tensor value with its dynamic dims at their example sizes (recorded
    at import as polyarch.shapes / polyarch.arg_shapes); a dynamic dim with no record
    counts as 1. None for non-tensors."""
    from torch_mlir import ir

    info = tensor_info(value.type)
    if info is None:
        return None
    shape = info[0]
    if -1 not in shape:
        return shape
    owner = value.owner
    if isinstance(owner, ir.Block):
        op, attr, index = owner.owner, ARG_SHAPES, ir.BlockArgument(value).arg_number
    else:
        op, attr, index = owner, SHAPES, ir.OpResult(value).result_number
    try:
        recorded = list(op.attributes[attr][index])
    except (KeyError, IndexError):
        recorded = None
    if recorded is None or len(recorded) != len(shape):
        return [max(d, 1) for d in shape]
    return [r if d == -1 else d for d, r in zip(shape, recorded)]


def set_nominal_shapes(ir: ModuleType, op: "ir.Operation", values: list, attr: str = SHAPES,
                       shape_of: Callable = nominal_shape) -> None:
    """Record the nominal shapes of `values` (results or arguments of `op`) on `op`, if
    any is dynamic; shape_of(value) gives each tensor's (default: what is recorded)."""
    if any(-1 in (tensor_info(v.type) or ([],))[0] for v in values):
        shapes = [shape_of(v) if is_tensor(v) else [] for v in values]
        op.attributes[attr] = ir.ArrayAttr.get([ir.DenseI64ArrayAttr.get(s) for s in shapes])


def is_tensor(value: "ir.Value") -> bool:
    return tensor_info(value.type) is not None


def create_transfer(ir: ModuleType, value: "ir.Value", src: str, dst: str, ip: "ir.InsertionPoint",
                    result_type: "ir.Type | None" = None) -> "ir.Value":
    """Insert `%y = "polyarch.transfer"(%x) {from, to}` at `ip`."""
    op = ir.Operation.create(
        TRANSFER,
        results=[result_type or value.type],
        operands=[value],
        attributes={"from": ir.StringAttr.get(src), "to": ir.StringAttr.get(dst)},
        loc=ir.Location.unknown(),
        ip=ip,
    )
    return op.results[0]


def _same_or_widened(a, b):
    from ..targets import BOUNDARY, WIDEN

    if a == b:
        return True
    ia, ib = tensor_info(a), tensor_info(b)
    conv = {**WIDEN, **BOUNDARY}
    return bool(ia and ib) and ia[0] == ib[0] and (conv.get(ia[1]) == ib[1] or conv.get(ib[1]) == ia[1])


def verify(module: "ir.Module") -> None:
    """Check the polyarch contracts of a module and read every polyarch attribute through its
    accessor (a malformed one raises); raises PolyarchError naming the op and its location."""
    plan = Plan.of(module)
    ends = set(plan.devices) | {HOST} if plan else None
    for fn in module.body.operations:
        segment = Segment.of(fn)
        for block in fn.regions[0].blocks:
            for op in block.operations:
                name = op.operation.name
                if name == TRANSFER:
                    _verify_transfer(op, segment, ends)
                elif name.startswith("polyarch."):
                    raise PolyarchError(f"unknown polyarch op '{name}'", str(op.location))
                else:
                    _verify_placed(op, segment)


def _verify_transfer(op, segment, ends):
    from torch_mlir import ir

    attrs = op.operation.attributes
    for key in ("from", "to"):
        if key not in attrs or not isinstance(attrs[key], ir.StringAttr):
            raise PolyarchError(f"{TRANSFER} needs a string attribute '{key}'", str(op.location))
    if attrs["from"].value == attrs["to"].value:
        raise PolyarchError(f"{TRANSFER} from a device to itself", str(op.location))
    if ends is not None and not {attrs["from"].value, attrs["to"].value} <= ends:
        raise PolyarchError(f"{TRANSFER} from {attrs['from'].value} to {attrs['to'].value}: not a device of the "
                            f"module's {DEVICES} ({', '.join(sorted(ends - {HOST}))}) nor '{HOST}'", str(op.location))
    if len(op.operands) != 1 or len(op.results) != 1 or not _same_or_widened(op.operands[0].type, op.results[0].type):
        raise PolyarchError(f"{TRANSFER} takes one tensor and returns one of the same shape and type (or its boundary "
                            "type: 32-bit widening, f64 as f32)", str(op.location))
    if segment is not None:
        raise PolyarchError(f"{TRANSFER} inside a device segment", str(op.location))


def _verify_placed(op, segment):
    Cost.of(op)
    Times.of(op)
    placement = Placement.of(op)
    if segment is not None and placement is not None and placement.device != segment.device:
        raise PolyarchError(f"{op.operation.name} placed on {placement.device} inside segment @{segment.name} "
                            f"on {segment.device}", str(op.location))


def _malformed(what, op, expected):
    return PolyarchError(f"malformed {what} on {op.operation.name if hasattr(op, 'operation') else op}: "
                         f"expected {expected}", str(getattr(op, "location", "")) or None)


@dataclass(frozen=True)
class Cost:
    """polyarch.cost on a placed op: its FLOPs and bytes read and written (annotate-costs)."""

    flops: int
    bytes_read: int
    bytes_written: int

    @classmethod
    def of(cls, op: "ir.Operation") -> "Cost | None":
        from torch_mlir import ir

        if COST not in op.attributes:
            return None
        d = op.attributes[COST]
        try:
            vals = [ir.IntegerAttr(d[k]).value for k in ("flops", "bytes_read", "bytes_written")]
        except (KeyError, ValueError, TypeError):
            raise _malformed(COST, op, "{flops, bytes_read, bytes_written : i64}") from None
        return cls(*vals)

    def to_attr(self) -> "ir.Attribute":
        from torch_mlir import ir

        i64 = ir.IntegerType.get_signless(64)
        return ir.DictAttr.get({k: ir.IntegerAttr.get(i64, getattr(self, k)) for k in ("flops", "bytes_read", "bytes_written")})

    def put(self, op: "ir.Operation") -> None:
        op.attributes[COST] = self.to_attr()


@dataclass(frozen=True)
class Times:
    """polyarch.time_us on a placed op: predicted microseconds per device name."""

    us: dict

    @classmethod
    def of(cls, op: "ir.Operation") -> "Times | None":
        from torch_mlir import ir

        if TIME_US not in op.attributes:
            return None
        try:
            return cls({a.name: ir.FloatAttr(a.attr).value for a in ir.DictAttr(op.attributes[TIME_US])})
        except (ValueError, TypeError):
            raise _malformed(TIME_US, op, "{<device> = f64, ...}") from None

    def to_attr(self) -> "ir.Attribute":
        from torch_mlir import ir

        f64 = ir.F64Type.get()
        return ir.DictAttr.get({d: ir.FloatAttr.get(f64, t) for d, t in self.us.items()})

    def put(self, op: "ir.Operation") -> None:
        op.attributes[TIME_US] = self.to_attr()


@dataclass(frozen=True)
class Placement:
    """polyarch.device (and polyarch.reason, why it is not on its fastest device) on a placed op."""

    device: str
    reason: str | None = None

    @classmethod
    def of(cls, op: "ir.Operation") -> "Placement | None":
        from torch_mlir import ir

        if DEVICE not in op.attributes:
            return None
        try:
            reason = ir.StringAttr(op.attributes[REASON]).value if REASON in op.attributes else None
            return cls(ir.StringAttr(op.attributes[DEVICE]).value, reason)
        except (ValueError, TypeError):
            raise _malformed(f"{DEVICE} or {REASON}", op, "a string") from None

    def put(self, op: "ir.Operation") -> None:
        from torch_mlir import ir

        op.attributes[DEVICE] = ir.StringAttr.get(self.device)
        if self.reason:
            op.attributes[REASON] = ir.StringAttr.get(self.reason)


@dataclass(frozen=True)
class Segment:
    """An outlined function: func.func @seg_N {polyarch.device, polyarch.time_us : f64}."""

    name: str
    device: str
    predicted_us: float
    fn: object

    @classmethod
    def of(cls, fn: "ir.Operation") -> "Segment | None":
        from torch_mlir import ir

        if fn.operation.name != "func.func" or DEVICE not in fn.attributes:
            return None
        try:
            t = ir.FloatAttr(fn.attributes[TIME_US]).value if TIME_US in fn.attributes else 0.0
            return cls(ir.StringAttr(fn.attributes["sym_name"]).value, ir.StringAttr(fn.attributes[DEVICE]).value, t, fn)
        except (ValueError, TypeError):
            raise _malformed("segment attributes", fn, f"{DEVICE} a string and {TIME_US} an f64") from None

    @staticmethod
    def all(module: "ir.Module") -> list:
        """The segments of a module, in module order."""
        return [s for s in (Segment.of(op) for op in module.body.operations) if s is not None]

    def put(self) -> None:
        from torch_mlir import ir

        self.fn.attributes[DEVICE] = ir.StringAttr.get(self.device)
        self.fn.attributes[TIME_US] = ir.FloatAttr.get(ir.F64Type.get(), self.predicted_us)


@dataclass(frozen=True)
class Plan:
    """The module's placement: polyarch.devices (the targets), polyarch.profiles (the
    profile that priced each), polyarch.plan (how it was chosen and what is predicted)."""

    devices: tuple
    summary: dict
    profiles: dict
    device_info: dict | None = None

    @classmethod
    def of(cls, module: "ir.Module") -> "Plan | None":
        from torch_mlir import ir

        attrs = module.operation.attributes
        if DEVICES not in attrs:
            return None
        try:
            devices = tuple(ir.StringAttr(a).value for a in ir.ArrayAttr(attrs[DEVICES]))
            summary = attr_to_py(ir.DictAttr(attrs[PLAN])) if PLAN in attrs else {}
            profiles = {a.name: ir.StringAttr(a.attr).value for a in ir.DictAttr(attrs[PROFILES])} \
                if PROFILES in attrs else {}
            info = json.loads(ir.StringAttr(attrs[DEVICE_INFO]).value) if DEVICE_INFO in attrs else None
        except (ValueError, TypeError):
            raise _malformed("plan attributes", module.operation,
                             f"{DEVICES} strings, {PLAN} and {PROFILES} dictionaries, {DEVICE_INFO} JSON text") from None
        return cls(devices, summary, profiles, info)

    def put(self, module: "ir.Module") -> None:
        from torch_mlir import ir

        attrs = module.operation.attributes
        attrs[DEVICES] = ir.ArrayAttr.get([ir.StringAttr.get(d) for d in self.devices])
        attrs[PLAN] = py_to_attr(self.summary)
        if self.profiles:
            set_profiles(module, self.profiles)
        if self.device_info is not None:
            set_device_info(module, self.device_info)


def set_profiles(module: "ir.Module", profiles: dict) -> None:
    """polyarch.profiles: {device: profile name}."""
    from torch_mlir import ir

    module.operation.attributes[PROFILES] = ir.DictAttr.get({d: ir.StringAttr.get(n) for d, n in profiles.items()})


def set_devices(module: "ir.Module", devices: Iterable) -> None:
    """polyarch.devices: the devices a module is placed over."""
    from torch_mlir import ir

    module.operation.attributes[DEVICES] = ir.ArrayAttr.get([ir.StringAttr.get(d) for d in devices])


def set_device_info(module: "ir.Module", info: dict) -> None:
    """polyarch.device_info: per device its identity on the compiling host (or null), the
    profile that priced it and where that came from (JSON text)."""
    from torch_mlir import ir

    module.operation.attributes[DEVICE_INFO] = ir.StringAttr.get(json.dumps(info, sort_keys=True))


def is_placed(op: "ir.Operation") -> bool:
    """True for an op assign-devices placed (weights and glue are not: they are rematerialised)."""
    return DEVICE in op.attributes


def pin_of(op: "ir.Operation") -> str | None:
    """polyarch.pin: the device the IR itself pins the op to, or None."""
    from torch_mlir import ir

    return ir.StringAttr(op.attributes[PIN]).value if PIN in op.attributes else None


def lowering_of(op: "ir.Operation") -> str | None:
    """polyarch.lowering: the rewrite tuning chose for a convolution ("im2col", "taps"), or None."""
    from torch_mlir import ir

    return ir.StringAttr(op.attributes[LOWERING]).value if LOWERING in op.attributes else None


def set_lowering(op: "ir.Operation", kind: str | None) -> None:
    """Mark a convolution with its lowering (None: unmark it)."""
    from torch_mlir import ir

    if kind is None:
        if LOWERING in op.attributes:
            del op.attributes[LOWERING]
    else:
        op.attributes[LOWERING] = ir.StringAttr.get(kind)


def attr_to_py(attr: "ir.Attribute") -> Any:
    """A (nested) MLIR dictionary/array/string/number attribute as plain Python."""
    from torch_mlir import ir

    if isinstance(attr, ir.DictAttr):
        return {a.name: attr_to_py(a.attr) for a in attr}
    if isinstance(attr, ir.ArrayAttr):
        return [attr_to_py(a) for a in attr]
    if isinstance(attr, (ir.StringAttr, ir.IntegerAttr, ir.FloatAttr, ir.BoolAttr)):
        return attr.value
    return str(attr)


def py_to_attr(value: Any) -> "ir.Attribute":
    """Plain Python (dict, list, str, int, float, bool) as an MLIR attribute: ints as i64,
    floats as f64."""
    from torch_mlir import ir

    if isinstance(value, dict):
        return ir.DictAttr.get({k: py_to_attr(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return ir.ArrayAttr.get([py_to_attr(v) for v in value])
    if isinstance(value, bool):
        return ir.BoolAttr.get(value)
    if isinstance(value, int):
        return ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)
    if isinstance(value, float):
        return ir.FloatAttr.get(ir.F64Type.get(), value)
    return ir.StringAttr.get(str(value))
