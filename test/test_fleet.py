"""Fleet prediction for generation (issue 23, compiler/fleet.py, `polyarch plan --generate`):
the roofline figures against hand-computed ones, the plan kinds and the Pareto chart.

Tolerances: figures computed by hand from the same formulas, to 1e-9 relative."""

import json
import os

import pytest

from conftest import cli

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

ACCEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "profiles",
                     "sram-decode-accelerator.json")

MODELS = '''
import torch, transformers

def _llama(layers, hidden, inter, tie=False):
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=tie)
    with torch.device("meta"):  # no memory for the weights: prediction reads shapes only
        return transformers.LlamaForCausalLM(cfg)

def target():
    return _llama(24, 2048, 5632)

def draft():
    return _llama(4, 1024, 2816, tie=True)
'''


def test_roofline_by_hand():
    from polyarch.compiler.fleet import Fleet, LMSpec, predict
    from polyarch.targets.profiles import BUILTIN

    cfg = T.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2)
    with torch.device("meta"):
        m = T.LlamaForCausalLM(cfg)
    spec = LMSpec.of(m, "bf16")
    emb = 1000 * 256
    assert spec.params == sum(p.numel() for p in m.parameters()) and spec.embedding == emb
    assert spec.kv_bytes_per_token == 2 * 4 * 2 * 32 * 2
    h100 = BUILTIN["cuda"]
    f = Fleet("bf16")
    # decode, batch 8 at a mean context of 100: weights once, the cache of 8 sequences read
    flops = 8 * (2 * (spec.params - emb) + 4 * 4 * 8 * 32 * 100)
    nbytes = (spec.params - emb) * 2 + spec.kv_bytes_per_token * (8 * 100 + 8)
    peak = h100.peak("bf16")
    if h100.half_flops:
        per = flops / (4 * 7)
        peak *= per / (per + h100.half_flops)
    want = max(flops / peak, nbytes / h100.mem_bw) + 4 * 12 * h100.launch_s + h100.call_s
    assert f.call_s(spec, h100, 8, 8, 100, 1) == pytest.approx(want, rel=1e-9)
    # a profile that says how fast its matrix-vector products read bf16 weights: the weights at that
    # rate, the cache at the memory bandwidth
    from dataclasses import replace

    slow = replace(h100, weight_bw={"bf16": h100.mem_bw / 3})
    weights = (spec.params - emb) * 2
    want = max(flops / peak, weights / (h100.mem_bw / 3) + (nbytes - weights) / h100.mem_bw) + \
        4 * 12 * h100.launch_s + h100.call_s
    assert f.call_s(spec, slow, 8, 8, 100, 1) == pytest.approx(want, rel=1e-9)
    # and what each row past the first adds (8 tokens: 7 more rows)
    rows = replace(slow, row_cost={"bf16": 0.1})
    want = max(flops / peak, weights / (h100.mem_bw / 3) * 1.7 + (nbytes - weights) / h100.mem_bw) + \
        4 * 12 * h100.launch_s + h100.call_s
    assert f.call_s(spec, rows, 8, 8, 100, 1) == pytest.approx(want, rel=1e-9)
    assert f.call_s(LMSpec.of(m, "f32"), slow, 8, 8, 100, 1) == \
        pytest.approx(f.call_s(LMSpec.of(m, "f32"), h100, 8, 8, 100, 1), rel=1e-9)  # no f32 figure: mem_bw
    rows = predict(spec, {"h100": h100}, 64, 16, [1, 8], spec, [1, 3], 0.8, "bf16")
    single = [r for r in rows if r["kind"] == "single"]
    assert [r["batch"] for r in single] == [1, 8]
    assert single[1]["tpot_ms"] == pytest.approx(f.call_s(spec, h100, 8, 8, 64 + 8, 1) * 1e3)
    assert single[1]["tokens_per_s"] == pytest.approx(8 / single[1]["tpot_ms"] * 1e3)
    spec_rows = [r for r in rows if r["kind"] == "speculative"]
    assert {(r["batch"], r["k"]) for r in spec_rows} == {(1, 1), (1, 3), (8, 1), (8, 3)}
    assert not [r for r in rows if r["kind"] == "split"]  # one device: nothing to split over


def test_cli_plan_generate_fleet(tmp_path):
    (tmp_path / "models.py").write_text(MODELS)
    png, out = tmp_path / "pareto.png", tmp_path / "fleet.json"
    r = cli("plan", f"{tmp_path / 'models.py'}:target", "--generate", "--draft", f"{tmp_path / 'models.py'}:draft",
            "-d", "cuda", "--profile", ACCEL, "--weights-dtype", "bf16", "--batches", "1,16", "--draft-lengths", "2,4",
            "--pareto", str(png), "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "| single | cuda |" in r.stdout or "| single | sram-lpu |" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plans = json.loads(out.read_text())["plans"]
    kinds = {(p["kind"], p["devices"]) for p in plans}
    assert ("split", "cuda -> sram-lpu") in kinds and ("speculative", "cuda + draft on sram-lpu") in kinds
    lpu = next(p for p in plans if p["kind"] == "single" and p["devices"] == "sram-lpu" and p["batch"] == 1)
    assert lpu["devices_used"] > 1  # 230 MB of SRAM a chip: the model is spread over several
    for bad, said in ((["--batches", "4,x"], "--batches '4,x' is not a list"), (["--pin", "model=cpu"],
                                                                                "--pin does not apply to plan --generate")):
        r = cli("plan", f"{tmp_path / 'models.py'}:target", "--generate", "-d", "cuda", *bad)
        assert r.returncode != 0 and said in r.stderr and "Traceback" not in r.stderr
    # the accelerator profile is for prediction only: compiling for it is refused in one line
    r = cli("plan", f"{tmp_path / 'models.py'}:target", "--profile", ACCEL)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "lpu" in r.stderr
