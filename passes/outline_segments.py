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

from ..targets import BOUNDARY, WIDEN, has_narrow_storage
from ..dialects import polyarch as pa
from ..runtime.devices import DeviceSpec
from ..errors import PolyarchError
from .common import body_ops, describe, main_func, remat_set

OPTIONS = {}


def _segments(ops, remat):
    segs = []
    for op in ops:
        if op.operation in remat:
            continue
        if pa.DEVICE not in op.attributes:
            raise PolyarchError(f"{describe(op)} has no {pa.DEVICE}", fix="run assign-devices before outline-segments")
        dev = op.attributes[pa.DEVICE].value
        if segs and segs[-1][0] == dev:
            segs[-1][1].append(op)
        else:
            segs.append((dev, [op]))
    return segs


def run(module):
    from torch_mlir import ir
    from torch_mlir.dialects import func

    main = main_func(module)
    ops, term = body_ops(main)
    remat = remat_set(main)
    segs = _segments(ops, remat)
    f64 = ir.F64Type.get()
    # values -> the value that stands for them in @main after outlining
    main_value = {}
    where = {}  # main value -> device it lives on (None: host input)
    for a in main.regions[0].blocks[0].arguments:
        main_value[a] = a
        where[a] = None
    transfers = {}
    main_ip = ir.InsertionPoint(term)
    module_ip = ir.InsertionPoint(main)

    # What each segment reads from outside (first, for all segments: a later segment may
    # read a tensor of an earlier one through glue, which the earlier one must then return).
    needs = [_needs(ir, sops, remat) for _, sops in segs]
    read_elsewhere = {v for inputs, _ in needs for v in inputs}
    returned = set(term.operands)

    for k, (dev, sops) in enumerate(segs):
        members = {op.operation for op in sops}
        inputs, glue = needs[k]
        # Outputs: results read by ops placed elsewhere, by another segment (directly or
        # through glue) or returned. Glue in @main itself is erased.
        outputs = []
        for op in sops:
            for r in op.results:
                if r in outputs:
                    continue
                if r in read_elsewhere or r in returned or any(
                        u.owner.operation not in members and u.owner.operation not in remat for u in r.uses):
                    outputs.append(r)
        for v in inputs:
            if not pa.is_tensor(v):
                raise PolyarchError(f"a non-tensor value crosses into segment {k} ({dev})", fix="report this model to polyarch; glue ops should be rematerialised")
        name = f"seg_{k}"
        widen = not has_narrow_storage(DeviceSpec.parse(dev))
        # Clone in original program order (topological): glue may read a member's result
        # (a size query on a dynamic tensor), so it cannot all go first.
        fn, in_types, out_types = make_function(ir, name, inputs, outputs, program_order(glue + list(sops), ops), widen,
                                                module_ip)
        fn.attributes[pa.DEVICE] = ir.StringAttr.get(dev)
        total = sum(op.attributes[pa.TIME_US][dev].value for op in sops if pa.TIME_US in op.attributes)
        fn.attributes[pa.TIME_US] = ir.FloatAttr.get(f64, round(total, 3))
        pa.set_nominal_shapes(ir, fn, inputs, pa.ARG_SHAPES)

        # In @main: transfers for inputs living elsewhere, then the call.
        args = []
        for v, want in zip(inputs, in_types):
            mv = main_value[v]
            src = where[mv]
            if (src is not None and src != dev) or mv.type != want:
                key = (mv, dev)
                if key not in transfers:
                    t = pa.create_transfer(ir, mv, src or pa.HOST, dev, main_ip, result_type=want)
                    pa.set_nominal_shapes(ir, t.owner, [mv])
                    transfers[key] = t
                    where[t] = dev
                mv = transfers[key]
            args.append(mv)
        call = func.CallOp(out_types, ir.FlatSymbolRefAttr.get(name), args, ip=main_ip)
        pa.set_nominal_shapes(ir, call.operation, outputs)
        for v, r in zip(outputs, call.results):
            main_value[v] = r
            where[r] = dev

    # Outputs computed from constants alone (arange, a model without inputs, an unused
    # statistic of batch_norm) are returned, not refused: one more segment computes them.
    consts = list(dict.fromkeys(v for v in term.operands if v not in main_value))
    if consts:
        _constant_segment(ir, module, func, f"seg_{len(segs)}", consts, ops, remat, segs, main_value, main_ip,
                          module_ip)
    # The return: outputs of segments, or inputs passed through.
    for i, v in enumerate(term.operands):
        term.operands[i] = main_value[v]
    for op in reversed(ops):
        op.operation.erase()


def _constant_segment(ir, module, func, name, values, ops, remat, segs, main_value, main_ip, module_ip):
    """A segment without inputs that computes `values` (returned by the model, computed from
    constants alone) from clones of the ops they come from; on the plan's cpu if it has one,
    else on its first device. Its call goes before the return."""
    devs = [a.value for a in module.operation.attributes[pa.DEVICES]] if pa.DEVICES in module.operation.attributes else []
    devs = devs or [d for d, _ in segs] or ["cpu"]
    dev = next((d for d in devs if DeviceSpec.parse(d).kind == "cpu"), devs[0])
    _, closure = _reach(ir, values, set(), remat)  # constants and glue alone: no inputs
    fn, _, out_types = make_function(ir, name, [], values, program_order(closure, ops),
                                     not has_narrow_storage(DeviceSpec.parse(dev)), module_ip)
    fn.attributes[pa.DEVICE] = ir.StringAttr.get(dev)
    fn.attributes[pa.TIME_US] = ir.FloatAttr.get(ir.F64Type.get(), 0.0)
    call = func.CallOp(out_types, ir.FlatSymbolRefAttr.get(name), [], ip=main_ip)
    pa.set_nominal_shapes(ir, call.operation, values)
    for v, r in zip(values, call.results):
        main_value[v] = r


def make_function(ir, name, inputs, outputs, order, widen, ip):
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


def program_order(some, ops):
    pos = {op.operation: i for i, op in enumerate(ops)}
    return sorted(some, key=lambda op: pos[op.operation])


# torch ScalarType codes for the dtypes that widening converts between
_TORCH_DTYPE = {"ui8": 0, "si8": 1, "si16": 2, "si32": 3, "si64": 4, "f16": 5, "f32": 6, "f64": 7, "i1": 11, "bf16": 15}


def _boundary_type(ir, type_, widen):
    """The type a tensor crosses a segment boundary as: f64 as f32 everywhere (BOUNDARY),
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
