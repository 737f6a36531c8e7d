"""Language-model generation on cpu: polyarch's prefill + decode bundle against transformers
eager with its own KV cache, in one run (issue 22).

    .venv/bin/python bench/generate.py [--layers 8] [--prompt 128] [--new 128] [--batches 1,4,8] [--rounds 3]
                                       [--out out/bench]

Model: a Llama-style causal LM with random weights (8 layers, hidden 768, 12 heads, 4 KV heads,
intermediate 2048, vocab 32000: about 100M parameters), f32, 2 threads. Engines are timed in
blocks ordered A B C .. C B A (eager, polyarch f32, polyarch f16 weights, llama.cpp f32, f16, then back), each block warmed up by one
generation first; figures are the median of the blocks. Prefill: ms for the prompt (time to
first token); decode: ms per output token at batch 1, and tokens/s at each batch size (the
batch sizes timed in blocks of their own, 1 4 8 8 4 1), in --rounds rounds (default 3): each
figure is the median of an engine's blocks, every block's decode time kept in generate.json.
Peak RSS of polyarch is measured in a child process that loads the bundle and generates
(compared with weights + cache). llama.cpp runs on the same weights written as GGUF
(bench/llamacpp.py; f32 and f16), when llama-cpp-python is installed (bench/requirements.txt,
which `make bench` installs).
Targets (issue 22): f32 prefill and decode at least as fast as llama.cpp f32; batch 8 decode
at least 4x the tokens/s of batch 1; peak RSS at most 1.2x (weights + cache)."""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THREADS = 2


def build(layers):
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
    return T.LlamaForCausalLM(cfg).eval()


def eager_run(model, prompt, new):
    """-> (prefill s, decode s per token) with transformers' DynamicCache, greedy."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - t
        cache = out.past_key_values
        t = time.perf_counter()
        for _ in range(new - 1):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, (time.perf_counter() - t) / (new - 1)


def polyarch_run(bundle, prompts, new):
    g = bundle.generate(prompts if len(prompts) > 1 else prompts[0], new, stop_ids=())
    g.run()
    st = g.stats
    return st["ttft_s"][0], st["tpot_s"], st["tokens"] / st["seconds"], st["state_host_bytes_per_step"], g.tokens[0]


def llamacpp_engines(model, out, ctx, prompt_len):
    """{name: LlamaCpp} for f32 and f16 GGUF files of the model, or {} with the reason printed."""
    try:
        import llama_cpp  # noqa: F401

        from llamacpp import LlamaCpp, write_gguf
    except ImportError as e:
        print(f"llama.cpp: not measured ({e}); `make bench` installs it: pip install -r bench/requirements.txt",
              file=sys.stderr)
        return {}
    engines = {}
    for name, f16 in (("llama.cpp f32", False), ("llama.cpp f16", True)):
        path = write_gguf(model, os.path.join(out, f"llama100m-{'f16' if f16 else 'f32'}.gguf"), f16)
        engines[name] = LlamaCpp(path, ctx, prompt_len, THREADS)
    return engines


def blocks(*fns, rounds=1):
    """Blocks in the order A B C .. C B A, `rounds` times, each warmed up once. -> [[results]
    per engine]."""
    out = [[] for _ in fns]
    order = list(range(len(fns)))
    for _ in range(rounds):
        for i in order + order[::-1]:
            fns[i]()  # warm-up
            out[i].append(fns[i]())
    return out


def child_rss(path, prompt, new):
    code = ("import resource; import polyarch.runtime as r; "
            f"b = r.load({path!r}); b.generate({prompt!r}, {new}).run(); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")  # ru_maxrss survives exec
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    return int(out.stdout.strip().splitlines()[-1]) * 1024 if out.returncode == 0 else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of blocks A B C .. C B A (each engine's figure: the median of its 2 x rounds blocks)")
    args = ap.parse_args()
    import numpy as np
    import torch

    import polyarch
    from polyarch.runtime import load

    torch.set_num_threads(THREADS)
    os.makedirs(args.out, exist_ok=True)
    model = build(args.layers)
    params = sum(p.numel() for p in model.parameters())
    ctx = args.prompt + args.new
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, 32000, args.prompt)]
    batches = [int(b) for b in args.batches.split(",")]
    paths = {}
    for b in batches:
        paths[b] = os.path.join(args.out, f"llama100m-b{b}.pab")
        t = time.time()
        polyarch.compile(model, output=paths[b], generate=True, max_context=ctx, batch=b, tune="none",
                         progress=lambda m: print(f"  {m}", file=sys.stderr) if "compiled" in m or "wrote" in m else None)
        print(f"compiled batch {b} in {time.time() - t:.0f} s", file=sys.stderr)
    res = {"params": params, "prompt": args.prompt, "new": args.new, "threads": THREADS,
           "load": os.getloadavg()[0]}
    path16 = os.path.join(args.out, "llama100m-b1-f16.pab")
    t = time.time()
    polyarch.compile(model, output=path16, generate=True, max_context=ctx, batch=1, tune="none", weights_dtype="f16")
    print(f"compiled batch 1, f16 weights, in {time.time() - t:.0f} s", file=sys.stderr)
    sys.path.insert(0, HERE)
    cpp = llamacpp_engines(model, args.out, ctx, args.prompt)
    with load(paths[batches[0]]) as b1, load(path16) as b16:
        e, p, h, *c = blocks(lambda: eager_run(model, prompt, args.new), lambda: polyarch_run(b1, [prompt], args.new),
                             lambda: polyarch_run(b16, [prompt], args.new),
                             *[(lambda eng=eng: eng.run(prompt, args.new)) for eng in cpp.values()], rounds=args.rounds)
    # every block's decode ms/token, in the order run
    res["decode_ms_blocks"] = {name: [round(x[1] * 1e3, 3) for x in runs] for name, runs in
                               zip(["eager", "polyarch", "polyarch f16", *cpp], [e, p, h, *c])}
    for name, runs in zip(cpp, c):
        res[f"{name} prefill_ms"] = statistics.median(x[0] for x in runs) * 1e3
        res[f"{name} decode_ms"] = statistics.median(x[1] for x in runs) * 1e3
        ref = p[0][4] if name.endswith("f32") else h[0][4]
        res[f"{name} greedy tokens equal to polyarch's"] = sum(a == b for a, b in zip(runs[0][2], ref))
    res["eager_prefill_ms"] = statistics.median(x[0] for x in e) * 1e3
    res["eager_decode_ms"] = statistics.median(x[1] for x in e) * 1e3
    res["polyarch_prefill_ms"] = statistics.median(x[0] for x in p) * 1e3
    res["polyarch_decode_ms"] = statistics.median(x[1] for x in p) * 1e3
    res["polyarch_f16_prefill_ms"] = statistics.median(x[0] for x in h) * 1e3
    res["polyarch_f16_decode_ms"] = statistics.median(x[1] for x in h) * 1e3
    res["state_host_bytes_per_step"] = max(x[3] for x in p + h)
    # the batch sizes in blocks too (1 4 8 8 4 1, each warmed up): one after the other, minutes
    # apart on a host whose memory rate swings, their ratio moved with the minute (3.41x once)
    res["tokens_per_s"] = {}
    loaded = [load(paths[b]) for b in batches]
    try:
        runs = blocks(*[(lambda bb=bb, b=b: polyarch_run(bb, [prompt[: args.prompt - i] for i in range(b)], args.new))
                        for bb, b in zip(loaded, batches)], rounds=args.rounds)
    finally:
        for bb in loaded:
            bb.close()
    for b, rs in zip(batches, runs):
        res["tokens_per_s"][b] = statistics.median(b / r[1] for r in rs)  # decode tokens/s over the batch
    weights = params * 4
    cache = 2 * args.layers * 4 * ctx * 64 * 4
    res["weights_mb"], res["cache_mb"] = weights / 1e6, cache / 1e6
    rss = child_rss(paths[batches[0]], prompt, args.new)
    res["polyarch_peak_rss_mb"] = rss / 1e6 if rss else None
    res["load_after"] = os.getloadavg()[0]
    with open(os.path.join(args.out, "generate.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"Llama-style {params / 1e6:.1f}M parameters, f32, prompt {args.prompt}, {args.new} new tokens, "
          f"{THREADS} threads (load {res['load']:.1f} -> {res['load_after']:.1f}); blocks A B C .. C B A x {args.rounds}, "
          "medians")
    print(f"| engine | prefill ms | decode ms/token |\n|---|---|---|")
    print(f"| transformers eager (DynamicCache) | {res['eager_prefill_ms']:.1f} | {res['eager_decode_ms']:.2f} |")
    print(f"| polyarch cpu | {res['polyarch_prefill_ms']:.1f} | {res['polyarch_decode_ms']:.2f} |")
    print(f"| polyarch cpu, f16 weights | {res['polyarch_f16_prefill_ms']:.1f} | {res['polyarch_f16_decode_ms']:.2f} |")
    for name in cpp:
        print(f"| {name} | {res[name + ' prefill_ms']:.1f} | {res[name + ' decode_ms']:.2f} |")
    for name in cpp:
        print(f"{name}: greedy tokens equal to polyarch's: {res[name + ' greedy tokens equal to polyarch' + chr(39) + 's']}"
              f" of {args.new} (same weights: the first tokens agree unless the GGUF conversion is wrong)")
    if cpp:
        def target(what, ours, theirs):
            r = res[ours] / res[theirs]
            print(f"target {what}: polyarch / llama.cpp {r:.2f} ({'met' if r <= 1 else 'MISSED'})")
        target("f32 prefill", "polyarch_prefill_ms", "llama.cpp f32 prefill_ms")
        target("f32 decode", "polyarch_decode_ms", "llama.cpp f32 decode_ms")
        target("16-bit decode", "polyarch_f16_decode_ms", "llama.cpp f16 decode_ms")
    print(f"polyarch / eager: prefill {res['polyarch_prefill_ms'] / res['eager_prefill_ms']:.2f}, decode "
          f"{res['polyarch_decode_ms'] / res['eager_decode_ms']:.2f}")
    print("decode tokens/s by batch: " + ", ".join(f"{b}: {v:.1f}" for b, v in res["tokens_per_s"].items()))
    if 1 in res["tokens_per_s"] and 8 in res["tokens_per_s"]:
        r = res["tokens_per_s"][8] / res["tokens_per_s"][1]
        print(f"batch 8 / batch 1 tokens/s: {r:.2f} (target >= 4: {'met' if r >= 4 else 'MISSED'})")
    print(f"KV-cache bytes through the host per decode step: {res['state_host_bytes_per_step']:.0f}")
    if res["polyarch_peak_rss_mb"]:
        r = res["polyarch_peak_rss_mb"] / (res["weights_mb"] + res["cache_mb"])
        print(f"polyarch peak RSS {res['polyarch_peak_rss_mb']:.0f} MB = {r:.2f} x (weights {res['weights_mb']:.0f} MB + "
              f"cache {res['cache_mb']:.1f} MB) (target <= 1.2: {'met' if r <= 1.2 else 'MISSED'})")


if __name__ == "__main__":
    main()
