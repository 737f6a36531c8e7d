"""The OpenAI completions API for a --generate bundle: `POST /v1/completions` (streamed by
server-sent events with `"stream": true`) and `GET /v1/models`, as the `openai` client sends
and reads them.

A prompt is text (the bundle must carry a tokenizer: `compile --tokenizer`), token ids, or a
list of either (one choice each). Each choice also carries `token_ids`, the new tokens' ids
(an extension; the `openai` client keeps it: `choice.model_extra["token_ids"]`), so that
the tokens can be checked against `Bundle.generate`'s. A bundle without a tokenizer answers
with each token id as text (" 17 4 ..."). Parameters: max_tokens (16), temperature (1.0, as
OpenAI's; 0 is greedy), top_p, seed, stop (strings: the text ends before the first), stream,
stream_options.include_usage, and the extensions top_k, stop_token_ids and ignore_eos (as
vLLM's). n, best_of, echo, logprobs, suffix, penalties and logit_bias other than their
defaults are refused (400 naming the parameter)."""

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import PolyarchError
from ..runtime.batching import Overloaded

__all__ = ["add_routes"]


class _Bad(Exception):
    def __init__(self, message, param=None, status=400, headers=None):
        self.param, self.status, self.headers = param, status, headers
        super().__init__(message)


def _error(e: "_Bad"):
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}.get(e.status, "server_error")
    return JSONResponse({"error": {"message": str(e), "type": kind, "param": e.param, "code": None}},
                        status_code=e.status, headers=e.headers)


def _number(body, key, default, kind, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else \
        isinstance(v, int) and not isinstance(v, bool)
    if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else f" of at least {lo}" if lo is not None else ""
        raise _Bad(f"{key}={v!r}: give a {'number' if kind is float else 'whole number'}{rng}", key)
    return v


def _prompts(body, tokenizer, vocab):
    """The prompts as token id lists."""
    p = body.get("prompt")
    if p is None:
        raise _Bad("prompt is missing", "prompt")

    def ids_of(x):
        if isinstance(x, str):
            if tokenizer is None:
                raise _Bad("this bundle carries no tokenizer: give the prompt as token ids (a list of integers)",
                           "prompt")
            return tokenizer.encode(x).ids
        if isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            return list(x)
        raise _Bad("give text, token ids (a list of integers), or a list of either", "prompt")

    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
        return [ids_of(p)]
    if isinstance(p, list) and p:
        return [ids_of(x) for x in p]
    raise _Bad("the prompt is empty", "prompt")


def _parse(body, served, tokenizer):
    if not isinstance(body, dict):
        raise _Bad("the body must be a JSON object", "body")
    model = body.get("model")
    if model is not None and model != served.name:
        raise _Bad(f"no model {model!r} here (this server serves {served.name!r})", "model", 404)
    for key, default in (("n", 1), ("best_of", 1), ("echo", False), ("logprobs", None), ("suffix", None),
                         ("frequency_penalty", 0), ("presence_penalty", 0), ("logit_bias", None)):
        v = body.get(key)
        if v is not None and v != default and v != {}:
            raise _Bad(f"{key}={v!r} is not supported by this server (only {default!r})", key)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise _Bad("stop: give a string or a list of up to 4 non-empty strings", "stop")
    if stops and tokenizer is None:
        raise _Bad("stop strings need a bundle that carries a tokenizer; use stop_token_ids", "stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (isinstance(stop_ids, list) and all(isinstance(t, int) for t in stop_ids)):
        raise _Bad("stop_token_ids: give a list of token ids", "stop_token_ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _Bad("ignore_eos: give true or false", "ignore_eos")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _Bad("stream: give true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _Bad("stream_options: give an object", "stream_options")
    cfg = served.manifest["generate"]
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _Bad(f"seed={seed!r}: give a whole number", "seed")
    eos = [] if ignore_eos else list(cfg.get("eos_token_ids", ()))
    return dict(prompts=_prompts(body, tokenizer, cfg["vocab"]),
                max_new=_number(body, "max_tokens", 16, int, 1),
                temperature=float(_number(body, "temperature", 1.0, float, 0, 2)),
                top_p=float(_number(body, "top_p", 1.0, float, 0, 1)), top_k=_number(body, "top_k", 0, int, 0),
                seed=seed, stops=stops, stop_ids=eos + list(stop_ids or ()), stream=stream,
                usage=bool(opts.get("include_usage", False)))


class _Choice:
    """One prompt's new tokens as text: what has been sent, what is held back (it may yet
    become a stop string, or end mid-character)."""

    def __init__(self, index, prompt, detok, stops):
        self.index, self.prompt, self.detok, self.stops = index, prompt, detok, stops
        self.tokens, self.sent, self.finish, self.seq = [], "", None, None

    def add(self, token):
        """A new token (None: the sequence ended). -> the text to send now."""
        if self.finish is not None:
            return ""
        if token is None:
            self.finish = self.seq.finish_reason if self.seq.finish_reason in ("stop", "length") else "stop"
            if self.seq.error is not None:
                self.finish = "error"
        else:
            self.tokens.append(token)
        text = self.detok(self.tokens)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                text, self.finish = text[:at], "stop"
                self.seq.cancel()  # its slot is freed at the next step
        if self.finish is None:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[:len(text) - hold] if hold else text
            while text.endswith("\ufffd"):  # a character not yet complete
                text = text[:-1]
        if not text.startswith(self.sent):  # the decoding changed earlier text: send only what is new
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def add_routes(app, served):
    m = served.metrics
    worker = served.plans[0].worker
    cfg = served.manifest["generate"]
    has_tokenizer = cfg.get("tokenizer") is not None

    def tokenizer():
        return worker.gen.tokenizer if has_tokenizer else None

    def detok(tokens):
        return tokenizer().decode(tokens) if has_tokenizer else "".join(f" {t}" for t in tokens)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "polyarch"}]}

    @app.post("/v1/chat/completions")
    async def chat():
        return _error(_Bad(f"{served.path} carries no chat template: send the conversation as text to "
                           "/v1/completions", "messages"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        try:
            try:
                body = json.loads(await request.body())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Bad(f"the body is not JSON ({e})", "body") from None
            p = _parse(body, served, tokenizer())
        except _Bad as e:
            m.errors.labels("completions", "bad_request").inc()
            return _error(e)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        choices = [_Choice(i, prompt, detok, p["stops"]) for i, prompt in enumerate(p["prompts"])]

        def on_token(seq, token, i):  # on the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (i, token))

        m.plan_requests.labels(served.plans[0].name).inc()
        try:
            for c in choices:
                c.seq = worker.submit(c.prompt, p["max_new"], temperature=p["temperature"], top_k=p["top_k"],
                                      top_p=p["top_p"], stop_ids=p["stop_ids"], seed=p["seed"],
                                      on_token=lambda seq, tok, i=c.index: on_token(seq, tok, i))
        except Overloaded as e:
            for c in choices:
                if c.seq is not None:
                    c.seq.cancel()
            m.errors.labels("completions", "overloaded").inc()
            return _error(_Bad(str(e), None, 503, {"Retry-After": str(int(max(1, e.retry_after_s)))}))
        except PolyarchError as e:  # prompt too long, ids outside the vocabulary, sampling settings
            for c in choices:
                if c.seq is not None:
                    c.seq.cancel()
            m.errors.labels("completions", "bad_request").inc()
            return _error(_Bad(str(e), "prompt" if "prompt" in str(e) else None))
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(i, text, finish, ids):
            return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": ids}]}

        def usage():
            n = sum(len(c.tokens) for c in choices)
            k = sum(len(c.prompt) for c in choices)
            return {"prompt_tokens": k, "completion_tokens": n, "total_tokens": n + k}

        first = [True]

        async def tokens():
            """(choice, text delta, token or None) until every choice is done."""
            done = 0
            while done < len(choices):
                i, token = await events.get()
                c = choices[i]
                if c.finish is not None:
                    continue
                delta = c.add(token)
                if token is not None:
                    m.tokens.inc()
                    if first[0]:
                        first[0] = False
                        m.ttft.observe(time.perf_counter() - t0)
                if c.finish is not None:
                    done += 1
                yield c, delta, token

        def failed():
            errs = [c.seq.error for c in choices if c.seq.error is not None]
            return errs[0] if errs else None

        if not p["stream"]:
            try:
                async for _ in tokens():
                    pass
            finally:
                for c in choices:
                    c.seq.cancel()
            err = failed()
            if err is not None:
                m.errors.labels("completions", "timeout" if isinstance(err, TimeoutError) else "runtime").inc()
                return _error(_Bad(f"{type(err).__name__}: {err}", None, 504 if isinstance(err, TimeoutError) else 500))
            return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                    "choices": [{"index": c.index, "text": c.sent, "logprobs": None, "finish_reason": c.finish,
                                 "token_ids": c.tokens} for c in choices], "usage": usage()}

        async def sse():
            try:
                async for c, delta, token in tokens():
                    if c.finish == "error":
                        err = c.seq.error
                        m.errors.labels("completions", "runtime").inc()
                        yield "data: " + json.dumps({"error": {"message": f"{type(err).__name__}: {err}",
                                                               "type": "server_error", "param": None,
                                                               "code": None}}) + "\n\n"
                        continue
                    if delta or c.finish is not None or token is not None:
                        out = chunk(c.index, delta, c.finish, [token] if token is not None else [])
                        yield "data: " + json.dumps(out) + "\n\n"
                if p["usage"]:
                    yield "data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                                 "model": served.name, "choices": [], "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away, or all done: free the slots
                for c in choices:
                    c.seq.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
