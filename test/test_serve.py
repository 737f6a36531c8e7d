"""`polyarch serve` (issue 24), tested with the real clients of the protocols it speaks:
Triton's `tritonclient.http` (KServe v2, JSON and binary tensors) and the `openai` client
(completions, streamed), against servers this test starts on loopback.

Tolerances: tensors must equal the in-process runtime's bit for bit (the same plan on the
same device: batching concatenates rows, and a row's values do not depend on the others);
generated tokens must equal `Bundle.generate`'s (greedy, and sampled with a seed)."""

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import polyarch
from conftest import EXAMPLES, ROOT, example
from polyarch.runtime import load

POLYARCH = os.path.join(os.path.dirname(sys.executable), "polyarch")


class Server:
    """`polyarch serve` in its own process, on a free loopback port."""

    def __init__(self, bundle, *args, exe=POLYARCH, env=None):
        self.proc = subprocess.Popen([exe, "serve", str(bundle), "--port", "0", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError("the server stopped: " + "".join(self.lines))
            self.lines.append(line)
            found = re.search(r"serving \S+ at http://([\d.]+):(\d+)", line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                self.url = f"http://{self.host}:{self.port}"
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise AssertionError("the server did not start")

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read()

    def post(self, path, body, headers=None):
        req = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def metric(self, name, **labels):
        text = self.get("/metrics")[1].decode()
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} w3 {% else %} w4 {% endif %}"
        "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} w4{% endif %}")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    ex = example("mlp")
    model, (x,) = ex.build(), ex.example_inputs()
    mlp = polyarch.compile(model, (x[:8],), ["cpu"], output=str(d / "mlp.pab"), dynamic_dims=["input0:0:16"],
                           tune="none")
    ex = example("minilm")
    minilm = polyarch.compile(ex.build(), ex.example_inputs(), ["cpu"], output=str(d / "minilm.pab"), tune="none")
    from test_generate import _word_tokenizer

    tok = _word_tokenizer(d / "tokenizer.json", 256)
    with open(d / "tokenizer_config.json", "w") as f:  # as transformers saves it: the chat template beside
        json.dump({"bos_token": "w1", "eos_token": "w2", "chat_template": CHAT}, f)
    llm = polyarch.compile(example("tiny_llama").build(), output=str(d / "llm.pab"), generate=True, tune="none",
                           max_context=64, batch=4, tokenizer=tok)
    return {"mlp": mlp, "minilm": minilm, "llm": llm, "dir": d}


def _triton_infer(client, name, arrays, specs, binary=True):
    import tritonclient.http as th

    inputs = []
    for a, (iname, dt) in zip(arrays, specs):
        i = th.InferInput(iname, list(a.shape), dt)
        i.set_data_from_numpy(a, binary_data=binary)
        inputs.append(i)
    return client.infer(name, inputs)


def test_tritonclient_minilm_bit_for_bit(bundles, minilm):
    """MiniLM with its real weights: Triton's client, binary and JSON tensors, metadata, readiness."""
    import tritonclient.http as th

    ids, mask = (np.asarray(t.numpy()) for t in minilm[1])
    with load(bundles["minilm"]) as b:
        want = b(ids, mask)
        names = [i["name"] for i in b.inputs]
    with Server(bundles["minilm"]) as s:
        c = th.InferenceServerClient(f"{s.host}:{s.port}")
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("minilm")
        meta = c.get_model_metadata("minilm")
        assert [i["name"] for i in meta["inputs"]] == names
        assert meta["inputs"][0] == {"name": names[0], "datatype": "INT64", "shape": list(ids.shape)}
        for binary in (True, False):
            r = _triton_infer(c, "minilm", [ids, mask], [(n, "INT64") for n in names], binary)
            out = r.as_numpy(meta["outputs"][0]["name"])
            assert out.dtype == want.dtype and np.array_equal(out, want)
        assert s.metric("polyarch_requests_total", endpoint="infer", code="200") == 2
        assert s.metric("polyarch_device_busy_seconds_total", device="cpu") > 0


def test_dynamic_batching_with_concurrent_tritonclients(bundles):
    """32 concurrent requests of 1..5 rows to an MLP with a dynamic batch: each gets exactly the
    rows the in-process runtime gives for its own input; calls took several requests at once."""
    import tritonclient.http as th

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 6)), 256)).astype(np.float32) for _ in range(32)]
    with load(bundles["mlp"]) as b:
        want = [b(x) for x in xs]
    with Server(bundles["mlp"], "--max-delay-ms", "20") as s:
        def one(x):
            c = th.InferenceServerClient(f"{s.host}:{s.port}")
            return _triton_infer(c, "mlp", [x], [("x", "FP32")]).as_numpy("output0")

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(one, xs))
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
        calls = s.metric("polyarch_batch_requests_count")
        assert 0 < calls < 32, "no two requests shared a call"
        assert s.metric("polyarch_batch_requests_sum") == 32


def test_bad_requests_are_400_naming_the_field_and_the_server_goes_on(bundles):
    x = np.ones((2, 256), np.float32)
    good = {"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32", "data": x.ravel().tolist()}]}
    cases = [
        (b"{not json", "body"),
        (json.dumps({"inputs": [{"name": "y", "shape": [2, 256], "datatype": "FP32", "data": []}]}), "inputs[0].name"),
        (json.dumps({"inputs": [{"name": "x", "shape": [2, 256], "datatype": "INT64", "data": [0] * 512}]}),
         "inputs[0].datatype"),
        (json.dumps({"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32", "data": [1.0] * 7}]}),
         "inputs[0].data"),
        (json.dumps({"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 2048}}]}), "inputs[0].parameters.binary_data_size"),
        (json.dumps({"inputs": [{"name": "x", "shape": [40, 256], "datatype": "FP32", "data": [0.0] * 10240}]}),
         "dimension 0 is 40; this bundle accepts 1 to 16"),
        (json.dumps({**good, "outputs": [{"name": "nope"}]}), "outputs"),
    ]
    with Server(bundles["mlp"]) as s:
        for body, field in cases:
            code, _, out = s.post("/v2/models/mlp/infer", body if isinstance(body, bytes) else body.encode())
            assert code == 400, (field, out)
            assert field in json.loads(out)["error"], out
        code, _, _ = s.post("/v2/models/other/infer", json.dumps(good).encode())
        assert code == 404
        code, _, out = s.post("/v2/models/mlp/infer", json.dumps(good).encode())
        assert code == 200
        with load(bundles["mlp"]) as b:
            assert np.array_equal(np.array(json.loads(out)["outputs"][0]["data"], np.float32).reshape(2, 64), b(x))
        assert s.metric("polyarch_request_errors_total", endpoint="infer", cause="bad_request") == len(cases)


def test_openai_client_streams_the_tokens_generate_gives(bundles):
    """The `openai` client: a streamed greedy completion of text, a sampled one with a seed, and
    four streams at once (continuous batching over the bundle's 4 slots, then a fifth waiting):
    each equals `Bundle.generate` for its own prompt and settings."""
    import openai

    prompts = ["w1 w2 w3", "w7", "w9 w9 w4 w2 w1", "w30 w31", "w200 w5 w6"]
    with load(bundles["llm"]) as b:
        want = []
        for p in prompts:
            g = b.generate(p, 12)
            g.run()
            want.append((g.tokens[0], g.text))
        g = b.generate("w3 w4", 10, temperature=0.9, top_k=50, seed=11)
        g.run()
        sampled = g.tokens[0]
    with Server(bundles["llm"]) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["llm"]

        def stream(p):
            ids, text, finish = [], "", None
            for chunk in client.completions.create(model="llm", prompt=p, max_tokens=12, temperature=0, stream=True):
                ch = chunk.choices[0]
                ids += ch.model_extra["token_ids"]
                text += ch.text
                finish = ch.finish_reason or finish
            return ids, text, finish

        ids, text, finish = stream(prompts[0])
        assert (ids, text) == want[0] and finish in ("length", "stop")
        r = client.completions.create(model="llm", prompt="w3 w4", max_tokens=10, temperature=0.9, seed=11,
                                      extra_body={"top_k": 50})
        assert r.choices[0].model_extra["token_ids"] == sampled
        assert r.usage.completion_tokens == len(sampled) and r.usage.prompt_tokens == 2
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            got = list(pool.map(stream, prompts))
        assert [g[:2] for g in got] == want
        assert s.metric("polyarch_generated_tokens_total") == len(want[0][0]) + len(sampled) + sum(len(w[0]) for w in want)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="llm", prompt="w1", max_tokens=0)
        with pytest.raises(openai.BadRequestError, match="context of 64"):
            client.completions.create(model="llm", prompt="w1 " * 60, max_tokens=10)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="w1", max_tokens=2)


def _minilm_request(bundles, minilm):
    """A v2 infer request body (JSON tensors) of MiniLM's example inputs, and the runtime's output."""
    ids, mask = (np.asarray(t.numpy()) for t in minilm[1])
    with load(bundles["minilm"]) as b:
        names = [i["name"] for i in b.inputs]
        want = b(ids, mask)
    body = json.dumps({"inputs": [{"name": n, "shape": list(a.shape), "datatype": "INT64", "data": a.ravel().tolist()}
                                  for n, a in zip(names, (ids, mask))]}).encode()
    return body, want


def test_overload_answers_503_with_retry_after_and_loses_no_request(bundles, minilm):
    """A queue of one: of 24 concurrent requests some are refused (503, Retry-After), every one is
    answered, and the server serves on."""
    body, _ = _minilm_request(bundles, minilm)
    with Server(bundles["minilm"], "--max-queue", "1") as s:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda _: s.post("/v2/models/minilm/infer", body), range(24)))
        codes = [a[0] for a in answers]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
        refused = [a for a in answers if a[0] == 503]
        assert all(int(a[1]["retry-after"]) >= 1 and "queue is full" in json.loads(a[2])["error"] for a in refused)
        assert s.metric("polyarch_request_errors_total", cause="overloaded") == codes.count(503)
        assert s.post("/v2/models/minilm/infer", body)[0] == 200


def test_sigterm_finishes_the_requests_in_flight(bundles, minilm):
    body, want = _minilm_request(bundles, minilm)
    s = Server(bundles["minilm"])
    n = 8
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(s.post, "/v2/models/minilm/infer", body) for _ in range(n)]
        deadline = time.time() + 30
        while s.metric("polyarch_in_flight") < n + 1 and time.time() < deadline:  # + the /metrics request itself
            time.sleep(0.005)
        assert not all(f.done() for f in futures), "the requests were done before the signal: nothing tested"
        s.proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
    assert s.proc.wait(30) == 0
    for code, _, out in answers:
        assert code == 200
        o = json.loads(out)["outputs"][0]
        assert np.array_equal(np.array(o["data"], np.float32).reshape(o["shape"]), want)


@pytest.mark.vulkan
def test_load_aware_routing_uses_both_plans(bundles):
    """A bundle with a cpu plan and a vulkan plan (lavapipe: about 100x slower here), served
    with --plan all. A moderate load stays on cpu (by prediction it is always free sooner);
    a spike that fills cpu's queue spills onto vulkan instead of being refused; every answer
    is right and no request goes unanswered (a client that gets 503 retries after Retry-After)."""
    ex = example("mlp")
    model, (x,) = ex.build(), ex.example_inputs()
    path = polyarch.compile(model, (x[:8],), output=str(bundles["dir"] / "two.pab"), dynamic_dims=["input0:0:16"],
                            plans=[["cpu"], ["vulkan"]], tune="none")
    xs = [np.random.default_rng(i).standard_normal((16, 256)).astype(np.float32) for i in range(64)]
    with load(path, plan="cpu") as b:
        plans = b.plans
        want = [b(a) for a in xs]
        name = b.inputs[0]["name"]
    assert sorted(plans) == ["cpu", "vulkan"]

    def body(a):
        return json.dumps({"inputs": [{"name": name, "shape": list(a.shape), "datatype": "FP32",
                                       "data": a.ravel().tolist()}]}).encode()

    def one(s, i):
        for _ in range(100):
            code, headers, out = s.post("/v2/models/two/infer", body(xs[i]))
            if code != 503:
                break
            time.sleep(float(headers.get("retry-after", 1)) / 20)  # (a patient client; kept short here)
        assert code == 200, out
        o = json.loads(out)["outputs"][0]
        return np.array(o["data"], np.float32).reshape(o["shape"])

    with Server(path, "--plan", "all", "--max-batch", "16", "--max-queue", "2") as s:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # moderate: cpu alone
            got = list(pool.map(lambda i: one(s, i), range(16)))
        assert s.metric("polyarch_plan_requests_total", plan="vulkan") == 0
        with concurrent.futures.ThreadPoolExecutor(24) as pool:  # a spike: cpu's queue of 2 fills
            got += list(pool.map(lambda i: one(s, i), range(16, 64)))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        by_plan = {p: s.metric("polyarch_plan_requests_total", plan=p) for p in plans}
        assert sum(by_plan.values()) == len(xs) and all(v > 0 for v in by_plan.values()), by_plan


@pytest.mark.slow
def test_runtime_only_install_runs_and_serves(bundles, tmp_path):
    """A fresh venv with `pip install polyarch` (no compiler extra): run, inspect, generate and
    serve work; compile says in one line what to install."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    keep = re.compile(r"^(pyproject\.toml|[a-z_]+\.py|(compiler|dialects|passes|runtime|server|targets|tools)/.*\.py)$")
    for f in files:
        if keep.match(f):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy(os.path.join(ROOT, f), src / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    exe = str(venv / "bin" / "polyarch")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    lacking = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, env=env)
    assert lacking.returncode != 0, "the runtime-only venv has torch"
    r = subprocess.run([exe, "run", str(bundles["mlp"])], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "output 0: 8x64xfloat32" in r.stdout, r.stderr
    r = subprocess.run([exe, "inspect", str(bundles["llm"])], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "generate", str(bundles["llm"]), "--prompt", "w1 w2", "-n", "4"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "compile", os.path.join(EXAMPLES, "mlp.py")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: `polyarch compile` needs the compiler, which this install does not have (no module torch); run, "
        "inspect, generate and serve need only the runtime. Fix: pip install 'polyarch[compiler]'"]
    import tritonclient.http as th

    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    with load(bundles["mlp"]) as b:
        want = b(x)
    with Server(bundles["mlp"], exe=exe, env=env) as s:
        c = th.InferenceServerClient(f"{s.host}:{s.port}")
        assert np.array_equal(_triton_infer(c, "mlp", [x], [("x", "FP32")]).as_numpy("output0"), want)


def test_routing_in_a_simulated_fleet():
    """The router's own decision (server/routing.order) over a simulated fleet: a spike of 1.2x
    what the fastest plan can take. All on the fastest plan, the queue grows without bound;
    routed, the spike spills onto the slower plan and p99 falls; below capacity, the fast
    plan takes (nearly) everything."""
    from polyarch.server.routing import poisson, simulate

    fleet = {"h100": 0.010, "cpu": 0.025}  # seconds per call, as plans predict them
    spike = poisson(120, 2.0, seed=1)
    alone = simulate(spike, fleet, only="h100")
    routed = simulate(spike, fleet)
    p99 = lambda r: sorted(r["latency_s"])[int(0.99 * (len(r["latency_s"]) - 1))]  # noqa: E731
    assert routed["by_plan"]["cpu"] > 0.2 * len(spike) and routed["by_plan"]["h100"] > 0.5 * len(spike)
    assert p99(routed) < 0.4 * p99(alone), (p99(routed), p99(alone))
    assert sum(routed["by_plan"].values()) == len(spike)
    calm = simulate(poisson(20, 2.0, seed=2), fleet)
    assert calm["by_plan"]["cpu"] <= 0.05 * sum(calm["by_plan"].values())


def test_openai_chat_streams_the_rendered_conversation(bundles):
    """/v1/chat/completions: the conversation rendered by the chat template carried from beside
    the tokenizer, streamed as chat.completion.chunk deltas (the role first); the tokens are
    those `Bundle.generate` gives for the rendered text."""
    import openai

    msgs = [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w12"},
            {"role": "user", "content": [{"type": "text", "text": "w13"}]}]
    with load(bundles["llm"]) as b:
        g = b.generate("w1 w3 w10 w11 w4 w12 w3 w13 w4", 8)
        g.run()
    with Server(bundles["llm"]) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        text, ids, roles = "", [], []
        for ch in client.chat.completions.create(model="llm", messages=msgs, max_tokens=8, temperature=0, stream=True):
            d = ch.choices[0].delta
            text += d.content or ""
            ids += ch.choices[0].model_extra["token_ids"]
            roles.append(d.role)
        assert (ids, text) == (g.tokens[0], g.text) and roles[0] == "assistant"
        r = client.chat.completions.create(model="llm", messages=msgs, max_completion_tokens=8, temperature=0)
        assert r.choices[0].message.content == g.text and r.usage.prompt_tokens == 9
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\]"):
            client.chat.completions.create(model="llm", messages=[{"content": "w1"}], max_tokens=2)


def test_a_request_that_fails_in_the_runtime_fails_alone(tmp_path):
    """A model that computes an index from its input: one request of a batch makes an index out
    of range, found while the batched call runs. That request alone gets the error (400, the op
    named); the others of its batch get their rows, bit for bit; the server serves on."""
    import torch
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(16, 8)

        def forward(self, x):
            return self.emb((x[:, 0] * 4).long()) + x[:, 1:9]

    path = polyarch.compile(Lookup().eval(), (torch.rand(4, 9),), ["cpu"], output=str(tmp_path / "lookup.pab"),
                            dynamic_dims=["input0:0:16"], tune="none")
    rng = np.random.default_rng(0)
    xs = [rng.random((2, 9)).astype(np.float32) for _ in range(8)]
    xs[3][1, 0] = 10.0  # index 40 of 16
    with load(path) as b:
        want = {i: b(x) for i, x in enumerate(xs) if i != 3}
        name = b.inputs[0]["name"]
    with Server(path, "--max-delay-ms", "50") as s:
        def one(i):
            c = th.InferenceServerClient(f"{s.host}:{s.port}")
            try:
                return _triton_infer(c, "lookup", [xs[i]], [(name, "FP32")]).as_numpy("output0")
            except InferenceServerException as e:
                return e

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(8)))
        assert isinstance(got[3], InferenceServerException) and "out of range in torch.aten.embedding" in str(got[3])
        assert str(got[3].status()) == "400"
        for i, w in want.items():
            assert np.array_equal(got[i], w), i
        assert s.metric("polyarch_split_batches") >= 1  # the failing request was in a batch, run again alone
        assert s.metric("polyarch_request_errors_total", cause="runtime") == 1
        assert np.array_equal(one(0), want[0])
