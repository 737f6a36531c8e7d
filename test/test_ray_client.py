"""Ray Client (`cluster="ray://HOST:PORT"`): a driver that is not a node of the cluster.

Ray's servers listen on every interface, so this cluster and its driver run in a process
of their own, in a network namespace that has only loopback: nothing of it can be
reached from, or reach, another host. A module of its own, so that test_ray.py's cluster
has stopped before this one starts (`ray stop` ends every Ray process of the user; on
pytest-xdist's workers `one_ray_cluster_at_a_time` keeps them apart)."""

import os
import subprocess
import sys

import pytest
import torch

from polyarch.compiler import driver

LOOPBACK_SCRIPT = r"""
import glob, os, sys
sys.path.insert(0, sys.argv[2])
from conftest import enter_loopback_only_network
enter_loopback_only_network()
import numpy as np
import polyarch
from polyarch.runtime.ray_executor import start_local_cluster

path = sys.argv[1]
x = np.random.default_rng(0).standard_normal((7, 32)).astype(np.float32)
expected = polyarch.runtime.load(path)(x)
addresses, stop = start_local_cluster(["cpu", "vulkan"], object_store_mb=128)
try:
    assert addresses["client"].startswith("ray://127.0.0.1:")
    try:
        with polyarch.runtime.load(path, cluster=addresses["client"]) as b:
            got = b(x)
            assert len({p["pid"] for p in b.placement.values()}) == 2
    except Exception:
        # what Ray Client's proxy and its per-connection servers logged
        for f in sorted(glob.glob(os.path.join(addresses["logs"], "ray_client_server*"))):
            print(f"--- {os.path.basename(f)}\n" + open(f, errors="replace").read()[-3000:], file=sys.stderr)
        raise
    assert np.array_equal(got, expected), float(np.abs(got - expected).max())
    print("RAY-CLIENT-OK")
finally:
    stop()
"""


def test_ray_client_in_a_loopback_only_network(tmp_path):
    from conftest import enter_loopback_only_network

    try:  # can this process make a network namespace? (the script's own process will)
        enter_loopback_only_network()()
    except OSError as e:
        pytest.skip(f"the Ray tests run in a loopback-only network namespace, which needs root here ({e})")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    path = tmp_path / "mlp.pab"
    driver.compile(model, (torch.randn(7, 32),), ["cpu", "vulkan"], output=str(path), pins=["0=cpu", "2=vulkan"])
    script = tmp_path / "loopback.py"
    script.write_text(LOOPBACK_SCRIPT)
    from conftest import one_ray_cluster_at_a_time

    with one_ray_cluster_at_a_time():
        r = subprocess.run([sys.executable, str(script), str(path), os.path.dirname(os.path.abspath(__file__))],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "RAY-CLIENT-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-8000:]
