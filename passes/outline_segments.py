"""outline-segments: cut @main into device segments.

Every maximal run of consecutive placed ops on one device (program order) becomes

    func.func @seg_N(<tensors it reads>) -> <tensors others read>
        attributes {polyarch.device = "...", polyarch.time_us = <predicted>}

On a device without 8/16-bit storage (the default Vulkan target), the segment's
narrow inputs and outputs (i1, si8, f16, ...) travel widened to 32 bits: the
function converts them with torch.aten.to.dtype inside, and the runtime casts host
arrays to the segment's declared types. f64 tensors cross every boundary as f32
(IREE demotes f64 inside, but sizes f64 results wrongly at the function boundary).

Dynamic dims stay dynamic (`?`) across boundaries; their example sizes
(polyarch.shapes) go with the segment's arguments, the calls and the transfers.

Constants, weights and glue (lists, scalars) are rematerialised: cloned into each
segment that uses them, never passed between segments. @main becomes a sequence of
func.call @seg_N, with a "polyarch.transfer" wherever a tensor crosses devices."""

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from ..targets import BOUNDARY, WIDEN, has_narrow_storage
from ..dialects import polyarch as pa
from ..runtime.devices import DeviceSpec
from ..errors import PolyarchError
from .base import Pass
from .common import body_ops, describe, main_func, remat_set

if TYPE_CHECKING:
    from torch_mlir import ir


def _segments(ops, remat):
    segs = []
    for op in ops:
        if op.operation in remat:
            continue
        if not pa.is_placed(op):
            raise PolyarchError(f"{describe(op)} has no {pa.DEVICE}", fix="run assign-devices before outline-segments")
        dev = pa.Placement.of(op).device
        if segs and segs[-1][0] == dev:
            segs[-1][1].append(op)
        else:
            segs.append((dev, [op]))
    return segs


@dataclass(frozen=True)
class OutlineSegments(Pass):
    NAME = "outline-segments"

    def apply(self, module: "ir.Module") -> None:
        _Outliner(module).run()


def run(module: "ir.Module") -> None:
    """Run the pass (see OutlineSegments)."""
    OutlineSegments().apply(module)


class _Outliner:
    """One run of the pass over a module's @main: the segments in program order, then the
    constant segment, then the return; `main_value` maps each original value to what stands
    for it in @main after outlining, `where` each such value to its device (None: a host input)."""

    def __init__(self, module):
        from torch_mlir import ir
        from torch_mlir.dialects import func

        self.ir, self.func, self.module = ir, func, module
        self.main = main_func(module)
        self.ops, self.term = body_ops(self.main)
        self.remat = remat_set(self.main)
        self.segs = _segments(self.ops, self.remat)
        args = list(self.main.regions[0].blocks[0].arguments)
        self.main_value = {a: a for a in args}
        self.where = {a: None for a in args}
        self.transfers = {}
        self.main_ip = ir.InsertionPoint(self.term)
        self.module_ip = ir.InsertionPoint(self.main)

    def run(self):
        # What each segment reads from outside (first, for all segments: a later segment may
        # read a tensor of an earlier one through glue, which the earlier one must then return).
        needs = [_needs(self.ir, sops, self.remat) for _, sops in self.segs]
        read_elsewhere = {v for inputs, _ in needs for v in inputs}
        for k, (dev, sops) in enumerate(self.segs):
            inputs, glue = needs[k]
            outputs = self.outputs(sops, read_elsewhere)
            self.outline(k, dev, sops, inputs, glue, outputs)
        # Outputs computed from constants alone (arange, a model without inputs, an unused
        # statistic of batch_norm) are returned, not refused: one more segment computes them.
        consts = list(dict.fromkeys(v for v in self.term.operands if v not in self.main_value))
        if consts:
            _constant_segment(self.ir, self.module, self.func, f"seg_{len(self.segs)}", consts, self.ops, self.remat,
                              self.segs, self.main_value, self.main_ip, self.module_ip)
        # The return: outputs of segments, or inputs passed through.
        for i, v in enumerate(self.term.operands):
            self.term.operands[i] = self.main_value[v]
        for op in reversed(self.ops):
            op.operation.erase()

    def outputs(self, sops, read_elsewhere):
        """A segment's results read by ops placed elsewhere, by another segment (directly or
        through glue) or returned. (Glue in @main itself is erased.)"""
        members = {op.operation for op in sops}
        returned = set(self.term.operands)
        out = []
        for op in sops:
            for r in op.results:
                if r not in out and (r in read_elsewhere or r in returned or any(
                        u.owner.operation not in members and u.owner.operation not in self.remat for u in r.uses)):
                    out.append(r)
        return out

    def outline(self, k, dev, sops, inputs, glue, outputs):
        """func.func @seg_k for one run of ops, and in @main the transfers and the call."""
        ir = self.ir
        for v in inputs:
            if not pa.is_tensor(v):
                raise PolyarchError(f"a non-tensor value crosses into segment {k} ({dev})",
                                    fix="report this model to polyarch; glue ops should be rematerialised")
        name = f"seg_{k}"
        widen = not has_narrow_storage(DeviceSpec.parse(dev))
        # Clone in original program order (topological): glue may read a member's result
        # (a size query on a dynamic tensor), so it cannot all go first.
        fn, in_types, out_types = make_function(ir, name, inputs, outputs, program_order(glue + list(sops), self.ops),
                                                widen, self.module_ip)
        total = sum(t.us[dev] for t in (pa.Times.of(op) for op in sops) if t is not None and dev in t.us)
        pa.Segment(name, dev, round(total, 3), fn).put()
        pa.set_nominal_shapes(ir, fn, inputs, pa.ARG_SHAPES)
        args = [self.moved(v, dev, want) for v, want in zip(inputs, in_types)]
        call = self.func.CallOp(out_types, ir.FlatSymbolRefAttr.get(name), args, ip=self.main_ip)
        pa.set_nominal_shapes(ir, call.operation, outputs)
        for v, r in zip(outputs, call.results):
            self.main_value[v] = r
            self.where[r] = dev

    def moved(self, v, dev, want):
        """What stands for `v` in @main on device `dev` as type `want`: a transfer where it
        lives elsewhere or travels as another type (one per value and device)."""
        mv = self.main_value[v]
        src = self.where[mv]
        if (src is not None and src != dev) or mv.type != want:
            key = (mv, dev)
            if key not in self.transfers:
                t = pa.create_transfer(self.ir, mv, src or pa.HOST, dev, self.main_ip, result_type=want)
                pa.set_nominal_shapes(self.ir, t.owner, [mv])
                self.transfers[key] = t
                self.where[t] = dev
            mv = self.transfers[key]
        return mv


def _constant_segment(ir, module, func, name, values, ops, remat, segs, main_value, main_ip, module_ip):
    """A segment without inputs that computes `values` (returned by the model, computed from
    constants alone) from clones of the ops they come from; on the plan's cpu if it has one,
    else on its first device. Its call goes before the return."""
    plan = pa.Plan.of(module)
    devs = list(plan.devices) if plan else []
    devs = devs or [d for d, _ in segs] or ["cpu"]
    dev = next((d for d in devs if DeviceSpec.parse(d).kind == "cpu"), devs[0])
    _, closure = _reach(ir, values, set(), remat)  # constants and glue alone: no inputs
    fn, _, out_types = make_function(ir, name, [], values, program_order(closure, ops),
                                     not has_narrow_storage(DeviceSpec.parse(dev)), module_ip)
    pa.Segment(name, dev, 0.0, fn).put()
    call = func.CallOp(out_types, ir.FlatSymbolRefAttr.get(name), [], ip=main_ip)
    pa.set_nominal_shapes(ir, call.operation, values)
    for v, r in zip(values, call.results):
        main_value[v] = r


def make_function(ir: ModuleType, name: str, inputs: list, outputs: list, order: list, widen: bool,
                  ip: "ir.InsertionPoint") -> tuple:
    """func.func @name(inputs) -> outputs at `ip`, its body clones of `order` (ops in program
    order, glue included), with the boundary types of the device (see _boundary_type).
    -> (function, input types, output types)."""
    from torch_mlir.dialects import func

    in_types = [_boundary_type(ir, v.type, widen) for v in inputs]
    out_types = [_boundary_type(ir, v.type, widen) for v in outputs]
    fn = func.FuncOp(name, (in_types, out_types), ip=ip)
    block = fn.add_entry_block()
    body = ir.InsertionPoint(block)
    mapping = {v: (_convert(ir, a, v.type, body) if a.type != v.type else a) for v, a in zip(inputs, block.arguments)}
    for op in order:
        new = op.operation.clone(ip=body)
        for i, o in enumerate(op.operands):
            if o in mapping:
                new.operands[i] = mapping[o]
        for inner in _nested_ops(new):  # a loop's body reads values from outside it too
            for i, o in enumerate(inner.operands):
                if o in mapping:
                    inner.operands[i] = mapping[o]
        for old_r, new_r in zip(op.results, new.results):
            mapping[old_r] = new_r
    func.ReturnOp([_convert(ir, mapping[v], t, body) if t != v.type else mapping[v] for v, t in zip(outputs, out_types)],
                  ip=body)
    return fn, in_types, out_types


def _needs(ir, sops, remat):
    """(inputs, glue) of a segment: the tensors it reads from outside (arguments or other
    segments), directly or through glue, and the glue ops to clone into it."""
    return _reach(ir, [o for op in sops for o in list(op.operands) + _captured(ir, op)],
                  {op.operation for op in sops}, remat)


def _reach(ir, values, members, remat):
    """What computing `values` takes besides the ops in `members`: (the tensors to read
    from outside, the rematerialisable ops to clone, in the order found)."""
    inputs, glue, seen = [], [], set()

    def need(v):
        owner = v.owner
        if isinstance(owner, ir.Block) or (owner.operation not in members and owner.operation not in remat):
            if v not in inputs:
                inputs.append(v)
            return
        if owner.operation in members or owner.operation in seen:
            return
        seen.add(owner.operation)
        for o in owner.operands:
            need(o)
        glue.append(owner)

    for v in values:
        need(v)
    return inputs, glue


def _nested_ops(op):
    """Every op inside op's regions, at any depth."""
    out = []
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                out.append(inner.operation)
                out.extend(_nested_ops(inner.operation))
    return out


def _captured(ir, op):
    """The values that ops inside op's regions (torch.prim.Loop's body, STFT's) read from
    outside it: the segment needs them as much as op's operands (a clone would otherwise
    point into @main, and crash when @main's ops are erased)."""
    inner = _nested_ops(op.operation)
    if not inner:
        return []
    ops = set(inner)
    blocks = [b for o in [op.operation] + inner for r in o.regions for b in r.blocks]
    out = []
    for o in inner:
        for v in o.operands:
            owner = v.owner
            outside = (not any(owner == b for b in blocks)) if isinstance(owner, ir.Block) else owner.operation not in ops
            if outside and v not in out:
                out.append(v)
    return out


def program_order(some: list, ops: list) -> list:
    pos = {op.operation: i for i, op in enumerate(ops)}
    return sorted(some, key=lambda op: pos[op.operation])


# torch ScalarType codes for the dtypes that widening converts between
_TORCH_DTYPE = {"ui8": 0, "si8": 1, "si16": 2, "si32": 3, "si64": 4, "f16": 5, "f32": 6, "f64": 7, "complex<f32>": 9,
                "complex<f64>": 10, "i1": 11, "bf16": 15}


def _boundary_type(ir, type_, widen):
    """The type a tensor crosses a segment boundary as: f64 as f32 and complex<f64> as
    complex<f32> everywhere (BOUNDARY),
    narrow types widened to 32 bits where the device needs it."""
    info = pa.tensor_info(type_)
    if info is None:
        return type_
    shape, et = info
    to = BOUNDARY.get(et) or (WIDEN.get(et) if widen else None)
    if not to:
        return type_
    return ir.Type.parse(f"!torch.vtensor<[{','.join('?' if d == -1 else str(d) for d in shape)}],{to}>")


def _convert(ir, value, to_type, ip):
    """`torch.aten.to.dtype` of value to to_type's element type, inserted at ip."""
    et = pa.tensor_info(to_type)[1]
    const = lambda name, t, attrs: ir.Operation.create(name, results=[ir.Type.parse(t)], attributes=attrs, ip=ip).results[0]
    code = const("torch.constant.int", "!torch.int", {"value": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), _TORCH_DTYPE[et])})
    false = const("torch.constant.bool", "!torch.bool", {"value": ir.BoolAttr.get(False)})
    none = const("torch.constant.none", "!torch.none", {})
    op = ir.Operation.create("torch.aten.to.dtype", results=[to_type], operands=[value, code, false, false, none], ip=ip)
    return op.results[0]
