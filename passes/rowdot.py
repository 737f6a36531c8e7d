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
a copy of it. The call carries the mm's location."""

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
KERNEL_NAME = re.compile(r"^polyarch_rowdot_(\d+|D)x(\d+)x(\d+)_(f32|f16|bf16)$")


def kernel_name(m: int, n: int, k: int, dtype: str) -> str:
    return f"polyarch_rowdot_{'D' if m == DYNAMIC else m}x{n}x{k}_{dtype}"


def supported(m: int, n: int, k: int, dtype: str) -> bool:
    """Shapes the kernel is written for: 1..MAX_ROWS rows, or a dynamic row count of f32; k a
    multiple of LANES."""
    rows = 1 <= m <= MAX_ROWS or (m == DYNAMIC and dtype == "f32")
    return dtype in DTYPES and rows and n >= 1 and k >= LANES and k % LANES == 0


@dataclass(frozen=True)
class Rowdot(Pass):
    NAME = "rowdot"
    max_rows: int = option(MAX_ROWS, f"rewrite a matmul of at most this many rows (1..{MAX_ROWS})")
    dynamic_rows: bool = option(True, "rewrite an f32 matmul of a dynamic row count too")

    def check(self):
        from ..errors import PolyarchError

        if not (type(self.max_rows) is int and 1 <= self.max_rows <= MAX_ROWS):
            raise PolyarchError(f"rowdot max_rows={self.max_rows}", fix=f"use 1..{MAX_ROWS}")
        if type(self.dynamic_rows) is not bool:
            raise PolyarchError(f"rowdot dynamic_rows={self.dynamic_rows}", fix="use true or false")

    def apply(self, module: "ir.Module") -> int:
        """-> the number of matmuls rewritten."""
        self.check()
        return _rewrite_all(module, self.max_rows, self.dynamic_rows)


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


def match(op: "ir.Operation", max_rows: int = MAX_ROWS, dynamic_rows: bool = True):
    """(x, w, (m, n, k, dtype)) for an mm this pass rewrites, else None."""
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


def run(module: "ir.Module", max_rows: int = MAX_ROWS, dynamic_rows: bool = True) -> int:
    """Rewrite every matching mm of `module` in place. -> the number rewritten."""
    return Rowdot(max_rows=max_rows, dynamic_rows=dynamic_rows).apply(module)


def _rewrite_all(module, max_rows, dynamic_rows):
    from torch_mlir import ir

    done, declared = 0, set()
    with module.context, ir.Location.unknown():
        existing = {ir.StringAttr(op.attributes["sym_name"]).value for op in module.body.operations
                    if "sym_name" in op.attributes}
        for func in list(module.body.operations):
            if func.operation.name != "func.func" or not func.regions[0].blocks:
                continue
            found = [(op, hit) for block in func.regions[0].blocks for op in block.operations
                     if (hit := match(op, max_rows, dynamic_rows))]
            for op, (x, w, (m, n, k, dt)) in found:
                name = kernel_name(m, n, k, dt)
                rows = "?" if m == DYNAMIC else m
                tx, tw, ty = (f"tensor<{a}x{b}x{dt}>" for a, b in ((rows, k), (n, k), (rows, n)))
                if name not in existing and name not in declared:
                    decl = ir.Module.parse(f'func.func private @{name}({tx}, {tw}) -> {ty} '
                                           f'attributes {{polyarch.kernel = "rowdot"}}')
                    decl.body.operations[0].operation.clone(ip=ir.InsertionPoint.at_block_begin(module.body))
                    declared.add(name)
                ip, loc = ir.InsertionPoint(op), op.location
                make = lambda opname, t, operands, attrs=None: ir.Operation.create(
                    opname, results=[ir.Type.parse(t)], operands=list(operands), attributes=attrs or {}, ip=ip,
                    loc=loc).results[0]
                xb = make("torch_c.to_builtin_tensor", tx, [x])
                wb = make("torch_c.to_builtin_tensor", tw, [w])
                yb = make("func.call", ty, [xb, wb], {"callee": ir.FlatSymbolRefAttr.get(name)})
                y = make("torch_c.from_builtin_tensor", str(op.results[0].type), [yb])
                op.results[0].replace_all_uses_with(y)
                transpose = _owner(op.operands[1])
                op.operation.erase()
                if not list(transpose.results[0].uses):
                    transpose.erase()
                done += 1
    return done
