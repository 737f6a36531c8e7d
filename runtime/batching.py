"""Serving many callers from one loaded bundle: requests queue (bounded) for one worker
thread that owns the bundle.

    w = CallWorker(bundle, max_batch=16)                       # a bundle with a dynamic batch dim
    fut = w.submit([x])                                        # concurrent.futures.Future -> outputs
    s = GenerationWorker(bundle)                               # a --generate bundle
    req = s.submit([1, 2, 3], max_new_tokens=32, on_token=print)

CallWorker is a dynamic batcher (Triton's is the anchor): a bundle whose inputs all have a
dynamic leading dimension of one symbol, and whose outputs all lead with that symbol, is
called once for several queued requests, their rows concatenated (up to max_batch rows: the
requests that queued while the previous call ran, and those that come within max_delay_s of
the first), and each request gets its own rows of
the outputs back. A bundle without such a dimension runs its requests one by one. A request
that fails its input check fails alone before it is queued; a batched call that fails is
run again request by request, so that only the request that fails gets the error.

GenerationWorker is continuous batching (vLLM's scheduler is the anchor): the bundle's decode
batch has `batch` slots; between decode steps a waiting request is prefilled into a free slot
(its first token comes from that prefill), every step decodes the slots in use, and a
sequence that ends frees its slot for the next request at once. Each request samples with its
own settings and its own seeded generator, so its tokens are those `Bundle.generate` gives for
the same prompt and settings. A step whose sequences are all greedy reads back decode's own
greedy tokens (`Generator.start_decode`), not the logits. (A bundle with a draft model decodes
plainly here.)

Both refuse a request when their queue is full (`Overloaded`, with a retry-after estimate)
and drop one that waited past its deadline (`TimeoutError`); `close()` finishes the work in
flight, then stops the thread."""

import concurrent.futures
import queue
import threading
import time
from typing import Callable, Iterable

import numpy as np

from ..errors import PolyarchError
from .executor import check_inputs
from .generate import Generator, _check_sampling, sample

__all__ = ["CallWorker", "GenerationWorker", "Overloaded", "batch_dimension"]


class Overloaded(PolyarchError):
    """The worker's queue is full: come back after `retry_after_s`."""

    def __init__(self, depth, retry_after_s):
        self.retry_after_s = retry_after_s
        super().__init__(f"the server's queue is full ({depth} requests waiting)",
                         fix=f"retry after {retry_after_s:.0f} s, or start the server with a larger --max-queue")


def batch_dimension(inputs: list, outputs: list) -> "int | None":
    """The largest batch a bundle's signature allows if every input has a dynamic dimension 0 of
    one symbol and every output leads with that symbol (its `max`, or 0 for no bound); else None."""
    if not inputs or not outputs:
        return None
    dims = [next((d for d in spec.get("dynamic", ()) if d["dim"] == 0), None) for spec in inputs]
    symbols = {d.get("symbol") for d in dims if d is not None}
    if any(d is None for d in dims) or len(symbols) != 1 or None in symbols:
        return None
    sym = symbols.pop()
    for spec in outputs:
        lead = next((d for d in spec.get("dynamic", ()) if d["dim"] == 0), None)
        if lead is None or lead.get("expr") != sym:
            return None
    bounds = [d.get("max") for d in dims if d.get("max") is not None]
    return min(bounds) if bounds else 0


class _Worker:
    """A bounded queue and one thread; subclasses define `_loop`."""

    def __init__(self, bundle, max_queue: int, timeout_s: float | None, name: str):
        if max_queue < 1:
            raise PolyarchError(f"max_queue={max_queue}", fix="give 1 or more")
        self.bundle, self.timeout_s = bundle, timeout_s
        self._queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._call_s = None  # measured seconds per call (moving average): the retry-after estimate
        self.in_flight = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet started)."""
        return self._queue.qsize()

    def predicted_wait_s(self) -> float:
        """When a request queued now would start, by measurement: the requests ahead of it
        (waiting and in flight) times the measured time per call."""
        return (self.depth + self.in_flight) * (self._call_s or 0.0)

    def _timed(self, seconds):
        self._call_s = seconds if self._call_s is None else 0.8 * self._call_s + 0.2 * seconds

    def _put(self, item):
        if self._stop.is_set():
            raise PolyarchError("the server is shutting down", fix="send the request to another replica")
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise Overloaded(self._queue.qsize(), max(1.0, self.predicted_wait_s())) from None

    def _expired(self, deadline):
        return deadline is not None and time.monotonic() > deadline

    def _timed_out(self):
        return TimeoutError(f"the request waited more than its timeout ({self.timeout_s} s) in the queue")

    def _deadline(self, timeout_s):
        t = self.timeout_s if timeout_s is None else timeout_s
        return None if t is None else time.monotonic() + t

    def _run(self):
        try:
            self._loop()
        except BaseException as e:  # the thread must never die silently: fail what is queued
            self._stop.set()
            self._fail_all(e)

    def _fail_all(self, err):
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._fail(item, err)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, finish those queued and in flight, stop the thread."""
        self._stop.set()
        self._thread.join(timeout_s)


class _Call:
    __slots__ = ("args", "rows", "future", "deadline")

    def __init__(self, args, rows, deadline):
        self.args, self.rows, self.deadline = args, rows, deadline
        self.future = concurrent.futures.Future()


class CallWorker(_Worker):
    """Calls of a plain bundle, batched where its signature allows (module docstring).

    max_batch: rows per call at most (default: the bundle's bound on its batch dimension, or
    64 when it has none); 1 turns batching off. max_delay_s: how long the first request of a
    batch waits for others. on_call(requests, rows, seconds, counters_delta): called after
    each bundle call (metrics)."""

    def __init__(self, bundle, max_batch: int | None = None, max_delay_s: float = 0.0, max_queue: int = 64,
                 timeout_s: float | None = 60.0, on_call: Callable | None = None):
        bound = batch_dimension(bundle.inputs, bundle.outputs)
        self.batchable = bound is not None
        if max_batch is not None and max_batch < 1:
            raise PolyarchError(f"max_batch={max_batch}", fix="give 1 or more")
        if bound is None:
            limit = 1
        else:
            limit = max_batch or bound or 64
            if bound:
                limit = min(limit, bound)
        self.max_batch, self.max_delay_s, self.on_call = limit, max_delay_s, on_call
        self.split_batches = 0  # batched calls that failed and were run again request by request
        self.rows_ahead = 0  # rows of the requests queued and in flight (routing)
        self._rows_lock = threading.Lock()
        super().__init__(bundle, max_queue, timeout_s, "polyarch-calls")

    def submit(self, args: list, timeout_s: float | None = None) -> concurrent.futures.Future:
        """Queue one call. args: the inputs (host arrays), checked here (a BundleError at once for
        a bad one). -> a Future of the outputs (a list of numpy arrays)."""
        args = check_inputs(self.bundle.path, self.bundle.inputs, list(args))
        rows = int(args[0].shape[0]) if self.batchable else 1
        call = _Call(args, rows, self._deadline(timeout_s))
        with self._rows_lock:
            self.rows_ahead += rows
        try:
            self._put(call)
        except BaseException:
            self._done_rows(rows)
            raise
        call.future.add_done_callback(lambda _: self._done_rows(rows))
        return call.future

    def _done_rows(self, rows):
        with self._rows_lock:
            self.rows_ahead -= rows

    def _fail(self, call, err):
        if not call.future.done():
            call.future.set_exception(err)

    def _take(self, first=None):
        """The next batch: the first request waiting (or `first`), then more until max_batch
        rows or max_delay_s; a request that does not fit is kept for the next batch."""
        while first is None:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return None, None
        batch, rows, carry = [first], first.rows, None
        if self.batchable and self.max_batch > 1:
            until = time.monotonic() + self.max_delay_s
            while rows < self.max_batch:
                left = until - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if rows + nxt.rows > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                rows += nxt.rows
        return batch, carry

    def _loop(self):
        carry = None
        while True:
            batch, carry = self._take(carry)
            if batch is None:
                return
            live = []
            for c in batch:
                if c.future.set_running_or_notify_cancel() is False:
                    continue
                if self._expired(c.deadline):
                    c.future.set_exception(self._timed_out())
                    continue
                live.append(c)
            if live:
                self.in_flight = len(live)
                try:
                    self._call(live)
                finally:
                    self.in_flight = 0

    def _call(self, calls):
        b = self.bundle
        before = _snapshot(b.counters)
        t0 = time.perf_counter()
        try:
            if len(calls) == 1:
                outs = [_as_list(b(*calls[0].args))]
            else:
                joined = [np.concatenate([c.args[i] for c in calls]) for i in range(len(calls[0].args))]
                whole = _as_list(b(*joined))
                cuts = np.cumsum([c.rows for c in calls])[:-1]
                outs = [list(parts) for parts in zip(*(np.split(o, cuts) for o in whole))]
        except Exception as e:
            if len(calls) == 1:
                calls[0].future.set_exception(e)
            else:  # which request failed? each alone: only that one gets the error
                self.split_batches += 1
                for c in calls:
                    self._call([c])
            return
        seconds = time.perf_counter() - t0
        self._timed(seconds)
        if self.on_call is not None:
            self.on_call(len(calls), sum(c.rows for c in calls), seconds, _delta(before, b.counters))
        for c, o in zip(calls, outs):
            c.future.set_result(list(o))


def _as_list(out):
    """A bundle call's outputs as a list (a one-output bundle gives its array alone)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _snapshot(counters):
    return dict(counters, segment_seconds=dict(counters["segment_seconds"]))


def _delta(before, after):
    d = {k: after[k] - before[k] for k in ("calls", "transfers", "bytes_moved", "transfer_seconds")}
    d["segment_seconds"] = {k: v - before["segment_seconds"].get(k, 0.0) for k, v in after["segment_seconds"].items()}
    return d


class Sequence:
    """One generation request in a GenerationWorker: `tokens` so far, `finish_reason` once done
    ("stop": a stop id; "length": max_new_tokens; "cancelled"; "error"), `error`, `ttft_s`."""

    def __init__(self, prompt, max_new, sampling, stops, seed, on_token, deadline):
        self.prompt, self.max_new, self.sampling, self.stops = prompt, max_new, sampling, stops
        self.rng = np.random.Generator(np.random.PCG64(seed)) if sampling["temperature"] > 0 else None
        self.on_token, self.deadline = on_token, deadline
        self.tokens, self.finish_reason, self.error, self.ttft_s = [], None, None, None
        self.t0 = time.perf_counter()
        self.done = threading.Event()
        self.cancelled = False
        self.pos = self.last = 0

    def cancel(self) -> None:
        """Leave the batch at the next step (the client went away)."""
        self.cancelled = True

    def _emit(self, token):
        self.tokens.append(token)
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.t0
        if self.on_token is not None:
            self.on_token(self, token)
        if token in self.stops:
            return "stop"
        return "length" if len(self.tokens) >= self.max_new else None

    def _finish(self, reason, error=None):
        self.finish_reason, self.error = reason, error
        if self.on_token is not None:
            self.on_token(self, None)
        self.done.set()


class GenerationWorker(_Worker):
    """Continuous batching over a --generate bundle's decode slots (module docstring).
    on_step(active sequences, seconds, counters_delta): called after each decode step (metrics)."""

    def __init__(self, bundle, max_queue: int = 64, timeout_s: float | None = 300.0, on_step: Callable | None = None):
        self.gen = Generator(bundle)
        self.on_step = on_step
        self.slots = [None] * self.gen.batch
        super().__init__(bundle, max_queue, timeout_s, "polyarch-generate")

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def submit(self, prompt_ids: Iterable, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, stop_ids: Iterable | None = None, seed: int | None = None,
               on_token: Callable | None = None, timeout_s: float | None = None) -> Sequence:
        """Queue one prompt (token ids). on_token(seq, token) is called from the worker thread for
        each new token, then once with None when the sequence is done. -> its Sequence."""
        _check_sampling(temperature, top_k, top_p, max_new_tokens)
        prompt = [int(t) for t in prompt_ids]
        self.gen.check_prompts([prompt], max_new_tokens)
        stops = set(map(int, self.gen.eos if stop_ids is None else stop_ids))
        seq = Sequence(prompt, max_new_tokens, dict(temperature=temperature, top_k=top_k, top_p=top_p), stops, seed,
                       on_token, self._deadline(timeout_s))
        self._put(seq)
        return seq

    def predicted_wait_s(self) -> float:
        free = self.slots.count(None)
        ahead = max(0, self.depth - free)
        return ahead * (self._call_s or 0.0)

    def _fail(self, seq, err):
        seq._finish("error", err)

    def _admit(self):
        """Prefill waiting requests into free slots (each gives its first token)."""
        for slot in range(len(self.slots)):
            if self.slots[slot] is not None:
                continue
            while True:  # the next request that is still wanted
                try:
                    seq = self._queue.get_nowait()
                except queue.Empty:
                    return
                if seq.cancelled:
                    seq._finish("cancelled")
                elif self._expired(seq.deadline):
                    seq._finish("error", self._timed_out())
                else:
                    break
            try:
                logits = self.gen.prefill(seq.prompt, slot)
                tok = sample(logits, seq.rng, **seq.sampling)
            except Exception as e:
                seq._finish("error", e)
                continue
            seq.pos, seq.last = len(seq.prompt), tok
            reason = seq._emit(tok)
            if reason:
                seq._finish(reason)
            else:
                self.slots[slot] = seq

    def _loop(self):
        gen = self.gen
        while True:
            before = _snapshot(self.bundle.counters)  # a step's device time: its prefills and its decode
            for slot, seq in enumerate(self.slots):
                if seq is not None and seq.cancelled:
                    seq._finish("cancelled")
                    self.slots[slot] = None
            self._admit()
            self.in_flight = self.active
            if not self.active:
                if self._stop.is_set() and self._queue.empty():
                    return
                try:  # wait for work without spinning
                    seq = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                self._queue_front(seq)
                continue
            t0 = time.perf_counter()
            tokens = [s.last if s is not None else 0 for s in self.slots]
            positions = [min(s.pos, gen.max_context - 1) if s is not None else 0 for s in self.slots]
            # every sequence greedy: decode's own greedy tokens, 8 bytes a slot read back
            # instead of the logits and a host argmax (a bundle compiled before they were added:
            # the logits)
            greedy = gen.next_output is not None and all(s.rng is None for s in self.slots if s is not None)
            try:
                if greedy:
                    picked = gen.finish_decode(gen.start_decode(tokens, positions))
                else:
                    logits = gen.decode(tokens, positions)
            except Exception as e:  # the step failed for every sequence in it: they end, the server goes on
                for slot, s in enumerate(self.slots):
                    if s is not None:
                        s._finish("error", e)
                        self.slots[slot] = None
                gen.cache = None
                continue
            seconds = time.perf_counter() - t0
            self._timed(seconds)
            for slot, s in enumerate(self.slots):
                if s is None:
                    continue
                tok = int(picked[slot]) if greedy else sample(logits[slot], s.rng, **s.sampling)
                s.pos, s.last = s.pos + 1, tok
                reason = s._emit(tok)
                if reason:
                    s._finish(reason)
                    self.slots[slot] = None
            if self.on_step is not None:
                self.on_step(self.active, seconds, _delta(before, self.bundle.counters))

    def _queue_front(self, seq):
        """Put back a request taken while waiting: it is the next one admitted."""
        with self._queue.mutex:
            self._queue.queue.appendleft(seq)
            self._queue.unfinished_tasks += 1
            self._queue.not_empty.notify()

    def close(self, timeout_s: float | None = None) -> None:
        super().close(timeout_s)
        self.gen.release()
