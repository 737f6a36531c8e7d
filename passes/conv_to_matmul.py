"""conv-to-matmul: 2-D convolutions as an explicit im2col + matrix multiply, channels last.

    %y = torch.aten.convolution %x, %w, %b, stride, padding, dilation, false, [0, 0], 1
becomes
    xp   = constant_pad_nd(x, padding)                      (when padded)
    xh   = permute(xp, [0, 2, 3, 1])                        NHWC
    cols = cat([xh[:, i*dh :: sh, j*dw :: sw, :] for i, j], dim 3)   one slice per tap
    y    = permute(view(mm(view(cols, [N*OH*OW, KH*KW*C]),
                           view(permute(w, [2, 3, 1, 0]), [KH*KW*C, F])) + b,
                        [N, OH, OW, F]), [0, 3, 1, 2])

Why (measured, IREE 3.13 llvm-cpu, docs/cpu-speed.md): IREE lowers
`linalg.conv_2d_nchw_fchw` with its own convolution tiling, which reaches 10-40% of what
its data-tiled matmul reaches on the same FLOPs for some shapes (a 7x7 stride-2 stem:
12.2 ms against 2.8 ms here) and is as fast or faster for others. Which is faster depends
on the shape and the host, so the driver's tuner (compiler/tuning.py) measures both per
convolution shape and marks the ones to rewrite; this pass is the rewrite.

Options:
  convs=all      rewrite every eligible convolution (default)
  convs=marked   rewrite only those marked `polyarch.lowering = "im2col"` (what the tuner does)

Eligible: 2-D (rank-4 input and weight), static shapes, not transposed, groups = 1,
float element type, constant stride/padding/dilation. Others are left as they are.
The new ops carry the convolution's location (module path and source line)."""

from ..dialects import polyarch as pa
from ..errors import PolyarchError

OPTIONS = {"convs": "all"}
IM2COL = "im2col"
_FLOATS = ("f32", "f16", "bf16", "f64")


def _const_list(value):
    """The ints of a torch.prim.ListConstruct of torch.constant.int, or None."""
    owner = value.owner
    o = getattr(owner, "operation", None)
    if o is None or o.name != "torch.prim.ListConstruct":
        return None
    out = []
    for v in o.operands:
        c = getattr(v.owner, "operation", None)
        if c is None or c.name != "torch.constant.int":
            return None
        out.append(c.attributes["value"].value)
    return out


def _const_scalar(value):
    o = getattr(value.owner, "operation", None)
    if o is None or not o.name.startswith("torch.constant."):
        return None
    return o.attributes["value"].value if "value" in o.attributes else o.name.rsplit(".", 1)[1]


def conv_params(op):
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
    if any(l is None or len(l) != 2 for l in lists) or _const_scalar(transposed) is not False or _const_scalar(groups) != 1:
        return None
    bias = None if pa.tensor_info(b.type) is None else b
    return {"x": x, "w": w, "b": bias, "stride": lists[0], "padding": lists[1], "dilation": lists[2],
            "in_shape": xi[0], "w_shape": wi[0], "out_shape": yi[0], "et": xi[1]}


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


def _rewrite(ir, op, p):
    """Replace one convolution (params p from conv_params) by im2col + mm."""
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
    xh = bld.tensor("torch.aten.permute", [n, h, w_, c], et, [x, bld.ints([0, 2, 3, 1])])
    taps = []
    for i in range(kh):
        rows = xh
        if (i * dh, sh, oh) != (0, 1, h):
            rows = bld.tensor("torch.aten.slice.Tensor", [n, oh, w_, c], et,
                              [xh, bld.int(1), bld.int(i * dh), bld.int(i * dh + sh * (oh - 1) + 1), bld.int(sh)])
        for j in range(kw):
            tap = rows
            if (j * dw, sw, ow) != (0, 1, w_):
                tap = bld.tensor("torch.aten.slice.Tensor", [n, oh, ow, c], et,
                                 [rows, bld.int(2), bld.int(j * dw), bld.int(j * dw + sw * (ow - 1) + 1), bld.int(sw)])
            taps.append(tap)
    k = kh * kw * c
    if len(taps) > 1:
        lst = bld._op("torch.prim.ListConstruct", "!torch.list<vtensor>", taps)
        cols = bld.tensor("torch.aten.cat", [n, oh, ow, k], et, [lst, bld.int(3)])
    else:
        cols = taps[0]
    cols = bld.tensor("torch.aten.view", [n * oh * ow, k], et, [cols, bld.ints([n * oh * ow, k])])
    wt = bld.tensor("torch.aten.permute", [kh, kw, c, f], et, [p["w"], bld.ints([2, 3, 1, 0])])
    wt = bld.tensor("torch.aten.view", [k, f], et, [wt, bld.ints([k, f])])
    y = bld.tensor("torch.aten.mm", [n * oh * ow, f], et, [cols, wt])
    if p["b"] is not None:
        y = bld.tensor("torch.aten.add.Tensor", [n * oh * ow, f], et, [y, p["b"], bld.int(1)])
    y = bld.tensor("torch.aten.view", [n, oh, ow, f], et, [y, bld.ints([n, oh, ow, f])])
    y = bld.tensor("torch.aten.permute", [n, f, oh, ow], et, [y, bld.ints([0, 3, 1, 2])])
    op.results[0].replace_all_uses_with(y)
    op.operation.erase()


def convolutions(func):
    """The eligible convolutions of a function, in program order. (Their parameters are
    read by conv_params just before each rewrite: a rewrite replaces the values that later
    convolutions read.)"""
    return [op for block in func.regions[0].blocks for op in block.operations if conv_params(op) is not None]


def run(module, convs="all"):
    """Rewrite the eligible convolutions of every function of `module` in place.
    -> the number rewritten."""
    from torch_mlir import ir

    if convs not in ("all", "marked"):
        raise PolyarchError(f"conv-to-matmul: convs={convs!r}", fix="use convs=all or convs=marked")
    done = 0
    with module.context, ir.Location.unknown():
        for func in list(module.body.operations):
            if func.operation.name != "func.func":
                continue
            for op in convolutions(func):
                marked = pa.LOWERING in op.attributes and op.attributes[pa.LOWERING].value == IM2COL
                if convs == "all" or marked:
                    _rewrite(ir, op, conv_params(op))
                    done += 1
    return done
