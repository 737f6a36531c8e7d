"""`polyarch serve m.pab --ray ADDRESS --replicas N`: the same app (server/app.py) deployed on
Ray Serve, one replica per loaded bundle.

Each replica gets the bundle's bytes (nodes need not share a file system), writes them to a
private temporary file and serves them with `Served` + `create_app`, exactly as `polyarch
serve` does on one host: Ray Serve's HTTP proxy on the head node spreads requests over the
replicas. Replicas are placed through the same custom resources as the Ray executor
(runtime/ray_executor.py): a replica of a plan over cpu and vulkan asks for one unit each of
`polyarch_cpu` and `polyarch_vulkan`, so it lands on a node that offers those devices, and
a device offered once serves one replica. Too few units for the replicas asked is an error
before anything is deployed (Ray Serve would wait for them without end)."""

import os
import tempfile

from ..errors import DeviceError
from ..runtime.bundle import read_manifest
from ..runtime.ray_executor import resource_name

__all__ = ["deploy", "plan_devices"]

APP = "polyarch"


def plan_devices(manifest: dict, plans) -> list:
    """The devices a replica serving `plans` (None: the fastest predicted plan; "all"; names) holds."""
    ps = manifest["plans"]
    if plans is None:
        ps = [min(ps, key=lambda p: p.get("plan", {}).get("predicted_us", 0.0))]
    elif plans != "all":
        ps = [p for p in ps if p["name"] in plans]
    return list(dict.fromkeys(s["device"] for p in ps for s in p["segments"]))


class Replica:
    """A Ray Serve replica: the bundle's bytes loaded and served (its app built at replica start)."""

    def __init__(self, data: bytes, filename: str, options: dict):
        from .app import Served

        fd, self.path = tempfile.mkstemp(prefix="polyarch-serve-", suffix="-" + filename)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.served = Served(self.path, **options)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.served)

    def __del__(self):
        try:
            os.unlink(self.path)
        except OSError:
            pass


def deploy(path: str, address: str, replicas: int, port: int, host: str = "127.0.0.1", plans=None,
           trusted_keys=None, **options) -> str:
    """Deploy `path` on the Ray cluster at `address` with `replicas` replicas behind Ray Serve's
    proxy on host:port. options: as `Served` takes them. -> the proxy's URL."""
    import ray
    from ray import serve

    manifest = read_manifest(path)
    if trusted_keys is not None:  # checked here, and by each replica on the bytes it was sent
        from ..runtime.signing import check, key_list, read_keys

        trusted_keys = read_keys(key_list(trusted_keys))
        check(path, trusted_keys)
    name = options.get("name") or os.path.splitext(os.path.basename(path))[0]
    devices = plan_devices(manifest, plans)
    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace="polyarch", logging_level="WARNING", log_to_driver=False)
        except Exception as e:
            raise DeviceError(f"cannot connect to the Ray cluster at {address}: {str(e).strip().splitlines()[0]}",
                              fix="start one (`ray start --head --resources '{\"polyarch_cpu\": 1}'`) and pass its "
                                  "address") from e
    free = ray.available_resources()
    short = [d for d in devices if free.get(resource_name(d), 0) < replicas]
    if short:
        have = ", ".join(f"{resource_name(d)} x{free.get(resource_name(d), 0):g}" for d in short)
        raise DeviceError(f"{replicas} replica(s) of {name} need {replicas} free unit(s) of "
                          f"{', '.join(resource_name(d) for d in short)}; the Ray cluster has {have} free",
                          fix="ask for fewer --replicas, free the devices (another bundle holds them?), or start "
                              "nodes that offer them (`ray start --address HEAD:6379 --resources "
                              "'{\"" + resource_name(short[0]) + "\": 1}'`)")
    serve.start(http_options={"host": host, "port": port}, detached=False)
    with open(path, "rb") as f:
        data = f.read()
    deployment = serve.deployment(serve.ingress()(Replica), name=name, num_replicas=replicas,
                                  ray_actor_options={"num_cpus": 0,
                                                     "resources": {resource_name(d): 1 for d in devices}},
                                  max_ongoing_requests=max(8, options.get("max_queue", 64)))
    opts = dict(options, name=name, plans=plans, trusted_keys=trusted_keys)
    serve.run(deployment.bind(data, os.path.basename(path), opts), name=APP, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def undeploy() -> None:
    """Remove the app and stop Ray Serve (the cluster stays)."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
