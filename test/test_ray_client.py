"""Ray Client (`cluster="ray://HOST:PORT"`): a driver that is not a node of the cluster.

Ray's servers listen on every interface, so this cluster and its driver run in a network
namespace that has only loopback (`unshare -n`): nothing of it can be reached from, or
reach, another host. A module of its own, so that test_ray.py's cluster has stopped
before this one starts (`ray stop` ends every Ray process of the user)."""

import shutil
import subprocess
import sys

import pytest
import torch

from polyarch.compiler import driver

LOOPBACK_SCRIPT = r"""
import glob, os, sys
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
    if not shutil.which("unshare") or not shutil.which("ip") or subprocess.run(["unshare", "-n", "true"],
                                                                                capture_output=True).returncode:
        pytest.skip("needs `unshare -n` (root, util-linux) and `ip` (iproute2) for a loopback-only network namespace")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    path = tmp_path / "mlp.pab"
    driver.compile(model, (torch.randn(7, 32),), ["cpu", "vulkan"], output=str(path), pins=["0=cpu", "2=vulkan"])
    script = tmp_path / "loopback.py"
    script.write_text(LOOPBACK_SCRIPT)
    r = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
                        str(script), str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "RAY-CLIENT-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-8000:]
