"""Load-aware routing over the plans a server holds: each request goes to the plan whose
devices would be done with it soonest by prediction, the work queued ahead of it (requests
waiting and in flight x the measured time per call) plus its own call. A spike then spills
onto the other device sets instead of queueing behind the fastest one.

`simulate` runs the same decision (`order`) over plans given by their time per call alone,
so that routing can be studied for a fleet this host does not have (the times from
`polyarch plan` predictions, or profiles)."""

from typing import Iterable

__all__ = ["order", "simulate", "poisson"]


def order(plans: Iterable, rows: int = 1) -> list:
    """The plans, the one predicted to finish a request of `rows` rows sent now first (each has
    `free_at_s(rows)`): a request goes to the first whose queue has room."""
    return sorted(plans, key=lambda p: p.free_at_s(rows))


class _SimPlan:
    def __init__(self, name, call_s):
        self.name, self.call_s, self.busy_until, self.now = name, call_s, 0.0, 0.0

    def free_at_s(self, rows=1):
        return max(0.0, self.busy_until - self.now) + self.call_s


def simulate(arrivals_s: Iterable[float], call_s: dict, only: str | None = None) -> dict:
    """Requests arriving at `arrivals_s` (seconds, ascending) served by plans that each run one
    call at a time ({plan name: seconds per call}), each request routed by `order` (or all to
    plan `only`). -> {"latency_s": [per request], "by_plan": {name: requests}}."""
    plans = [_SimPlan(n, s) for n, s in call_s.items()]
    if only is not None:
        plans = [p for p in plans if p.name == only]
    lat, by_plan = [], {p.name: 0 for p in plans}
    for t in arrivals_s:
        for p in plans:
            p.now = t
        p = order(plans)[0]  # (simulated queues never fill)
        start = max(t, p.busy_until)
        p.busy_until = start + p.call_s
        lat.append(p.busy_until - t)
        by_plan[p.name] += 1
    return {"latency_s": lat, "by_plan": by_plan}


def poisson(rate_per_s: float, seconds: float, seed: int = 0) -> list:
    """Arrival times of a Poisson stream (for `simulate`)."""
    import random

    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate_per_s)
        if t > seconds:
            return out
        out.append(t)

