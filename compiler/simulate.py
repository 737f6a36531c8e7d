"""What a plan predicts: per-segment explanation, and a simulated timeline of one call
(or a pipelined stream of calls) on the devices of the profiles, as a Chrome trace and
a Gantt chart. Works for fleets this machine does not have: only profiles are needed."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from ..dialects import polyarch as pa
from ..targets import profiles as P

if TYPE_CHECKING:
    from torch_mlir import ir


@dataclass
class Segment:
    name: str
    device: str
    ops: list  # [(description, {device: us}, reason or None)]
    predicted_us: float
    other_us: dict  # device -> us of the same ops there (None: some op cannot run there)
    call_s: float
    in_bytes: int = 0
    in_s: float = 0.0
    in_count: int = 0
    out_bytes: int = 0
    out_count: int = 0


@dataclass
class Report:
    plan: dict
    devices: list
    profiles: dict  # device -> DeviceProfile
    segments: list
    steps: list  # the schedule, transfers with "seconds"
    objective: str = "latency"
    memory: dict = field(default_factory=dict)

    def lines(self, explain: bool = False, ops: list = False) -> list:
        p = self.plan
        out = [f"plan: {p['objective']} objective, {p['algorithm']}"]
        out.append("profiles: " + ", ".join(f"{d} = {pr.name}" + (" (calibrated)" if pr.calibrated else " (spec sheet)")
                                           for d, pr in self.profiles.items()))
        thr = p.get("bottleneck_us") or 0
        out.append(
            f"predicted: {p['predicted_us'] / 1000:.3f} ms per call; bottleneck {thr / 1000:.3f} ms"
            + (f" ({1e6 / thr:.1f} calls/s pipelined)" if thr else "")
            + f"; ${p.get('cost_usd_per_1m', 0):.4f} per 1M calls; {p.get('energy_j', 0):.4g} J per call; "
            f"{p['transfer_bytes'] / 1e6:.3f} MB moved between devices"
        )
        if self.memory:
            out.append("memory (weights + peak activations): " + ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in self.memory.items()))
        for s in self.segments:
            others = ", ".join(f"{d}: {'n/a' if t is None else f'{t / 1000:.3f} ms'}" for d, t in s.other_us.items())
            out.append(f"  {s.name:8s} {s.device:10s} {len(s.ops):5d} ops  {s.predicted_us / 1000:9.3f} ms"
                       + (f"  (on {others})" if others else ""))
            if explain:
                if s.in_count:
                    out.append(f"      in:  {s.in_count} tensor(s), {s.in_bytes / 1e6:.3f} MB moved here ({s.in_s * 1000:.3f} ms)")
                if s.out_count:
                    out.append(f"      out: {s.out_count} tensor(s), {s.out_bytes / 1e6:.3f} MB moved to other devices")
                out.append(f"      why: {self._why(s)}")
                heavy = sorted(s.ops, key=lambda o: -o[1].get(s.device, 0))[:3]
                for desc, times, _ in heavy:
                    if times.get(s.device, 0) > 0:
                        out.append(f"      {times[s.device]:10.2f} us  {desc}")
            if ops:
                for desc, times, reason in s.ops:
                    out.append(f"      {times.get(s.device, 0):9.2f} us  {desc}" + (f"  [{reason}]" if reason else ""))
        for st in self.steps:
            if st["op"] == "transfer":
                out.append(f"  transfer {st['from']} -> {st['to']}: {st['bytes']} bytes ({st['seconds'] * 1e6:.1f} us)")
        return out

    def _why(self, s):
        fastest = sum(1 for _, _, r in s.ops if r is None)
        kept = sum(1 for _, _, r in s.ops if r and r.startswith("kept on"))
        chosen = sum(1 for _, _, r in s.ops if r and r.startswith("placed on"))
        forced = {}
        for _, _, r in s.ops:
            if r and not r.startswith(("kept on", "placed on")):
                forced[r] = forced.get(r, 0) + 1
        parts = []
        if fastest:
            parts.append(f"{fastest} op(s) fastest on {s.device}")
        if kept:
            parts.append(f"{kept} kept on {s.device} to avoid a transfer")
        if chosen:
            parts.append(f"{chosen} placed on {s.device} for the {self.objective} objective although slower")
        for r, k in sorted(forced.items(), key=lambda x: -x[1])[:3]:
            parts.append(f"{k} forced: {r}")
        return "; ".join(parts) or "no ops"


def explain(module: "ir.Module", profile_files: Iterable = ()) -> "Report":
    """A Report of a module after outline-segments."""
    from ..passes.assign_devices import link_time
    from ..passes.common import body_ops, describe
    from .modules import schedule_of

    placement = pa.Plan.of(module)
    plan, devices = placement.summary, list(placement.devices)
    profs = P.resolve(devices, profile_files)
    steps, _ = schedule_of(module)
    segs = []
    for s in pa.Segment.all(module):
        name, device, fn = s.name, s.device, s.fn
        ops = [(describe(op), (pa.Times.of(op) or pa.Times({})).us, pa.Placement.of(op).reason)
               for op in body_ops(fn)[0] if pa.is_placed(op)]
        other = {}
        for d in devices:
            if d != device:
                other[d] = None if any(d not in t for _, t, _ in ops) else sum(t[d] for _, t, _ in ops)
        segs.append(Segment(name, device, ops, s.predicted_us, other, profs[device].call_s))
    by_name = {s.name: s for s in segs}
    made_by = {}
    transfer_of = {}
    for st in steps:
        if st["op"] == "transfer":
            src = None if st["from"] == pa.HOST else profs[st["from"]]
            st["seconds"] = link_time(src, profs[st["to"]], st["bytes"])
            transfer_of[st["dst"]] = st
            seg = made_by.get(st["src"])
            if seg:
                seg.out_bytes += st["bytes"]
                seg.out_count += 1
        else:
            seg = by_name[st["segment"]]
            for a in st["args"]:
                if a in transfer_of:
                    seg.in_bytes += transfer_of[a]["bytes"]
                    seg.in_s += transfer_of[a]["seconds"]
                    seg.in_count += 1
            for r in st["results"]:
                made_by[r] = seg
    return Report(plan, devices, profs, segs, steps, objective=plan.get("objective", "latency"),
                  memory=plan.get("memory_bytes", {}))


def timeline(report: "Report", requests: int = 1) -> list:
    """Simulate `requests` calls: segments run on their device, transfers on the host
    link of each non-cpu end. Greedy list scheduling: repeatedly start, among the next
    steps of all calls, the one that can start earliest (inputs ready, devices free),
    so later calls overlap earlier ones where devices are idle: a pipeline.
    -> [{name, kind, track, start, dur, request, bytes}] in seconds."""
    by_name = {s.name: s for s in report.segments}

    def shape(st):
        if st["op"] == "call":
            seg = by_name[st["segment"]]
            return seg.name, [seg.device], seg.predicted_us * 1e-6 + seg.call_s, st["args"], st["results"], 0
        ends = [d for d in (st["from"], st["to"]) if d != pa.HOST and report.profiles[d].kind != "cpu"]
        tracks = [f"link {d}" for d in ends] or ["link host"]
        return f"{st['from']} -> {st['to']}", tracks, st["seconds"], [st["src"]], [st["dst"]], st["bytes"]

    steps = [shape(st) for st in report.steps]
    kinds = [st["op"] for st in report.steps]
    free, ready = {}, [dict() for _ in range(requests)]
    nxt = [0] * requests
    events = []
    while any(i < len(steps) for i in nxt):
        best = None
        for r in range(requests):
            i = nxt[r]
            if i >= len(steps):
                continue
            name, tracks, dur, deps, outs, nbytes = steps[i]
            start = max([ready[r].get(a, 0.0) for a in deps] + [free.get(t, 0.0) for t in tracks] + [0.0])
            if best is None or start < best[0] - 1e-12:
                best = (start, r)
        start, r = best
        name, tracks, dur, deps, outs, nbytes = steps[nxt[r]]
        end = start + dur
        for t in tracks:
            free[t] = end
        for v in outs:
            ready[r][v] = end
        events.append({"name": name, "kind": kinds[nxt[r]], "track": tracks[0], "start": start, "dur": dur,
                       "request": r, "bytes": nbytes})
        nxt[r] += 1
    return events


def write_chrome_trace(path: str, events: list, report: "Report") -> None:
    from ..runtime.trace import write_chrome_trace as write

    write(path, "polyarch plan (predicted)",
          [dict(e, args={"request": e["request"], "bytes": e["bytes"]}) for e in events], tracks=report.devices,
          other={"plan": report.plan, "profiles": {d: p.name for d, p in report.profiles.items()}})


def write_gantt(path: str, events: list, report: "Report") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = list(dict.fromkeys([d for d in report.devices if any(e["track"] == d for e in events)] + [e["track"] for e in events]))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(tracks)), dpi=110)
    end = max((e["start"] + e["dur"] for e in events), default=1e-6)
    for e in events:
        y = tracks.index(e["track"])
        c = colours(e["request"] % 10) if e["kind"] == "call" else "0.6"
        ax.barh(y, e["dur"] * 1e3, left=e["start"] * 1e3, height=0.6, color=c, edgecolor="black", linewidth=0.3)
        if e["dur"] > end * 0.04:
            ax.text((e["start"] + e["dur"] / 2) * 1e3, y, e["name"], ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(tracks)), tracks)
    ax.invert_yaxis()
    ax.set_xlabel("predicted time (ms)")
    n = 1 + max((e["request"] for e in events), default=0)
    p = report.plan
    ax.set_title(f"{' + '.join(report.devices)}: {p['objective']} plan, {n} call(s); "
                 f"{p['predicted_us'] / 1000:.3f} ms per call ({', '.join(pr.name for pr in report.profiles.values())})", fontsize=9)
    fig.tight_layout()
    from ..files import atomic_write

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
