"""What the passes share: finding @main, classifying ops, describing where an op came from."""

import re
from typing import TYPE_CHECKING, Any, Iterable

from ..dialects import polyarch as pa
from ..errors import PolyarchError

if TYPE_CHECKING:
    from torch_mlir import ir

TERMINATORS = ("func.return",)


def main_func(module: "ir.Module", name: str = "main") -> "ir.Operation":
    for op in module.body.operations:
        if op.operation.name == "func.func" and op.attributes["sym_name"].value == name:
            return op
    raise PolyarchError(f"no func.func @{name} in the module", fix="import the model with polyarch.compiler.importer")


def body_ops(func: "ir.Operation") -> tuple:
    """The ops of a single-block function, terminator excluded."""
    blocks = list(func.regions[0].blocks)
    if len(blocks) != 1:
        raise PolyarchError(f"@{func.attributes['sym_name'].value} has {len(blocks)} blocks; polyarch needs one")
    ops = list(blocks[0].operations)
    return ops[:-1], ops[-1]


def _remat_by_kind(op):
    """True/False where the op's kind decides, None where its operands do."""
    if op.name == "torch.vtensor.literal":
        return True
    if len(op.regions) or op.name in TERMINATORS or op.name.startswith("func."):
        return False
    if not any(pa.is_tensor(r) for r in op.results):
        return True
    return None


def _is_block_arg(value):
    from torch_mlir import ir

    return isinstance(value.owner, ir.Block)


def remat_set(func: "ir.Operation") -> set:
    """The rematerialisable ops of a single-block function: constants, constant-foldable
    ops and glue, not placed on any device.

    `outline-segments` clones them into every segment that uses them. That covers
    torch.constant.*, torch.vtensor.literal (weights), ops computed from constants
    alone (weight transposes, arange: IREE folds them at compile time), and ops whose
    results are all non-tensors (lists, scalars, size queries). Glue over computed tensors
    (the list of a `cat` of activations) is rematerialised too, but does not make the op
    that reads it constant. Decided in one pass over the function (program order is
    topological, so each op's operands come before it)."""
    ops, _ = body_ops(func)
    out, const = set(), set()  # const: computed from constants alone (glue over tensors is not)
    for op in ops:
        o = op.operation
        kind = _remat_by_kind(o)
        from_consts = all(not _is_block_arg(v) and v.owner.operation in const for v in o.operands)
        if kind is None:
            kind = from_consts
        if kind:
            out.add(o)
            if from_consts:
                const.add(o)
    return out


def placeable_ops(func: "ir.Operation") -> list:
    ops, _ = body_ops(func)
    remat = remat_set(func)
    return [op for op in ops if op.operation not in remat]


_NAME = re.compile(r'^loc\((?:callsite\()?"([^"]+)"\(')
_FILE = re.compile(r'"([^"]+)":(\d+):(\d+)')


def module_path(op: "ir.Operation") -> str:
    """The nn.Module path (e.g. 'encoder.layer.0.attention') recorded at import, or ''."""
    m = _NAME.match(str(op.location))
    return m.group(1) if m else ""


def source_line(op: "ir.Operation") -> str:
    """'file.py:LINE' of the innermost source frame of the op, or '' if unknown."""
    m = _FILE.search(str(op.location))
    if not m or m.group(1) in ("-", ""):
        return ""
    return f"{m.group(1)}:{m.group(2)}"


def describe(op: "ir.Operation") -> str:
    """'torch.aten.mm (encoder.layer.0.attention.self.query) at modeling_bert.py:210'."""
    s = op.operation.name
    path = module_path(op)
    if path:
        s += f" ({path})"
    src = source_line(op)
    if src:
        s += f" at {src}"
    return s


def tensor_bytes(value: "ir.Value") -> int:
    from ..targets import ELEMENT_BYTES

    info = pa.tensor_info(value.type)
    if info is None:
        return 0
    n = 1
    for d in pa.nominal_shape(value):
        n *= max(d, 1)
    return n * ELEMENT_BYTES.get(info[1], 4)


def element_types(op: "ir.Operation") -> set:
    """Element types of the tensors an op reads, and of the results that are used
    (an unused result, e.g. max.dim's indices under softmax, is dropped by IREE)."""
    ts = set()
    used = [r for r in op.results if any(True for _ in r.uses)]
    for v in list(op.operands) + used:
        info = pa.tensor_info(v.type)
        if info:
            ts.add(info[1])
    return ts


def _constant_value(value):
    """The Python-ish text of a constant scalar or list operand (torch.constant.*,
    torch.prim.ListConstruct of constants), or None."""
    owner = value.owner
    if not hasattr(owner, "operation"):
        return None
    o = owner.operation
    if o.name.startswith("torch.constant."):
        return str(o.attributes["value"]) if "value" in o.attributes else o.name.rsplit(".", 1)[1]
    if o.name == "torch.prim.ListConstruct":
        items = [_constant_value(v) for v in o.operands]
        return None if any(i is None for i in items) else "[" + ",".join(items) + "]"
    return None


def const_scalar(value: "ir.Value") -> Any:
    """The value of a torch.constant.* operand (int, float, bool, str; 'none' for
    torch.constant.none), or None if the operand is not a constant."""
    o = getattr(value.owner, "operation", None)
    if o is None or not o.name.startswith("torch.constant."):
        return None
    return o.attributes["value"].value if "value" in o.attributes else o.name.rsplit(".", 1)[1]


def const_ints(value: "ir.Value") -> list | None:
    """The ints of a torch.prim.ListConstruct of torch.constant.int operands, or None."""
    o = getattr(value.owner, "operation", None)
    if o is None or o.name != "torch.prim.ListConstruct":
        return None
    out = []
    for v in o.operands:
        c = getattr(v.owner, "operation", None)
        if c is None or c.name != "torch.constant.int":
            return None
        out.append(c.attributes["value"].value)
    return out


def op_fingerprint(op: "ir.Operation") -> str:
    """What makes an op compute what it computes, as one line: its name, its tensor operand
    and result types and its constant operands (strides, groups, dims...). Two ops with
    the same fingerprint are the same computation on different data: an op measured wrong
    on a device is recorded by it (compiler/verify.py) and kept off that device
    (assign-devices)."""
    args = []
    for v in op.operands:
        if pa.is_tensor(v):
            args.append(str(v.type))
        else:
            c = _constant_value(v)
            args.append(c if c is not None else str(v.type))
    results = ",".join(str(r.type) for r in op.results)
    return f"{op.operation.name}({', '.join(args)}) -> {results}"


def load_verdicts(items: Iterable) -> dict:
    """Measured facts about devices, for annotate-costs and assign-devices: each item a dict
    or the path of a JSON file {"device": NAME, "wrong_ops": {fingerprint: {"reason": ...}},
    "corrections": {"matmul"|"conv"|"other": factor}}. -> {device: {"wrong_ops", "corrections"}}."""
    import json

    out = {}
    for item in items or ():
        if isinstance(item, str):
            try:
                with open(item) as f:
                    item = json.load(f)
            except (OSError, ValueError) as e:
                raise PolyarchError(f"cannot read verdicts file {item}: {e}", fix="give a JSON file as compiler/verify.py writes")
        if not isinstance(item, dict) or "device" not in item:
            raise PolyarchError("a verdicts entry needs a 'device'", fix='write {"device": "vulkan", "wrong_ops": {...}}')
        d = out.setdefault(item["device"], {"wrong_ops": {}, "corrections": {}})
        d["wrong_ops"].update(item.get("wrong_ops", {}))
        d["corrections"].update(item.get("corrections", {}))
    return out
