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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..targets import profiles as P
from ..targets import BOUNDARY, ELEMENT_BYTES, WIDEN, has_narrow_storage, unsupported_reason
from ..dialects import polyarch as pa
from ..errors import PolyarchError
from ..runtime.devices import parse_devices
from . import solver as S
from .base import Pass, option
from .annotate_costs import correction, op_seconds
from .common import (body_ops, describe, element_types, load_verdicts, main_func, module_path, op_fingerprint, remat_set,
                     tensor_bytes)

if TYPE_CHECKING:
    from torch_mlir import ir

INF = math.inf


def parse_objective(text: str) -> dict:
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


def link_time(src: "P.DeviceProfile | None", dst: "P.DeviceProfile | None", nbytes: int) -> float:
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
    pinned = pa.pin_of(op)
    if pinned is not None:
        return pinned, "pinned in the IR (polyarch.pin)"
    name, path = op.operation.name, module_path(op)
    for pattern, dev, hits in pins:
        if name == pattern or (path and (path == pattern or path.startswith(pattern + "."))):
            hits[0] += 1
            return dev, f"pinned by user ({pattern}={dev})"
    return None, None


def _pin_fix(op, placed, pins, spec, remat):
    """The fix for a pin refused for one op: where a module path was pinned, the largest
    sub-modules below it whose every op the device can run, which could be pinned instead."""
    path = module_path(op)
    pattern = next((p for p, d, _ in pins if path and (path == p or path.startswith(p + "."))), None)
    plain = "remove the pin or pin it to another device"
    if pattern is None:
        return plain
    under = [(module_path(o), o) for o in placed if (module_path(o) or "").startswith(pattern + ".")]

    def cover(prefix, items, depth):
        if all(support_reason(o, spec, remat) is None for _, o in items):
            return [prefix]
        if depth == 6:
            return []
        children = {}
        for p, o in items:
            rest = p[len(prefix) + 1:]
            if rest:
                children.setdefault(prefix + "." + rest.split(".")[0], []).append((p, o))
        return [g for child, its in children.items() for g in cover(child, its, depth + 1)]

    fine = cover(pattern, under, 0) if under else []
    if not fine or fine == [pattern]:
        return plain
    shown = " ".join(f"--pin {g}={spec.name}" for g in fine[:6]) + (f" (and {len(fine) - 6} more)" if len(fine) > 6 else "")
    return f"pin the parts of {pattern} that {spec.name} can run instead: {shown}; or {plain}"


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


def support_reason(op: "ir.Operation", spec: Any, remat: set) -> str | None:
    """Why device `spec` cannot run this placed op (with what it pulls in), or None.
    remat: the remat_set of the op's function."""
    ets = element_types(op) | _remat_element_types(op, remat)
    in_ets = {pa.tensor_info(v.type)[1] for v in op.operands if pa.is_tensor(v)}
    return unsupported_reason(spec, ets, op.operation.name, in_ets)


@dataclass(frozen=True)
class AssignDevices(Pass):
    NAME = "assign-devices"
    devices: tuple = option(("cpu",), "the targets, in preference order for ties", sep=",")
    pin: tuple = option((), "PATTERN=DEVICE: force ops onto a device (repeatable)", repeat=True)
    objective: str = option("latency", "latency | throughput | cost | energy | NAME:WEIGHT,NAME:WEIGHT")
    solver: str = option("auto", "placement algorithm", choices=("auto", "brute", "chain-dp", "mincut", "heft"))
    profile: tuple = option((), "device profile JSON file or DeviceProfile (repeatable)", repeat=True)
    verdicts: tuple = option((), "what was measured on a device: JSON file or dict (repeatable)", repeat=True)

    def check(self) -> None:
        parse_objective(self.objective)

    def apply(self, module: "ir.Module") -> None:
        measured = load_verdicts(self.verdicts)
        specs = parse_devices(self.devices)
        names = [s.name for s in specs]
        profs = P.resolve(specs, self.profile)
        main = main_func(module)
        ops, _ = body_ops(main)
        remat = remat_set(main)
        placed = [op for op in ops if op.operation not in remat]
        times, why_not = _op_times(placed, specs, profs, _parse_pins(self.pin, names), measured, remat)
        weights = parse_objective(self.objective)
        problem = _problem(main, placed, remat, specs, profs, times, measured, weights)
        choice, algorithm, metrics = _solve(problem, self.solver, len(placed))
        _mark_ops(placed, choice, times, why_not, names, weights, self.objective or "latency")
        memory = S.memory_use(problem, choice)
        pa.Plan(tuple(names), {
            "algorithm": algorithm,
            "objective": self.objective or "latency",
            "predicted_us": round(float(metrics["latency"]) * 1e6, 3),
            "bottleneck_us": round(float(metrics["throughput"]) * 1e6, 3),
            "cost_usd_per_1m": round(float(metrics["cost"]), 6),
            "energy_j": round(float(metrics["energy"]), 6),
            "transfer_bytes": int(S.transfer_bytes(problem, choice)),
            "memory_bytes": {names[d]: int(memory[d]) for d in range(len(names))},
        }, {}).put(module)


def run(module: "ir.Module", **options) -> None:
    """Run the pass with Python option values (see AssignDevices)."""
    AssignDevices(**options).apply(module)


def _op_times(placed, specs, profs, pins, measured, remat):
    """Seconds per op per device (INF where it cannot go), with the reason for each INF;
    refuses an op no device can run, an op pinned where it cannot run, a pin matching nothing."""
    times, why_not = [], []
    names = [s.name for s in specs]
    for op in placed:
        dev_pin, pin_why = _pin_of(op, pins)
        row, why = _times_of(op, specs, profs, measured, remat, dev_pin, pin_why)
        if dev_pin is not None and dev_pin in names and row[names.index(dev_pin)] == INF:
            spec = specs[names.index(dev_pin)]
            raise PolyarchError(f"{describe(op)} is pinned to {dev_pin}, which cannot run it "
                                f"({why[names.index(dev_pin)]})", fix=_pin_fix(op, placed, pins, spec, remat))
        if all(t == INF for t in row):
            raise PolyarchError(f"unsupported op: {describe(op)} cannot run on any target device "
                                f"({'; '.join(r for r in why if r)})", fix="add a device that supports it, e.g. --device cpu")
        times.append(row)
        why_not.append(why)
    for pattern, dev, hits in pins:
        if hits[0] == 0 and not any(op.operation.name == pattern for op in placed):
            raise PolyarchError(f"pin '{pattern}={dev}' matched no op",
                                fix="use an op name (polyarch plan --ops lists them) or a module path prefix")
    return times, why_not


def _times_of(op, specs, profs, measured, remat, dev_pin, pin_why):
    """One op's seconds on each device (from polyarch.time_us where annotate-costs gave it)."""
    given = pa.Times.of(op)
    fingerprint = op_fingerprint(op) if measured else None
    row, why = [], []
    for s in specs:
        reason = support_reason(op, s, remat)
        wrong = measured.get(s.name, {}).get("wrong_ops", {}).get(fingerprint)
        if wrong:
            row.append(INF), why.append(f"{s.name} cannot run it: {wrong.get('reason', 'measured wrong there')}")
        elif reason:
            row.append(INF), why.append(f"{s.name} cannot run it: {reason}")
        elif dev_pin is not None and dev_pin != s.name:
            row.append(INF), why.append(pin_why)
        elif given is not None and s.name in given.us:
            row.append(given.us[s.name] * 1e-6), why.append(None)
        else:
            corr = correction(op, measured.get(s.name, {}).get("corrections"))
            row.append(op_seconds(op, profs[s.name]) * corr), why.append(None)
    return row, why


def _boundary_values(main, placed, specs):
    """The tensors that may cross devices: @main's arguments and placed ops' results, each
    with the bytes it moves as, the placed ops that read it (directly or through glue) and
    whether @main returns it."""
    index = {op.operation: i for i, op in enumerate(placed)}

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
    return values


def _problem(main, placed, remat, specs, profs, times, measured, weights):
    """The placement problem (passes/solver.py) of @main's placed ops."""
    names = [s.name for s in specs]
    D = len(specs)
    cpu = [j for j, s in enumerate(specs) if s.kind == "cpu"]
    host = cpu[0] if cpu else D
    locs = [profs[nm] for nm in names] + [P.host_profile(profs)]
    # measured corrections of transfer time (compiler/grounding.py), per device; 1 for the host
    tcorr = [float(measured.get(nm, {}).get("corrections", {}).get("transfer", 1.0)) for nm in names] + [1.0]

    def link(a, b, nbytes):
        # A tensor moved to a device also means a segment call there: its call overhead
        # (submit + wait) is charged with the transfer.
        pa_, pb_ = (None if a == host else locs[a]), (None if b == host else locs[b])
        t = link_time(pa_, pb_, nbytes)
        t = t + locs[b].call_s if (a != b and nbytes and b < D) else t
        return t * max(tcorr[a], tcorr[b])

    return S.Problem(
        devices=names, comp=times, values=_boundary_values(main, placed, specs), link=link, host=host,
        watts=[p.watts for p in locs], price=[p.price_per_hour for p in locs], weights=weights,
        weight_bytes=[_weights_of(op, remat) for op in placed], capacity=[profs[nm].mem_capacity for nm in names],
    )


def _solve(problem, solver, n):
    """-> (device index per op, algorithm, metrics); refuses a plan over a device's memory."""
    try:
        choice, algorithm, m = S.solve(problem, solver) if n else ([], S.ALGORITHMS["one"], S.metrics(problem, []))
    except ValueError as e:
        raise PolyarchError(f"solver={solver}: {e}", fix="use solver=auto") from None
    over = S.over_capacity(problem, choice)
    if over:
        d, use, cap = over[0]
        raise PolyarchError(
            f"the model does not fit on {problem.devices[d]}: needs {use / 2**30:.2f} GiB (weights + peak activations), "
            f"the profile gives {cap / 2**30:.2f} GiB",
            fix="add a device with more memory, pin part of the model elsewhere, or correct mem_capacity in the profile",
        )
    return choice, algorithm, m


def _mark_ops(placed, choice, times, why_not, names, weights, objective):
    """Each op's polyarch.device, its time on each device that can run it, and the reason
    where it is not on its fastest device."""
    only = [k for k in weights if weights[k]]
    for i, op in enumerate(placed):
        j = choice[i]
        pa.Times({names[k]: round(t * 1e6, 4) for k, t in enumerate(times[i]) if t != INF}).put(op)
        fastest = min(range(len(names)), key=lambda k: times[i][k])
        reason = None
        if any(why_not[i]):
            reason = "; ".join(r for r in why_not[i] if r)
        elif times[i][j] > times[i][fastest]:
            if only == ["latency"]:
                reason = f"kept on {names[j]} to avoid a transfer ({names[fastest]} alone would be faster)"
            else:
                reason = f"placed on {names[j]} for the {objective} objective ({names[fastest]} alone would be faster)"
        pa.Placement(names[j], reason).put(op)
