"""The OpenAI completions API for a --generate bundle: `POST /v1/completions` (streamed by
server-sent events with `"stream": true`), `POST /v1/chat/completions` (a bundle whose
tokenizer came with a chat template: the conversation rendered by it, in Jinja's sandbox, as
transformers does) and `GET /v1/models`, as the `openai` client sends and reads them.

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
    message = str(e) if not e.param or str(e).startswith(e.param) else f"{e.param}: {e}"
    return JSONResponse({"error": {"message": message, "type": kind, "param": e.param, "code": None}},
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


def _prompts(body, tokenizer):
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
    return dict(prompts=_prompts(body, tokenizer),
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
        self.tokens, self.sent, self.finish, self.seq, self.started = [], "", None, None, False

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


class _Text:
    """The shapes of /v1/completions' answers."""
    endpoint, prefix, obj, chunk_obj = "completions", "cmpl-", "text_completion", "text_completion"

    @staticmethod
    def chunk(c, delta, finish, ids):
        return {"index": c.index, "text": delta, "logprobs": None, "finish_reason": finish, "token_ids": ids}

    @staticmethod
    def final(c):
        return {"index": c.index, "text": c.sent, "logprobs": None, "finish_reason": c.finish, "token_ids": c.tokens}


class _Chat:
    """The shapes of /v1/chat/completions' answers."""
    endpoint, prefix, obj, chunk_obj = "chat", "chatcmpl-", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def chunk(c, delta, finish, ids):
        d = {"content": delta}
        if not c.started:
            c.started = True
            d["role"] = "assistant"
        return {"index": c.index, "delta": d, "logprobs": None, "finish_reason": finish, "token_ids": ids}

    @staticmethod
    def final(c):
        return {"index": c.index, "message": {"role": "assistant", "content": c.sent}, "logprobs": None,
                "finish_reason": c.finish, "token_ids": c.tokens}


def _render_chat(chat, messages):
    """The conversation as the text the model was trained on (the bundle's chat template, in
    Jinja's sandbox, as transformers renders it), ending with the assistant's turn opened."""
    import jinja2
    import jinja2.sandbox

    if not isinstance(messages, list) or not messages:
        raise _Bad("give a non-empty list of {role, content} messages", "messages")
    plain = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _Bad("each message needs a role and a content", f"messages[{i}]")
        content = msg.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _Bad("only text content parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _Bad("content must be text", f"messages[{i}].content")
        plain.append({"role": msg["role"], "content": content})

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(chat["template"]).render(messages=plain, add_generation_prompt=True,
                                                        bos_token=chat.get("bos_token") or "",
                                                        eos_token=chat.get("eos_token") or "")
    except jinja2.TemplateError as e:
        raise _Bad(f"the bundle's chat template refused the conversation: {e}", "messages") from None


def add_routes(app, served):
    m = served.metrics
    worker = served.plans[0].worker
    cfg = served.manifest["generate"]
    has_tokenizer = cfg.get("tokenizer") is not None
    chat_member = cfg.get("chat_template")
    chat = json.loads(bytes(worker.bundle._members.views[chat_member]).decode()) if chat_member else None

    def tokenizer():
        return worker.gen.tokenizer if has_tokenizer else None

    def detok(tokens):
        return tokenizer().decode(tokens) if has_tokenizer else "".join(f" {t}" for t in tokens)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "polyarch"}]}

    async def body_of(request):
        try:
            return json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Bad(f"the body is not JSON ({e})", "body") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        try:
            if chat is None:
                raise _Bad(f"{served.path} carries no chat template (none was beside its tokenizer when it was "
                           "compiled): send the conversation as text to /v1/completions", "messages")
            body = await body_of(request)
            if not isinstance(body, dict):
                raise _Bad("the body must be a JSON object", "body")
            if body.get("logprobs") not in (None, False):
                raise _Bad("logprobs are not supported by this server", "logprobs")
            text = _render_chat(chat, body.get("messages"))
            body = {k: v for k, v in body.items() if k not in ("messages", "logprobs")}
            if "max_completion_tokens" in body:
                body["max_tokens"] = body.pop("max_completion_tokens")
            body["prompt"] = tokenizer().encode(text, add_special_tokens=False).ids
            p = _parse(body, served, tokenizer())
        except _Bad as e:
            m.errors.labels("chat", "bad_request").inc()
            return _error(e)
        return await _answer(_Chat, p, t0)

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        try:
            p = _parse(await body_of(request), served, tokenizer())
        except _Bad as e:
            m.errors.labels("completions", "bad_request").inc()
            return _error(e)
        return await _answer(_Text, p, t0)

    async def _answer(fmt, p, t0):
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        choices = [_Choice(i, prompt, detok, p["stops"]) for i, prompt in enumerate(p["prompts"])]

        def on_token(seq, token, i):  # on the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (i, token))

        def cancel_all():
            for c in choices:
                if c.seq is not None:
                    c.seq.cancel()

        m.plan_requests.labels(served.plans[0].name).inc()
        try:
            for c in choices:
                c.seq = worker.submit(c.prompt, p["max_new"], temperature=p["temperature"], top_k=p["top_k"],
                                      top_p=p["top_p"], stop_ids=p["stop_ids"], seed=p["seed"],
                                      on_token=lambda seq, tok, i=c.index: on_token(seq, tok, i))
        except Overloaded as e:
            cancel_all()
            m.errors.labels(fmt.endpoint, "overloaded").inc()
            return _error(_Bad(str(e), None, 503, {"Retry-After": str(int(max(1, e.retry_after_s)))}))
        except PolyarchError as e:  # prompt too long, ids outside the vocabulary, sampling settings
            cancel_all()
            m.errors.labels(fmt.endpoint, "bad_request").inc()
            return _error(_Bad(str(e), "prompt" if "prompt" in str(e) else None))
        rid, created = fmt.prefix + uuid.uuid4().hex, int(time.time())
        head = {"id": rid, "created": created, "model": served.name}

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

        if not p["stream"]:
            try:
                async for _ in tokens():
                    pass
            finally:
                cancel_all()
            errs = [c.seq.error for c in choices if c.seq.error is not None]
            if errs:
                timeout = isinstance(errs[0], TimeoutError)
                m.errors.labels(fmt.endpoint, "timeout" if timeout else "runtime").inc()
                return _error(_Bad(f"{type(errs[0]).__name__}: {errs[0]}", None, 504 if timeout else 500))
            return {**head, "object": fmt.obj, "choices": [fmt.final(c) for c in choices], "usage": usage()}

        async def sse():
            try:
                async for c, delta, token in tokens():
                    if c.finish == "error":
                        err = c.seq.error
                        m.errors.labels(fmt.endpoint, "runtime").inc()
                        yield "data: " + json.dumps({"error": {"message": f"{type(err).__name__}: {err}",
                                                               "type": "server_error", "param": None,
                                                               "code": None}}) + "\n\n"
                        continue
                    if delta or c.finish is not None or token is not None:
                        out = fmt.chunk(c, delta, c.finish, [token] if token is not None else [])
                        yield "data: " + json.dumps({**head, "object": fmt.chunk_obj, "choices": [out]}) + "\n\n"
                if p["usage"]:
                    yield "data: " + json.dumps({**head, "object": fmt.chunk_obj, "choices": [],
                                                 "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away, or all done: free the slots
                cancel_all()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
