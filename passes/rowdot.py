"""rowdot: a matmul of a few rows against a transposed [N, K] matrix becomes a call to a
hand-written CPU dispatch (compiler/kernels.py).

    %wt = torch.aten.permute %w, [1, 0]      (or torch.aten.t %w, torch.aten.transpose.int %w, 0, 1)
    %y = torch.aten.mm %x, %wt               (x: [M, K], 1 <= M <= max-rows or M dynamic; w: [N, K])
becomes
    %xb = torch_c.to_builtin_tensor %x
    %wb = torch_c.to_builtin_tensor %w
    %yb = func.call @polyarch_rowdot_<M>x<N>x<K>_<dtype>(%xb, %wb)
    %y = torch_c.from_builtin_tensor %yb
with one private declaration per shape, marked `polyarch.kernel = "rowdot"`, which
compiler/kernels.py `define` gives its body (an IREE executable) before iree-compile. This is
how nn.Linear multiplies in a decode step (x: the batch's rows, w: the weight as stored,
[out, in]); IREE 3.13's own code for it streams the weights about 1.4x slower
(docs/cpu-speed.md). Only for segments compiled for cpu: the body is llvm-cpu code.
x and w of one dtype (f32, f16, bf16); K a multiple of 16. A dynamic row count (prefill's
nn.Linear over the prompt) in f32 too (`polyarch_rowdot_Dx<N>x<K>_f32`): the same dispatch
with its rows in register tiles, reading the weight as stored where IREE's data tiling packs
a copy of it. The call carries the mm's location.

A bmm of a few rows against a batch of transposed matrices (option `batched`, on by default)
becomes one batched call, `polyarch_rowdot_b<B1xB2..>_<M>x<N>x<K>_<dtype>`:

    %kt = torch.aten.permute %cache, [0, 1, 3, 2]        (cache: [S, H, N, K])
    %k3 = torch.aten.view %kt, [S * H, K, N]             (or transpose.int of a [B, N, K] w)
    %s = torch.aten.bmm %q, %k3                          (q: [S * H, M, K], M <= 16)

the attention scores of a decode or verify step: each key/value head's queries against its
cached keys, read as the cache stores them, where IREE copied the cache transposed for every
layer (at batch 8 in f32: 118 us a layer) before its own product.

A bmm of a few rows by a batch of matrices as stored (option `values`, on by default) becomes
one `polyarch_rowmix_b<B1xB2..>_<M>x<N>x<K>_<dtype>` call (compiler/kernels.py `rowmix_source`):

    %v3 = torch.aten.view %cache, [S * H, N, K]          (cache: [S, H, N, K]; or any [B, N, K])
    %o = torch.aten.bmm %p, %v3                          (p: [S * H, M, N], M <= 16)

the attention values of a decode or verify step: each key/value head's probabilities against
its cached values, read as stored, where IREE packed each layer's value cache (data tiling)
before its batch_matmul."""

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dialects import polyarch as pa
from .base import Pass, option
from .common import const_ints as _ints
from .common import const_scalar

if TYPE_CHECKING:
    from torch_mlir import ir

DTYPES = ("f32", "f16", "bf16")  # element types (the same names in torch's and MLIR's types)
MAX_ROWS = 8  # x rows (the batch, or verify's tokens) a rowdot serves
LANES = 16  # f32 lanes of one accumulator (a 512-bit register, two 256-bit ones on AVX2): K's multiple
DYNAMIC = -1  # a dynamic row count (prefill's prompt): "D" in the kernel's name, f32 only
MAX_GROUP = 4  # weights multiplied by one x in one dispatch
MAX_BATCH = 64  # products of one batched dispatch (a layer's key/value heads x the batch)
MAX_BATCH_ROWS = 16  # rows of x a batched product serves (the query heads of a key/value head x tokens)
# N: a weight's rows, or a group's (N1_N2..: one dispatch, one result per weight); bB_: a batch
# of B products (x [B, M, K] by w [B, N, K]: attention's queries by its cached keys)
KERNEL_NAME = re.compile(r"^polyarch_rowdot_(?:b(\d+(?:x\d+)*)_)?(\d+|D)x(\d+(?:_\d+)*)x(\d+)_(f32|f16|bf16)$")


MIX_NAME = re.compile(r"^polyarch_rowmix_b(\d+(?:x\d+)*)_(\d+)x(\d+)x(\d+)_(f32|f16|bf16)$")
MAX_MIX_K = 128  # columns (a head's dimension) of the matrices a rowmix reads


def _lead(batch: "int | tuple") -> str:
    """A batch's leading dims as a kernel's name writes them: B1xB2.."""
    return "x".join(map(str, batch)) if isinstance(batch, tuple) else str(batch)


def _dims(text: str) -> tuple:
    """_lead's text read back."""
    return tuple(int(v) for v in text.split("x"))


def mix_name(m: int, n: int, k: int, dtype: str, batch: "int | tuple") -> str:
    """The rowmix kernel of x [prod(batch), m, n] by v [*batch, n, k] -> [prod(batch), m, k]."""
    return f"polyarch_rowmix_b{_lead(batch)}_{m}x{n}x{k}_{dtype}"


def parse_mix_name(sym: str):
    """(m, n, k, dtype, batch) of a rowmix kernel's name, or None."""
    hit = MIX_NAME.match(sym)
    if not hit:
        return None
    batch, m, n, k, dtype = hit.groups()
    return int(m), int(n), int(k), dtype, _dims(batch)


def supported_mix(m: int, n: int, k: int, dtype: str, batch) -> bool:
    """Shapes rowmix is written for: a batch of 1..MAX_BATCH products of 1..MAX_BATCH_ROWS rows,
    k a multiple of LANES up to MAX_MIX_K."""
    total = math.prod(batch) if isinstance(batch, tuple) else batch
    return (dtype in DTYPES and 1 <= total <= MAX_BATCH and 1 <= m <= MAX_BATCH_ROWS and n >= 1
            and LANES <= k <= MAX_MIX_K and k % LANES == 0)


def kernel_name(m: int, n: "int | tuple", k: int, dtype: str, batch: "int | tuple" = 0) -> str:
    """batch: the weights' leading dims (a tuple: w [*batch, n, k], x [prod(batch), m, k])."""
    rows = "_".join(map(str, n)) if isinstance(n, tuple) else n
    return f"polyarch_rowdot_{f'b{_lead(batch)}_' if batch else ''}{'D' if m == DYNAMIC else m}x{rows}x{k}_{dtype}"


def parse_name(sym: str):
    """(m, n, k, dtype, batch) of a kernel's name (n a tuple for a group; batch 0 unbatched), or None."""
    hit = KERNEL_NAME.match(sym)
    if not hit:
        return None
    batch, m, n, k, dtype = hit.groups()
    ns = tuple(int(v) for v in n.split("_"))
    lead = _dims(batch) if batch else 0
    return DYNAMIC if m == "D" else int(m), ns if len(ns) > 1 else ns[0], int(k), dtype, lead


def supported(m: int, n: "int | tuple", k: int, dtype: str, batch: int = 0) -> bool:
    """Shapes the kernel is written for: 1..MAX_ROWS rows, or a dynamic row count of f32; k a
    multiple of LANES; a group (n a tuple of 2..MAX_GROUP weights' rows) of static rows; a
    batch (1..MAX_BATCH) of one weight shape, 1..MAX_BATCH_ROWS static rows."""
    if batch:
        total = math.prod(batch) if isinstance(batch, tuple) else batch
        return (1 <= total <= MAX_BATCH and 1 <= m <= MAX_BATCH_ROWS and not isinstance(n, tuple)
                and supported(1, n, k, dtype))
    if isinstance(n, tuple):
        return 2 <= len(n) <= MAX_GROUP and m != DYNAMIC and all(supported(m, v, k, dtype) for v in n)
    rows = 1 <= m <= MAX_ROWS or (m == DYNAMIC and dtype == "f32")
    return dtype in DTYPES and rows and n >= 1 and k >= LANES and k % LANES == 0


@dataclass(frozen=True)
class Rowdot(Pass):
    NAME = "rowdot"
    max_rows: int = option(MAX_ROWS, f"rewrite a matmul of at most this many rows (1..{MAX_ROWS})")
    dynamic_rows: bool = option(True, "rewrite an f32 matmul of a dynamic row count too")
    group: bool = option(True, f"one dispatch for the matmuls of one x by 2..{MAX_GROUP} weights (static rows)")
    batched: bool = option(True, "rewrite a bmm against a transposed batch of weights too (attention's "
                                 "queries x cached keys; static rows)")
    values: bool = option(True, "rewrite a bmm of a few rows by a batch of matrices as stored too "
                                "(attention's probabilities x cached values; static rows)")

    def check(self):
        from ..errors import PolyarchError

        if not (type(self.max_rows) is int and 1 <= self.max_rows <= MAX_ROWS):
            raise PolyarchError(f"rowdot max_rows={self.max_rows}", fix=f"use 1..{MAX_ROWS}")
        for key in ("dynamic_rows", "group", "batched", "values"):
            if type(getattr(self, key)) is not bool:
                raise PolyarchError(f"rowdot {key}={getattr(self, key)}", fix="use true or false")

    def apply(self, module: "ir.Module") -> int:
        """-> the number of matmuls rewritten."""
        self.check()
        return _rewrite_all(module, self.max_rows, self.dynamic_rows, self.group, self.batched, self.values)


def _owner(value):
    return getattr(value.owner, "operation", None)


def transposed_source(value: "ir.Value"):
    """The [N, K] value a [K, N] operand is the transpose of, or None."""
    o = _owner(value)
    if o is None:
        return None
    if o.name == "torch.aten.permute" and _ints(o.operands[1]) == [1, 0]:
        return o.operands[0]
    if o.name == "torch.aten.t":
        return o.operands[0]
    if o.name == "torch.aten.transpose.int":
        dims = [const_scalar(v) for v in o.operands[1:3]]
        if all(type(d) is int for d in dims) and sorted(d % 2 for d in dims) == [0, 1]:
            return o.operands[0]
    return None


def batched_source(value: "ir.Value"):
    """(w, its leading dims) for a [B, K, N] operand that is w [B, N, K] transposed, or a view
    of w [a, b, N, K] (a * b = B, a cache: sequences x key/value heads) permuted [0, 1, 3, 2];
    else None."""
    o = _owner(value)
    if o is None:
        return None
    if o.name == "torch.aten.transpose.int":
        dims, info = [const_scalar(v) for v in o.operands[1:3]], pa.tensor_info(o.operands[0].type)
        if info and len(info[0]) == 3 and all(type(d) is int for d in dims) and sorted(d % 3 for d in dims) == [1, 2]:
            return o.operands[0], (info[0][0],)
    if o.name in VIEWS and len(o.operands) == 2:
        p, out = _owner(o.operands[0]), pa.tensor_info(value.type)
        if p is not None and p.name == "torch.aten.permute" and _ints(p.operands[1]) == [0, 1, 3, 2] and out:
            info = pa.tensor_info(p.operands[0].type)
            if (info and len(info[0]) == 4 and len(out[0]) == 3 and info[0][0] * info[0][1] == out[0][0]
                    and list(info[0][2:]) == [out[0][2], out[0][1]]):
                return p.operands[0], tuple(info[0][:2])
    return None


def values_source(value: "ir.Value"):
    """(v, its leading dims) for a [B, N, K] operand read as it is: a view of v [a, b, N, K]
    (a * b = B, a cache: sequences x key/value heads), else the operand itself; None for a
    transpose or a view of one (batched_source's) or a shape other than 3-D."""
    info = pa.tensor_info(value.type)
    if not info or len(info[0]) != 3 or DYNAMIC in info[0]:
        return None
    o, transposes = _owner(value), ("torch.aten.transpose.int", "torch.aten.permute")
    if o is not None and o.name in transposes:
        return None
    if o is not None and o.name in VIEWS and len(o.operands) == 2:
        if (p := _owner(o.operands[0])) is not None and p.name in transposes:
            return None  # the scores' keys (batched_source), left alone with batched=false
        src = pa.tensor_info(o.operands[0].type)
        if (src and len(src[0]) == 4 and DYNAMIC not in src[0] and src[0][0] * src[0][1] == info[0][0]
                and list(src[0][2:]) == list(info[0][1:])):
            return o.operands[0], tuple(src[0][:2])
    return value, (info[0][0],)


def match(op: "ir.Operation", max_rows: int = MAX_ROWS, dynamic_rows: bool = True, batched: bool = True,
          values: bool = True):
    """(x, w, (m, n, k, dtype)) for an mm this pass rewrites, (x, w, (m, n, k, dtype, the
    weights' leading dims)) for a bmm against transposed weights (batched), (x, v, (m, n, k,
    dtype, the leading dims, "mix")) for a bmm against matrices as stored (values: x [B, m, n],
    v [B, n, k]), else None."""
    if op.operation.name == "torch.aten.bmm" and len(op.operands) == 2:
        x, hit = op.operands[0], batched_source(op.operands[1]) if batched else None
        if hit is None:
            return _match_values(x, op.operands[1]) if values else None
        (w, lead), xi = hit, pa.tensor_info(x.type)
        wi = pa.tensor_info(w.type)
        if not (xi and wi) or len(xi[0]) != 3 or xi[1] != wi[1] or DYNAMIC in (*xi[0], *wi[0]):
            return None
        (b, m, k), (n, k2) = xi[0], wi[0][-2:]
        if k != k2 or b != math.prod(lead) or not supported(m, n, k, xi[1], lead):
            return None
        return x, w, (m, n, k, xi[1], lead)
    if op.operation.name != "torch.aten.mm" or len(op.operands) != 2:
        return None
    x, wt = op.operands
    w = transposed_source(wt)
    if w is None:
        return None
    xi, wi = pa.tensor_info(x.type), pa.tensor_info(w.type)
    if not (xi and wi) or len(xi[0]) != 2 or len(wi[0]) != 2 or xi[1] != wi[1]:
        return None
    (m, k), (n, k2) = xi[0], wi[0]  # a dynamic dim is -1 (DYNAMIC)
    if k != k2 or m > max_rows or (m == DYNAMIC and not dynamic_rows) or not supported(m, n, k, xi[1]):
        return None
    return x, w, (m, n, k, xi[1])


def _match_values(x, operand):
    """match's values case: (x, v, (m, n, k, dtype, lead, "mix")) or None."""
    hit = values_source(operand)
    if hit is None:
        return None
    (v, lead), xi, oi = hit, pa.tensor_info(x.type), pa.tensor_info(operand.type)
    if not (xi and oi) or len(xi[0]) != 3 or xi[1] != oi[1] or DYNAMIC in xi[0]:
        return None
    (b, m, n), (b2, n2, k) = xi[0], oi[0]
    if b != b2 or n != n2 or not supported_mix(m, n, k, xi[1], lead):
        return None
    return x, v, (m, n, k, xi[1], lead, "mix")


def run(module: "ir.Module", max_rows: int = MAX_ROWS, dynamic_rows: bool = True, group: bool = True,
        batched: bool = True, values: bool = True) -> int:
    """Rewrite every matching mm (and bmm) of `module` in place. -> the number rewritten."""
    return Rowdot(max_rows=max_rows, dynamic_rows=dynamic_rows, group=group, batched=batched,
                  values=values).apply(module)


VIEWS = ("torch.aten.view", "torch.aten.reshape", "torch.aten._unsafe_view")


def _x_key(x: "ir.Value") -> tuple:
    """What identifies x's value: a view of a value (each nn.Linear views the same hidden
    state for itself) by its source, shape and type."""
    o = _owner(x)
    if o is not None and o.name in VIEWS and len(o.operands) == 2:
        shape = _ints(o.operands[1])
        if shape is not None:
            return o.operands[0], tuple(shape), str(x.type)
    return (x,)


def _groups(block, found: list, group: bool) -> list:
    """The matches of one block (in order) as lists: those multiplying the same x (_x_key) by
    weights of the same k and dtype, static rows, together (up to MAX_GROUP, in order) where
    each weight is defined before the first of them; the rest alone."""
    if not group:
        return [[f] for f in found]
    pos = {op.operation: i for i, op in enumerate(block.operations)}
    before = lambda w, at: (isinstance(w.owner, type(block)) and w.owner == block) or (
        (o := _owner(w)) is not None and o in pos and pos[o] < at)
    out, open_ = [], {}  # open_: key -> the list being filled
    for f in found:
        op, (x, w, shape) = f
        if len(shape) >= 5:  # a bmm: alone
            out.append([f])
            continue
        m, n, k, dt = shape
        key = (_x_key(x), m, k, dt)
        members = open_.get(key) if m != DYNAMIC else None
        if members and len(members) < MAX_GROUP and before(w, pos[members[0][0].operation]):
            members.append(f)
            continue
        out.append([f])
        if m != DYNAMIC:
            open_[key] = out[-1]
    return out


def _rewrite_all(module, max_rows, dynamic_rows, group, batched, values):
    from torch_mlir import ir

    done, declared = 0, set()
    with module.context, ir.Location.unknown():
        existing = {ir.StringAttr(op.attributes["sym_name"]).value for op in module.body.operations
                    if "sym_name" in op.attributes}
        for func in list(module.body.operations):
            if func.operation.name != "func.func" or not func.regions[0].blocks:
                continue
            for block in func.regions[0].blocks:
                found = [(op, hit) for op in block.operations
                         if (hit := match(op, max_rows, dynamic_rows, batched, values))]
                for members in _groups(block, found, group):
                    _rewrite(module, members, existing, declared)
                    done += len(members)
    return done


def _rewrite(module, members, existing, declared):
    """One call (at the first mm) for the mms of `members` [(op, (x, w, shape))], x the first's.
    The operands are read from the mms now: an x matched earlier may have been the result of an
    mm rewritten since (replaced, erased)."""
    from torch_mlir import ir

    first, (_, _, shape) = members[0]
    if len(shape) == 6:
        return _rewrite_mix(module, first, shape, existing, declared)
    (m, _, k, dt), lead = shape[:4], shape[4] if len(shape) == 5 else ()
    x = first.operands[0]
    ns = tuple(s_[1] for _, (_, _, s_) in members)
    name = kernel_name(m, ns if len(ns) > 1 else ns[0], k, dt, lead or 0)
    rows = "?" if m == DYNAMIC else m
    tx, tws, tys = f"tensor<{rows}x{k}x{dt}>", [f"tensor<{n}x{k}x{dt}>" for n in ns], [f"tensor<{rows}x{n}x{dt}>" for n in ns]
    if lead:  # x [B, m, k], w [*lead, n, k] -> [B, m, n]
        b = math.prod(lead)
        tx, tws, tys = f"tensor<{b}x{m}x{k}x{dt}>", [f"tensor<{'x'.join(map(str, lead))}x{ns[0]}x{k}x{dt}>"], \
            [f"tensor<{b}x{m}x{ns[0]}x{dt}>"]
    source = (lambda v: batched_source(v)[0]) if lead else transposed_source
    if name not in existing and name not in declared:
        decl = ir.Module.parse(f'func.func private @{name}({tx}, {", ".join(tws)}) -> ({", ".join(tys)}) '
                               f'attributes {{polyarch.kernel = "rowdot"}}')
        decl.body.operations[0].operation.clone(ip=ir.InsertionPoint.at_block_begin(module.body))
        declared.add(name)
    ip = ir.InsertionPoint(first)
    loc = first.location if len(members) == 1 else ir.Location.fused([op.location for op, _ in members])
    make = lambda opname, ts, operands, attrs=None: ir.Operation.create(
        opname, results=[ir.Type.parse(t) for t in ts], operands=list(operands), attributes=attrs or {}, ip=ip,
        loc=loc).results
    xb = make("torch_c.to_builtin_tensor", [tx], [x])[0]
    wbs = [make("torch_c.to_builtin_tensor", [tw], [source(op.operands[1])])[0] for tw, (op, _) in zip(tws, members)]
    ybs = make("func.call", tys, [xb, *wbs], {"callee": ir.FlatSymbolRefAttr.get(name)})
    ys = [make("torch_c.from_builtin_tensor", [str(op.results[0].type)], [yb])[0] for yb, (op, _) in zip(ybs, members)]
    for y, (op, _) in zip(ys, members):
        op.results[0].replace_all_uses_with(y)
        transpose = _owner(op.operands[1])
        op.operation.erase()
        if not list(transpose.results[0].uses):
            transpose.erase()


def _rewrite_mix(module, op, shape, existing, declared):
    """A bmm against matrices as stored (match's values case) as one rowmix call."""
    from torch_mlir import ir

    m, n, k, dt, lead, _ = shape
    b, name = math.prod(lead), mix_name(m, n, k, dt, lead)
    tx, tw, ty = (f"tensor<{b}x{m}x{n}x{dt}>", f"tensor<{'x'.join(map(str, lead))}x{n}x{k}x{dt}>",
                  f"tensor<{b}x{m}x{k}x{dt}>")
    if name not in existing and name not in declared:
        decl = ir.Module.parse(f'func.func private @{name}({tx}, {tw}) -> {ty} attributes {{polyarch.kernel = "rowmix"}}')
        decl.body.operations[0].operation.clone(ip=ir.InsertionPoint.at_block_begin(module.body))
        declared.add(name)
    ip, loc = ir.InsertionPoint(op), op.location
    make = lambda opname, t, operands, attrs=None: ir.Operation.create(
        opname, results=[ir.Type.parse(t)], operands=list(operands), attributes=attrs or {}, ip=ip, loc=loc).results[0]
    xb = make("torch_c.to_builtin_tensor", tx, [op.operands[0]])
    vb = make("torch_c.to_builtin_tensor", tw, [values_source(op.operands[1])[0]])
    yb = make("func.call", ty, [xb, vb], {"callee": ir.FlatSymbolRefAttr.get(name)})
    y = make("torch_c.from_builtin_tensor", str(op.results[0].type), [yb])
    op.results[0].replace_all_uses_with(y)
    view = _owner(op.operands[1])
    op.operation.erase()
    if view is not None and view.name in VIEWS and not list(view.results[0].uses):
        view.erase()
