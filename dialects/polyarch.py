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
round-trip without a C++ registration); `verify` enforces their contracts."""

import re

from ..errors import PolyarchError

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


def make_context():
    """An MLIR context with the torch dialect registered and polyarch ops allowed."""
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d

    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    return ctx


def tensor_info(type_):
    """(shape, element type) of a `!torch.vtensor` type, or None for other types.

    Dynamic dims are -1."""
    m = _VTENSOR.match(str(type_))
    if not m:
        return None
    dims = [int(d) if d not in ("?", "") else -1 for d in m.group(1).split(",")] if m.group(1) else []
    return dims, m.group(2)


SHAPES = "polyarch.shapes"
ARG_SHAPES = "polyarch.arg_shapes"


def nominal_shape(value):
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


def set_nominal_shapes(ir, op, values, attr=SHAPES, shape_of=nominal_shape):
    """Record the nominal shapes of `values` (results or arguments of `op`) on `op`, if
    any is dynamic; shape_of(value) gives each tensor's (default: what is recorded)."""
    if any(-1 in (tensor_info(v.type) or ([],))[0] for v in values):
        shapes = [shape_of(v) if is_tensor(v) else [] for v in values]
        op.attributes[attr] = ir.ArrayAttr.get([ir.DenseI64ArrayAttr.get(s) for s in shapes])


def is_tensor(value):
    return tensor_info(value.type) is not None


def create_transfer(ir, value, src, dst, ip, result_type=None):
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


def verify(module):
    """Check the polyarch contracts of a module; raises PolyarchError."""
    from torch_mlir import ir

    for fn in module.body.operations:
        is_segment = DEVICE in fn.attributes
        for block in fn.regions[0].blocks:
            for op in block.operations:
                name = op.operation.name
                if name == TRANSFER:
                    attrs = op.operation.attributes
                    for key in ("from", "to"):
                        if key not in attrs or not isinstance(attrs[key], ir.StringAttr):
                            raise PolyarchError(f"{TRANSFER} needs a string attribute '{key}'", str(op.location))
                    if attrs["from"].value == attrs["to"].value:
                        raise PolyarchError(f"{TRANSFER} from a device to itself", str(op.location))
                    if len(op.operands) != 1 or len(op.results) != 1 or not _same_or_widened(op.operands[0].type, op.results[0].type):
                        raise PolyarchError(f"{TRANSFER} takes one tensor and returns one of the same shape and type (or its boundary type: 32-bit widening, f64 as f32)", str(op.location))
                    if is_segment:
                        raise PolyarchError(f"{TRANSFER} inside a device segment", str(op.location))
                elif name.startswith("polyarch."):
                    raise PolyarchError(f"unknown polyarch op '{name}'", str(op.location))
