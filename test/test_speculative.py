"""Speculative decoding (issue 23): a draft model compiled into the bundle drafts tokens, the
model checks them in one `verify` call. Random-init small configs: the target is a 2-layer
Llama whose second layer is scaled towards the identity, the draft its first layer alone
(the same embedding, norm and head), so that the draft is often, not always, right.

Exactness: greedy speculative tokens must equal transformers' greedy tokens of the target,
every one of 48; sampling is checked for reproducibility and for following the target's
distribution (the rejection scheme) through the sampler's own functions."""

import os
import textwrap

import numpy as np
import pytest

from conftest import cli

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

STEPS = 48
PROMPTS = [[1, 5, 9, 22, 7], [3, 4], [8, 8, 8, 2, 50, 61, 70, 9, 1]]

MODELS = textwrap.dedent('''
    import torch
    import transformers

    CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, eos_token_id=None)


    def target(scale=0.05):
        """2 layers; the second's residual branches scaled by `scale` (towards the identity)."""
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=2, **CFG)).eval()
        with torch.no_grad():
            layer = m.model.layers[1]
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
        return m


    def draft():
        """The target's first layer alone, with its embedding, norm and head."""
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=1, **CFG)).eval()
        m.load_state_dict(target().state_dict(), strict=False)
        return m
''')


def _reference(model, prompt, n=STEPS):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """The bundle, compiled from the command line: target (f32) + draft (f16 weights), batch 2, up
    to 4 drafted a step."""
    import importlib.util

    d = tmp_path_factory.mktemp("spec")
    (d / "models.py").write_text(MODELS)
    path = str(d / "spec.pab")
    r = cli("compile", str(d / "models.py") + ":target", "--generate", "--draft", str(d / "models.py") + ":draft",
            "--speculate", "4", "--draft-dtype", "f16", "--batch", "2", "--max-context", "96", "--tune", "none", "-q",
            "-o", path)
    assert r.returncode == 0, r.stderr
    spec_ = importlib.util.spec_from_file_location("spec_models", d / "models.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    return mod, path


def test_greedy_speculative_is_the_targets_own(spec):
    from polyarch.runtime import load

    mod, path = spec
    target = mod.target()
    with load(path) as b:
        assert sorted(b.phases) == ["decode", "draft_decode", "draft_prefill", "draft_verify", "prefill", "verify"]
        assert b.manifest["generate"]["draft"]["speculate"] == 4
        assert b.manifest["generate"]["draft"]["dtype"] == "float16" and b.manifest["generate"]["dtype"] == "float32"
        assert b.plans and b.manifest["plans"][0]["verification"]["status"] == "verified"
        b.trace = True
        g = b.generate(PROMPTS[0], STEPS, stop_ids=())
        tokens = list(g)
        assert tokens == _reference(target, PROMPTS[0])
        # a step's draft decode calls are chained on the device: each issued before the host saw
        # the one before it finish (a step drafting 1 token has one call)
        calls = [e for e in b.events if e["name"].startswith("draft_decode")]
        chained = [(p_, n) for p_, n in zip(calls, calls[1:]) if n["call"] == p_["call"] + 1
                   and n["start"] < p_["start"] + p_["dur"]]
        assert len(chained) >= len(calls) // 3
        b.trace = False
        sp = g.stats["speculative"]
        assert 0 < sp["accepted"] < sp["drafted"]  # the draft is right often, not always
        # a step whose drafts were all accepted: the next step's first draft call is the draft's
        # 2-token verify (its last draft and the model's next token), not a draft call of its own
        assert sp["catch_up_calls"] > 0 and sp["draft_calls"] + sp["catch_up_calls"] == sum(g._st["k"])
        assert g.stats["decode_steps"] < STEPS - 1  # fewer model calls than tokens
        assert g.stats["state_host_bytes_per_step"] == 0  # both caches stayed on their device
        plain = b.generate(PROMPTS[0], STEPS, stop_ids=(), speculative=False)
        assert list(plain) == tokens and "speculative" not in plain.stats
        # several prompts of different lengths share the batch (2 slots: two waves)
        g = b.generate(PROMPTS, 24, stop_ids=())
        g.run()
        assert g.tokens == [_reference(target, p, 24) for p in PROMPTS]


def test_speculative_sampling_reproducible(spec):
    from polyarch.runtime import load

    _, path = spec
    with load(path) as b:
        runs = [b.generate(PROMPTS[0], 32, stop_ids=(), temperature=0.9, top_k=20, seed=s).run()[0] for s in (7, 7, 8)]
        assert runs[0] == runs[1] and runs[0] != runs[2]
        assert all(0 <= t < 128 for t in runs[0])


def test_rejection_scheme_follows_the_target_distribution():
    """Generation._check on fixed logits: drafting from q and checking against p must give p's
    distribution for the first token (the standard rejection scheme), whatever q is."""
    from polyarch.runtime.generate import Generation, distribution

    rng = np.random.default_rng(0)
    lp, lq = rng.normal(size=16) * 2, rng.normal(size=16) * 2
    p, q = distribution(lp, 1.0), distribution(lq, 1.0)
    g = Generation.__new__(Generation)
    g.sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    g.rng = np.random.Generator(np.random.PCG64(1))
    counts = np.zeros(16)
    for _ in range(30000):
        d = int(g.rng.choice(16, p=q))
        tokens, _ = g._check(np.stack([lp, lp]), [d], [q])
        counts[tokens[0]] += 1
    assert np.max(np.abs(counts / counts.sum() - p)) < 0.01


def test_speculative_gain_prices_the_catch_up():
    """The expected tokens per second of a step: k draft calls and a verify call, and with
    probability a^k the draft's catch-up, a draft call of its own (catch_up_s None) or what the
    2-token call costs over a draft call (it is paid more rarely the longer the draft: a free one
    favours shorter drafts than a call of its own)."""
    from polyarch.runtime.generate import Generation, speculative_gain

    assert speculative_gain(1.0, 4, 1.0, 3.0) == pytest.approx(5 / (4 + 1 + 3))
    assert speculative_gain(1.0, 4, 1.0, 3.0, 0.25) == pytest.approx(5 / (4 + 0.25 + 3))
    a = 0.8
    assert speculative_gain(a, 3, 1.0, 3.0, 0.0) == pytest.approx((1 - a ** 4) / (1 - a) / (3 + 3))
    # the rate (38 + 2) / (46 + 4) = 0.8 (pulled towards 1/2 early on)
    st = {"verify_calls": 10, "tested": 46, "accepted": 38, "draft_s": 10.0, "draft_calls": 10, "verify_s": 40.0,
          "catch_s": 0.0, "catch_calls": 0}
    separate, two = Generation._choose_k(st, 8), Generation._choose_k(st, 8, two=True)
    assert (separate, two) == (4, 3) and two == max(range(1, 9), key=lambda k: speculative_gain(0.8, k, 1.0, 4.0, 0.0))
    st.update(catch_s=5 * 1.5, catch_calls=5)  # measured: a 2-token call 1.5 draft calls
    assert Generation._choose_k(st, 8, two=True) == max(range(1, 9), key=lambda k: speculative_gain(0.8, k, 1, 4, 0.5))
    assert Generation._choose_k(st, 8, (2.0, 4.0, 2.0), two=True) == \
        max(range(1, 9), key=lambda k: speculative_gain(0.8, k, 2.0, 4.0, 0.0))


def test_cli_generate_speculative_and_no_draft(spec):
    _, path = spec
    r = cli("generate", path, "--ids", "1,5,9,22,7", "-n", "12", "--no-stop")
    assert r.returncode == 0, r.stderr
    assert "speculative:" in r.stderr and "accepted" in r.stderr
    trace = os.path.join(os.path.dirname(path), "gen.json")
    r2 = cli("generate", path, "--ids", "1,5,9,22,7", "-n", "12", "--no-stop", "--trace", trace)
    assert r2.returncode == 0 and r2.stdout == r.stdout, r2.stderr
    import json

    names = {e["name"] for e in json.load(open(trace))["traceEvents"] if e.get("ph") == "X"}
    assert any(n.startswith("verify_") for n in names) and any(n.startswith("draft_decode_") for n in names)
    r2 = cli("generate", path, "--ids", "1,5,9,22,7", "-n", "12", "--no-stop", "--no-draft")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout and "speculative:" not in r2.stderr
    r = cli("inspect", path)
    assert "draft: LlamaForCausalLM, 1 layers, drafts up to 4 tokens" in r.stdout


def test_draft_errors_are_one_line(spec, tmp_path):
    import polyarch
    from polyarch.runtime import load

    mod, path = spec
    other = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=1, vocab_size=64, hidden_size=32,
                                             intermediate_size=64, num_attention_heads=2)).eval()
    with pytest.raises(polyarch.PolyarchError, match="vocabulary has 64 tokens, the model's 128"):
        polyarch.compile(mod.target(), generate=True, max_context=96, draft=other, output=str(tmp_path / "x.pab"))
    with pytest.raises(polyarch.PolyarchError, match="applies to --generate"):
        polyarch.compile(mod.target(), draft=mod.draft(), output=str(tmp_path / "x.pab"))
    r = cli("compile", "nothing.py", "--generate", "--draft", "nothing.py", "--speculate", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x.pab")


def test_phase_split_plan_gives_the_single_device_tokens(tmp_path):
    """Prefill pinned to Vulkan (lavapipe here), decode to the cpu: the cache moves once per
    prompt; the tokens are those of the model on one device (transformers' greedy ones)."""
    import polyarch
    from polyarch.runtime import load

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             eos_token_id=None)).eval()
    path = polyarch.compile(model, generate=True, max_context=48, devices=["cpu", "vulkan"], tune="none",
                            phase_pins=["prefill:model.layers=vulkan", "decode:model=cpu"],
                            output=str(tmp_path / "split.pab"))
    with load(path) as b:
        segs = b.plan["segments"]
        assert "vulkan" in {s["device"] for s in segs if s["name"].startswith("prefill_")}
        assert {s["device"] for s in segs if s["name"].startswith("decode_")} == {"cpu"}
        g = b.generate(PROMPTS[0], 24, stop_ids=())
        assert list(g) == _reference(model, PROMPTS[0], 24)
    r = cli("inspect", path)
    assert "moves from prefill's devices to decode's once per prompt" in r.stdout
    with pytest.raises(polyarch.PolyarchError, match="PHASE:PATTERN=DEVICE"):
        polyarch.compile(model, generate=True, phase_pins=["warmup:model=cpu"], output=str(tmp_path / "x.pab"))
