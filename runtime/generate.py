"""Generation from a --generate bundle: prefill each prompt into its decode slot, then decode
the batch one token per sequence per step, the KV cache kept on its device between calls.

    b = polyarch.runtime.load("llm.pab")
    for token in b.generate([1, 2, 3], max_new_tokens=64):           # greedy, streamed
        print(token)
    g = b.generate([[1, 2, 3], [4, 5]], 32, temperature=0.8, top_k=40, seed=7)
    for seq, token in g: ...                                          # several prompts: (index, token)
    g.tokens, g.stats                                                 # when done
    b.generate("Once upon a time", 32).run(); g.text                  # a bundle carrying a tokenizer

Several prompts share the decode batch (the bundle's `--batch B` slots, more prompts run in
waves of B). Each prompt is prefilled alone into its slot (the logits of its last token give
the first new token: the time to first token), then every decode step runs the B slots at
their own positions; a sequence that meets a stop id (by default the model's end-of-sequence
ids) or its token count leaves the batch.
Greedy decoding (temperature 0, no draft) chains the steps on the device: decode also gives
each sequence's greedy token, which the next step takes where it is, issued before the host
reads this one's back (Generation._chained). Otherwise sampling runs on the host over the
logits read back (B x vocab values a step): temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the top_k tokens and the
smallest set whose probability reaches top_p, drawn from numpy's PCG64 seeded with `seed`,
one draw per sequence and step in a fixed order (so a seed reproduces the tokens).

A bundle compiled with a draft model (`--draft`) decodes speculatively by default: the draft
proposes tokens, the model checks them in one `verify` call (Generation._spec_step); greedy
tokens are the model's own, sampled ones follow its distribution. `speculative=False` decodes
with the model alone."""

import time
from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import BundleError, PolyarchError

__all__ = ["Generator", "Generation", "sample", "distribution", "speculative_gain", "DRAFT"]

DRAFT = "draft_"  # the phases of a bundle's draft model: draft_prefill, draft_decode, draft_verify
# the tokens of the draft's verify phase: after a step whose k drafts were all accepted, the draft
# has not seen its own last draft; its next step's first call feeds that token and the model's
# next one together (a call reads the weights once: about the cost of one token, not two)
CATCH_UP_TOKENS = 2


def _candidates(logits, temperature, top_k, top_p):
    """The tokens sampling may draw and their probabilities (summing to 1): softmax(logits /
    temperature) over the top_k tokens and the fewest whose mass reaches top_p. -> (ids, p);
    ids None for the whole vocabulary (then p is over every token, in id order)."""
    z = np.asarray(logits, np.float64) / temperature
    full = np.exp(z - z.max())
    full /= full.sum()
    # The candidates, most likely first: the top_k, or (top_p alone) the fewest whose mass reaches
    # top_p, found among a growing partition rather than by sorting the whole vocabulary.
    if not (top_k and top_k > 0) and top_p >= 1.0:  # the whole distribution: no order needed
        return None, full
    k = min(len(z), top_k) if top_k and top_k > 0 else min(len(z), 64)
    while True:
        part = np.argpartition(-full, k - 1)[:k] if k < len(z) else np.arange(len(z))
        order = part[np.lexsort((part, -full[part]))]  # by probability, ties by token id (deterministic)
        if top_k or k == len(z) or full[order].sum() >= top_p:
            break
        k = min(len(z), 4 * k)
    p = full[order]
    p = p / p.sum()
    if top_p < 1.0:
        keep = int(min(len(p) - 1, np.searchsorted(np.cumsum(p), top_p)) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return order, p


def sample(logits: np.ndarray, rng: "np.random.Generator | None", temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> int:
    """One token from one row of logits (module docstring)."""
    if temperature <= 0 or rng is None:
        # numpy's argmax over 16-bit floats is scalar: 94 us for 32000 f16 logits, 56 with the
        # (exact) widening to f32 first, 3 over f32 (the same index: first of the largest)
        logits = np.asarray(logits)
        return int(np.argmax(logits.astype(np.float32) if logits.dtype.itemsize == 2 else logits))
    ids, p = _candidates(logits, temperature, top_k, top_p)
    if ids is None:
        return _draw(p, rng)
    return int(ids[rng.choice(len(p), p=p)])


def distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The probability of every token under the sampling settings (zeros outside top_k/top_p)."""
    ids, p = _candidates(logits, temperature, top_k, top_p)
    if ids is None:
        return p
    full = np.zeros(len(logits))
    full[ids] = p
    return full


def _draw(p, rng):
    """A token drawn from the probabilities p over the vocabulary (inverse CDF, one uniform)."""
    return int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right").clip(0, len(p) - 1))


def _check_sampling(temperature, top_k, top_p, max_new_tokens):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise PolyarchError(f"max_new_tokens={max_new_tokens!r}", fix="give a whole number of 1 or more")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise PolyarchError(f"temperature={temperature!r}", fix="give 0 (greedy) or a positive number")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise PolyarchError(f"top_k={top_k!r}", fix="give 0 (no limit) or a positive whole number")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise PolyarchError(f"top_p={top_p!r}", fix="give a number in (0, 1]")


# Chained greedy decode keeps this many steps issued beyond the one the host waits for. 2 was
# level with 1 on the 100M f16 model (in-process A B B A, 5 rounds: 0.98, from 0.84 to 1.09),
# and wastes one more step where a sequence stops.
CHAIN_AHEAD = 1


class Generator:
    """The generation state of one loaded bundle: its decode batch's cache, on its device."""

    def __init__(self, bundle: Any, prefix: str = ""):  # an executor.Bundle (which imports this module: no import back)
        if prefix + "prefill" not in bundle.phases or prefix + "decode" not in bundle.phases:
            raise BundleError(f"{bundle.path} was not compiled for generation (it has no prefill and decode phases)",
                              fix="compile the model with `polyarch compile --generate` (CompileOptions(generate=True))")
        self.bundle, self.prefix = bundle, prefix
        cfg = bundle.manifest["generate"]
        self.config = {**cfg, **cfg["draft"]} if prefix else cfg
        self.batch, self.max_context = self.config["batch"], self.config["max_context"]
        self.vocab = self.config["vocab"]
        self.prefill_multiple = cfg.get("prefill_multiple", 1)  # prefill's ids: padded with -1 to a multiple
        self.n_cache = 2 * self.config["layers"]
        # with a draft model: its own generator (its own cache), and the tokens verify takes
        self.draft = Generator(bundle, DRAFT) if not prefix and "draft" in cfg and "verify" in bundle.phases else None
        if prefix:  # the draft's 2-token verify (bundles compiled before it have none: a catch-up decode call)
            self.verify_tokens = CATCH_UP_TOKENS if prefix + "verify" in bundle.phases else None
        else:
            self.verify_tokens = cfg["draft"]["speculate"] + 1 if self.draft is not None else None
        # each phase gives the cache back as outputs 1.., and takes it as inputs 2..
        self._kept, self._state = range(1, 1 + self.n_cache), range(2, 2 + self.n_cache)
        # decode's output after the cache: each sequence's greedy token (compiler/causal_lm.py),
        # absent from bundles compiled before it (their greedy steps read the logits back)
        outs = bundle.manifest["phases"][prefix + "decode"]["signature"]["outputs"]
        self.next_output = 1 + self.n_cache if len(outs) == 2 + self.n_cache and outs[-1]["dtype"] == "int64" else None
        self.cache = None
        self.in_flight = []  # decode steps started (start_decode) and not yet finished: settle
        self.eos = list(self.config.get("eos_token_ids", ()))
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        """The bundle's tokenizer (a `tokenizers.Tokenizer`), or a PolyarchError saying why there is none."""
        if self._tokenizer is None:
            member = self.config.get("tokenizer")
            if member is None:
                raise PolyarchError(f"{self.bundle.path} carries no tokenizer: give token ids, not text",
                                    fix="compile with --tokenizer tokenizer.json (or put one beside the model file)")
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise PolyarchError("text in and out needs the `tokenizers` package",
                                    fix="pip install tokenizers (a dependency of polyarch: reinstall it)") from None
            self._tokenizer = Tokenizer.from_str(bytes(self.bundle._members.views[member]).decode("utf-8"))
        return self._tokenizer

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text).ids

    def _empty_cache(self):
        spec = self.bundle.manifest["phases"][self.prefix + "decode"]["signature"]["inputs"][2]
        from .dtypes import np_dtype

        return [np.zeros(spec["shape"], np_dtype(spec["dtype"])) for _ in range(self.n_cache)]

    def prefill(self, ids: Iterable, slot: int) -> np.ndarray:
        """Write a prompt into decode slot `slot`. -> the logits of its last token [vocab]."""
        ids = np.asarray(list(ids), np.int64)
        if self.prefill_multiple > 1 and ids.size and ids.min() < 0:  # -1 marks the padding
            raise PolyarchError(f"token id {int(ids.min())} is negative", fix=f"give token ids in [0, {self.vocab - 1}]")
        ids = np.pad(ids, (0, -len(ids) % self.prefill_multiple), constant_values=-1)[None, :]
        cache = self.cache if self.cache is not None else self._empty_cache()
        out = self.bundle.run_phase(self.prefix + "prefill", [ids, np.array([slot], np.int64), *cache], keep=self._kept,
                                    state=self._state)
        self.cache = out[1:1 + self.n_cache]
        return out[0][0]

    def decode(self, tokens: Iterable, positions: Iterable, greedy: bool = False) -> "np.ndarray | tuple":
        """One step for every slot: token b at position b. -> logits [batch, vocab]; greedy
        True (a bundle whose decode gives them: `next_output`): (logits, greedy tokens [batch])."""
        out = self.bundle.run_phase(self.prefix + "decode", [np.asarray(list(tokens), np.int64),
                                                             np.asarray(list(positions), np.int64), *self.cache],
                                    keep=self._kept, state=self._state)
        self.cache = out[1:1 + self.n_cache]
        if greedy:
            if self.next_output is None:
                raise BundleError(f"the decode phase of {self.bundle.path} gives no greedy tokens (compiled before "
                                  "they were added)", fix="recompile it with `polyarch compile --generate`")
            return out[0], out[self.next_output]
        return out[0]

    def start_decode(self, tokens: "Iterable | PhaseCall", positions: Iterable) -> "PhaseCall":
        """Issue one decode step without waiting for it (a bundle whose decode gives its greedy
        tokens: `next_output`). tokens: ids, or the step before (a `PhaseCall`: its greedy
        tokens, taken where they are, on the device). The cache becomes the step's at once
        (later calls run after it on the device). -> the step in flight (`finish_decode`)."""
        tok = tokens.resident(self.next_output) if hasattr(tokens, "resident") else np.asarray(list(tokens), np.int64)
        step = self.bundle.start_phase(self.prefix + "decode", [tok, np.asarray(list(positions), np.int64),
                                                                *self.cache], state=self._state)
        self.cache = [step.resident(j) for j in self._kept]
        self.in_flight.append(step)
        return step

    def finish_decode(self, step: "PhaseCall") -> np.ndarray:
        """Wait for a started decode step. -> its greedy tokens [batch] (int64), read back."""
        try:
            return self.bundle.finish_phase(step, [self.next_output])[0]
        finally:
            self.in_flight.remove(step)

    def settle(self) -> None:
        """Wait for the decode steps started and not finished (`in_flight`), unread: a step
        issued ahead for sequences that stopped, or a generation left part-way. Its buffers
        and its device must not go while the device works on it (a bundle dropped with a step
        in flight crashed the process)."""
        while self.in_flight:
            self.in_flight.pop().wait()

    def release(self) -> None:
        """Drop the caches (device buffers) of the model and of its draft, after the steps in flight."""
        for g in (self, self.draft):
            if g is not None:
                g.settle()
                g.cache = None

    def predicted_us(self, *phases: str) -> tuple:
        """The compile-time predicted time of each phase's call on the loaded plan (microseconds)."""
        plan = self.bundle.plan["phases"]
        return tuple(max(1e-3, float(plan[p].get("plan", {}).get("predicted_us") or 1.0)) for p in phases)

    def verify(self, tokens: Iterable, positions: Iterable) -> np.ndarray:
        """(A bundle with a draft, or its draft) tokens[b] ([verify_tokens] ids) at positions[b]
        onwards into every slot's cache. -> logits [batch, verify_tokens, vocab], one row per token."""
        out = self.bundle.run_phase(self.prefix + "verify", [np.asarray(tokens, np.int64),
                                                             np.asarray(list(positions), np.int64), *self.cache],
                                    keep=self._kept, state=self._state)
        self.cache = out[1:1 + self.n_cache]
        return out[0]

    def generate(self, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, stop_ids: Iterable | None = None, seed: int | None = None,
                 speculative: "bool | None" = None) -> "Generation":
        """stop_ids None: the model's end-of-sequence ids (its config's eos_token_id); () for none.
        prompt_ids: token ids, a list of such lists, or text (str, or a list of str: the bundle's
        tokenizer encodes it, and `Generation.text` decodes the tokens). speculative: None uses
        the bundle's draft model where it has one, False decodes with the model alone."""
        _check_sampling(temperature, top_k, top_p, max_new_tokens)
        if speculative and self.draft is None:
            raise PolyarchError(f"{self.bundle.path} has no draft model to speculate with",
                                fix="compile with --draft DRAFT.py (CompileOptions(draft=...)), or leave speculative unset")
        text = isinstance(prompt_ids, str) or (isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0
                                                and all(isinstance(p, str) for p in prompt_ids))
        if text:
            prompt_ids = self.encode(prompt_ids) if isinstance(prompt_ids, str) else [self.encode(p) for p in prompt_ids]
        single = len(prompt_ids) > 0 and all(isinstance(t, (int, np.integer)) for t in prompt_ids)
        prompts = [list(map(int, prompt_ids))] if single else [list(map(int, p)) for p in prompt_ids]
        if not prompts:
            raise PolyarchError("no prompt given", fix="give token ids, e.g. [1, 2, 3], or a list of such lists")
        self.check_prompts(prompts, max_new_tokens)
        stops = set(map(int, self.eos if stop_ids is None else stop_ids))
        spec = self.draft is not None and speculative is not False
        return Generation(self, prompts, max_new_tokens, temperature, top_k, top_p, stops, seed, single, spec)

    def check_prompts(self, prompts: list, max_new_tokens: int) -> None:
        """PolyarchError for a prompt that is empty, holds an id outside the vocabulary, or
        with max_new_tokens would pass the bundle's context."""
        for i, p in enumerate(prompts):
            if not p:
                raise PolyarchError(f"prompt {i} is empty", fix="give at least one token id")
            bad = next((t for t in p if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise PolyarchError(f"prompt {i} holds token id {bad}, outside the vocabulary of {self.vocab}",
                                    fix=f"give token ids in [0, {self.vocab - 1}]")
            if len(p) + max_new_tokens > self.max_context:
                what = (f"prompt {i} has {len(p)} tokens, more than the bundle's context of {self.max_context}"
                        if len(p) > self.max_context else
                        f"prompt {i} ({len(p)} tokens) + {max_new_tokens} new tokens would pass the bundle's context "
                        f"of {self.max_context}")
                raise PolyarchError(what, fix=f"shorten the prompt or ask for at most {max(0, self.max_context - len(p))} "
                                              "new tokens, or recompile with a larger --max-context")


class Generation:
    """A generation in progress: iterate for tokens as they come (ints for one prompt,
    (prompt index, token) for several); `tokens` holds each prompt's new tokens, `stats`
    the times: ttft_s (per prompt: from the start to its first token), tpot_s (mean time per
    output token over the decode steps: the time generate spends on them, the consumer's
    time between tokens excluded), decode_steps, tokens_per_s, and
    state_host_bytes_per_step (KV-cache bytes that crossed the host per decode step); with
    a draft model (speculative decoding, `Generation._spec_step`) also `speculative`: drafted
    and accepted tokens, acceptance_rate, mean_k (tokens drafted a step), the calls and
    seconds of the draft's decode (draft_calls, draft_s), of its 2-token catch-up (catch_up_calls,
    catch_up_s: a step's first draft call after a step whose drafts were all accepted) and of
    verify (decode_steps then counts verify calls; tpot_s counts these and the draft's
    prefills, which run after each first token). acceptance_rate is
    the probability that a drafted token is accepted (accepted / drafts checked: a step checks
    its drafts up to the first rejected one; the ones after it are drafted but not checked)."""

    def __init__(self, gen, prompts, max_new, temperature, top_k, top_p, stops, seed, single, speculative=False):
        self.gen, self.prompts, self.max_new, self.single = gen, prompts, max_new, single
        self.speculative, self.seed = speculative, seed
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.stops = stops
        self.rng = np.random.Generator(np.random.PCG64(seed)) if temperature > 0 else None
        self.tokens = [[] for _ in prompts]
        self.stats = {}
        self._it = self._run()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        return next(self._it)

    def close(self) -> None:
        """Stop generating here (the device's steps in flight finished, unread; dropping the
        Generation does the same). `tokens` keeps what came."""
        self._it.close()

    def run(self) -> list:
        """Generate to the end. -> `tokens`."""
        for _ in self:
            pass
        return self.tokens

    @property
    def text(self) -> "str | list":
        """The new tokens so far as text (the bundle's tokenizer): a str for one prompt, else a list."""
        out = [self.gen.tokenizer.decode(t) for t in self.tokens]
        return out[0] if self.single else out

    def _emit(self, i, token):
        self.tokens[i].append(token)
        return token if self.single else (i, token)

    def _run(self):
        """Each wave of up to `batch` prompts: every prompt prefilled into its slot (its first
        token is the time to first token), then its decode steps (`_steps`)."""
        gen, draft, b = self.gen, self.gen.draft if self.speculative else None, self.gen.batch
        # k from measured call times, except when a seed asks for reproducible sampling: the draws
        # a step makes depend on k, so then the times are the plan's predicted ones (fixed per bundle)
        costs = None if not draft or self.rng is None or self.seed is None else \
            gen.predicted_us(DRAFT + "decode", "verify", *((DRAFT + "verify",) if draft.verify_tokens else ()))
        t0 = time.perf_counter()
        ttft = [None] * len(self.prompts)
        counters = gen.bundle.counters
        state0 = counters["state_host_bytes"]
        st = self._st = {"steps": 0, "drafted": 0, "accepted": 0, "tested": 0, "k": [],
                         **{f"{w}_{x}": 0 for w in ("decode", "draft_prefill", "draft", "catch", "verify")
                            for x in ("s", "calls")}}
        state_steps = 0  # state bytes through the host in the decode steps (prefill's empty caches excluded)
        for wave in range(0, len(self.prompts), b):
            ids = list(range(wave, min(wave + b, len(self.prompts))))
            gen.cache = None  # a fresh cache per wave (its rows are rewritten by each prefill)
            if draft:
                draft.cache = None
            pos, last, live = [0] * b, [0] * b, set()
            self._pending = {}  # slots whose draft has not seen its last (accepted) draft: {slot: (token, position)}
            for slot, i in enumerate(ids):
                logits = gen.prefill(self.prompts[i], slot)
                tok = sample(logits, self.rng, **self.sampling)
                ttft[i] = time.perf_counter() - t0
                pos[slot], last[slot] = len(self.prompts[i]), tok
                yield self._emit(i, tok)
                if tok not in self.stops and self.max_new > 1:
                    live.add(slot)
                if draft:
                    self._timed("draft_prefill", draft.prefill, self.prompts[i], slot)  # after the first token
            state_base = counters["state_host_bytes"]
            yield from self._steps(ids, pos, last, live, draft, costs)
            state_steps += counters["state_host_bytes"] - state_base
        total = time.perf_counter() - t0
        out = sum(map(len, self.tokens))
        steps = st["steps"]
        spent = st["draft_prefill_s"] + st["draft_s"] + st["catch_s"] + st["verify_s"] if draft else st["decode_s"]
        self.stats.update(ttft_s=ttft, tpot_s=spent / (max(1, out - len(self.prompts)) if draft else steps)
                          if steps else None, decode_steps=steps, tokens=out, seconds=total,
                          tokens_per_s=out / total if total else None,
                          state_host_bytes=counters["state_host_bytes"] - state0,
                          state_host_bytes_per_step=state_steps / max(1, steps))
        if draft:
            self.stats["speculative"] = {
                "drafted": st["drafted"], "accepted": st["accepted"],
                "acceptance_rate": st["accepted"] / st["tested"] if st["tested"] else None,
                "mean_k": float(np.mean(st["k"])) if st["k"] else None,
                **{key: st[key] for key in ("draft_calls", "draft_s", "verify_calls", "verify_s")},
                "catch_up_calls": st["catch_calls"], "catch_up_s": st["catch_s"]}

    def _steps(self, ids, pos, last, live, draft, costs):
        """A wave's decode steps, until every sequence of it is done: greedy steps chained on
        the device where the bundle's decode gives its greedy tokens (`_chained`), else
        `_decode_step`, or with a draft `_spec_step`."""
        gen = self.gen
        if not draft:
            if live and self.rng is None and gen.next_output is not None:
                yield from self._chained(ids, pos, last, live)
            while live:
                yield from self._decode_step(ids, pos, last, live)
            return
        while live:
            # never draft past what any live sequence may still emit, nor past the cache
            room = max(self.max_new - len(self.tokens[ids[s]]) for s in live) - 1
            k = max(0, min(self._choose_k(self._st, gen.verify_tokens - 1, costs, bool(draft.verify_tokens)), room))
            yield from self._spec_step(k, ids, pos, last, live)

    def _decode_step(self, ids, pos, last, live):
        """One decode step for the batch: one token per live sequence (yielded). Its time
        (decode_s) is the call's and the sampling's."""
        gen, t = self.gen, time.perf_counter()
        # a slot that is done (or unused) repeats a harmless write at a position in range
        logits = gen.decode(last, [min(q, gen.max_context - 1) for q in pos])
        toks = {slot: sample(logits[slot], self.rng, **self.sampling) for slot in sorted(live)}
        self._step_done(t)
        yield from self._emit_step(ids, pos, last, live, toks)

    def _chained(self, ids, pos, last, live):
        """Greedy decode steps until every sequence of the wave is done, chained on the device
        (a bundle whose decode gives its greedy tokens): step n + 1 is issued with step n's
        tokens still on the device before the host reads step n's back, so that the host's
        work for a token (the read-back, the stop test, what the consumer does with it) runs
        while the device computes the next. A step issued for sequences that then stop is
        waited for, unread (`Generator.settle`: also when the generation is left part-way). A
        step's time (decode_s) is the time spent here for it: issuing the next step and waiting
        for this one's tokens."""
        gen, n = self.gen, self.gen.max_context - 1
        t = time.perf_counter()
        at, window = list(pos), deque()  # at: the position the next step issued writes, per slot
        try:
            while live:
                need = max(self.max_new - len(self.tokens[ids[s]]) for s in live)  # steps that may yield tokens
                while len(window) < min(1 + CHAIN_AHEAD, need):
                    window.append(gen.start_decode(window[-1] if window else last, [min(q, n) for q in at]))
                    at = [q + (s in live) for s, q in enumerate(at)]
                got = gen.finish_decode(window.popleft())
                toks = {slot: int(got[slot]) for slot in sorted(live)}
                self._step_done(t)
                yield from self._emit_step(ids, pos, last, live, toks)
                t = time.perf_counter()
        finally:  # done, stopped, or left part-way (closed, collected): no step stays in flight
            gen.settle()

    def _step_done(self, t):
        st = self._st
        st["steps"] += 1
        st["decode_calls"] += 1
        st["decode_s"] += time.perf_counter() - t

    def _emit_step(self, ids, pos, last, live, toks):
        """Yield a step's token of each live slot ({slot: token}); a sequence that meets a stop
        or its count leaves the batch."""
        for slot, tok in toks.items():
            i = ids[slot]
            pos[slot], last[slot] = pos[slot] + 1, tok
            yield self._emit(i, tok)
            if tok in self.stops or len(self.tokens[i]) >= self.max_new:
                live.discard(slot)

    def _timed(self, what, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self._st[f"{what}_s"] += time.perf_counter() - t
        self._st[f"{what}_calls"] += 1
        return out

    def _spec_step(self, k, ids, pos, last, live):
        """One speculative step for the batch (a bundle with a draft model): the draft proposes
        k tokens per sequence (k decode calls of the draft), the model checks them and gives one
        more in a single verify call; greedy keeps the drafted tokens up to the first the model
        would not have chosen (so the tokens are the model's own), sampling accepts token d with
        probability min(1, p(d) / q(d)) and on rejection draws from max(0, p - q) renormalised
        (the standard scheme: the tokens follow the model's distribution). The tokens each live
        sequence keeps are yielded, its position and last token moved on. k (1 .. speculate) is
        chosen each step (`_choose_k`) for the most tokens per second, from the acceptance rate
        and the draft and verify call times measured so far. A sequence whose k drafts were all
        accepted leaves its draft one token behind (the last draft): the next step's first
        draft call feeds it with the new last token in the draft's 2-token verify phase."""
        gen, draft, b, st = self.gen, self.gen.draft, self.gen.batch, self._st
        n = gen.max_context
        drafts, qs = self._draft(k, pos, last, live)
        tokens = np.zeros((b, gen.verify_tokens), np.int64)
        for s in range(b):
            tokens[s, :1 + len(drafts[s])] = [last[s], *drafts[s]]
        logits = self._timed("verify", gen.verify, tokens, [min(q, n - 1) for q in pos])
        st["steps"] += 1
        st["k"].append(k)
        catch_up = {}
        for s in sorted(live):
            i = ids[s]
            new, accepted = self._check(logits[s], drafts[s], qs[s])
            st["drafted"] += k
            st["accepted"] += accepted
            st["tested"] += accepted + (accepted < k)  # drafts checked up to the first rejected one
            if accepted == k and k:  # the draft has not yet seen its own last token
                catch_up[s] = (drafts[s][-1], pos[s] + k)
            for tok in new:
                pos[s], last[s] = pos[s] + 1, tok
                yield self._emit(i, tok)
                if tok in self.stops or len(self.tokens[i]) >= self.max_new:
                    live.discard(s)
                    break
        catch_up = {s: v for s, v in catch_up.items() if s in live}
        if draft.verify_tokens:  # the next step's first draft call feeds them
            self._pending = catch_up
        elif catch_up:  # a bundle without the draft's 2-token verify: a decode call of its own now
            self._timed("draft", draft.decode, [catch_up[s][0] if s in catch_up else last[s] for s in range(b)],
                        [min(catch_up[s][1] if s in catch_up else pos[s], n - 1) for s in range(b)])

    def _draft(self, k, pos, last, live):
        """k draft calls for the batch. -> (drafts, qs): each slot's drafted tokens and, when
        sampling, the draft's distribution for each. The first call also feeds the slots whose
        draft is one token behind (`self._pending`) with the draft's 2-token verify."""
        draft, b, n = self.gen.draft, self.gen.batch, self.gen.max_context
        drafts, qs = [[] for _ in range(b)], [[] for _ in range(b)]
        dl, dp = list(last), list(pos)  # slots not live repeat a harmless write at their position
        pending = {s: v for s, v in self._pending.items() if s in live} if k else {}  # k = 0: a last step
        if self.rng is None and draft.next_output is not None:
            return self._draft_chained(k, pos, last, live, pending), qs
        for j in range(k):
            if j == 0 and pending:
                logits = self._catch_up(pending, pos, last)
            else:
                logits = self._timed("draft", draft.decode, dl, [min(q, n - 1) for q in dp])
            for s in sorted(live):
                if self.rng is None:
                    d = int(np.argmax(logits[s]))
                else:
                    qs[s].append(distribution(logits[s], **self.sampling))
                    d = _draw(qs[s][-1], self.rng)
                drafts[s].append(d)
                dl[s], dp[s] = d, dp[s] + 1
        return drafts, qs

    def _catch_up(self, pending, pos, last):
        """A step's first draft call where slots are pending: one 2-token call, each pending
        slot's last draft (at pos - 1), then its last token; the others feed their last token
        twice (the second row is rewritten before it is read). -> each slot's logits for its
        next draft."""
        draft, b, n = self.gen.draft, self.gen.batch, self.gen.max_context
        two = np.array([[pending[s][0], last[s]] if s in pending else [last[s], last[s]] for s in range(b)], np.int64)
        start = [pending[s][1] if s in pending else min(pos[s], n - CATCH_UP_TOKENS) for s in range(b)]
        rows = self._timed("catch", draft.verify, two, start)
        return [rows[s, 1 if s in pending else 0] for s in range(b)]

    def _draft_chained(self, k, pos, last, live, pending):
        """Greedy drafts of the batch with the draft's decode calls chained on the device (a
        draft whose decode gives its greedy tokens): each call takes the one before's tokens
        where they are, all are issued before the first is read back. The first call is the
        2-token catch-up where slots are pending (`_catch_up`), whose tokens the host reads (an
        argmax of its logits). -> each slot's drafted tokens."""
        draft, b, n, st = self.gen.draft, self.gen.batch, self.gen.max_context, self._st
        drafts = [[] for _ in range(b)]
        dl, dp = list(last), list(pos)
        clock = time.perf_counter
        if k and pending:
            logits = self._catch_up(pending, pos, last)
            for s in sorted(live):
                drafts[s].append(int(np.argmax(logits[s])))
                dl[s], dp[s] = drafts[s][-1], dp[s] + 1
        t, steps, prev = clock(), [], dl
        try:
            for _ in range(k - (1 if k and pending else 0)):
                prev = draft.start_decode(prev, [min(q, n - 1) for q in dp])
                steps.append(prev)
                dp = [q + (s in live) for s, q in enumerate(dp)]
            for step in steps:
                got = draft.finish_decode(step)
                for s in sorted(live):
                    drafts[s].append(int(got[s]))
        finally:
            draft.settle()
        st["draft_s"] += clock() - t
        st["draft_calls"] += len(steps)
        return drafts

    def _check(self, rows, drafted, qs):
        """The tokens one verify row gives: the drafted tokens the model accepts, then one of
        its own (a correction, or after all of them the next). -> (tokens, accepted count)."""
        for j, d in enumerate(drafted):
            if self.rng is None:
                if int(np.argmax(rows[j])) != d:
                    return drafted[:j] + [int(np.argmax(rows[j]))], j
                continue
            p = distribution(rows[j], **self.sampling)
            if self.rng.random() * qs[j][d] >= p[d]:  # rejected: draw from what the draft under-proposes
                rest = np.maximum(p - qs[j], 0.0)
                return drafted[:j] + [_draw(rest if rest.sum() > 0 else p, self.rng)], j
        return drafted + [sample(rows[len(drafted)], self.rng, **self.sampling)], len(drafted)

    @staticmethod
    def _choose_k(st, kmax, costs=None, two=False):
        """The draft length with the most expected tokens per second (`speculative_gain`). Before
        any step: kmax. costs: (draft call, verify call[, draft's 2-token call]) times to use
        instead of the measured ones. two: the draft catches up in a 2-token call (its cost over
        a draft call, until measured taken as none), else in a draft call of its own."""
        if not st["verify_calls"] or not st["tested"]:
            return kmax
        a = (st["accepted"] + 2.0) / (st["tested"] + 4.0)  # the measured rate, pulled towards 1/2 early on
        td, tv = (costs[0], costs[1]) if costs else (st["draft_s"] / max(1, st["draft_calls"]),
                                                      st["verify_s"] / st["verify_calls"])
        tc = None
        if two:
            t2 = costs[2] if costs else st["catch_s"] / st["catch_calls"] if st["catch_calls"] else td
            tc = max(0.0, t2 - td)
        return max(range(1, kmax + 1), key=lambda k: speculative_gain(a, k, td, tv, tc))


def speculative_gain(a: float, k: int, draft_s: float, verify_s: float, catch_up_s: "float | None" = None) -> float:
    """Expected tokens per second of speculative steps: k drafted tokens, each accepted with
    probability a, yield (1 - a^(k+1)) / (1 - a) tokens a step, for k draft calls, one verify
    call (whose time does not depend on k: its shape is fixed), and when all k are accepted
    (probability a^k) the draft's catch-up on its last draft: catch_up_s, what the draft's
    2-token call costs over a draft call (CATCH_UP_TOKENS), or None for a draft call of its
    own. The speed-up over plain decoding is this times the time of one plain decode call."""
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (k * draft_s + a ** k * (draft_s if catch_up_s is None else catch_up_s) + verify_s)
