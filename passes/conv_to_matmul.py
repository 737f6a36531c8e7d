"""conv-to-matmul: 2-D convolutions as an explicit im2col + matrix multiply; depthwise ones
as a sum of their taps. Both stay in NCHW: no transposes.

    %y = torch.aten.convolution %x, %w, %b, stride, padding, dilation, false, [0, 0], 1
becomes
    xp   = constant_pad_nd(x, padding)                                   (when padded)
    cols = cat([xp[:, :, i*dh :: sh, j*dw :: sw].unsqueeze(2) for i, j], dim 2)   a slice per tap
    y    = view(matmul(view(w, [F, C*KH*KW]), view(cols, [N, C*KH*KW, OH*OW])), [N, F, OH, OW]) + b
(a 1x1 stride-1 convolution is the matmul alone). A channels-last form (permute to NHWC,
matmul, permute back) measured slower in whole models: the permutes fuse into the
neighbouring elementwise dispatches as strided transposes (MobileNetV2: 23.3 ms of dispatches
against 11.7 ms in NCHW, ResNet-18: 38.1 against 32.3).

Why (measured, IREE 3.13 llvm-cpu, docs/cpu-speed.md): IREE lowers a strided
`linalg.conv_2d_nchw_fchw` outside its data-tiled matmul path, 3x-200x slower than the same
FLOPs as a matmul (ResNet-18's 1x1 stride-2 downsample: 36.7 ms against 0.2 ms), while
stride-1 convolutions are about as fast either way. Which is faster depends on the shape and
the host, so the driver's tuner (compiler/tuning.py) measures both per convolution shape and
marks the ones to rewrite; this pass is the rewrite.

A depthwise convolution (groups = input channels = output channels) is no matmul; it becomes

    y = sum over taps (i, j) of  xp[:, :, i*dh :: sh, j*dw :: sw] * w[:, 0, i, j].view(1, C, 1, 1)  (+ b)

elementwise work that IREE fuses into one dispatch (IREE's own depthwise lowering ran at
4 GFLOP/s in MobileNetV2 here).

Options:
  convs=all      rewrite every eligible convolution (default)
  convs=marked   rewrite only those marked `polyarch.lowering = "im2col"` (groups = 1) or
                 `"taps"` (depthwise): what the tuner does

Eligible: 2-D (rank-4 input and weight), static shapes, not transposed, groups = 1 or
depthwise with one filter per channel, float element type, constant stride/padding/dilation.
Others are left as they are.
The new ops carry the convolution's location (module path and source line)."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dialects import polyarch as pa
from .base import Pass, option
from .common import const_ints as _const_list
from .common import const_scalar as _const_scalar

if TYPE_CHECKING:
    from torch_mlir import ir

IM2COL = "im2col"
TAPS = "taps"
_FLOATS = ("f32", "f16", "bf16", "f64")


def conv_params(op: "ir.Operation") -> dict | None:
    """The parameters of an eligible 2-D convolution, or None if the rewrite does not apply.
    -> dict(x, w, b (or None), stride, padding, dilation, in_shape, w_shape, out_shape, et)."""
    if op.operation.name != "torch.aten.convolution" or len(op.operands) != 9:
        return None
    x, w, b, stride, padding, dilation, transposed, _, groups = op.operands
    xi, wi, yi = pa.tensor_info(x.type), pa.tensor_info(w.type), pa.tensor_info(op.results[0].type)
    if not (xi and wi and yi) or len(xi[0]) != 4 or len(wi[0]) != 4 or xi[1] not in _FLOATS:
        return None
    if any(d < 0 for d in xi[0] + wi[0] + yi[0]):
        return None
    lists = [_const_list(v) for v in (stride, padding, dilation)]
    g = _const_scalar(groups)
    depthwise = g == xi[0][1] and wi[0][1] == 1 and wi[0][0] == g and g > 1
    if any(l is None or len(l) != 2 for l in lists) or _const_scalar(transposed) is not False or (g != 1 and not depthwise):
        return None
    bias = None if pa.tensor_info(b.type) is None else b
    return {"x": x, "w": w, "b": bias, "stride": lists[0], "padding": lists[1], "dilation": lists[2],
            "in_shape": xi[0], "w_shape": wi[0], "out_shape": yi[0], "et": xi[1],
            "lowering": TAPS if depthwise else IM2COL}


class _Builder:
    """Creates torch ops before one op, at its location."""

    def __init__(self, ir, op):
        self.ir, self.ip, self.loc = ir, ir.InsertionPoint(op), op.location

    def _op(self, name, result, operands, attrs=None):
        return self.ir.Operation.create(name, results=[self.ir.Type.parse(result)], operands=operands,
                                        attributes=attrs or {}, ip=self.ip, loc=self.loc).results[0]

    def int(self, v):
        return self._op("torch.constant.int", "!torch.int", [],
                        {"value": self.ir.IntegerAttr.get(self.ir.IntegerType.get_signless(64), v)})

    def ints(self, vals):
        return self._op("torch.prim.ListConstruct", "!torch.list<int>", [self.int(v) for v in vals])

    def tensor(self, name, shape, et, operands):
        return self._op(name, f"!torch.vtensor<[{','.join(map(str, shape))}],{et}>", operands)


def _rewrite_taps(ir, op, p):
    """Replace a depthwise convolution by a sum over its taps of strided slices times the
    tap's per-channel weight (elementwise work that IREE fuses into one dispatch)."""
    bld = _Builder(ir, op)
    n, c, h, w_ = p["in_shape"]
    _, _, kh, kw = p["w_shape"]
    _, _, oh, ow = p["out_shape"]
    (sh, sw), (ph, pw), (dh, dw) = p["stride"], p["padding"], p["dilation"]
    et, x, w = p["et"], p["x"], p["w"]
    if ph or pw:
        zero = bld._op("torch.constant.float", "!torch.float", [], {"value": ir.FloatAttr.get_f64(0.0)})
        h, w_ = h + 2 * ph, w_ + 2 * pw
        x = bld.tensor("torch.aten.constant_pad_nd", [n, c, h, w_], et, [x, bld.ints([pw, pw, ph, ph]), zero])
    acc = None
    for i in range(kh):
        rows = x
        if (i * dh, sh, oh) != (0, 1, h):
            rows = bld.tensor("torch.aten.slice.Tensor", [n, c, oh, w_], et,
                              [x, bld.int(2), bld.int(i * dh), bld.int(i * dh + sh * (oh - 1) + 1), bld.int(sh)])
        wrow = bld.tensor("torch.aten.slice.Tensor", [c, 1, 1, kw], et, [w, bld.int(2), bld.int(i), bld.int(i + 1), bld.int(1)])
        for j in range(kw):
            tap = rows
            if (j * dw, sw, ow) != (0, 1, w_):
                tap = bld.tensor("torch.aten.slice.Tensor", [n, c, oh, ow], et,
                                 [rows, bld.int(3), bld.int(j * dw), bld.int(j * dw + sw * (ow - 1) + 1), bld.int(sw)])
            wij = bld.tensor("torch.aten.slice.Tensor", [c, 1, 1, 1], et, [wrow, bld.int(3), bld.int(j), bld.int(j + 1), bld.int(1)])
            wij = bld.tensor("torch.aten.view", [1, c, 1, 1], et, [wij, bld.ints([1, c, 1, 1])])
            prod = bld.tensor("torch.aten.mul.Tensor", [n, c, oh, ow], et, [tap, wij])
            acc = prod if acc is None else bld.tensor("torch.aten.add.Tensor", [n, c, oh, ow], et, [acc, prod, bld.int(1)])
    if p["b"] is not None:
        b = bld.tensor("torch.aten.view", [1, c, 1, 1], et, [p["b"], bld.ints([1, c, 1, 1])])
        acc = bld.tensor("torch.aten.add.Tensor", [n, c, oh, ow], et, [acc, b, bld.int(1)])
    op.results[0].replace_all_uses_with(acc)
    op.operation.erase()


def _rewrite(ir, op, p):
    """Replace one convolution by im2col + matmul in NCHW: no transposes.
    cols [N, C*KH*KW, OH*OW] (taps stacked after the channels), W [F, C*KH*KW] @ cols."""
    bld = _Builder(ir, op)
    n, c, h, w_ = p["in_shape"]
    f, _, kh, kw = p["w_shape"]
    _, _, oh, ow = p["out_shape"]
    (sh, sw), (ph, pw), (dh, dw) = p["stride"], p["padding"], p["dilation"]
    et, x = p["et"], p["x"]
    if ph or pw:
        zero = bld._op("torch.constant.float", "!torch.float", [], {"value": ir.FloatAttr.get_f64(0.0)})
        h, w_ = h + 2 * ph, w_ + 2 * pw
        x = bld.tensor("torch.aten.constant_pad_nd", [n, c, h, w_], et, [x, bld.ints([pw, pw, ph, ph]), zero])
    k = c * kh * kw
    if (sh, sw, dh, dw) == (kh, kw, 1, 1) and (h, w_) == (oh * kh, ow * kw) and kh * kw > 1:
        # patches that tile the input (ViT's patch embedding): a reshape and a transpose, no taps
        cols = bld.tensor("torch.aten.view", [n, c, oh, kh, ow, kw], et, [x, bld.ints([n, c, oh, kh, ow, kw])])
        cols = bld.tensor("torch.aten.permute", [n, c, kh, kw, oh, ow], et, [cols, bld.ints([0, 1, 3, 5, 2, 4])])
        return _finish(bld, op, p, cols, k)
    taps = []
    for i in range(kh):
        rows = x
        if (i * dh, sh, oh) != (0, 1, h):
            rows = bld.tensor("torch.aten.slice.Tensor", [n, c, oh, w_], et,
                              [x, bld.int(2), bld.int(i * dh), bld.int(i * dh + sh * (oh - 1) + 1), bld.int(sh)])
        for j in range(kw):
            tap = rows
            if (j * dw, sw, ow) != (0, 1, w_):
                tap = bld.tensor("torch.aten.slice.Tensor", [n, c, oh, ow], et,
                                 [rows, bld.int(3), bld.int(j * dw), bld.int(j * dw + sw * (ow - 1) + 1), bld.int(sw)])
            taps.append(tap)
    if len(taps) > 1:
        taps = [bld.tensor("torch.aten.unsqueeze", [n, c, 1, oh, ow], et, [t, bld.int(2)]) for t in taps]
        lst = bld._op("torch.prim.ListConstruct", "!torch.list<vtensor>", taps)
        cols = bld.tensor("torch.aten.cat", [n, c, kh * kw, oh, ow], et, [lst, bld.int(2)])
    else:
        cols = taps[0]
    _finish(bld, op, p, cols, k)


def _finish(bld, op, p, cols, k):
    """The matmul of the weights with the columns (any shape holding [N, C*KH*KW, OH*OW]), the
    bias, and the convolution's result replaced."""
    n, f, oh, ow = p["out_shape"]
    et = p["et"]
    cols = bld.tensor("torch.aten.view", [n, k, oh * ow], et, [cols, bld.ints([n, k, oh * ow])])
    w2 = bld.tensor("torch.aten.view", [f, k], et, [p["w"], bld.ints([f, k])])
    y = bld.tensor("torch.aten.matmul", [n, f, oh * ow], et, [w2, cols])
    y = bld.tensor("torch.aten.view", [n, f, oh, ow], et, [y, bld.ints([n, f, oh, ow])])
    if p["b"] is not None:
        b = bld.tensor("torch.aten.view", [1, f, 1, 1], et, [p["b"], bld.ints([1, f, 1, 1])])
        y = bld.tensor("torch.aten.add.Tensor", [n, f, oh, ow], et, [y, b, bld.int(1)])
    op.results[0].replace_all_uses_with(y)
    op.operation.erase()


def convolutions(func: "ir.Operation") -> list:
    """The eligible convolutions of a function, in program order. (Their parameters are
    read by conv_params just before each rewrite: a rewrite replaces the values that later
    convolutions read.)"""
    return [op for block in func.regions[0].blocks for op in block.operations if conv_params(op) is not None]


@dataclass(frozen=True)
class ConvToMatmul(Pass):
    NAME = "conv-to-matmul"
    convs: str = option("all", "all eligible convolutions, or those marked polyarch.lowering", choices=("all", "marked"))
    kinds: tuple = option((IM2COL, TAPS), "with convs=marked: the lowerings rewritten", sep=",")

    def apply(self, module: "ir.Module") -> int:
        """-> the number of convolutions rewritten."""
        return _rewrite_all(module, self.convs, self.kinds)


def run(module: "ir.Module", **options) -> int:
    """Rewrite the eligible convolutions of every function of `module` in place (with
    convs=marked, only those marked with one of `kinds`). -> the number rewritten."""
    return ConvToMatmul(**options).apply(module)


def _rewrite_all(module, convs, kinds):
    from torch_mlir import ir

    done = 0
    with module.context, ir.Location.unknown():
        for func in list(module.body.operations):
            if func.operation.name != "func.func":
                continue
            for op in convolutions(func):
                p = conv_params(op)
                marked = (pa.lowering_of(op) == p["lowering"]
                          and p["lowering"] in kinds)
                if convs == "all" or marked:
                    (_rewrite_taps if p["lowering"] == TAPS else _rewrite)(ir, op, p)
                    done += 1
    return done
