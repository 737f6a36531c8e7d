"""assign-devices: put every placeable op of @main on one of the target devices.

Options:
  devices=cpu,vulkan        the targets, in preference order for ties
  pin=PATTERN=DEVICE        (repeatable) force ops onto a device; PATTERN is an op
                            name (torch.aten.mm), or a module path prefix
                            (encoder.layer.0); ops may also carry polyarch.pin
  objective=latency         latency (default), throughput (pipelined stages: the
                            busiest device), cost ($ per 1M calls), energy (J per
                            call), or a weighted mix: latency:1,energy:0.5 (each term
                            relative to its best single-device plan)
  solver=auto               auto, brute, chain-dp, mincut or heft (passes/solver.py)
  profile=FILE.json         (repeatable) device profiles, as for annotate-costs
  verdicts=FILE.json        (repeatable) what was measured on a device (compiler/grounding.py):
                            ops whose fingerprint is in its "wrong_ops" never go there
                            (they were measured wrong on it); "corrections" as for
                            annotate-costs, and "transfer" multiplies the time of
                            moving a tensor to or from the device

Per-op device times come from annotate-costs (polyarch.time_us; computed here with
the same profiles if absent). An op a device cannot run (e.g. i64 tensors on default
Vulkan) never goes there; neither do ops pinned elsewhere. Transfers are priced per
tensor and destination with the profiles' host link figures, plus the call overhead
of the segment that receives it (call_s); memory capacity
(weights + peak live activations) is a constraint. The module gets polyarch.plan:
the algorithm (and whether it is exact), the objective and the predicted latency,
bottleneck, cost, energy and bytes moved. Ops not on their fastest device get
polyarch.reason."""

import math

from ..targets import profiles as P
from ..targets import BOUNDARY, ELEMENT_BYTES, WIDEN, has_narrow_storage, unsupported_reason
from ..dialects import polyarch as pa
from ..errors import PolyarchError
from ..runtime.devices import parse_devices
from . import solver as S
from .annotate_costs import correction, op_seconds
from .common import (body_ops, describe, element_types, load_verdicts, main_func, module_path, op_fingerprint, remat_set,
                     tensor_bytes)

OPTIONS = {
    "devices": "comma-separated device specs",
    "pin": "PATTERN=DEVICE (repeatable)",
    "objective": "latency | throughput | cost | energy | NAME:WEIGHT,NAME:WEIGHT",
    "solver": "auto | brute | chain-dp | mincut | heft",
    "profile": "device profile JSON file (repeatable)",
    "verdicts": "measured verdicts JSON file (repeatable)",
}

INF = math.inf


def parse_objective(text):
    """'latency' or 'latency:1,energy:0.5' -> {metric: weight}."""
    text = (text or "latency").strip()
    out = {}
    for part in text.split(","):
        name, sep, w = part.partition(":")
        name = name.strip()
        if name not in S.METRICS:
            raise PolyarchError(f"unknown objective '{name}'", fix=f"use {', '.join(S.METRICS)}, or a mix like latency:1,energy:0.5")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            raise PolyarchError(f"objective weight '{w}' for {name} is not a number", fix="write NAME:WEIGHT, e.g. latency:1,energy:0.5") from None
        if weight < 0:
            raise PolyarchError(f"objective weight for {name} is negative", fix="use weights >= 0")
        out[name] = weight
    if not any(out.values()):
        raise PolyarchError(f"objective '{text}' has no positive weight", fix="give at least one metric a weight > 0")
    return out


def link_time(src, dst, nbytes):
    """Seconds to move nbytes between two device profiles through host memory (None: the host)."""
    if src is dst or nbytes == 0:
        return 0.0
    t = 0.0
    for p in (src, dst):
        if p is not None and p.kind != "cpu":
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


def _boundary_bytes(value, widen):
    """Bytes a tensor moves as between segments: f64 as f32, and narrow types as 32-bit
    when a target lacks narrow storage (outline-segments converts them at the boundary)."""
    nb = tensor_bytes(value)
    info = pa.tensor_info(value.type)
    if not nb or not info:
        return nb
    et = info[1]
    to = BOUNDARY.get(et) or (WIDEN.get(et) if widen else None)
    return nb // ELEMENT_BYTES.get(et, 4) * ELEMENT_BYTES[to] if to else nb


def _users(value):
    return [u.owner.operation for u in value.uses]


def _remat_ancestors(op, remat):
    """The rematerialised ops (weights included) an op pulls into its segment. remat: the
    function's remat_set."""
    stack, seen = list(op.operands), set()
    while stack:
        owner = stack.pop().owner
        if not hasattr(owner, "operation") or owner.operation in seen:
            continue
        o = owner.operation
        seen.add(o)
        if o in remat:
            yield o
            stack.extend(o.operands)


def _weights_of(op, remat):
    """{literal op: bytes} of the weights an op reads (directly or through rematerialised ops)."""
    return {o: tensor_bytes(o.results[0]) for o in _remat_ancestors(op, remat) if o.name == "torch.vtensor.literal"}


def _remat_element_types(op, remat):
    """Element types computed by the rematerialised ops an op pulls into its segment
    (e.g. an si64 arange behind a causal mask): the device compiles them too. A size
    query (torch.aten.size.int, from dynamic shapes) reads no elements of its tensor."""
    out = set()
    for o in _remat_ancestors(op, remat):
        if o.name not in ("torch.vtensor.literal", "torch.aten.size.int"):
            for t in list(o.operands) + list(o.results):
                info = pa.tensor_info(t.type)
                if info:
                    out.add(info[1])
    return out


def support_reason(op, spec, remat):
    """Why device `spec` cannot run this placed op (with what it pulls in), or None.
    remat: the remat_set of the op's function."""
    ets = element_types(op) | _remat_element_types(op, remat)
    in_ets = {pa.tensor_info(v.type)[1] for v in op.operands if pa.is_tensor(v)}
    return unsupported_reason(spec, ets, op.operation.name, in_ets)


def run(module, devices=("cpu",), pin=(), objective="latency", solver="auto", profile=(), verdicts=()):
    from torch_mlir import ir

    if isinstance(devices, str):
        devices = devices.split(",")
    if isinstance(pin, str):
        pin = [pin]
    if isinstance(profile, str):
        profile = [profile]
    if isinstance(verdicts, (str, dict)):
        verdicts = [verdicts]
    measured = load_verdicts(verdicts)
    weights = parse_objective(objective)
    if solver not in ("auto", *S.ALGORITHMS) or solver == "one":
        raise PolyarchError(f"unknown solver '{solver}'", fix="use auto, brute, chain-dp, mincut or heft")
    specs = parse_devices(devices)
    names = [s.name for s in specs]
    profs = P.resolve(specs, profile)
    pins = _parse_pins(pin, names)
    main = main_func(module)
    ops, term = body_ops(main)
    remat = remat_set(main)
    placed = [op for op in ops if op.operation not in remat]
    index = {op.operation: i for i, op in enumerate(placed)}
    n, D = len(placed), len(specs)

    # Seconds per op per device, with reasons for impossible ones.
    times = [[0.0] * D for _ in range(n)]
    why_not = [[None] * D for _ in range(n)]
    for i, op in enumerate(placed):
        dev_pin, pin_why = _pin_of(op, pins)
        given = op.attributes[pa.TIME_US] if pa.TIME_US in op.attributes else None
        fingerprint = op_fingerprint(op) if measured else None
        for j, s in enumerate(specs):
            reason = support_reason(op, s, remat)
            wrong = measured.get(s.name, {}).get("wrong_ops", {}).get(fingerprint)
            if wrong:
                times[i][j], why_not[i][j] = INF, f"{s.name} cannot run it: {wrong.get('reason', 'measured wrong there')}"
            elif reason:
                times[i][j], why_not[i][j] = INF, f"{s.name} cannot run it: {reason}"
            elif dev_pin is not None and dev_pin != s.name:
                times[i][j], why_not[i][j] = INF, pin_why
            elif given is not None and s.name in given:
                times[i][j] = given[s.name].value * 1e-6
            else:
                times[i][j] = op_seconds(op, profs[s.name]) * correction(op, measured.get(s.name, {}).get("corrections"))
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

    # Values: @main's tensor arguments and placed ops' tensor results, with the placed
    # ops that read them (directly or through glue) and whether @main returns them.
    def readers(value):
        cons, returned, stack, seen = set(), False, _users(value), set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if u.name == "func.return":
                returned = True
            elif u in index:
                cons.add(index[u])
            else:  # glue (list, scalar): its users read the value too
                for res in u.results:
                    stack.extend(_users(res))
        return sorted(cons), returned

    values = []
    defs = [(-1, a) for a in main.regions[0].blocks[0].arguments] + [(i, r) for i, op in enumerate(placed) for r in op.results]
    widen = any(not has_narrow_storage(s) for s in specs)
    for i, v in defs:
        nb = _boundary_bytes(v, widen)
        if nb:
            cons, ret = readers(v)
            values.append(S.Value(i, nb, cons, ret))

    cpu = [j for j, s in enumerate(specs) if s.kind == "cpu"]
    host = cpu[0] if cpu else D
    host_prof = P.host_profile(profs)
    locs = [profs[nm] for nm in names] + [host_prof]

    # measured corrections of transfer time (compiler/grounding.py), per device; 1 for the host
    tcorr = [float(measured.get(nm, {}).get("corrections", {}).get("transfer", 1.0)) for nm in names] + [1.0]

    def link(a, b, nbytes):
        # A tensor moved to a device also means a segment call there: its call overhead
        # (submit + wait) is charged with the transfer.
        pa_, pb_ = (None if a == host else locs[a]), (None if b == host else locs[b])
        t = link_time(pa_, pb_, nbytes)
        t = t + locs[b].call_s if (a != b and nbytes and b < D) else t
        return t * max(tcorr[a], tcorr[b])

    problem = S.Problem(
        devices=names, comp=times, values=values, link=link, host=host,
        watts=[p.watts for p in locs], price=[p.price_per_hour for p in locs], weights=weights,
        weight_bytes=[_weights_of(op, remat) for op in placed], capacity=[profs[nm].mem_capacity for nm in names],
    )
    try:
        choice, algorithm, m = S.solve(problem, solver) if n else ([], S.ALGORITHMS["one"], S.metrics(problem, []))
    except ValueError as e:
        raise PolyarchError(f"solver={solver}: {e}", fix="use solver=auto") from None
    over = S.over_capacity(problem, choice)
    if over:
        d, use, cap = over[0]
        raise PolyarchError(
            f"the model does not fit on {names[d]}: needs {use / 2**30:.2f} GiB (weights + peak activations), "
            f"the profile gives {cap / 2**30:.2f} GiB",
            fix="add a device with more memory, pin part of the model elsewhere, or correct mem_capacity in the profile",
        )
    memory = S.memory_use(problem, choice)

    f64 = ir.F64Type.get()
    i64 = ir.IntegerType.get_signless(64)
    only = [k for k in weights if weights[k]]
    obj_text = objective if isinstance(objective, str) else "latency"
    for i, op in enumerate(placed):
        j = choice[i]
        op.attributes[pa.DEVICE] = ir.StringAttr.get(names[j])
        op.attributes[pa.TIME_US] = ir.DictAttr.get(
            {names[k]: ir.FloatAttr.get(f64, round(times[i][k] * 1e6, 4)) for k in range(D) if times[i][k] != INF}
        )
        fastest = min(range(D), key=lambda k: times[i][k])
        if any(why_not[i]):
            op.attributes[pa.REASON] = ir.StringAttr.get("; ".join(r for r in why_not[i] if r))
        elif times[i][j] > times[i][fastest]:
            if only == ["latency"]:
                why = f"kept on {names[j]} to avoid a transfer ({names[fastest]} alone would be faster)"
            else:
                why = f"placed on {names[j]} for the {obj_text} objective ({names[fastest]} alone would be faster)"
            op.attributes[pa.REASON] = ir.StringAttr.get(why)
    module.operation.attributes[pa.DEVICES] = ir.ArrayAttr.get([ir.StringAttr.get(s) for s in names])
    module.operation.attributes[pa.PLAN] = ir.DictAttr.get(
        {
            "algorithm": ir.StringAttr.get(algorithm),
            "objective": ir.StringAttr.get(obj_text),
            "predicted_us": ir.FloatAttr.get(f64, round(m["latency"] * 1e6, 3)),
            "bottleneck_us": ir.FloatAttr.get(f64, round(m["throughput"] * 1e6, 3)),
            "cost_usd_per_1m": ir.FloatAttr.get(f64, round(m["cost"], 6)),
            "energy_j": ir.FloatAttr.get(f64, round(m["energy"], 6)),
            "transfer_bytes": ir.IntegerAttr.get(i64, S.transfer_bytes(problem, choice)),
            "memory_bytes": ir.DictAttr.get({names[d]: ir.IntegerAttr.get(i64, memory[d]) for d in range(D)}),
        }
    )
