"""`polyarch serve`: one bundle behind an HTTP server (FastAPI on uvicorn).

    app = create_app(Served("m.pab", max_batch=16))
    uvicorn.run(app, port=8000)

Speaks the KServe v2 inference protocol (server/kserve.py: what `tritonclient.http` sends),
for a --generate bundle the OpenAI completions API (server/completions.py: what the `openai`
client sends), and Prometheus metrics at /metrics (server/metrics.py). Each plan served has
one worker thread that owns its loaded bundle (runtime/batching.py): calls are batched
dynamically where the bundle's batch dimension is dynamic, generation is batched
continuously. A full queue answers 503 with Retry-After; a request that waited past its
timeout answers 504; a bad request answers 400 naming the field; a request that fails in
the runtime answers 500 alone while the server goes on serving."""

import asyncio
import contextlib
import json
import logging
import os
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import BundleError, DeviceError, PolyarchError
from ..runtime import load
from ..runtime.batching import CallWorker, GenerationWorker, Overloaded
from ..runtime.bundle import read_manifest
from ..runtime.executor import plan_time_us
from ..version import __version__
from .kserve import RequestError, encode_infer, parse_infer, tensor_metadata
from .metrics import Metrics
from .routing import order

__all__ = ["Served", "create_app"]

log = logging.getLogger("polyarch.server")


class _Plan:
    """One plan served: its loaded bundle, its worker, and its time per call as fixed + per-row
    seconds (two calls timed at load: 1 row and a full batch; the per-row part then follows
    the calls measured while serving)."""

    def __init__(self, bundle, worker, fixed_s, per_row_s):
        self.bundle, self.worker, self.fixed_s, self.per_row_s = bundle, worker, fixed_s, per_row_s
        self.name = bundle.plan_name

    def seconds(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows

    def measured(self, rows: int, seconds: float) -> None:
        """A call of `rows` rows took `seconds` (from the worker thread)."""
        self.per_row_s = 0.8 * self.per_row_s + 0.2 * max(0.0, seconds - self.fixed_s) / max(1, rows)

    def free_at_s(self, rows: int = 1) -> float:
        """When a request of `rows` rows sent now would be done, by prediction: the rows queued and
        in flight ahead of it (in calls of at most max_batch rows), then its own call."""
        ahead = self.worker.rows_ahead
        calls = -(-ahead // max(1, self.worker.max_batch))
        return calls * self.fixed_s + self.per_row_s * ahead + self.seconds(rows)


class Served:
    """A bundle loaded for serving. plans: None serves the plan `load` chooses; "all" each plan
    whose devices this host has (requests routed to the one free soonest by prediction); or
    a list of plan names. The other arguments as `polyarch serve --help` says."""

    def __init__(self, path, name=None, plans=None, max_batch=None, max_delay_ms=0.0, max_queue=64,
                 timeout_s=60.0, trusted_keys=None):
        self.path = str(path)
        manifest = read_manifest(self.path)
        self.name = name or os.path.splitext(os.path.basename(self.path))[0]
        self.version = "1"
        self.timeout_s = timeout_s
        self.metrics = Metrics()
        self.generate = "generate" in manifest
        all_plans = [p["name"] for p in manifest["plans"]]
        if plans is None:
            names = [None]
        elif plans == "all":
            names = all_plans
        else:
            unknown = [p for p in plans if p not in all_plans]
            if unknown:
                raise BundleError(f"{self.path} has no plan {unknown[0]!r}", fix="its plans: " + ", ".join(all_plans))
            names = list(plans)
        self.plans = []
        try:
            for pname in names:
                try:
                    b = load(self.path, plan=pname, strict=pname is not None, trusted_keys=trusted_keys)
                except DeviceError as e:
                    if plans == "all":
                        log.warning("plan %s is not served: %s", pname, e)
                        continue
                    raise
                if self.generate:
                    w = GenerationWorker(b, max_queue=max_queue, timeout_s=timeout_s,
                                         on_step=lambda active, s, d: self.metrics.step(active, s, d["segment_seconds"]))
                    self.plans.append(_Plan(b, w, 0.0, 0.0))
                else:
                    w = CallWorker(b, max_batch=max_batch, max_delay_s=max_delay_ms / 1e3, max_queue=max_queue,
                                   timeout_s=timeout_s)
                    fixed, per_row = _call_model(b, w.max_batch if w.batchable else 1)
                    plan = _Plan(b, w, fixed, per_row)

                    def on_call(n, rows, s, d, plan=plan):
                        plan.measured(rows, s)
                        self.metrics.call(plan.name, n, rows, s, d)

                    w.on_call = on_call
                    self.plans.append(plan)
                if self.generate:
                    break  # one decode batch: generation is served by one plan
        except BaseException:
            self.close()
            raise
        if not self.plans:
            raise BundleError(f"none of the plans of {self.path} can run on this host's devices",
                              fix="see `polyarch inspect` for the devices each plan needs")
        first = self.plans[0].bundle
        self.inputs, self.outputs = first.inputs, first.outputs
        self.manifest = first.manifest
        self.ready = True

    @property
    def batching(self) -> bool:
        return not self.generate and self.plans[0].worker.max_batch > 1

    def by_prediction(self, rows: int = 1) -> list:
        """The plans, the one that would finish a request of `rows` rows first leading (the rows
        queued ahead of it x measured time per row and per call): where the first one's queue is
        full, the request goes to the next (a spike spills onto the other device sets)."""
        return order(self.plans, rows)

    def close(self, timeout_s=None) -> None:
        """Finish the work in flight, then release the bundles."""
        self.ready = False
        for p in self.plans:
            p.worker.close(timeout_s)
        for p in self.plans:
            p.bundle.close()
        self.plans = []


def _call_model(b, max_rows: int) -> tuple:
    """(fixed, per-row) seconds of a call of a plain bundle: calls on zeros (dynamic dimensions at
    their least, then the batch dimension at max_rows) timed after a first one. What routing
    starts from, rather than the compile-time prediction (a plan on a slow device predicted
    fast drew requests until its first calls came back). Zeros that are no valid input (an
    index check): the plan's prediction, all fixed."""
    from ..runtime.dtypes import np_dtype

    def zeros(rows):
        out = []
        for spec in b.inputs:
            low = {d["dim"]: d.get("min") or 1 for d in spec.get("dynamic", ())}
            shape = [low.get(k, n) for k, n in enumerate(spec["shape"])]
            if rows is not None and 0 in low:
                shape[0] = rows
            out.append(np.zeros(shape, np_dtype(spec["dtype"])))
        return out

    def timed(args):
        t = time.perf_counter()
        b(*args)
        return time.perf_counter() - t

    try:
        one = zeros(None)
        b(*one)
        t1 = timed(one)
        if max_rows <= 1:
            return t1, 0.0
        full = zeros(max_rows)
        b(*full)
        tn = timed(full)
        per_row = max(0.0, tn - t1) / (max_rows - 1)
        return max(0.0, t1 - per_row), per_row
    except Exception:  # noqa: BLE001 (zeros may trip an index check: the prediction stands)
        return plan_time_us(b.plan) / 1e6, 0.0
    finally:
        b.reset_counters()


def _error(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(served: Served) -> FastAPI:
    """The ASGI app serving `served` (closed when the app shuts down)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        served.close()  # uvicorn has let the requests in flight finish

    app = FastAPI(title="polyarch", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    m = served.metrics
    app.state.served = served

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        m.in_flight.inc()
        try:
            response = await call_next(request)
        finally:
            m.in_flight.dec()
        endpoint = _endpoint(request.url.path)
        if endpoint != "metrics":
            m.requests.labels(endpoint, str(response.status_code)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.get("/v2")
    async def server_metadata():
        return {"name": "polyarch", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if served.ready else 503)

    def _model(name, version):
        if name != served.name:
            raise RequestError(f"no model {name!r} here (this server serves {served.name!r})", "model", 404)
        if version not in (None, "", served.version):
            raise RequestError(f"model {name!r} has no version {version!r} (its version: {served.version})",
                               "version", 404)

    async def model_metadata(name: str, version: str | None = None):
        try:
            _model(name, version)
        except RequestError as e:
            return _error(e.status, str(e))
        return {"name": served.name, "versions": [served.version], "platform": "polyarch",
                "inputs": [tensor_metadata(s) for s in served.inputs],
                "outputs": [tensor_metadata(s) for s in served.outputs],
                "parameters": {"plans": [p.name for p in served.plans], "max_batch": served.plans[0].worker.max_batch
                               if not served.generate else None}}

    async def model_ready(name: str, version: str | None = None):
        try:
            _model(name, version)
        except RequestError as e:
            return _error(e.status, str(e))
        return Response(status_code=200 if served.ready else 503)

    async def infer(request: Request, name: str, version: str | None = None):
        try:
            _model(name, version)
            if served.generate:
                raise RequestError("this bundle is a language model (compiled with --generate): ask it for "
                                   "completions at /v1/completions", "model", 400)
            body = await request.body()
            rid, args, asked, binary = parse_infer(body, request.headers.get("Inference-Header-Content-Length"),
                                                   served.inputs)
        except RequestError as e:
            m.errors.labels("infer", "not_found" if e.status == 404 else "bad_request").inc()
            return _error(e.status, str(e))
        rows = int(args[0].shape[0]) if args and args[0].ndim else 1
        fut, refused = None, None
        for plan in served.by_prediction(rows):  # the one free soonest; a full queue spills to the next
            try:
                fut = plan.worker.submit(args)
            except Overloaded as e:
                refused = e
                continue
            except PolyarchError as e:  # the input check: shapes, dtypes, index ranges
                m.errors.labels("infer", "bad_request").inc()
                return _error(400, str(e))
            finally:
                m.queue_depth.labels(plan.name).set(plan.worker.depth)
            m.plan_requests.labels(plan.name).inc()
            break
        if fut is None:
            m.errors.labels("infer", "overloaded").inc()
            return _error(503, str(refused), {"Retry-After": str(int(np.ceil(refused.retry_after_s)))})
        try:
            outs = await asyncio.wait_for(asyncio.wrap_future(fut), served.timeout_s)
        except (TimeoutError, asyncio.TimeoutError) as e:
            fut.cancel()
            m.errors.labels("infer", "timeout").inc()
            return _error(504, str(e) or f"no answer within the request timeout ({served.timeout_s} s)")
        except PolyarchError as e:  # found while it ran, caused by its data (an index computed out of range)
            m.errors.labels("infer", "runtime").inc()
            return _error(400, str(e))
        except Exception as e:
            m.errors.labels("infer", "runtime").inc()
            log.warning("request failed in the runtime: %s", e)
            return _error(500, f"{type(e).__name__}: {e}")
        try:
            content, headers = encode_infer(served.name, served.version, rid, served.outputs, outs, asked, binary)
        except RequestError as e:
            m.errors.labels("infer", "bad_request").inc()
            return _error(e.status, str(e))
        return Response(content, headers=headers)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, model_metadata, methods=["GET"])
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        app.add_api_route(prefix + "/infer", infer, methods=["POST"])

    @app.get("/metrics")
    async def metrics():
        for p in served.plans:
            m.queue_depth.labels(p.name).set(p.worker.depth)
        m.split_batches.set(sum(getattr(p.worker, "split_batches", 0) for p in served.plans))
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    if served.generate:
        from .completions import add_routes

        add_routes(app, served)
    return app


def _endpoint(path: str) -> str:
    """A metrics label for a request path (bounded: no model names or ids in it)."""
    if path.startswith("/v2/models/"):
        return "infer" if path.endswith("/infer") else "ready" if path.endswith("/ready") else "metadata"
    if path.startswith("/v2/health"):
        return "health"
    if path.startswith("/v1/completions"):
        return "completions"
    if path.startswith("/v1/chat"):
        return "chat"
    if path.startswith("/v1/models"):
        return "models"
    return {"/metrics": "metrics", "/v2": "server"}.get(path, "other")
