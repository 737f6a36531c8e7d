"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own per app."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("polyarch_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "code"], registry=r)
        self.errors = Counter("polyarch_request_errors", "Requests that failed, by endpoint and cause "
                              "(bad_request, overloaded, timeout, runtime)", ["endpoint", "cause"], registry=r)
        self.latency = Histogram("polyarch_request_latency_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.queue_depth = Gauge("polyarch_queue_depth", "Requests waiting for their plan's worker", ["plan"], registry=r)
        self.in_flight = Gauge("polyarch_in_flight", "Requests being run or streamed", registry=r)
        self.plan_requests = Counter("polyarch_plan_requests", "Requests routed to each plan", ["plan"], registry=r)
        self.batch_requests = Histogram("polyarch_batch_requests", "Requests per bundle call (dynamic batching)",
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_rows = Histogram("polyarch_batch_rows", "Rows per bundle call (dynamic batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.split_batches = Gauge("polyarch_split_batches", "Batched calls that failed and were run again request "
                                   "by request (so that only the failing request gets the error)", registry=r)
        self.device_busy = Counter("polyarch_device_busy_seconds", "Seconds each device spent running segments",
                                   ["device"], registry=r)
        self.bytes_moved = Counter("polyarch_bytes_moved", "Bytes moved between devices and the host", registry=r)
        self.transfers = Counter("polyarch_transfers", "Tensor transfers between devices and the host", registry=r)
        self.tokens = Counter("polyarch_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("polyarch_time_to_first_token_seconds", "Time from a completion's arrival to its "
                              "first token", buckets=_LATENCY, registry=r)
        self.active_sequences = Gauge("polyarch_active_sequences", "Sequences in the decode batch", registry=r)
        self.decode_step = Histogram("polyarch_decode_step_seconds", "Time of one decode step of the batch",
                                     buckets=_LATENCY, registry=r)

    def call(self, plan, requests, rows, seconds, delta):
        """After a bundle call (runtime/batching.CallWorker's on_call)."""
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        for device, s in delta["segment_seconds"].items():
            if s > 0:
                self.device_busy.labels(device).inc(s)
        self.bytes_moved.inc(max(0, delta["bytes_moved"]))
        self.transfers.inc(max(0, delta["transfers"]))

    def step(self, active, seconds, busy):
        """After a decode step (runtime/batching.GenerationWorker's on_step)."""
        self.active_sequences.set(active)
        self.decode_step.observe(seconds)
        for device, s in busy.items():
            if s > 0:
                self.device_busy.labels(device).inc(s)
