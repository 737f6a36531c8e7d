"""The placement problem and its solvers, free of MLIR so that they can be tested
against brute force.

Model. Ops 0..n-1 (in program order) each go on one of D devices; comp[i][d] is the
predicted seconds of op i on device d (inf: not allowed: unsupported or pinned
elsewhere). A value (tensor) is made by an op or comes from the host; it is moved
once to every other location that has a consumer of it, and returned values go back
to the host. The host is the cpu target when there is one, else a location of its own.
Execution is sequential (the runtime runs segments in order), so

    latency  = sum of op times on their devices + sum of transfer times
    cost     = sum over busy seconds (ops, and both ends of each transfer) of $/h / 3600, per 1M calls
    energy   = sum over busy seconds of the device's watts, J per call
    throughput (pipelined stages): the bottleneck, max over devices of its busy seconds;
               a stream of calls pipelined over the devices runs at 1 / bottleneck.

The objective is a weighted sum of these, each divided by its value for the best
single-device plan (so weights mean "relative importance"). Solvers:

    brute      exact: every placement (small problems only)
    chain-dp   exact: dynamic programming when the dataflow is a chain (each op reads only
               the previous op's results); additive objectives
    mincut     exact: minimum s-t cut when there are two devices; additive objectives,
               any dataflow graph (transfers once per destination, modelled with auxiliary
               nodes per value)
    heft       heuristic: list scheduling in HEFT's upward-rank order, each op to the
               device of least incremental objective, then local search (single ops and
               whole runs of same-device ops moved while the objective improves)

auto picks the first exact solver that applies (brute only for D**n <= 4096), else heft.
Memory capacity (weights + peak live activations per device) is checked after solving;
a plan over capacity is repaired by Lagrangian penalties on weight bytes (heuristic)."""

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

INF = math.inf
METRICS = ("latency", "cost", "energy", "throughput")
ADDITIVE = ("latency", "cost", "energy")
BRUTE_LIMIT = 4096


@dataclass
class Value:
    producer: int  # op index, or -1: a host input
    nbytes: int
    consumers: list  # op indices
    returned: bool = False


@dataclass
class Problem:
    devices: list  # names
    comp: list  # n x D seconds (INF = not allowed)
    values: list  # [Value]
    link: object  # (a, b, nbytes) -> seconds; a, b location indices (0..D-1 or D: separate host)
    host: int  # location index of the host (the cpu device's index, or D)
    watts: list  # per location (D+1 entries)
    price: list  # $/h per location (D+1 entries)
    weights: dict = field(default_factory=lambda: {"latency": 1.0})
    weight_bytes: list = None  # per op: {weight id: bytes}
    capacity: list = None  # per device, bytes (None: unlimited)

    @property
    def n(self) -> int:
        return len(self.comp)

    @property
    def D(self) -> int:
        return len(self.devices)


def _op_vec(pb, i, d):
    """Metric contributions of op i on device d: [latency, cost, energy, busy_0..busy_D]."""
    t = pb.comp[i][d]
    v = [0.0] * (3 + pb.D + 1)
    v[0] = t
    v[1] = t * pb.price[d] / 3600 * 1e6
    v[2] = t * pb.watts[d]
    v[3 + d] = t
    return v


def _value_vec(pb, v, src, dests):
    """Metric contributions of moving value v from location src to each of dests."""
    out = [0.0] * (3 + pb.D + 1)
    for d in dests:
        if d == src:
            continue
        t = pb.link(src, d, v.nbytes)
        if t == 0:
            continue
        out[0] += t
        out[1] += t * (pb.price[src] + pb.price[d]) / 3600 * 1e6
        out[2] += t * (pb.watts[src] + pb.watts[d])
        out[3 + src] += t
        out[3 + d] += t
    return out


def _dests(pb, v, assign):
    s = {assign[c] for c in v.consumers}
    if v.returned:
        s.add(pb.host)
    return s


def _src(pb, v, assign):
    return pb.host if v.producer < 0 else assign[v.producer]


def metrics(pb: "Problem", assign: list) -> dict:
    """{latency s, cost $/1M calls, energy J, throughput bottleneck s, busy [s per device]}."""
    tot = [0.0] * (3 + pb.D + 1)
    for i, d in enumerate(assign):
        for k, x in enumerate(_op_vec(pb, i, d)):
            tot[k] += x
    for v in pb.values:
        for k, x in enumerate(_value_vec(pb, v, _src(pb, v, assign), _dests(pb, v, assign))):
            tot[k] += x
    return _named(pb, tot)


def _named(pb, tot):
    busy = tot[3 : 3 + pb.D]
    return {"latency": tot[0], "cost": tot[1], "energy": tot[2], "throughput": max(busy) if busy else 0.0, "busy": busy}


def transfer_bytes(pb: "Problem", assign: list) -> int:
    return sum(v.nbytes * len(_dests(pb, v, assign) - {_src(pb, v, assign)}) for v in pb.values)


class Objective:
    """Weighted, normalised scalarisation of the metrics."""

    def __init__(self, pb, norms=None):
        self.pb = pb
        self.w = {k: float(x) for k, x in pb.weights.items() if x}
        self.norms = norms or normalisers(pb)
        self.additive = all(k in ADDITIVE for k in self.w)

    def of_metrics(self, m: dict) -> float:
        return sum(w * m[k] / self.norms[k] for k, w in self.w.items())

    def __call__(self, assign):
        return self.of_metrics(metrics(self.pb, assign))

    def unary(self, i: int, d: int) -> float:
        if self.pb.comp[i][d] == INF:
            return INF
        return self._scal(_op_vec(self.pb, i, d))

    def pair(self, v: "Value", src: int, dst: int) -> float:
        return self._scal(_value_vec(self.pb, v, src, [dst]))

    def _scal(self, vec):
        return sum(w * vec[("latency", "cost", "energy").index(k)] / self.norms[k] for k, w in self.w.items() if k in ADDITIVE)


def single_device_plans(pb: "Problem") -> list:
    return [[d] * pb.n for d in range(pb.D) if all(pb.comp[i][d] != INF for i in range(pb.n))]


def normalisers(pb: "Problem") -> dict:
    """Each metric's best value over the feasible single-device plans (1 if none, or 0)."""
    singles = single_device_plans(pb)
    out = {}
    for k in METRICS:
        vals = [metrics(pb, a)[k] for a in singles]
        best = min(vals) if vals else 0.0
        out[k] = best if best > 0 else 1.0
    return out


def feasible(pb: "Problem", assign: list) -> bool:
    return all(pb.comp[i][d] != INF for i, d in enumerate(assign))


# ---- exact solvers ----------------------------------------------------------------


def brute(pb: "Problem", obj: "Objective") -> list:
    best, best_a = INF, None
    allowed = [[d for d in range(pb.D) if pb.comp[i][d] != INF] for i in range(pb.n)]
    for a in itertools.product(*allowed):
        f = obj(list(a))
        if f < best - 1e-15:
            best, best_a = f, list(a)
    return best_a


def is_chain(pb: "Problem") -> bool:
    for v in pb.values:
        nxt = v.producer + 1
        if any(c != nxt for c in v.consumers):
            return False
    return True


def chain_dp(pb: "Problem", obj: "Objective") -> list | None:
    n, D = pb.n, pb.D
    into = [[] for _ in range(n + 1)]  # values produced by op i-1 (or the host for i=0), read by op i
    ret = [[] for _ in range(n)]
    for v in pb.values:
        if v.consumers:
            into[v.producer + 1].append(v)
        if v.returned:
            if v.producer < 0:
                continue  # a host input returned as is moves nowhere
            ret[v.producer].append(v)
    H = pb.host

    def edge(i, a, b):  # values from op i-1 on a (a=None: host) into op i on b
        src = H if a is None else a
        return sum(obj.pair(v, src, b) for v in into[i])

    best = [obj.unary(0, d) + edge(0, None, d) + sum(obj.pair(v, d, H) for v in ret[0]) for d in range(D)]
    back = []
    for i in range(1, n):
        nxt, ptr = [], []
        for b in range(D):
            u = obj.unary(i, b)
            cands = [best[a] + edge(i, a, b) for a in range(D)]
            a = min(range(D), key=lambda a: (cands[a], a != b))
            nxt.append(cands[a] + u + sum(obj.pair(v, b, H) for v in ret[i]))
            ptr.append(a)
        best = nxt
        back.append(ptr)
    d = min(range(D), key=lambda d: best[d])
    if best[d] == INF:
        return None
    assign = [d] * n
    for i in range(n - 1, 0, -1):
        assign[i - 1] = back[i - 1][assign[i]]
    return assign


def mincut(pb: "Problem", obj: "Objective") -> list:
    """Two devices: 0 is the source side, 1 the sink side."""
    import networkx as nx

    assert pb.D == 2
    G = nx.DiGraph()
    S, T = "s", "t"
    G.add_node(S)
    G.add_node(T)

    scale = 1e12 / max(1e-300, max((u for row in [[obj.unary(i, d) for d in range(2)] for i in range(pb.n)] for u in row if u != INF), default=1.0))

    def add(u, v, cap):
        # Integer capacities: preflow-push on floats gave wrong cuts (order-dependent roundoff).
        if cap != INF:
            cap = int(round(cap * scale))
        if cap == INF:
            G.add_edge(u, v)  # no capacity attribute: infinite
        elif cap > 0:
            if G.has_edge(u, v) and "capacity" in G[u][v]:
                G[u][v]["capacity"] += cap
            elif not G.has_edge(u, v):
                G.add_edge(u, v, capacity=cap)

    unary = [[obj.unary(i, d) for d in range(2)] for i in range(pb.n)]
    _transfer_edges(pb, obj, unary, add, S, T)
    for i in range(pb.n):
        G.add_node(i)
        add(S, i, unary[i][1])  # cut when i is on the sink side (device 1)
        add(i, T, unary[i][0])  # cut when i is on the source side (device 0)
    _, (src_side, _) = nx.minimum_cut(G, S, T)
    return [0 if i in src_side else 1 for i in range(pb.n)]


def _transfer_edges(pb, obj, unary, add, S, T):
    """The edges (and unary costs) that price each value's transfers in mincut's graph."""
    H = pb.host
    for vi, v in enumerate(pb.values):
        # The return goes to the host: a fixed terminal if the host is a device, else a unary cost.
        if v.returned and v.producer >= 0 and H == 2:
            for d in range(2):
                unary[v.producer][d] += obj.pair(v, d, H)
        if v.producer < 0 and H == 2:
            # From a separate host to every device with a consumer: pay once per device used.
            w0, w1 = obj.pair(v, H, 0), obj.pair(v, H, 1)
            if v.consumers:
                y, x = ("y", vi), ("x", vi)
                add(y, T, w0)  # paid if any consumer is on device 0 (source side)
                add(S, x, w1)  # paid if any consumer is on device 1 (sink side)
                for c in v.consumers:
                    add(c, y, INF)
                    add(x, c, INF)
            continue
        p = S if (v.producer < 0 and H == 0) else T if (v.producer < 0 and H == 1) else v.producer
        cons = list(v.consumers)
        if v.returned and H in (0, 1):
            cons.append(S if H == 0 else T)
        if not cons:
            continue
        w01, w10 = obj.pair(v, 0, 1), obj.pair(v, 1, 0)
        x, y = ("x", vi), ("y", vi)
        add(p, x, w01)  # producer on 0 and some consumer on 1
        add(y, p, w10)  # producer on 1 and some consumer on 0
        for c in cons:
            add(x, c, INF)
            add(c, y, INF)


# ---- heuristic --------------------------------------------------------------------


class _State:
    """An assignment with its metric totals, updated incrementally on moves."""

    def __init__(self, pb, obj, assign):
        self.pb, self.obj, self.a = pb, obj, list(assign)
        self.reads = [[] for _ in range(pb.n)]
        self.makes = [[] for _ in range(pb.n)]
        for v in pb.values:
            for c in set(v.consumers):
                self.reads[c].append(v)
            if v.producer >= 0:
                self.makes[v.producer].append(v)
        self.tot = [0.0] * (3 + pb.D + 1)
        for i, d in enumerate(self.a):
            self._add(_op_vec(pb, i, d), 1)
        for v in pb.values:
            self._add(self._vv(v), 1)

    def _vv(self, v):
        return _value_vec(self.pb, v, _src(self.pb, v, self.a), _dests(self.pb, v, self.a))

    def _add(self, vec, sign):
        for k, x in enumerate(vec):
            self.tot[k] += sign * x

    def value(self):
        return self.obj.of_metrics(_named(self.pb, self.tot))

    def move(self, ops, d):
        """Put ops on d; returns the undo list."""
        touched = {id(v): v for i in ops for v in self.reads[i] + self.makes[i]}.values()
        for v in touched:
            self._add(self._vv(v), -1)
        undo = []
        for i in ops:
            self._add(_op_vec(self.pb, i, self.a[i]), -1)
            undo.append((i, self.a[i]))
            self.a[i] = d
            self._add(_op_vec(self.pb, i, d), 1)
        for v in touched:
            self._add(self._vv(v), 1)
        return undo, list(touched)

    def undo(self, undo_touched):
        undo, touched = undo_touched
        for v in touched:
            self._add(self._vv(v), -1)
        for i, old in undo:
            self._add(_op_vec(self.pb, i, self.a[i]), -1)
            self.a[i] = old
            self._add(_op_vec(self.pb, i, old), 1)
        for v in touched:
            self._add(self._vv(v), 1)


def heft(pb: "Problem", obj: "Objective", start: list | None = None, check: Callable | None = None) -> list:
    """Local search from `start` (default: the list schedule); `check(assign)` may veto moves."""
    n, D = pb.n, pb.D
    if start is None:
        start = _list_schedule(pb, obj)
    st = _State(pb, obj, start)
    best = st.value()
    for _ in range(50):
        improved = False
        # Whole runs of same-device ops first (they cross fewer transfers together), then single ops.
        runs, i = [], 0
        while i < n:
            j = i
            while j + 1 < n and st.a[j + 1] == st.a[i]:
                j += 1
            runs.append(list(range(i, j + 1)))
            i = j + 1
        for group in runs + [[i] for i in range(n)]:
            for d in range(D):
                if st.a[group[0]] == d or any(pb.comp[i][d] == INF for i in group):
                    continue
                u = st.move(group, d)
                f = st.value()
                if f < best - 1e-12 * max(1.0, abs(best)) and (check is None or check(st.a)):
                    best, improved = f, True
                else:
                    st.undo(u)
        if not improved:
            break
    return st.a


def _list_schedule(pb, obj):
    """HEFT-style: ops by decreasing upward rank (mean time + mean transfer to the
    costliest successor path), each to the device with the least incremental objective."""
    n, D = pb.n, pb.D
    mean = [sum(t for t in row if t != INF) / max(1, sum(t != INF for t in row)) for row in pb.comp]
    succ = [[] for _ in range(n)]
    for v in pb.values:
        if v.producer >= 0:
            for c in v.consumers:
                succ[v.producer].append((c, pb.link(0, D - 1, v.nbytes) if D > 1 else 0.0))
    rank = [0.0] * n
    for i in range(n - 1, -1, -1):  # program order is topological
        rank[i] = mean[i] + max((w + rank[c] for c, w in succ[i]), default=0.0)
    order = sorted(range(n), key=lambda i: (-rank[i], i))
    # Every op starts on its fastest allowed device; in rank order, each then moves to the
    # device of least objective given the placements made so far.
    st = _State(pb, obj, [min(range(D), key=lambda d: pb.comp[i][d]) for i in range(n)])
    for i in order:
        best_d, best_f = st.a[i], st.value()
        for d in range(D):
            if d == best_d or pb.comp[i][d] == INF:
                continue
            u = st.move([i], d)
            f = st.value()
            st.undo(u)
            if f < best_f:
                best_d, best_f = d, f
        if best_d != st.a[i]:
            st.move([i], best_d)
    return st.a


# ---- memory -----------------------------------------------------------------------


def memory_use(pb: "Problem", assign: list) -> list:
    """Bytes per device: distinct weights of its ops + peak live activations on it."""
    D = pb.D
    weights = [dict() for _ in range(D)]
    if pb.weight_bytes:
        for i, d in enumerate(assign):
            weights[d].update(pb.weight_bytes[i])
    delta = [[0] * (pb.n + 2) for _ in range(D)]
    for v in pb.values:
        locs = {}
        if v.producer >= 0:
            locs.setdefault(assign[v.producer], []).append(v.producer)
        for c in v.consumers:
            locs.setdefault(assign[c], []).append(c)
        for d, pts in locs.items():
            lo = max(0, min(pts))
            hi = pb.n if v.returned and v.producer >= 0 and d == assign[v.producer] else max(pts)
            delta[d][lo] += v.nbytes
            delta[d][hi + 1] -= v.nbytes
    out = []
    for d in range(D):
        acc, peak = 0, 0
        for x in delta[d]:
            acc += x
            peak = max(peak, acc)
        out.append(sum(weights[d].values()) + peak)
    return out


def over_capacity(pb: "Problem", assign: list) -> list:
    if not pb.capacity:
        return []
    use = memory_use(pb, assign)
    return [(d, use[d], pb.capacity[d]) for d in range(pb.D) if pb.capacity[d] and use[d] > pb.capacity[d]]


# ---- driver -----------------------------------------------------------------------

ALGORITHMS = {
    "one": "exact: one device",
    "brute": "exact: enumeration of all placements",
    "chain-dp": "exact: dynamic programming over a chain",
    "mincut": "exact: minimum s-t cut (two devices)",
    "heft": "heuristic: HEFT-style list scheduling + local search",
}


def choose_solver(pb: "Problem", obj: "Objective") -> str:
    if pb.D == 1:
        return "one"
    allowed = 1
    for row in pb.comp:
        allowed *= sum(t != INF for t in row)
        if allowed > BRUTE_LIMIT:
            break
    if allowed <= BRUTE_LIMIT:
        return "brute"
    if obj.additive and is_chain(pb):
        return "chain-dp"
    if obj.additive and pb.D == 2:
        return "mincut"
    return "heft"


def solve(pb: "Problem", solver: str = "auto") -> tuple:
    """-> (assignment, algorithm text, metrics). Raises ValueError if a solver does not apply."""
    obj = Objective(pb)
    name = choose_solver(pb, obj) if solver == "auto" else solver
    if name in ("chain-dp", "mincut") and not obj.additive:
        raise ValueError(f"{name} solves additive objectives only (latency, cost, energy), not throughput")
    if name == "chain-dp" and not is_chain(pb):
        raise ValueError("chain-dp needs a chain dataflow (each op reads only the previous op's results)")
    if name == "mincut" and pb.D != 2:
        raise ValueError(f"mincut needs exactly two devices, not {pb.D}")
    assign = _run_solver(name, pb, obj)
    algo = ALGORITHMS[name]
    if pb.capacity and over_capacity(pb, assign):
        assign = _repair_capacity(pb, obj, assign)
        algo += " + memory-capacity repair (Lagrangian penalties, heuristic)"
    return assign, algo, metrics(pb, assign)


def _best_splits(pb, obj):
    """For each ordered device pair (a, b): the best plan 'ops [0, k) on a, [k, n) on b'
    over all k (ops b cannot run stay on a; skipped if a cannot run them either)."""
    out = []
    for a in range(pb.D):
        for b in range(pb.D):
            if a == b or any(pb.comp[i][a] == INF and pb.comp[i][b] == INF for i in range(pb.n)):
                continue
            start = [b if pb.comp[i][b] != INF else a for i in range(pb.n)]
            if any(pb.comp[i][d] == INF for i, d in enumerate(start)):
                continue
            st = _State(pb, obj, start)
            best_f, best_a = st.value(), list(st.a)
            for i in range(pb.n):
                if st.a[i] != a and pb.comp[i][a] != INF:
                    st.move([i], a)
                    f = st.value()
                    if f < best_f:
                        best_f, best_a = f, list(st.a)
            out.append(best_a)
    return out


def _pair_mincuts(pb, obj):
    """For each device pair: the exact two-device plan (additive objectives only)."""
    import copy

    out = []
    if not obj.additive:
        return out
    for a, b in itertools.combinations(range(pb.D), 2):
        if any(pb.comp[i][a] == INF and pb.comp[i][b] == INF for i in range(pb.n)):
            continue
        loc = {a: 0, b: 1}
        back = {0: a, 1: b, 2: pb.host}
        sub = copy.copy(pb)
        sub.devices = [pb.devices[a], pb.devices[b]]
        sub.comp = [[row[a], row[b]] for row in pb.comp]
        sub.host = loc.get(pb.host, 2)
        sub.link = lambda x, y, nb: pb.link(back[x], back[y], nb)
        sub.watts = [pb.watts[a], pb.watts[b], pb.watts[pb.host]]
        sub.price = [pb.price[a], pb.price[b], pb.price[pb.host]]
        sub.capacity = None
        sol = mincut(sub, Objective(sub, obj.norms))
        out.append([back[x] for x in sol])
    return out


def _run_solver(name, pb, obj):
    if name == "one":
        return [0] * pb.n
    return {"brute": brute, "chain-dp": chain_dp, "mincut": mincut, "heft": _heft_best}[name](pb, obj)


def _heft_best(pb, obj, check=None):
    """Local search from several starts: the HEFT-style list schedule, each single-device
    plan, the best contiguous split of each device pair, and each pair's exact min-cut
    plan; keep the best."""
    starts = [None] + single_device_plans(pb) + _best_splits(pb, obj) + _pair_mincuts(pb, obj)
    if check:
        starts = [s for s in starts if s is None or check(s)]
    results = [heft(pb, obj, s, check) for s in starts]
    if check:
        results = [r for r in results if check(r)] or results
    return min(results, key=obj)


def _repair_capacity(pb, obj, assign):
    """Penalise weight bytes on over-full devices (Lagrangian multipliers): double the
    multipliers until the plan fits, bisect back towards the smallest that fits, then
    local search among plans that fit."""
    import copy

    wb = [sum(w.values()) for w in pb.weight_bytes] if pb.weight_bytes else [0] * pb.n
    top = max(max(t for t in row if t != INF) for row in pb.comp) / max(1, max(wb))
    base = [0.0] * pb.D
    fits = lambda a: not over_capacity(pb, a)

    def solve_with(t):
        pen = copy.copy(pb)
        pen.comp = [[x + t * base[d] * (wb[i] + 1) if x != INF else INF for d, x in enumerate(row)] for i, row in enumerate(pb.comp)]
        pen.capacity = None
        pobj = Objective(pen, obj.norms)
        return _run_solver(choose_solver(pen, pobj), pen, pobj)

    t, lo, good = 1e-3, 0.0, None
    for _ in range(40):
        for d, _, _ in over_capacity(pb, assign):
            base[d] = top
        assign = solve_with(t)
        if fits(assign):
            good = assign
            break
        lo, t = t, t * 4
    if good is None:
        return assign
    hi = t
    for _ in range(8):
        mid = (lo + hi) / 2
        a = solve_with(mid)
        if fits(a):
            hi = mid
            if obj(a) < obj(good):
                good = a
        else:
            lo = mid
    return heft(pb, obj, good, fits)
