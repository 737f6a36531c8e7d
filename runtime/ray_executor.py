"""Running a bundle across hosts with Ray: one actor per device of the plan.

    bundle = polyarch.runtime.load("m.pab", cluster="ray://head:10001")
    out = bundle(x)                       # or bundle.stream(requests, depth=4)

Each device of the chosen plan gets a Ray actor (a worker process) on a node that offers
it. Nodes say which devices they own through Ray custom resources, one unit per device,
named `polyarch_<device>` (`polyarch_cpu`, `polyarch_vulkan`, `polyarch_cuda_1` for
"cuda:1"):

    ray start --head --resources '{"polyarch_cpu": 1}'                     # host A
    ray start --address A:6379 --resources '{"polyarch_vulkan": 1}'        # host B

An actor holds one unit of its device's resource while the bundle is loaded, so a device
offered once serves one loaded bundle at a time; offer N units (`{"polyarch_vulkan": 2}`)
to let N bundles share it. A bundle whose actors find no free unit within
`placement_timeout` seconds is an error that says which device is taken.

An actor loads only its device's segments (the bundle's bytes travel once through Ray's
object store, so the hosts need polyarch and its runtime, not the file). A call submits
every segment at once: tensors that stay on a device stay in its actor between
segments; a tensor that crosses devices, and every output, is returned by its actor
into the object store and handed to the consumer by reference, so the driver never
touches intermediate tensors. Actors run their segments in submission order, so
`stream` pipelines requests across devices as Ray resolves each dependency.

Without a GPU in the cluster, the Vulkan device of a node is lavapipe (Mesa's CPU
driver), as in a single process."""

import itertools
import os
import shutil
import tempfile
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from .bundle import read_manifest
from .devices import DeviceError, DeviceSpec

__all__ = ["RayBundle", "resource_name", "start_local_cluster"]

RESOURCE_PREFIX = "polyarch_"


def resource_name(device: str) -> str:
    """The Ray custom resource a node offers for a bundle device: 'cuda:1' -> 'polyarch_cuda_1'."""
    spec = DeviceSpec.parse(device)
    return RESOURCE_PREFIX + spec.kind + (f"_{spec.ordinal}" if spec.ordinal else "")


class _Local:
    """An argument that is already in the receiving actor (made there by an earlier segment)."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _Worker:
    """A Ray actor owning one device of a plan: it loads that device's segments and runs them."""

    def __init__(self, device):
        self.device = device
        self.bundle = None
        self.calls = {}

    def load(self, data: bytes, filename: str, plan: str, local_spec: str, trusted_keys: list | None = None) -> dict:
        from .executor import Bundle

        device = self.device
        # Ray hands large byte objects over zero-copy; the bundle is loaded from a file, which
        # goes as soon as it is loaded (the loaded bundle holds its members in memory; an actor
        # ended by ray.kill runs no clean-up).
        folder = tempfile.mkdtemp(prefix="polyarch-ray-bundle-")
        try:
            path = os.path.join(folder, filename)
            with open(path, "wb") as f:
                f.write(data)
            del data
            remap = {device: local_spec} if local_spec else None
            # The signature is checked again here, on the bytes this actor maps (trusted_keys:
            # PEM bytes; the node has no key files).
            self.bundle = Bundle(path, devices=remap, plan=plan, strict=True, only_devices=[device],
                                 trusted_keys=trusted_keys)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def where(self) -> dict:
        import socket

        import ray

        return {"device": self.device, "host": socket.gethostname(), "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()}

    def run(self, call_id: int, index: int, exports: list, *args) -> list:
        """Run step `index` of the schedule for call `call_id`; -> the exported results
        as host arrays (one, a tuple, or None)."""
        from .executor import _Call

        env = self.calls.setdefault(call_id, {})
        step = self.bundle.plan["schedule"][index]
        for name, a in zip(step["args"], args):
            if not isinstance(a, _Local):
                env[name] = a
        call = _Call(time.perf_counter(), False)
        self.bundle._invoke(step, env, call, wait_each=True)
        outs = tuple(self.bundle._to_host(env[n], call, n) for n in exports)
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else outs

    def release(self, call_id: int) -> None:
        self.calls.pop(call_id, None)

    def counters(self) -> dict:
        return self.bundle.counters


class _RayCall:
    __slots__ = ("id", "t0", "outputs", "as_torch")

    def __init__(self, call_id, t0, outputs, as_torch):
        self.id, self.t0, self.outputs, self.as_torch = call_id, t0, outputs, as_torch


class RayBundle:
    """A bundle whose devices are Ray actors. Called like `Bundle`: numpy (or torch) in,
    the same out; `stream(requests, depth)`; `close()` (or `with`) ends the actors.

    cluster   a Ray address: "ray://HOST:PORT" (Ray Client, from anywhere), or "auto" /
              "HOST:PORT" from a node of the cluster
    plan      the plan to run (default: the lowest predicted time whose devices some node offers)
    devices   optional {bundle device: device spec on its node}, as for `load`
    placement_timeout  seconds to wait for a free unit of each device's resource
    trusted_keys  Ed25519 public keys, as for `load`: checked here, and by every actor on
              the bytes it was sent
    """

    def __init__(self, path, cluster, plan=None, devices=None, placement_timeout=60.0, trusted_keys=None):
        try:
            import ray
        except ImportError as e:
            raise DeviceError("cluster= needs Ray, which is not installed",
                              fix="pip install 'ray[client]==2.60.0' (requirements.txt pins it)") from e
        self.path = str(path)
        self.manifest, raw = read_manifest(self.path, raw=True)
        from .signing import check, key_list, read_keys

        self._keys = None
        if key_list(trusted_keys) is not None:  # an empty list or a string is an error, never "no check"
            self._keys = read_keys(trusted_keys)
            check(self.path, self._keys, manifest=raw)
        sig = self.manifest["signature"]
        self.inputs, self.outputs = sig["inputs"], sig["outputs"]
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            try:
                ray.init(address=cluster, namespace="polyarch", log_to_driver=True, logging_level="WARNING")
            except Exception as e:
                if "Starting Ray client server failed" in str(e):
                    raise DeviceError(
                        f"Ray Client's proxy at {cluster} failed to start a server for this connection",
                        fix="see ray_client_server_*.err in the head node's Ray logs; 'epoll_wait error: Bad file "
                            "descriptor' there is a gRPC fork race: start the head node with GRPC_ENABLE_FORK_SUPPORT=0 "
                            "in its environment") from e
                raise DeviceError(f"cannot connect to the Ray cluster at {cluster}: {str(e).strip().splitlines()[0]}",
                                  fix="start one (`ray start --head --resources '{\"polyarch_cpu\": 1}'`) and pass "
                                      "its address (ray://HOST:10001 for Ray Client)") from e
        self.cluster = cluster
        self.workers = {}
        try:
            self._start(ray, plan, devices, placement_timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, ray, plan, devices, placement_timeout):
        self.plan = self._choose(plan, ray.cluster_resources())
        self.plan_name = self.plan["name"]
        self.devices = list(dict.fromkeys(s["device"] for s in self.plan["segments"]))
        self._seg_device = {s["name"]: s["device"] for s in self.plan["segments"]}
        remap = dict(devices or {})
        actor = ray.remote(_Worker)
        self.workers = {d: actor.options(num_cpus=0, resources={resource_name(d): 1}).remote(d) for d in self.devices}
        # Placement first (cheap), so that a device held by other actors is an error here
        # rather than a wait without end; loading may then take as long as it takes.
        pending = {w.where.remote(): d for d, w in self.workers.items()}
        _, waiting = ray.wait(list(pending), num_returns=len(pending), timeout=placement_timeout)
        if waiting:
            free = ray.available_resources()
            total = ray.cluster_resources()
            late = [pending[r] for r in waiting]
            taken = [d for d in late if free.get(resource_name(d), 0) < 1]
            if taken:
                raise DeviceError(
                    f"no free {', '.join(resource_name(d) for d in taken)} on the Ray cluster after "
                    f"{placement_timeout:g} s: all {', '.join(str(int(total.get(resource_name(d), 0))) for d in taken)} "
                    f"unit(s) are held by other actors (another loaded bundle?)",
                    fix="close the other bundle, start another node with the device, or offer more units of it "
                        "(`--resources '{\"" + resource_name(taken[0]) + "\": 2}'` lets two bundles share it)")
            raise DeviceError(f"the Ray actors for {', '.join(late)} did not start within {placement_timeout:g} s",
                              fix="check the cluster's nodes (`ray status`) or pass a longer placement_timeout")
        where = dict(zip((pending[r] for r in pending), ray.get(list(pending))))
        self.placement = {d: where[d] for d in self.devices}
        with open(self.path, "rb") as f:
            data = ray.put(f.read())
        try:
            ray.get([w.load.remote(data, os.path.basename(self.path), self.plan_name, remap.get(d), self._keys)
                     for d, w in self.workers.items()])
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            cause = getattr(e, "cause", None) or e
            what = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise DeviceError(f"a Ray worker of {self.path} failed to load its segments: {what}",
                              fix="check that polyarch and its runtime are installed on every node, and that each "
                                  "node has the devices it offers") from e
        self._exports = self._plan_exports()
        self._ids = itertools.count()
        self.reset_counters()

    def _choose(self, name, resources):
        plans = self.manifest["plans"]
        names = [p["name"] for p in plans]
        if name is not None and name not in names:
            raise DeviceError(f"the bundle has no plan '{name}'", fix=f"choose one of: {', '.join(names)}")

        def missing(p: dict) -> list:
            return [d for d in dict.fromkeys(s["device"] for s in p["segments"]) if resources.get(resource_name(d), 0) < 1]

        if name is not None:
            plan = plans[names.index(name)]
            lack = missing(plan)
            if lack:
                raise DeviceError(f"no node of the Ray cluster offers {', '.join(lack)} for plan '{name}'",
                                  fix="start a node that has it with `ray start --address HEAD:6379 --resources "
                                      + "'{" + ", ".join(f'"{resource_name(d)}": 1' for d in lack) + "}'`")
            self.choice = f"plan '{name}' (named)"
            return plan
        order = sorted(plans, key=lambda p: p.get("plan", {}).get("predicted_us", 0.0))
        for plan in order:
            if not missing(plan):
                self.choice = f"plan '{plan['name']}' (the fastest predicted plan whose devices the cluster offers)"
                return plan
        need = sorted({resource_name(d) for p in plans for d in missing(p)})
        raise DeviceError(f"no plan of {self.path} can run on the Ray cluster: no node offers {', '.join(need)}",
                          fix="start nodes with `ray start ... --resources '{\"polyarch_<device>\": 1}'` for their devices")

    def _plan_exports(self):
        """Per schedule step: the results another device or the caller reads (returned
        through the object store); the rest stay in the actor."""
        sched = self.plan["schedule"]
        device_of = {r: self._seg_device[step["segment"]] for step in sched if step["op"] == "call"
                     for r in step["results"]}
        wanted = set(self.plan["outputs"])
        for step in sched:
            if step["op"] == "transfer":
                wanted.add(step["src"])
            else:
                d = self._seg_device[step["segment"]]
                wanted.update(a for a in step["args"] if device_of.get(a, d) != d)
        return [[r for r in step.get("results", ()) if r in wanted] for step in sched]

    def reset_counters(self) -> None:
        """Zero `counters`: calls, seconds, and tensors handed between actors."""
        self.counters = {"calls": 0, "seconds": 0.0, "transfers": 0}

    def _submit(self, args):
        import ray

        from .executor import _is_torch, check_inputs

        as_torch = any(_is_torch(a) for a in args)
        args = check_inputs(self.path, self.inputs, args)
        call_id = next(self._ids)
        t0 = time.perf_counter()
        env = {f"in{i}": (None, a) for i, a in enumerate(args)}  # name -> (device holding it, value or ref)
        for index, step in enumerate(self.plan["schedule"]):
            if step["op"] == "transfer":
                env[step["dst"]] = (None, env[step["src"]][1])
                self.counters["transfers"] += 1
                continue
            d = self._seg_device[step["segment"]]
            call_args = [_Local(n) if env[n][0] == d else env[n][1] for n in step["args"]]
            exports = self._exports[index]
            refs = self.workers[d].run.options(num_returns=max(1, len(exports))).remote(call_id, index, exports, *call_args)
            refs = [refs] if not isinstance(refs, list) else refs
            got = dict(zip(exports, refs))
            for r in step["results"]:
                env[r] = (d, got.get(r))
        return _RayCall(call_id, t0, [env[n][1] for n in self.plan["outputs"]], as_torch)

    def _collect(self, call):
        import ray

        outs = [ray.get(o) if isinstance(o, ray.ObjectRef) else o for o in call.outputs]
        outs = [np.asarray(o).astype(spec["dtype"], copy=False) for o, spec in zip(outs, self.outputs)]
        for w in self.workers.values():
            w.release.remote(call.id)
        self.counters["calls"] += 1
        self.counters["seconds"] += time.perf_counter() - call.t0
        if call.as_torch:
            import torch

            outs = [torch.from_numpy(np.array(o)) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __call__(self, *args):
        return self._collect(self._submit(args))

    def stream(self, requests: Iterable, depth: int = 2) -> Iterator:
        """Pipelined calls: yields each request's outputs in order, `depth` requests in flight."""
        from .executor import pipelined

        return pipelined(self._submit, self._collect, requests, depth)

    def worker_counters(self) -> dict:
        """Each actor's own counters (segment seconds on its device, transfers it made)."""
        import ray

        return dict(zip(self.workers, ray.get([w.counters.remote() for w in self.workers.values()])))

    def close(self) -> None:
        """End the actors (and the connection, if `load` opened it)."""
        import ray

        for w in getattr(self, "workers", {}).values():
            ray.kill(w)
        self.workers = {}
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_local_cluster(devices: list, object_store_mb: int = 256, units: int = 1) -> Callable:
    """Start a one-node Ray cluster on loopback whose node offers `devices` (bundle device
    names, e.g. ["cpu", "vulkan"]), `units` of each (how many loaded bundles may share a
    device): for trying `cluster=` on one machine, and for tests.
    -> (addresses, stop): addresses {"client": "ray://127.0.0.1:PORT" (Ray Client), "gcs":
    "127.0.0.1:PORT" (for a driver on this machine)}, either one for `load(..., cluster=)`,
    and "logs": the cluster's log folder (its own temporary folder, not /tmp/ray);
    stop: a function that ends the cluster and removes that folder.

    stop() runs `ray stop`, which ends every Ray process of this user on the machine."""
    import json
    import socket
    import subprocess
    import sys

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    # Ray Client's proxy forks a server per connection while its gRPC threads run; with
    # gRPC's fork handlers on, the child sometimes dies before exec (epoll_wait: bad file
    # descriptor): 3 of 12 connections on a loaded 2-core machine, 0 of 32 with them off.
    env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    gcs, client = free_port(), free_port()
    # A folder of its own (short: Ray puts Unix sockets in it), so that its logs are found.
    temp_dir = tempfile.mkdtemp(prefix="polyarch-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    resources = {resource_name(d): units for d in devices}
    cmd = [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
           "--disable-usage-stats",           f"--num-cpus={max(2, len(devices))}", f"--resources={json.dumps(resources)}",
           f"--object-store-memory={object_store_mb * 1024 * 1024}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise DeviceError(f"`ray start` failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}",
                          fix="see `ray start --help`; is another Ray cluster running (`ray stop`)?")

    def stop() -> None:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env)
        shutil.rmtree(temp_dir, ignore_errors=True)

    return {"client": f"ray://127.0.0.1:{client}", "gcs": f"127.0.0.1:{gcs}",
            "logs": os.path.join(temp_dir, "session_latest", "logs")}, stop
