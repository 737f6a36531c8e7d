"""Per-transfer overhead of the Ray executor against in-process execution, same bundle.

A chain of 8 Linear layers pinned alternately to two CPU devices ("cpu" and "cpu:1"):
8 segments, each handing its activation to the other device. In process both devices
are IREE local-task devices of one process; on Ray each is an actor (worker process) of a
one-node local cluster, and every hand-over goes through Ray's object store. The
overhead per transfer is (Ray time - in-process time) / hand-overs per call, at three
payload sizes. Also through Ray Client (ray://) where it connects.

    .venv/bin/python bench/ray_overhead.py [--calls 30]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import polyarch  # noqa: E402
from polyarch.compiler import driver  # noqa: E402
from polyarch.runtime.ray_executor import start_local_cluster  # noqa: E402

LAYERS, WIDTH = 8, 256


def timed(fn, x, calls):
    fn(x)
    fn(x)
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]).eval()
    pins = [f"{i}={'cpu' if i % 2 == 0 else 'cpu:1'}" for i in range(LAYERS)]
    tmp = tempfile.mkdtemp(prefix="polyarch-ray-bench-")
    path = os.path.join(tmp, "chain.pab")
    driver.compile(model, (torch.ones(16, WIDTH),), ["cpu", "cpu:1"], output=path, pins=pins,
                   dynamic_dims=["input0:0:4096"])
    local = polyarch.runtime.load(path)
    hops = len(local.plan["segments"])
    print(f"chain of {LAYERS} Linear({WIDTH}) on cpu / cpu:1: {hops} segments, {hops - 1} device-to-device "
          f"hand-overs + input + output per call; median of {args.calls} calls")
    addresses, stop = start_local_cluster(["cpu", "cpu:1"], object_store_mb=512)
    rows = []
    try:
        for kind in ("gcs", "client"):
            try:
                remote = polyarch.runtime.load(path, cluster=addresses[kind])
            except Exception as e:  # Ray Client's proxy can fail to start its per-connection server
                print(f"{kind}: could not connect ({str(e).splitlines()[0]})")
                continue
            try:
                for batch in (16, 1024, 4096):
                    x = np.random.default_rng(batch).standard_normal((batch, WIDTH)).astype(np.float32)
                    assert np.array_equal(remote(x), local(x))
                    t_local = timed(local, x, args.calls)
                    t_ray = timed(remote, x, args.calls)
                    per = (t_ray - t_local) / (hops + 1)  # hand-overs, the input's and the output's
                    rows.append((kind, batch, x.nbytes, t_local, t_ray, per))
                    print(f"{kind:6s} payload {x.nbytes / 1024:8.0f} KiB: in-process {t_local * 1e3:7.2f} ms, "
                          f"Ray {t_ray * 1e3:7.2f} ms = {t_ray / t_local:5.2f}x; overhead per transfer "
                          f"{per * 1e3:6.2f} ms", flush=True)
            finally:
                remote.close()
    finally:
        stop()
    return rows


if __name__ == "__main__":
    main()
