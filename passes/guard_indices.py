"""guard-indices: no index op reads or writes out of bounds.

IREE does not bounds-check gathers: an out-of-range token id read garbage with rc 0, or
crashed the process (id 10**6 into an Embedding(1000, 64): SIGSEGV). PyTorch raises
IndexError. Every index operand of an embedding, index_select, gather, index / index_put or
scatter is classified:

  from an input    the index is a model input, seen through ops that keep values (view,
                   unsqueeze, slice, expand, an integer cast...): its valid range is recorded
                   on @main as `polyarch.index_inputs` (the driver copies it into the
                   manifest's signature) and the runtime checks every call's array before
                   anything runs, naming the input, the value, where it is and the range;
  computed         from inputs by arithmetic (ids + 3, or positions from a dynamic size):
                   marked `polyarch.index_guard`; stage `insert` puts a check in front of the op
                   (`lo <= min(i) and max(i) < hi` read by `torch.runtime.assert`, which IREE lowers to a
                   failing invocation with the message: the gather never runs);
  constant         values computed from constants alone (static positions; a constant
                   expanded to a dynamic size): the same values every call; left alone;
  clamped          a computed index clamped to constant bounds within the valid range
                   (`torch.clamp(i, 0, n - 1)`, seen through value-keeping ops): in range by
                   construction, left alone. A check would read a flag back to the host in
                   the middle of the call: speculative decoding's verify call, whose cache rows
                   are computed positions, was split into 18 submissions by its 8 checks.

Valid ranges, as PyTorch's: embedding, index_select, gather, scatter: [0, size); index and
index_put (negative indices count from the end): [-size, size). Into a dimension of dynamic
size the range is known only at run time: where the index is an input and the size an
input's dimension (a table given as an input), both are checked by the runtime before
anything runs (`sized` in the input's range: [{"input", "dim", "negative", "op"}]);
otherwise (a computed index, a computed table, constant indices) the check goes in the
segment, against `torch.aten.size.int` of the indexed tensor.

Options:
  stage=mark     classify, record and mark (the driver runs it on the imported model)
  stage=insert   insert the checks for the marked ops (the driver runs it on each segment)
  stage=all      both (for one module through polyarch-opt)"""

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dialects import polyarch as pa
from .base import Pass, option
from .common import const_scalar, main_func, module_path, source_line

if TYPE_CHECKING:
    from torch_mlir import ir

INPUTS = "polyarch.index_inputs"
GUARD = "polyarch.index_guard"

# op -> (operand of the indexed tensor, operand of the dim (None: dim 0), operand of the
# index (a tensor, or a list of optional tensors, one per dim), negative indices allowed)
INDEX_OPS = {
    "torch.aten.embedding": (0, None, 1, False),
    "torch.aten.index_select": (0, 1, 2, False),
    "torch.aten.gather": (0, 1, 2, False),
    "torch.aten.scatter.src": (0, 1, 2, False),
    "torch.aten.scatter.value": (0, 1, 2, False),
    "torch.aten.scatter_add": (0, 1, 2, False),
    "torch.aten.scatter_reduce.two": (0, 1, 2, False),
    "torch.aten.index.Tensor": (0, "list", 1, True),
    "torch.aten.index.Tensor_hacked_twin": (0, "list", 1, True),
    "torch.aten.index_put": (0, "list", 1, True),
    "torch.aten.index_put.hacked_twin": (0, "list", 1, True),
    "torch.aten._index_put_impl": (0, "list", 1, True),
}
# ops whose result holds some of operand 0's values unchanged (an integer cast of an
# in-range index is exact): an index reached through them is still the input's values
_KEEPS_VALUES = {
    "torch.aten." + n for n in (
        "view", "reshape", "_reshape_alias", "_unsafe_view", "unsqueeze", "squeeze", "squeeze.dim", "flatten.using_ints",
        "unflatten.int", "expand", "broadcast_to", "slice.Tensor", "select.int", "permute", "transpose.int", "t",
        "clone", "contiguous", "alias", "detach", "to.dtype", "_to_copy", "numpy_T", "expand_as", "repeat")
}
_INT = re.compile(r"^[su]i\d+$|^i(8|16|32|64)$")


def _owner_op(value):
    o = getattr(value.owner, "operation", None)
    return o if o is not None and not o.name.startswith("func.") else None


def _arg_number(value):
    from torch_mlir import ir

    return ir.BlockArgument(value).arg_number if isinstance(value.owner, ir.Block) else None


def _index_operands(op):
    """-> [(operand number, list item or -1, index value, bound)] for an index op, where bound
    is (lo, hi) for a static dim and ("dynamic", dim, negative allowed) for a dynamic one."""
    spec = INDEX_OPS.get(op.operation.name)
    if spec is None:
        return []
    src, dim_at, idx_at, negative = spec
    info = pa.tensor_info(op.operands[src].type)
    if not info or len(op.operands) <= idx_at:
        return []
    shape = info[0]

    def bounds(dim):
        if dim is None or not -len(shape) <= dim < len(shape):
            return None
        n = shape[dim]
        if n < 0:
            return ("dynamic", dim % len(shape), negative)
        return (-n if negative else 0, n)

    if dim_at == "list":
        lst = _owner_op(op.operands[idx_at])
        if lst is None or lst.name != "torch.prim.ListConstruct":
            return []
        out = []
        for k, v in enumerate(lst.operands):
            b = bounds(k)
            if b and pa.is_tensor(v) and _INT.match(pa.tensor_info(v.type)[1]):
                out.append((idx_at, k, v, b))
        return out
    dim = 0 if dim_at is None else const_scalar(op.operands[dim_at])
    b = bounds(dim if isinstance(dim, int) and not isinstance(dim, bool) else None)
    v = op.operands[idx_at]
    if b is None or not pa.is_tensor(v) or not _INT.match(pa.tensor_info(v.type)[1]):
        return []
    return [(idx_at, -1, v, b)]


def _source_input(value):
    """The argument number of the input whose values `value` holds unchanged (an integer input,
    or a float input cast to integers on the way, all of its values: truncated), or None."""
    partial = False  # through a slice: only some of the input's values are indices
    while True:
        n = _arg_number(value)
        if n is not None:
            et = (pa.tensor_info(value.type) or ([], ""))[1]
            return n if _INT.match(et) or (et in ("f16", "bf16", "f32", "f64") and not partial) else None
        o = _owner_op(value)
        partial = partial or (o is not None and o.name in ("torch.aten.slice.Tensor", "torch.aten.select.int"))
        if o is None or o.name not in _KEEPS_VALUES or not o.operands:
            return None
        value = o.operands[0]


# ops whose result has operand 0's shape, dimension for dimension
_KEEPS_SHAPE = {"torch.aten." + n for n in ("clone", "contiguous", "alias", "detach", "to.dtype", "_to_copy")}


def _shape_input(value):
    """The argument number of the input whose shape `value` has, dimension for dimension, or None."""
    while True:
        n = _arg_number(value)
        if n is not None:
            return n
        o = _owner_op(value)
        if o is None or o.name not in _KEEPS_SHAPE or not o.operands:
            return None
        value = o.operands[0]


def _holds(element_type, lo, hi):
    """Whether an integer element type ("si64", "ui8", "i32") holds every value of [lo, hi]."""
    m = re.match(r"^([su]?)i(\d+)$", element_type)
    if not m:
        return False
    bits = int(m.group(2))
    least, most = (0, 2 ** bits - 1) if m.group(1) == "u" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return least <= lo and hi <= most


def _clamped(value):
    """(lo, hi), inclusive, where `value` is a `torch.aten.clamp` to two constant bounds, seen
    through value-keeping ops, with every value on the way of an integer type that holds
    [lo, hi] (a float's NaN casts anywhere; a narrower integer cast wraps), else None."""
    types = []
    while True:
        types.append((pa.tensor_info(value.type) or ([], ""))[1])
        o = _owner_op(value)
        if o is None:
            return None
        if o.name == "torch.aten.clamp" and len(o.operands) == 3:
            lo, hi = const_scalar(o.operands[1]), const_scalar(o.operands[2])
            ints = all(isinstance(b, int) and not isinstance(b, bool) for b in (lo, hi))
            return (lo, hi) if ints and lo <= hi and all(_holds(t, lo, hi) for t in types) else None
        if o.name not in _KEEPS_VALUES or not o.operands:
            return None
        value = o.operands[0]


def _depends_on_inputs(value, memo):
    """True if the values of `value` are computed from any argument of the function (its
    values or sizes). A value-keeping op's values come from its operand 0 alone: a constant
    expanded to a dynamic batch (BERT's token_type_ids) holds only the constant's values."""
    if _arg_number(value) is not None:
        return True
    o = _owner_op(value)
    if o is None:
        return False
    if o not in memo:
        memo[o] = False  # (program order: no cycles; guards the recursion on shared operands)
        reads = o.operands[:1] if o.name in _KEEPS_VALUES else o.operands
        memo[o] = any(_depends_on_inputs(v, memo) for v in reads)
    return memo[o]


def _where(op):
    """'torch.aten.embedding (embeddings.word_embeddings)', or with the source line where the
    op has no module path (torch's own files are not named: they say nothing to the user)."""
    name = op.operation.name
    path = module_path(op)
    if path:
        return f"{name} ({path})"
    src = source_line(op)
    return f"{name} at {src}" if src and "/torch/" not in src else name


def mark(module: "ir.Module") -> dict:
    """Classify every index operand of @main. -> {arg number: {"min", "max", "op"}} for the
    inputs used as indices (also recorded as `polyarch.index_inputs` on @main); computed
    indices are marked `polyarch.index_guard` on their op."""
    from torch_mlir import ir

    func = main_func(module)
    ranges, memo = {}, {}
    with module.context:
        for op in list(func.regions[0].blocks[0].operations):
            guards = []
            for at, item, v, bound in _index_operands(op):
                arg = _source_input(v)
                if bound[0] == "dynamic":
                    _, dim, negative = bound
                    src = INDEX_OPS[op.operation.name][0]
                    table = _shape_input(op.operands[src])
                    if arg is not None and table is not None:  # both known on the host: checked there
                        sized = {"input": table, "dim": dim, "negative": negative, "op": _where(op)}
                        ranges.setdefault(arg, {"op": _where(op)}).setdefault("sized", []).append(sized)
                    else:  # against the size at run time, in the segment (constant indices too)
                        guards.append(ir.DenseI64ArrayAttr.get([at, item, int(negative), dim, src]))
                    continue
                lo, hi = bound
                if arg is not None and "min" not in ranges.get(arg, {"min": 0}):  # only sized uses so far
                    ranges[arg].update(min=lo, max=hi - 1, op=_where(op))
                elif arg is not None:  # several uses: the intersection, named by the narrowest
                    old = ranges.get(arg, {"min": lo, "max": hi - 1, "op": _where(op)})
                    narrower = hi - 1 - lo < old["max"] - old["min"]
                    ranges[arg] = dict(old, min=max(lo, old["min"]), max=min(hi - 1, old["max"]),
                                       op=_where(op) if narrower else old["op"])
                elif _depends_on_inputs(v, memo):
                    c = _clamped(v)
                    if c is None or not (lo <= c[0] and c[1] < hi):
                        guards.append(ir.DenseI64ArrayAttr.get([at, item, lo, hi]))
            if guards:
                op.attributes[GUARD] = ir.ArrayAttr.get(guards)
        if ranges:
            func.attributes[INPUTS] = ir.StringAttr.get(json.dumps({str(k): v for k, v in sorted(ranges.items())}))
    return ranges


def input_ranges(module: "ir.Module") -> dict:
    """{arg number: {"min", "max", "op"}} as recorded by `mark`."""
    func = main_func(module)
    if INPUTS not in func.attributes:
        return {}
    return {int(k): v for k, v in json.loads(func.attributes[INPUTS].value).items()}


def _check(ir, op, value, lo, hi, sized=None):
    """Insert `assert lo <= min(value) and max(value) < hi` in front of `op`; sized = (operand,
    dim, negative): hi is that operand's size there at run time, lo 0 or -hi."""
    ip, loc = ir.InsertionPoint(op), op.location
    make = lambda name, t, operands=(), attrs=None: ir.Operation.create(
        name, results=[ir.Type.parse(t)] if t else [], operands=list(operands), attributes=attrs or {}, ip=ip, loc=loc)
    i64 = lambda n: make("torch.constant.int", "!torch.int", (),
                         {"value": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), n)}).results[0]
    if sized is not None:
        src, dim, negative = sized
        size = make("torch.aten.size.int", "!torch.int", [op.operands[src], i64(dim)]).results[0]
        lo_v = make("torch.aten.neg.int", "!torch.int", [size]).results[0] if negative else i64(0)
        hi_v, valid = size, f"{'-size' if negative else '0'} to size - 1 of dimension {dim} (its size at run time)"
    else:
        lo_v, hi_v, valid = i64(lo), i64(hi), f"{lo} to {hi - 1}"
    # min and max, not a reduction over an i1 mask (those come out wrong on Vulkan, docs/architecture.md)
    scalar = re.sub(r"<\[[^\]]*\],", "<[],", str(value.type))
    lo_ok = make("torch.aten.ge.Scalar", "!torch.vtensor<[],i1>",
                 [make("torch.aten.min", scalar, [value]).results[0], lo_v]).results[0]
    hi_ok = make("torch.aten.lt.Scalar", "!torch.vtensor<[],i1>",
                 [make("torch.aten.max", scalar, [value]).results[0], hi_v]).results[0]
    ok = make("torch.aten.logical_and", "!torch.vtensor<[],i1>", [lo_ok, hi_ok]).results[0]
    flag = make("torch.aten.Bool.Tensor", "!torch.bool", [ok]).results[0]
    msg = (f"polyarch: an index computed in the model is out of range in {_where(op)}: "
           f"valid indices are {valid} (PyTorch raises IndexError here)")
    make("torch.runtime.assert", None, [flag], {"message": ir.StringAttr.get(msg)})


def insert(module: "ir.Module") -> int:
    """Put a range check in front of every op marked by `mark`, in every function of
    `module`. -> the number of checks inserted."""
    from torch_mlir import ir

    done = 0
    with module.context:
        for func in module.body.operations:
            if func.operation.name != "func.func":
                continue
            for op in list(func.regions[0].blocks[0].operations):
                if GUARD not in op.attributes:
                    continue
                for g in op.attributes[GUARD]:
                    g = list(ir.DenseI64ArrayAttr(g))  # [at, item, lo, hi] or [at, item, negative, dim, operand]
                    at, item = g[:2]
                    v = op.operands[at]
                    if item >= 0:
                        v = _owner_op(v).operands[item]
                    if len(g) == 5:
                        _check(ir, op, v, 0, 0, sized=(g[4], g[3], bool(g[2])))
                    else:
                        _check(ir, op, v, g[2], g[3])
                    done += 1
                del op.attributes[GUARD]
    return done


@dataclass(frozen=True)
class GuardIndices(Pass):
    NAME = "guard-indices"
    stage: str = option("all", "mark: classify and record; insert: the checks; all: both",
                        choices=("mark", "insert", "all"))

    def apply(self, module: "ir.Module") -> "ir.Module":
        if self.stage in ("mark", "all"):
            mark(module)
        if self.stage in ("insert", "all"):
            insert(module)
        return module


def run(module: "ir.Module", **options) -> "ir.Module":
    """Run the pass with Python option values (see GuardIndices)."""
    return GuardIndices(**options).apply(module)
