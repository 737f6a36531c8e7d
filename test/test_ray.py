"""The Ray executor: `load(path, cluster="ray://...")` runs each device's segments in a Ray
actor of its own; results equal the single-process runtime's bit for bit (same compiled
code on the same device kinds). The clusters are started and stopped here, one node with
127.0.0.1 as its address offering cpu and vulkan (lavapipe), two units of each (two
bundles at a time): two actors, two worker processes per bundle. Ray's servers listen on
every interface, so the cluster and this process (while the module runs) are in a network
namespace that has only loopback: nothing of it can be reached from, or reach, another
host. The Ray Client test is in test_ray_client.py."""

import os
import time

import numpy as np
import pytest
import torch

import polyarch
from polyarch.compiler import driver
from polyarch.runtime.devices import DeviceError
from polyarch.runtime.ray_executor import resource_name, start_local_cluster

PINS = ["0=cpu", "2=vulkan", "4=cpu"]


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 16)).eval()


@pytest.fixture(scope="module")
def cluster():
    from conftest import enter_loopback_only_network, one_ray_cluster_at_a_time

    try:
        leave = enter_loopback_only_network()
    except OSError as e:
        pytest.skip(f"the Ray tests run in a loopback-only network namespace, which needs root here ({e})")
    try:
        with one_ray_cluster_at_a_time():
            addresses, stop = start_local_cluster(["cpu", "vulkan"], object_store_mb=128, units=2)
            try:
                # The GCS address: this process joins as a driver. ray:// (Ray Client) goes through
                # a proxy that starts a server process per connection: test_ray_client.py.
                yield addresses["gcs"]
            finally:
                stop()
    finally:
        leave()


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory):
    model, x = tiny(), torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("ray") / "mlp.pab"
    driver.compile(model, (x,), ["cpu", "vulkan"], output=str(out), pins=PINS, dynamic_dims=["input0:0:64"])
    return model, x, out


@pytest.fixture(scope="module")
def on_ray(cluster, mlp_bundle):
    with polyarch.runtime.load(mlp_bundle[2], cluster=cluster) as b:
        yield b


def test_resource_names():
    assert resource_name("cpu") == "polyarch_cpu"
    assert resource_name("vulkan") == "polyarch_vulkan"
    assert resource_name("cuda:1@sm_86") == "polyarch_cuda_1"


def test_ray_matches_single_process(on_ray, mlp_bundle):
    model, x, path = mlp_bundle
    b = on_ray
    with polyarch.runtime.load(path) as local:
        # one actor (worker process) per device
        assert set(b.placement) == {"cpu", "vulkan"}
        assert len({p["pid"] for p in b.placement.values()}) == 2
        assert [s["device"] for s in b.plan["segments"]] == ["cpu", "vulkan", "cpu"]
        for n in (32, 5, 64):  # the bundle's batch is dynamic: any size up to 64
            xs = torch.randn(n, 32, generator=torch.Generator().manual_seed(n))
            got = b(xs)
            assert isinstance(got, torch.Tensor) and tuple(got.shape) == (n, 16)
            np.testing.assert_array_equal(got.numpy(), local(xs).numpy())
            np.testing.assert_allclose(got.numpy(), model(xs).detach().numpy(), atol=1e-5, rtol=0)
        got = b(x.numpy())
        assert isinstance(got, np.ndarray)
        # two tensors cross devices per call (cpu -> vulkan -> cpu), through the object store
        assert b.counters["transfers"] == 2 * b.counters["calls"]
        per_worker = b.worker_counters()
        # the actors' copies of the bundle are gone once loaded (the mappings stay)
        import glob
        import tempfile

        assert not glob.glob(f"{tempfile.gettempdir()}/polyarch-ray-bundle-*")
        assert per_worker["vulkan"]["segment_seconds"]["vulkan"] > 0
        assert per_worker["cpu"]["segment_seconds"]["cpu"] > 0


def test_ray_stream_equals_sequential(on_ray):
    xs = [np.random.default_rng(i).standard_normal((8, 32)).astype(np.float32) for i in range(6)]
    seq = [on_ray(x) for x in xs]
    streamed = list(on_ray.stream([(x,) for x in xs], depth=3))
    for a, c in zip(seq, streamed):
        np.testing.assert_array_equal(a, c)


def test_input_checks_apply(on_ray):
    with pytest.raises(polyarch.runtime.bundle.BundleError, match="dimension 0 is 65; this bundle accepts 1 to 64"):
        on_ray(np.zeros((65, 32), np.float32))


def test_a_signed_bundle_on_the_cluster(on_ray, cluster, mlp_bundle, tmp_path):
    """trusted_keys reach the actors as PEM bytes; each checks the bytes it maps."""
    import shutil

    from polyarch.runtime.signing import keygen, sign

    _, x, path = mlp_bundle
    key, pub, _ = keygen(str(tmp_path / "k"))
    signed = str(tmp_path / "signed.pab")
    shutil.copy(path, signed)
    sign(signed, key)
    with polyarch.runtime.load(signed, cluster=cluster, trusted_keys=[pub]) as b:
        np.testing.assert_array_equal(b(x.numpy()), on_ray(x.numpy()))
    with pytest.raises(polyarch.runtime.bundle.BundleError, match="is not signed, and trusted keys were given"):
        polyarch.runtime.load(path, cluster=cluster, trusted_keys=[pub])


def test_cli_run_on_the_cluster(on_ray, mlp_bundle, tmp_path):
    from conftest import cli

    _, x, path = mlp_bundle
    np.save(tmp_path / "x.npy", x.numpy()[:9])
    r = cli("run", str(path), "--cluster", on_ray.cluster, "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
            "-n", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on Ray cluster" in r.stdout and "cpu (actor pid" in r.stdout and "vulkan (actor pid" in r.stdout
    assert "2 tensor(s) handed between actors" in r.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), polyarch.runtime.load(path)(x.numpy()[:9]))
    r = cli("run", str(path), "--cluster", on_ray.cluster, "--trace", str(tmp_path / "t.json"))
    assert r.returncode != 0 and "--trace and --strict are not supported with --cluster" in r.stderr


def test_a_device_no_node_offers(on_ray, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "two_cpus.pab"
    driver.compile(model, (torch.ones(2, 8),), ["cpu", "cpu:1"], output=str(path), pins=["0=cpu", "2=cpu:1"])
    with pytest.raises(DeviceError, match=r"no plan of .* can run on the Ray cluster: no node offers polyarch_cpu_1"):
        polyarch.runtime.load(path, cluster=on_ray.cluster)
    with pytest.raises(DeviceError, match=r"no node of the Ray cluster offers cpu:1 for plan 'cpu\+cpu:1'.*"
                                          r"--resources '\{\"polyarch_cpu_1\": 1\}'"):
        polyarch.runtime.load(path, cluster=on_ray.cluster, plan="cpu+cpu:1")


def test_a_device_held_by_other_bundles(on_ray, mlp_bundle):
    """Each device is offered twice: on_ray holds one unit of each, a second bundle the
    other; a third finds none free and says so instead of waiting without end."""
    from polyarch.runtime.ray_executor import RayBundle

    with RayBundle(mlp_bundle[2], on_ray.cluster) as second:
        assert second(np.ones((3, 32), np.float32)).shape == (3, 16)
        with pytest.raises(DeviceError, match=r"no free polyarch_cpu, polyarch_vulkan on the Ray cluster after 2 s: "
                                              r"all 2, 2 unit\(s\) are held by other actors"):
            RayBundle(mlp_bundle[2], on_ray.cluster, placement_timeout=2)
    # the units are free again once a bundle is closed
    with RayBundle(mlp_bundle[2], on_ray.cluster, placement_timeout=30) as third:
        assert third(np.ones((3, 32), np.float32)).shape == (3, 16)


def test_serve_on_ray_serve(on_ray, mlp_bundle):
    """`polyarch serve --ray`: the app deployed on Ray Serve, its replica placed through the
    polyarch_<device> resources (on_ray holds one unit of each device, the replica the other);
    Triton's client gets the in-process runtime's outputs bit for bit through Ray Serve's proxy;
    a second deployment finds no unit free and says so in one line; SIGTERM takes the app down
    and frees the units."""
    import signal
    import socket
    import subprocess
    import sys

    import ray
    import tritonclient.http as th

    from conftest import cli

    _, x, path = mlp_bundle
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "polyarch")
    p = subprocess.Popen([exe, "serve", str(path), "--ray", on_ray.cluster, "--replicas", "1", "--port", str(port)],
                         stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in p.stderr:
            lines.append(line)
            if "polyarch: serving" in line or line.startswith("Error"):
                break
        assert "polyarch: serving mlp at" in lines[-1] and "1 replica(s)" in lines[-1], "".join(lines[-20:])
        free = ray.available_resources()
        assert free.get("polyarch_cpu", 0) == 0 and free.get("polyarch_vulkan", 0) == 0  # on_ray + the replica
        c = th.InferenceServerClient(f"127.0.0.1:{port}")
        a = x.numpy()[:5]
        b = polyarch.runtime.load(path)
        want, name, out = b(a), b.inputs[0]["name"], b.outputs[0]["name"]
        i = th.InferInput(name, list(a.shape), "FP32")
        i.set_data_from_numpy(a)
        np.testing.assert_array_equal(c.infer("mlp", [i]).as_numpy(out), want)
        c.close()
        r = cli("serve", str(path), "--ray", on_ray.cluster, "--replicas", "2", "--port", str(port + 1))
        assert r.returncode == 1 and "2 replica(s) of mlp need 2 free unit(s) of polyarch_cpu, polyarch_vulkan" \
            in r.stderr, r.stderr[-2000:]
        p.send_signal(signal.SIGTERM)
        assert p.wait(120) == 0
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.time() + 60
    while ray.available_resources().get("polyarch_cpu", 0) < 1 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("polyarch_cpu", 0) == 1
