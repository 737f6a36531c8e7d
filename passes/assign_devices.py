"""assign-devices: put every placeable op of @main on one of the target devices.

Options:
  devices=cpu,vulkan        the targets, in preference order for ties
  pin=PATTERN=DEVICE        (repeatable) force ops onto a device; PATTERN is an op
                            name (torch.aten.mm), or a module path prefix
                            (encoder.layer.0); ops may also carry polyarch.pin

Each op gets polyarch.device and polyarch.time_us (predicted time on each device:
roofline max(flops/peak, bytes/bandwidth) + launch overhead). An op a device cannot
run (e.g. i64 tensors on default Vulkan) never goes there. The placement minimises
predicted latency: compute plus the transfer of every live tensor at each point
where the device changes. It is solved exactly, by dynamic programming over the ops
in program order (the segments are contiguous runs of that order); the module gets
polyarch.plan with the algorithm and the predicted total. Ops not on their fastest
device get polyarch.reason."""

import math

from ..compiler.targets import profile_for, unsupported_reason
from ..dialects import polyarch as pa
from ..errors import PolyarchError
from ..runtime.devices import parse_devices
from .annotate_costs import cost_of, launches
from .common import body_ops, describe, is_rematerialisable, main_func, module_path, tensor_bytes, element_types

OPTIONS = {"devices": "comma-separated device specs", "pin": "PATTERN=DEVICE (repeatable)"}

ALGORITHM = "exact: dynamic programming over program order (contiguous segments)"


def compute_time(flops, nbytes, dispatches, prof):
    if flops == 0 and nbytes == 0:
        return 0.0
    return max(flops / prof.peak_flops, nbytes / prof.mem_bw) + dispatches * prof.launch_s


def transfer_time(src, dst, nbytes):
    """Seconds to move `nbytes` from device src to dst (through host memory)."""
    if src.name == dst.name or nbytes == 0:
        return 0.0
    t = 0.0
    for d in (src, dst):
        if d.kind != "cpu":
            p = profile_for(d)
            t += nbytes / p.link_bw + p.link_latency_s
    return t


def _parse_pins(pins, names):
    out = []
    for p in pins:
        pattern, sep, dev = p.rpartition("=")
        if not sep or not pattern:
            raise PolyarchError(f"bad pin '{p}'", fix="write PATTERN=DEVICE, e.g. torch.aten.mm=cpu or encoder.layer.0=vulkan")
        if dev not in names:
            raise PolyarchError(f"pin '{p}' names device '{dev}', which is not a target", fix=f"pin to one of {', '.join(names)}")
        out.append((pattern, dev, [0]))
    return out


def _pin_of(op, pins):
    if pa.PIN in op.attributes:
        return op.attributes[pa.PIN].value, "pinned in the IR (polyarch.pin)"
    name, path = op.operation.name, module_path(op)
    for pattern, dev, hits in pins:
        if name == pattern or (path and (path == pattern or path.startswith(pattern + "."))):
            hits[0] += 1
            return dev, f"pinned by user ({pattern}={dev})"
    return None, None


def _users(value):
    return [u.owner.operation for u in value.uses]


def run(module, devices=("cpu",), pin=()):
    from torch_mlir import ir

    if isinstance(devices, str):
        devices = devices.split(",")
    if isinstance(pin, str):
        pin = [pin]
    specs = parse_devices(devices)
    names = [s.name for s in specs]
    pins = _parse_pins(pin, names)
    main = main_func(module)
    ops, term = body_ops(main)
    placed = [op for op in ops if not is_rematerialisable(op)]
    index = {op.operation: i for i, op in enumerate(placed)}
    n, D = len(placed), len(specs)
    INF = math.inf

    # Cost per op per device, with reasons for impossible ones.
    times = [[0.0] * D for _ in range(n)]
    why_not = [[None] * D for _ in range(n)]
    for i, op in enumerate(placed):
        flops, r, w = cost_of(op)
        ets = element_types(op)
        in_ets = {pa.tensor_info(v.type)[1] for v in op.operands if pa.is_tensor(v)}
        dev_pin, pin_why = _pin_of(op, pins)
        for j, s in enumerate(specs):
            reason = unsupported_reason(s, ets, op.operation.name, in_ets)
            if reason:
                times[i][j], why_not[i][j] = INF, f"{s.name} cannot run it: {reason}"
            elif dev_pin is not None and dev_pin != s.name:
                times[i][j], why_not[i][j] = INF, pin_why
            else:
                times[i][j] = compute_time(flops, r + w, launches(op), profile_for(s))
        if dev_pin is not None and dev_pin in names and times[i][names.index(dev_pin)] == INF:
            raise PolyarchError(
                f"{describe(op)} is pinned to {dev_pin}, which cannot run it ({why_not[i][names.index(dev_pin)]})",
                fix="remove the pin or pin it to another device",
            )
        if all(t == INF for t in times[i]):
            reasons = "; ".join(r for r in why_not[i] if r)
            raise PolyarchError(
                f"unsupported op: {describe(op)} cannot run on any target device ({reasons})",
                fix="add a device that supports it, e.g. --device cpu",
            )
    for pattern, dev, hits in pins:
        if hits[0] == 0 and not any(op.operation.name == pattern for op in placed):
            raise PolyarchError(f"pin '{pattern}={dev}' matched no op", fix="use an op name (polyarch plan --ops lists them) or a module path prefix")

    # Live tensor bytes at each cut c (between placed[c-1] and placed[c]): values made by
    # placed ops (or @main's arguments) before c and used at or after c (or returned).
    def last_use(value):
        last = -1
        stack = _users(value)
        seen = set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if u.name == "func.return":
                return n
            if u in index:
                last = max(last, index[u])
            else:  # glue (list, scalar): its users use the value too
                for res in u.results:
                    stack.extend(_users(res))
        return last

    live_delta = [0] * (n + 2)
    defs = [(-1, a) for a in main.regions[0].blocks[0].arguments] + [(i, r) for i, op in enumerate(placed) for r in op.results]
    for i, v in defs:
        nb = tensor_bytes(v)
        if not nb:
            continue
        lu = last_use(v)
        if lu > i:
            live_delta[i + 1] += nb
            live_delta[lu + 1] -= nb
    live = []
    acc = 0
    for c in range(n + 1):
        acc += live_delta[c]
        live.append(acc)

    host = parse_devices(["cpu"])[0]
    # best[j]: least predicted time with the current op on specs[j].
    best = [transfer_time(host, specs[j], live[0]) + times[0][j] if n else 0.0 for j in range(D)]
    back = []
    for i in range(1, n):
        nxt, ptr = [], []
        for j in range(D):
            cands = [best[k] + (transfer_time(specs[k], specs[j], live[i]) if k != j else 0.0) for k in range(D)]
            k = min(range(D), key=lambda k: (cands[k], k != j))
            nxt.append(cands[k] + times[i][j])
            ptr.append(k)
        best = nxt
        back.append(ptr)
    ret_bytes = sum(tensor_bytes(v) for v in term.operands)
    final = [best[j] + transfer_time(specs[j], host, ret_bytes) for j in range(D)]
    j = min(range(D), key=lambda j: final[j]) if n else 0
    total = final[j] if n else 0.0
    choice = [j] * n
    for i in range(n - 1, 0, -1):
        choice[i - 1] = back[i - 1][choice[i]]

    f64 = ir.F64Type.get()
    moved = 0
    for i, op in enumerate(placed):
        j = choice[i]
        op.attributes[pa.DEVICE] = ir.StringAttr.get(names[j])
        op.attributes[pa.TIME_US] = ir.DictAttr.get(
            {names[k]: ir.FloatAttr.get(f64, round(times[i][k] * 1e6, 3)) for k in range(D) if times[i][k] != INF}
        )
        fastest = min(range(D), key=lambda k: times[i][k])
        if any(why_not[i]):
            op.attributes[pa.REASON] = ir.StringAttr.get("; ".join(r for r in why_not[i] if r))
        elif times[i][j] > times[i][fastest]:
            op.attributes[pa.REASON] = ir.StringAttr.get(f"kept on {names[j]} to avoid a transfer ({names[fastest]} alone would be faster)")
        if i and choice[i] != choice[i - 1]:
            moved += live[i]
    module.operation.attributes[pa.DEVICES] = ir.ArrayAttr.get([ir.StringAttr.get(s) for s in names])
    module.operation.attributes[pa.PLAN] = ir.DictAttr.get(
        {
            "algorithm": ir.StringAttr.get(ALGORITHM),
            "objective": ir.StringAttr.get("latency"),
            "predicted_us": ir.FloatAttr.get(f64, round(total * 1e6, 3)),
            "transfer_bytes": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), moved),
        }
    )
