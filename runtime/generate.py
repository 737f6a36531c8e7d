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
Sampling runs on the host over the logits read back (B x vocab values a step): temperature
0 is greedy; otherwise softmax(logits / temperature) restricted to the top_k tokens and the
smallest set whose probability reaches top_p, drawn from numpy's PCG64 seeded with `seed`,
one draw per sequence and step in a fixed order (so a seed reproduces the tokens)."""

import time
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import BundleError, PolyarchError

__all__ = ["Generator", "Generation", "sample"]


def sample(logits: np.ndarray, rng: "np.random.Generator | None", temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> int:
    """One token from one row of logits (module docstring)."""
    logits = np.asarray(logits, np.float64)
    if temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    z = logits / temperature
    full = np.exp(z - z.max())
    full /= full.sum()
    # The candidates, most likely first: the top_k, or (top_p alone) the fewest whose mass reaches
    # top_p, found among a growing partition rather than by sorting the whole vocabulary.
    if not (top_k and top_k > 0) and top_p >= 1.0:  # the whole distribution: no order needed
        return int(np.searchsorted(np.cumsum(full), rng.random() * full.sum(), side="right").clip(0, len(z) - 1))
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
    return int(order[rng.choice(len(p), p=p)])


def _check_sampling(temperature, top_k, top_p, max_new_tokens):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise PolyarchError(f"max_new_tokens={max_new_tokens!r}", fix="give a whole number of 1 or more")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise PolyarchError(f"temperature={temperature!r}", fix="give 0 (greedy) or a positive number")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise PolyarchError(f"top_k={top_k!r}", fix="give 0 (no limit) or a positive whole number")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise PolyarchError(f"top_p={top_p!r}", fix="give a number in (0, 1]")


class Generator:
    """The generation state of one loaded bundle: its decode batch's cache, on its device."""

    def __init__(self, bundle: Any):  # an executor.Bundle (which imports this module: no import back)
        if "prefill" not in bundle.phases or "decode" not in bundle.phases:
            raise BundleError(f"{bundle.path} was not compiled for generation (it has no prefill and decode phases)",
                              fix="compile the model with `polyarch compile --generate` (CompileOptions(generate=True))")
        self.bundle = bundle
        self.config = bundle.manifest["generate"]
        self.batch, self.max_context = self.config["batch"], self.config["max_context"]
        self.vocab = self.config["vocab"]
        self.n_cache = 2 * self.config["layers"]
        # each phase gives the cache back as outputs 1.., and takes it as inputs 2..
        self._kept, self._state = range(1, 1 + self.n_cache), range(2, 2 + self.n_cache)
        self.cache = None
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
                raise PolyarchError("text in and out needs the `tokenizers` package", fix="pip install tokenizers") from None
            self._tokenizer = Tokenizer.from_str(bytes(self.bundle._members.views[member]).decode("utf-8"))
        return self._tokenizer

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text).ids

    def _empty_cache(self):
        spec = self.bundle.manifest["phases"]["decode"]["signature"]["inputs"][2]
        from .dtypes import np_dtype

        return [np.zeros(spec["shape"], np_dtype(spec["dtype"])) for _ in range(self.n_cache)]

    def prefill(self, ids: Iterable, slot: int) -> np.ndarray:
        """Write a prompt into decode slot `slot`. -> the logits of its last token [vocab]."""
        ids = np.asarray(list(ids), np.int64)[None, :]
        cache = self.cache if self.cache is not None else self._empty_cache()
        out = self.bundle.run_phase("prefill", [ids, np.array([slot], np.int64), *cache], keep=self._kept,
                                    state=self._state)
        self.cache = out[1:]
        return out[0][0]

    def decode(self, tokens: Iterable, positions: Iterable) -> np.ndarray:
        """One step for every slot: token b at position b. -> logits [batch, vocab]."""
        out = self.bundle.run_phase("decode", [np.asarray(list(tokens), np.int64),
                                               np.asarray(list(positions), np.int64), *self.cache], keep=self._kept,
                                    state=self._state)
        self.cache = out[1:]
        return out[0]

    def generate(self, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, stop_ids: Iterable | None = None, seed: int | None = None) -> "Generation":
        """stop_ids None: the model's end-of-sequence ids (its config's eos_token_id); () for none.
        prompt_ids: token ids, a list of such lists, or text (str, or a list of str: the bundle's
        tokenizer encodes it, and `Generation.text` decodes the tokens)."""
        _check_sampling(temperature, top_k, top_p, max_new_tokens)
        text = isinstance(prompt_ids, str) or (isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0
                                                and all(isinstance(p, str) for p in prompt_ids))
        if text:
            prompt_ids = self.encode(prompt_ids) if isinstance(prompt_ids, str) else [self.encode(p) for p in prompt_ids]
        single = len(prompt_ids) > 0 and all(isinstance(t, (int, np.integer)) for t in prompt_ids)
        prompts = [list(map(int, prompt_ids))] if single else [list(map(int, p)) for p in prompt_ids]
        if not prompts:
            raise PolyarchError("no prompt given", fix="give token ids, e.g. [1, 2, 3], or a list of such lists")
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
        stops = set(map(int, self.eos if stop_ids is None else stop_ids))
        return Generation(self, prompts, max_new_tokens, temperature, top_k, top_p, stops, seed, single)


class Generation:
    """A generation in progress: iterate for tokens as they come (ints for one prompt,
    (prompt index, token) for several); `tokens` holds each prompt's new tokens, `stats`
    the times: ttft_s (per prompt: from the start to its first token), tpot_s (mean time per
    output token over the decode steps), decode_steps, tokens_per_s, and
    state_host_bytes_per_step (KV-cache bytes that crossed the host per decode step)."""

    def __init__(self, gen, prompts, max_new, temperature, top_k, top_p, stops, seed, single):
        self.gen, self.prompts, self.max_new, self.single = gen, prompts, max_new, single
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
        gen, b = self.gen, self.gen.batch
        t0 = time.perf_counter()
        ttft, steps, step_s = [None] * len(self.prompts), 0, 0.0
        counters = gen.bundle.counters
        state0 = counters["state_host_bytes"]
        for wave in range(0, len(self.prompts), b):
            ids = list(range(wave, min(wave + b, len(self.prompts))))
            gen.cache = None  # a fresh cache per wave (its rows are rewritten by each prefill)
            pos, last, live = [0] * b, [0] * b, set()
            for slot, i in enumerate(ids):
                logits = gen.prefill(self.prompts[i], slot)
                tok = sample(logits, self.rng, **self.sampling)
                ttft[i] = time.perf_counter() - t0
                pos[slot], last[slot] = len(self.prompts[i]), tok
                yield self._emit(i, tok)
                if tok not in self.stops and self.max_new > 1:
                    live.add(slot)
            state_base = counters["state_host_bytes"]
            while live:
                t = time.perf_counter()
                # a slot that is done (or unused) repeats a harmless write at a position in range
                logits = gen.decode(last, [min(q, gen.max_context - 1) for q in pos])
                step_s += time.perf_counter() - t
                steps += 1
                for slot in sorted(live):
                    i = ids[slot]
                    tok = sample(logits[slot], self.rng, **self.sampling)
                    pos[slot], last[slot] = pos[slot] + 1, tok
                    yield self._emit(i, tok)
                    if tok in self.stops or len(self.tokens[i]) >= self.max_new:
                        live.discard(slot)
            self.stats["state_host_bytes_per_step"] = (counters["state_host_bytes"] - state_base) / max(1, steps)
        total = time.perf_counter() - t0
        n = sum(map(len, self.tokens))
        self.stats.update(ttft_s=ttft, tpot_s=step_s / steps if steps else None, decode_steps=steps,
                          tokens=n, seconds=total, tokens_per_s=n / total if total else None,
                          state_host_bytes=counters["state_host_bytes"] - state0)
