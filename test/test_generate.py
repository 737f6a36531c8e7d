"""Language-model bundles (issue 22): prefill + decode over a KV cache kept on its device,
`generate` against transformers' own `generate(do_sample=False)` (random-init small configs).

Tolerances: greedy tokens must be equal (64 of them); the compile-time verification also
holds the logits of every step within 2e-3 of their range (compiler/lm.py LOGITS_TOL)."""

import json
import os

import numpy as np
import pytest

from conftest import cli, EXAMPLES

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

PROMPT = [1, 5, 9, 22, 7]
STEPS = 64


def _model(kind, eos=None):
    """eos None: no end-of-sequence id (generate then makes every token it is asked for, as
    transformers' generate with min_new_tokens does)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, eos_token_id=eos)
        return T.GPT2LMHeadModel(cfg).eval()
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, eos_token_id=eos)
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**cfg)).eval()
    return T.LlamaForCausalLM(T.LlamaConfig(**cfg)).eval()


def _reference(model, prompt, n=STEPS):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def _compile(tmp_path, model, name, **kw):
    import polyarch

    path = str(tmp_path / f"{name}.pab")
    polyarch.compile(model, output=path, generate=True, tune="none", **{"max_context": 80, **kw})
    return path


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory):
    model = _model("llama")
    return model, _compile(tmp_path_factory.mktemp("llama"), model, "llama", batch=4)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_greedy_equals_transformers(tmp_path, kind):
    from polyarch.runtime import load

    model = _model(kind)
    with load(_compile(tmp_path, model, kind)) as b:
        g = b.generate(PROMPT, STEPS)
        assert list(g) == _reference(model, PROMPT)
        assert g.stats["state_host_bytes_per_step"] == 0  # the cache never left the device


def test_llama_greedy_stream_and_cache_on_device(llama_bundle):
    from polyarch.runtime import load

    model, path = llama_bundle
    with load(path) as b:
        assert sorted(b.phases) == ["decode", "prefill"]
        m = b.manifest
        assert m["generate"]["batch"] == 4 and m["generate"]["max_context"] == 80
        assert m["plans"][0]["verification"]["status"] == "verified"
        g = b.generate(PROMPT, STEPS)
        first = next(g)  # streamed: the first token comes before the others are made
        assert g.stats == {} and g.tokens == [[first]]
        tokens = [first, *g]
        assert tokens == _reference(model, PROMPT)
        st = g.stats
        assert st["decode_steps"] == STEPS - 1 and st["tokens"] == STEPS
        assert st["state_host_bytes_per_step"] == 0 and st["ttft_s"][0] > 0 and st["tpot_s"] > 0
        # the weights are stored once for both phases
        segs = m["plans"][0]["segments"]
        assert {s["name"] for s in segs} == {"prefill_seg_0", "decode_seg_0"}
        keys = [set(s["parameters"]["keys"].values()) for s in segs]
        assert keys[0] & keys[1] and m["parameters"]["count"] == len(keys[0] | keys[1])


def test_batch_of_prompts_of_different_lengths(llama_bundle):
    from polyarch.runtime import load

    model, path = llama_bundle
    prompts = [[3, 4], PROMPT, [9, 9, 9, 9, 1, 2, 3, 4, 5]]
    with load(path) as b:
        g = b.generate(prompts, 24)
        seen = list(g)
        assert {i for i, _ in seen} == {0, 1, 2}
        assert g.stats["decode_steps"] == 23  # all three decoded together, one step per token
        for i, p in enumerate(prompts):
            assert g.tokens[i] == _reference(model, p, 24), f"prompt {i}"
            assert [t for j, t in seen if j == i] == g.tokens[i]
        # more prompts than the batch: decoded in waves of 4, each as it is alone
        five = b.generate(prompts + [[7], [8, 8]], 6).run()
        assert five[4] == _reference(model, [8, 8], 6)


def test_sampling_reproducible_and_stop(llama_bundle):
    from polyarch.runtime import load

    _, path = llama_bundle
    with load(path) as b:
        kw = dict(temperature=0.9, top_k=20, top_p=0.9)
        a = b.generate(PROMPT, 32, seed=7, **kw).run()
        assert b.generate(PROMPT, 32, seed=7, **kw).run() == a
        assert b.generate(PROMPT, 32, seed=8, **kw).run() != a
        greedy = b.generate(PROMPT, 16).run()[0]
        stopped = b.generate(PROMPT, 16, stop_ids=[greedy[3]]).run()[0]
        assert stopped == greedy[:greedy.index(greedy[3]) + 1]


def test_greedy_steps_chain_on_the_device(llama_bundle):
    """Greedy decode steps pass decode's own greedy tokens to the next step on the device:
    each step is issued before the host has seen the one before it finish; a step issued for
    a sequence that then stops is left unread, and what runs next on the device is right."""
    from polyarch.runtime import load

    model, path = llama_bundle
    with load(path) as b:
        sig = b.manifest["phases"]["decode"]["signature"]["outputs"]
        assert (sig[-1]["dtype"], sig[-1]["shape"]) == ("int64", [4]) and len(sig) == 2 + 2 * 2
        b.trace = True
        assert b.generate(PROMPT, 16).run()[0] == _reference(model, PROMPT, 16)
        steps = [e for e in b.events if e["name"].startswith("decode")]
        assert len(steps) == 15
        assert all(n["start"] < p["start"] + p["dur"] for p, n in zip(steps, steps[1:]))
        b.trace = False
        greedy = _reference(model, PROMPT, 16)
        stop = greedy[5]
        assert b.generate(PROMPT, 16, stop_ids=[stop]).run()[0] == greedy[:greedy.index(stop) + 1]
        assert b.generate([3, 4], 16).run()[0] == _reference(model, [3, 4], 16)  # after the unread step
        # no step stays in flight: not after a stop, nor after a generation left part-way (its
        # buffers and device freed under a running step crashed the process)
        gen, dev = b._generator, b.plan["segments"][0]["device"]
        b.generate(PROMPT, 16, stop_ids=[stop]).run()
        assert gen.in_flight == [] and b._sems[dev].query() == b._ticks[dev]
        x = b.generate(PROMPT, 16)
        next(x), next(x)
        assert len(gen.in_flight) == 1  # the step issued ahead
        x.close()
        assert gen.in_flight == [] and b._sems[dev].query() == b._ticks[dev]
        # decode's greedy tokens are the maxima of its logits, read back beside them
        from polyarch.runtime.generate import Generator

        gen = Generator(b)
        gen.prefill(PROMPT, 0)
        logits, tokens = gen.decode([greedy[0], 0, 0, 0], [len(PROMPT), 0, 0, 0], greedy=True)
        assert tokens.dtype == np.int64 and tokens.shape == (4,)
        assert all(logits[s][tokens[s]] == logits[s].max() for s in range(4))
        assert int(tokens[0]) == greedy[1]


def test_serving_worker_reads_greedy_tokens_not_logits(llama_bundle):
    """The server's continuous batching (runtime/batching.GenerationWorker): a step whose
    sequences are all greedy takes decode's own greedy tokens (no logits read back); a step
    with a sampled sequence in it reads the logits. Each sequence's tokens are generate's."""
    from polyarch.runtime import load
    from polyarch.runtime.batching import GenerationWorker

    model, path = llama_bundle
    with load(path) as b:
        sampled = b.generate([3, 4], 8, temperature=0.8, seed=5).run()[0]
        w = GenerationWorker(b)
        calls = {"decode": 0, "start_decode": 0}
        for name in calls:  # count the worker's calls of each, each still the Generator's own
            def counted(*a, _f=getattr(w.gen, name), _n=name, **k):
                calls[_n] += 1
                return _f(*a, **k)
            setattr(w.gen, name, counted)
        try:
            greedy = [w.submit(p, 10) for p in ([3, 4], PROMPT, [9, 9, 9])]
            for s in greedy:
                assert s.done.wait(120) and s.error is None, s.error
            assert calls["decode"] == 0 and calls["start_decode"] >= 9
            mixed = [w.submit(PROMPT, 6), w.submit([3, 4], 8, temperature=0.8, seed=5)]
            for s in mixed:
                assert s.done.wait(120) and s.error is None, s.error
            assert calls["decode"] >= 5
        finally:
            w.close()
        assert [s.tokens for s in greedy] == [_reference(model, p, 10) for p in ([3, 4], PROMPT, [9, 9, 9])]
        assert mixed[0].tokens == _reference(model, PROMPT, 6) and mixed[1].tokens == sampled


def test_decode_greedy_output_checked_on_load(tmp_path, llama_bundle):
    """A manifest whose decode gives something other than its batch's int64 greedy tokens
    after the cache is refused when loaded, with what is wrong."""
    import zipfile

    from polyarch.errors import BundleError
    from polyarch.runtime import load
    from polyarch.runtime.bundle import MANIFEST

    _, path = llama_bundle
    for name, edit in (("dtype", dict(dtype="float32")), ("shape", dict(shape=[1]))):
        dst = str(tmp_path / f"{name}.pab")
        with zipfile.ZipFile(path) as zi, zipfile.ZipFile(dst, "w") as zo:
            for info in zi.infolist():
                data = zi.read(info)
                if info.filename == MANIFEST:
                    m = json.loads(data)
                    m["phases"]["decode"]["signature"]["outputs"][-1].update(edit)
                    data = json.dumps(m)
                zo.writestr(info, data)
        with pytest.raises(BundleError, match=r"phase 'decode''s last output is not its 4 greedy tokens \(int64\).*"
                                              r"Fix: recompile it"):
            load(dst)


def test_odd_context_pads_the_cache_rows(tmp_path):
    """A max_context off a multiple of 16 gets a cache of rows rounded up (causal_lm.cache_rows:
    IREE multiplies queries by keys over an odd length 2.4x slower), not past the model's
    position table; the context limit stays max_context, and generation up to it is right."""
    from polyarch import PolyarchError
    from polyarch.compiler.causal_lm import cache_rows
    from polyarch.runtime import load

    model = _model("gpt2")  # 128 positions
    assert (cache_rows(model, 75), cache_rows(model, 80), cache_rows(model, 127)) == (80, 80, 128)
    short = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=70))
    assert cache_rows(short, 70) == 70 and cache_rows(short, 66) == 70
    with load(_compile(tmp_path, model, "odd", max_context=75)) as b:
        assert b.manifest["phases"]["decode"]["signature"]["inputs"][2]["shape"][2] == 80
        assert list(b.generate(PROMPT, 70)) == _reference(model, PROMPT, 70)
        with pytest.raises(PolyarchError, match="would pass the bundle's context of 75"):
            b.generate(PROMPT, 71)


def test_context_limits_are_one_line_errors(llama_bundle):
    from polyarch import PolyarchError
    from polyarch.runtime import load

    _, path = llama_bundle
    with load(path) as b:
        with pytest.raises(PolyarchError, match="more than the bundle's context of 80"):
            b.generate(list(range(81)), 1)
        with pytest.raises(PolyarchError, match=r"\+ 77 new tokens would pass the bundle's context of 80") as e:
            b.generate(PROMPT, 77)
        assert "at most 75 new tokens" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(PolyarchError, match="outside the vocabulary of 128"):
            b.generate([1, 500], 4)
        with pytest.raises(PolyarchError, match="top_p"):
            b.generate(PROMPT, 4, temperature=1.0, top_p=0)


def test_plain_bundle_has_no_generate(tmp_path, mlp):
    import polyarch
    from polyarch.errors import BundleError
    from polyarch.runtime import load

    model, inputs = mlp
    path = polyarch.compile(model, inputs, output=str(tmp_path / "mlp.pab"), verify=False, tune="none")
    with load(path) as b, pytest.raises(BundleError, match="was not compiled for generation"):
        b.generate([1, 2], 4)
    with pytest.raises(polyarch.PolyarchError, match="cache shape"):
        polyarch.compile(model, output=str(tmp_path / "x.pab"), generate=True)
    with pytest.raises(polyarch.PolyarchError, match="max_context"):
        polyarch.CompileOptions(generate=True, max_context=1)
    with pytest.raises(polyarch.PolyarchError, match="more than the 128 positions GPT2LMHeadModel was built for"):
        polyarch.compile(_model("gpt2"), output=str(tmp_path / "g.pab"), generate=True, max_context=129)


def test_cpu_vulkan_plan_with_a_pinned_block(tmp_path):
    """A Llama block's MLP pinned to Vulkan (lavapipe here): both phases split, same tokens.
    The same bundle carries the model as its own draft (issue 23), its blocks pinned to Vulkan
    (the draft on vulkan, the target mostly on cpu): speculative greedy tokens are the same too,
    and with a draft equal to the target nearly every drafted token is accepted."""
    from polyarch.runtime import load

    model = _model("llama")
    path = _compile(tmp_path, model, "split", devices=["cpu", "vulkan"], pins=["model.layers.1.mlp=vulkan"],
                    draft=model, speculate=3, draft_pins=["model.layers=vulkan"])
    with load(path) as b:
        assert {s["device"] for s in b.plan["segments"] if s["name"].startswith("decode_")} == {"cpu", "vulkan"}
        assert {s["device"] for s in b.plan["segments"] if s["name"].startswith("prefill_")} == {"cpu", "vulkan"}
        draft_ops = [s for s in b.plan["segments"] if s["name"].startswith("draft_decode_")]
        assert "vulkan" in {s["device"] for s in draft_ops}
        assert list(b.generate(PROMPT, STEPS, speculative=False)) == _reference(model, PROMPT)
        g = b.generate(PROMPT, STEPS)
        assert list(g) == _reference(model, PROMPT)
        assert g.stats["speculative"]["acceptance_rate"] > 0.9


def test_cli_compile_options_file_and_generate(tmp_path):
    """`compile --options` with generate (what CMake and the setuptools hook write), then
    `polyarch generate`: the same tokens as the API."""
    from polyarch.runtime import load

    opts = tmp_path / "o.json"
    opts.write_text(json.dumps({"generate": True, "max_context": 48, "batch": 2, "tune": "none"}))
    out = str(tmp_path / "tl.pab")
    r = cli("compile", os.path.join(EXAMPLES, "tiny_llama.py"), "--options", str(opts), "-o", out)
    assert r.returncode == 0, r.stderr
    assert "verified plan cpu" in r.stderr
    r = cli("generate", out, "--ids", "1,2,3", "-n", "12")
    assert r.returncode == 0, r.stderr
    with load(out) as b:
        assert [int(t) for t in r.stdout.split()] == b.generate([1, 2, 3], 12).run()[0]
    assert "KV-cache bytes through the host per step: 0" in r.stderr
    r = cli("generate", out, "--ids", "1,2,3", "-n", "46")
    assert r.returncode == 1 and "pass the bundle's context of 48" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_16_bit_weights(tmp_path, llama_bundle):
    """--weights-dtype f16 / bf16: weights, activations and cache in 16 bits, half the bytes;
    verified at compile time against the phases run by PyTorch in the same dtype (logits within
    5e-2 (f16) and 1e-1 (bf16) of their range, tokens equal but for near ties)."""
    import copy

    from polyarch.runtime import load

    model, path = llama_bundle
    with load(path) as b:
        f32 = b.manifest["parameters"]
    for dt, torch_dt, tol in (("f16", torch.float16, 5e-2), ("bf16", torch.bfloat16, 1e-1)):
        with load(_compile(tmp_path, model, dt, weights_dtype=dt)) as b:
            m = b.manifest
            assert m["generate"]["dtype"] == {"f16": "float16", "bf16": "bfloat16"}[dt]
            v = m["plans"][0]["verification"]
            assert v["status"] == "verified" and v["max_rel_logits_error"] <= tol == v["tolerance"]
            assert m["parameters"]["referenced_bytes"] * 2 == f32["referenced_bytes"]  # half the bytes stored
            tokens = list(b.generate(PROMPT, STEPS))
            if dt == "f16":  # bf16's coarser rounding lets random-init near ties go either way over 64 steps
                assert tokens == _reference(copy.deepcopy(model).to(torch_dt), PROMPT)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is left as it was


def _word_tokenizer(path, n=128):
    """A word-level tokenizer.json of n tokens, w0 .. w{n-1} (the `tokenizers` package)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_text_in_text_out_and_eos(tmp_path, llama_bundle):
    """A tokenizer carried in the bundle: text prompts, text out (API and CLI); generation
    stops at the model's end-of-sequence id by default, as transformers' generate does."""
    from polyarch.runtime import load

    ids = [1, 5, 9]
    greedy = _reference(_model("llama"), ids, 8)
    k = next(k for k in range(1, 8) if greedy[k] not in greedy[:k])  # a token first made at step k
    model = _model("llama", eos=greedy[k])
    tok = _word_tokenizer(tmp_path / "tokenizer.json")
    path = _compile(tmp_path, model, "text", tokenizer=tok, max_context=48)
    with load(path) as b:
        assert b.manifest["generate"]["eos_token_ids"] == [greedy[k]]
        g = b.generate("w1 w5 w9", 8)
        g.run()
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, 3:].tolist()
        assert g.tokens[0] == greedy[:k + 1] == ref  # stopped at the end-of-sequence id, eos included
        assert g.text == " ".join(f"w{t}" for t in greedy[:k + 1])
        assert b.generate("w1 w5 w9", 8, stop_ids=()).run()[0] == greedy  # () : no stop
    r = cli("generate", path, "--prompt", "w1 w5 w9", "-n", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == " ".join(f"w{t}" for t in greedy[:k + 1])
    r = cli("generate", path, "--ids", "1,5,9", "-n", "8", "--no-stop")
    assert [int(t) for t in r.stdout.split()] == greedy
    with load(llama_bundle[1]) as b:
        with pytest.raises(Exception, match="carries no tokenizer"):
            b.generate("w1 w2", 4)


def test_generate_options_from_every_front_end(tmp_path):
    """The setuptools hook's table and the options file reach CompileOptions alike (CMake's
    GENERATE writes the same JSON: test_cmake builds one)."""
    from polyarch.compiler.options import CompileOptions
    from polyarch.tools.setuptools_hook import compile_options

    o = compile_options({"source": "llm.py", "generate": True, "max_context": 64, "batch": 2,
                         "weights_dtype": "f16", "tokenizer": "tok/tokenizer.json"}, str(tmp_path))
    assert (o.generate, o.max_context, o.batch, o.weights_dtype) == (True, 64, 2, "f16")
    assert o.tokenizer == os.path.join(str(tmp_path), "tok/tokenizer.json")
    assert CompileOptions.from_json(o.to_json()) == CompileOptions.from_json(json.loads(json.dumps(o.to_json())))
    for bad, what in (({"generate": "yes"}, "true or false"), ({"generate": True, "batch": 0}, "batch"),
                      ({"weights_dtype": "f16"}, "applies to --generate"), ({"generate": True, "weights_dtype": "i8"},
                                                                             "weights_dtype")):
        with pytest.raises(Exception, match=what):
            CompileOptions.from_json(bad)


def test_sampler_distribution_and_limits():
    """runtime.generate.sample: greedy at temperature 0; softmax(logits / T) frequencies within
    0.01 over 40000 draws; top_k and top_p keep exactly the most likely tokens they name."""
    from polyarch.runtime.generate import sample

    rng = np.random.Generator(np.random.PCG64(0))
    logits = np.array([0.0, 1.0, 2.0, 3.0, -5.0])
    assert sample(logits, rng) == 3 == sample(logits, None, temperature=1.0)
    p = np.exp(logits / 2.0 - 1.5)
    p /= p.sum()
    freq = np.bincount([sample(logits, rng, temperature=2.0) for _ in range(40000)], minlength=5) / 40000
    np.testing.assert_allclose(freq, p, atol=0.01)
    assert {sample(logits, rng, temperature=5.0, top_k=2) for _ in range(500)} == {2, 3}
    # top_p 0.8 at T=1: p(3)=0.64, p(2)=0.24 reach it; token 1 (0.09) is left out
    assert {sample(logits, rng, temperature=1.0, top_p=0.8) for _ in range(2000)} == {2, 3}
    big = np.random.default_rng(1).standard_normal(32000) * 3  # the partition grows until top_p is reached
    z = np.exp(big - big.max())
    z /= z.sum()
    order = np.argsort(-z)
    keep = set(order[:int(np.searchsorted(np.cumsum(z[order]), 0.95) + 1)].tolist())
    got = {sample(big, rng, temperature=1.0, top_p=0.95) for _ in range(3000)}
    assert got <= keep and len(got) > 64


@pytest.mark.parametrize("t", [1, 5])
def test_grouped_attention_equals_eager(t):
    """Decode-like phases export with grouped attention (no repeat_kv copy of the cache): the
    same numbers as transformers' eager attention, with a mask, for 1 and 5 query tokens
    (decode, verify). Tolerance 1e-6 of the largest output (f32 sums in another order)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from polyarch.compiler.causal_lm import grouped_attention

    model = _model("llama")
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((4, t), (2, 9), (2, 9)))
    mask = torch.zeros(2, 1, t, 9)
    mask[0, :, :, 6:] = -1e9  # the first sequence's last keys hidden
    want, want_w = eager_attention_forward(attn, q, k, v, mask, scaling=0.25)
    got, got_w = grouped_attention(attn, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, t, 4, 16) and got_w.shape == want_w.shape
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    assert (got_w - want_w).abs().max() <= 1e-6
    # the decode phase exports without repeat_kv's expand, prefill with prefill_attention
    from polyarch.compiler import lm

    with lm._attention(model, "decode"):
        assert model.config._attn_implementation == "polyarch_grouped"
    with lm._attention(model, "prefill"):
        assert model.config._attn_implementation == "polyarch_prefill"
    assert model.config._attn_implementation not in ("polyarch_prefill", "polyarch_grouped")  # restored


@pytest.mark.parametrize("t", [1, 5, 16])
def test_prefill_attention_equals_eager(t):
    """Prefill exports with prefill_attention (softmax written out, normalised after the product
    with the values): eager attention's numbers under a causal mask and under one hiding a
    sequence's last keys. Tolerance 1e-5 of the largest output (f32 sums in another order);
    it returns no attention weights."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from polyarch.compiler.causal_lm import prefill_attention

    attn = _model("llama").model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, t, 16, generator=g) * 3 for h in (4, 2, 2))
    mask = torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), 1)[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, t // 2 + 1:] = torch.finfo(torch.float32).min
    want, _ = eager_attention_forward(attn, q, k, v, mask, scaling=0.25)
    got, weights = prefill_attention(attn, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, t, 4, 16) and weights is None
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_prefill_refuses_ids_not_padded(llama_bundle):
    """Prefill takes its ids padded with -1 to a multiple of 16 (generate.prefill_multiple; IREE
    miscompiles its attention for other lengths): called directly with 3 ids, as a phase or as
    the bundle's own call, it is a clear error, not wrong logits; padded, it gives generate's
    first token."""
    from polyarch.errors import BundleError
    from polyarch.runtime import load
    from polyarch.runtime.generate import Generator

    _, path = llama_bundle
    with load(path) as b:
        assert b.manifest["generate"]["prefill_multiple"] == 16
        cache = Generator(b)._empty_cache()
        for call in (lambda ids: b.run_phase("prefill", [ids, np.zeros(1, np.int64), *cache]),
                     lambda ids: b(ids, np.zeros(1, np.int64), *cache)):
            with pytest.raises(BundleError, match="multiple of 16 tokens, got 3"):
                call(np.array([[1, 5, 9]], np.int64))
        padded = np.array([[1, 5, 9] + [-1] * 13], np.int64)
        logits = b.run_phase("prefill", [padded, np.zeros(1, np.int64), *cache])[0]
        assert int(np.argmax(logits[0])) == list(b.generate([1, 5, 9], 1))[0]


def test_greedy_sample_of_16_bit_logits_is_numpys_argmax():
    """Greedy sampling widens 16-bit logits to f32 before argmax (numpy's argmax over f16 is
    scalar): the same index as numpy's argmax of the logits as given, ties to the first, for
    f16, bf16 and f32 rows and a list."""
    import ml_dtypes

    from polyarch.runtime.generate import sample

    rng = np.random.default_rng(0)
    for dt in (np.float16, ml_dtypes.bfloat16, np.float32):
        for _ in range(100):
            a = rng.standard_normal(500).astype(dt)
            a[rng.integers(0, 500, 3)] = a.max()  # ties: the first wins
            assert sample(a, None) == int(np.argmax(a)), dt
    assert sample([0.5, 2.0, 2.0, -1.0], None) == 1
