"""pool-to-mean: an average pool whose one window covers the whole input becomes a mean.

    %y = torch.aten.avg_pool2d %x, [KH, KW], stride, [0, 0], ceil_mode, count_include_pad, none
         (x: [N, C, H, W], KH >= H, KW >= W, y: [N, C, 1, 1])
becomes
    %y = torch.aten.mean.dim %x, [2, 3], true, none

Both compute the mean over H x W: without padding, PyTorch clips the window to the input
and divides by the clipped size whatever count_include_pad says. Why: transformers'
EfficientNet pools with `AvgPool2d(hidden_dim=1280, ceil_mode=True)` on a 7 x 7 map, which
IREE 3.13 refuses ("'linalg.generic' op inferred input/output operand #1 has shape's
dimension #0 to be 1287, but found 1280"; plain iree-compile on the torch-mlir import
fails the same way). The new op carries the pool's location."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dialects import polyarch as pa
from .base import Pass
from .common import const_ints as _ints

if TYPE_CHECKING:
    from torch_mlir import ir


@dataclass(frozen=True)
class PoolToMean(Pass):
    NAME = "pool-to-mean"

    def apply(self, module: "ir.Module") -> int:
        """-> the number of pools rewritten."""
        return _rewrite_all(module)


def _is_none(value):
    o = getattr(value.owner, "operation", None)
    return o is not None and o.name == "torch.constant.none"


def whole_window(op: "ir.Operation") -> bool:
    """True for an avg_pool2d whose single window covers its whole (static) input."""
    if op.operation.name != "torch.aten.avg_pool2d" or len(op.operands) != 7:
        return False
    x, kernel, _, padding, _, _, divisor = op.operands
    xi, yi = pa.tensor_info(x.type), pa.tensor_info(op.results[0].type)
    k, p = _ints(kernel), _ints(padding)
    if not (xi and yi and k and p) or len(xi[0]) != 4 or len(k) != 2 or any(d < 0 for d in xi[0]):
        return False
    n, c, h, w = xi[0]
    return p == [0, 0] and k[0] >= h and k[1] >= w and list(yi[0]) == [n, c, 1, 1] and _is_none(divisor)


def run(module: "ir.Module") -> int:
    """Rewrite every whole-window average pool of `module` in place. -> the number rewritten."""
    return PoolToMean().apply(module)


def _rewrite_all(module):
    from torch_mlir import ir

    done = 0
    with module.context, ir.Location.unknown():
        for func in list(module.body.operations):
            if func.operation.name != "func.func":
                continue
            pools = [op for block in func.regions[0].blocks for op in block.operations if whole_window(op)]
            for op in pools:
                ip, loc = ir.InsertionPoint(op), op.location
                make = lambda name, t, operands=(), attrs=None: ir.Operation.create(
                    name, results=[ir.Type.parse(t)], operands=list(operands), attributes=attrs or {}, ip=ip,
                    loc=loc).results[0]
                i64 = lambda v: make("torch.constant.int", "!torch.int", (),
                                     {"value": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), v)})
                dims = make("torch.prim.ListConstruct", "!torch.list<int>", [i64(2), i64(3)])
                true = make("torch.constant.bool", "!torch.bool", (), {"value": ir.BoolAttr.get(True)})
                none = make("torch.constant.none", "!torch.none")
                y = make("torch.aten.mean.dim", str(op.results[0].type), [op.operands[0], dims, true, none])
                op.results[0].replace_all_uses_with(y)
                op.operation.erase()
                done += 1
    return done
