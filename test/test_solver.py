"""The placement solvers against brute force on small random graphs, and constraints."""

import math
import random

import pytest

from polyarch.passes import solver as S

INF = math.inf


def random_problem(rng, n, D, chain=False, host_is_device=True, weights=None, forbid=0.15):
    comp = []
    for _ in range(n):
        row = [rng.choice([1e-5, 1e-4, 1e-3]) * rng.uniform(0.2, 5) for _ in range(D)]
        for d in range(D):
            if rng.random() < forbid:
                row[d] = INF
        if all(t == INF for t in row):
            row[rng.randrange(D)] = rng.uniform(1e-5, 1e-3)
        comp.append(row)
    values = [S.Value(-1, rng.choice([1e3, 1e5, 1e6]), [0])]
    for i in range(n):
        if chain:
            cons = [i + 1] if i + 1 < n else []
        else:
            later = list(range(i + 1, n))
            cons = sorted(rng.sample(later, min(len(later), rng.randint(1, 3)))) if later else []
        values.append(S.Value(i, rng.choice([1e3, 1e5, 1e6, 1e7]), cons, returned=(i == n - 1) or (not cons)))
    if not chain:
        values.append(S.Value(-1, 4e5, sorted(rng.sample(range(n), min(n, 2)))))
    host = 0 if host_is_device else D
    bw = [2e10] + [rng.choice([1e9, 1e10]) for _ in range(D)]
    lat = [0.0] + [2e-5] * D

    def link(a, b, nbytes):
        if a == b:
            return 0.0
        t = 0.0
        for x in (a, b):
            if x != host:
                t += nbytes / bw[x] + lat[x]
        return t

    return S.Problem(
        devices=[f"d{k}" for k in range(D)], comp=comp, values=values, link=link, host=host,
        watts=[rng.uniform(10, 700) for _ in range(D + 1)], price=[rng.uniform(0, 4) for _ in range(D + 1)],
        weights=weights or {"latency": 1.0},
    )


def best_value(pb):
    obj = S.Objective(pb)
    return obj(S.brute(pb, obj)), obj


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("host_is_device", [True, False])
@pytest.mark.parametrize("weights", [{"latency": 1}, {"energy": 1}, {"cost": 1}, {"latency": 1, "energy": 0.5}])
def test_mincut_is_exact_on_two_devices(seed, host_is_device, weights):
    rng = random.Random(seed)
    pb = random_problem(rng, rng.randint(3, 9), 2, host_is_device=host_is_device, weights=weights)
    opt, obj = best_value(pb)
    got = S.mincut(pb, obj)
    assert S.feasible(pb, got)
    assert obj(got) == pytest.approx(opt, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("D", [2, 3])
def test_chain_dp_is_exact_on_chains(seed, D):
    rng = random.Random(100 + seed)
    pb = random_problem(rng, rng.randint(2, 7), D, chain=True, host_is_device=bool(seed % 2))
    assert S.is_chain(pb)
    opt, obj = best_value(pb)
    got = S.chain_dp(pb, obj)
    assert obj(got) == pytest.approx(opt, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("weights", [{"latency": 1}, {"throughput": 1}])
def test_heuristic_is_feasible_and_close_on_three_devices(seed, weights):
    rng = random.Random(200 + seed)
    pb = random_problem(rng, rng.randint(4, 7), 3, weights=weights)
    opt, obj = best_value(pb)
    got = S.heft(pb, obj) if seed % 2 else S._heft_best(pb, obj)
    assert S.feasible(pb, got)
    # Never worse than the best single-device plan, and within 25% of the optimum on these.
    singles = [obj(a) for a in S.single_device_plans(pb)]
    if singles and seed % 2 == 0:
        assert obj(got) <= min(singles) * (1 + 1e-9)
    assert obj(got) <= opt * 1.25 + 1e-12


def test_heuristic_quality_over_many_graphs():
    """Mean gap of heft (best of its starts) to the optimum over 60 random 3-device graphs."""
    gaps = []
    for seed in range(60):
        rng = random.Random(300 + seed)
        pb = random_problem(rng, 7, 3)
        opt, obj = best_value(pb)
        gaps.append(obj(S._heft_best(pb, obj)) / opt)
    assert sum(gaps) / len(gaps) < 1.02
    assert max(gaps) < 1.25


def test_auto_names_the_solver_it_used():
    rng = random.Random(7)
    small = random_problem(rng, 5, 2)
    assert S.solve(small)[1].startswith("exact: enumeration")
    big = random_problem(rng, 40, 2, forbid=0)
    assert S.solve(big)[1] == "exact: minimum s-t cut (two devices)"
    chain = random_problem(rng, 40, 3, chain=True, forbid=0)
    assert S.solve(chain)[1] == "exact: dynamic programming over a chain"
    dag3 = random_problem(rng, 40, 3, forbid=0)
    assert S.solve(dag3)[1].startswith("heuristic: HEFT-style")
    thr = random_problem(rng, 40, 2, forbid=0, weights={"throughput": 1})
    assert S.solve(thr)[1].startswith("heuristic")


def test_solvers_refuse_what_they_cannot_solve():
    rng = random.Random(8)
    pb = random_problem(rng, 6, 3)
    with pytest.raises(ValueError, match="two devices"):
        S.solve(pb, "mincut")
    with pytest.raises(ValueError, match="chain"):
        S.solve(pb, "chain-dp")
    pb.weights = {"throughput": 1}
    with pytest.raises(ValueError, match="additive"):
        S.solve(pb, "mincut")


def test_forbidden_devices_are_never_used():
    rng = random.Random(9)
    for seed in range(10):
        pb = random_problem(random.Random(seed), 30, 2, forbid=0.4)
        a, _, _ = S.solve(pb)
        assert S.feasible(pb, a)


def test_memory_capacity_is_honoured():
    # Two devices; device 1 is fast but can hold only one of the three weights.
    comp = [[1e-3, 1e-5]] * 3
    values = [S.Value(-1, 100, [0]), S.Value(0, 100, [1]), S.Value(1, 100, [2]), S.Value(2, 100, [], True)]
    pb = S.Problem(devices=["cpu", "gpu"], comp=comp, values=values, link=lambda a, b, n: 0.0 if a == b else 1e-6,
                   host=0, watts=[1, 1, 1], price=[0, 0, 0], weight_bytes=[{"w0": 1000}, {"w1": 1000}, {"w2": 1000}],
                   capacity=[10**9, 1500])
    a, algo, _ = S.solve(pb)
    assert "memory-capacity repair" in algo
    assert not S.over_capacity(pb, a)
    assert a.count(1) == 1
