"""A 1B-parameter synthetic decoder: compiles and runs on cpu within 24 GiB?

    .venv/bin/python bench/big_decoder.py [--layers 20] [--d 2048] [--out out/bench]

Builds a Llama-shaped decoder (RMSNorm, causal attention, SwiGLU MLP, output head tied
to the embedding) with random weights, compiles it for cpu in a child process and runs
the bundle in another, sampling the resident memory of each process tree (the Python
process plus its iree-compile children) every 0.2 s. Reports parameters, raw weight
bytes, bundle size and its ratio to weights + code, peak memory of compile and of
load + one call, and max |polyarch - eager| over the logits.
Targets (issue 4): bundle within 5% of weights + code; peak memory < 24 GiB."""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODEL = r'''
import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(torch.nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.gate = torch.nn.Linear(d, ffn, bias=False)
        self.up = torch.nn.Linear(d, ffn, bias=False)
        self.down = torch.nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class Decoder(torch.nn.Module):
    def __init__(self, vocab, d, layers, heads, ffn):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) @ self.embed.weight.T  # head tied to the embedding


def build(vocab, d, layers, heads, ffn):
    torch.manual_seed(0)
    m = Decoder(vocab, d, layers, heads, ffn).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return m
'''

COMPILE = r'''
import json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import model_def, polyarch
cfg = json.loads(sys.argv[2])
out = sys.argv[3]
m = model_def.build(**cfg)
n = sum(p.numel() for p in m.parameters())
ids = torch.randint(0, cfg["vocab"], (1, 32), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = m(ids).numpy()
np.save(out + ".ids.npy", ids.numpy())
np.save(out + ".ref.npy", ref)
t = time.time()
polyarch.compile(m, (ids,), devices=["cpu"], output=out, progress=True)
print(json.dumps({"params": n, "weight_bytes": n * 4, "compile_s": time.time() - t}))
'''

RUN = r'''
import json, sys, time
import numpy as np
import polyarch.runtime
out = sys.argv[1]
t = time.time()
b = polyarch.runtime.load(out)
load_s = time.time() - t
ids = np.load(out + ".ids.npy")
t = time.time()
y = b(ids)
call_s = time.time() - t
t = time.time()
y = b(ids)
call2_s = time.time() - t
ref = np.load(out + ".ref.npy")
print(json.dumps({"load_s": load_s, "first_call_s": call_s, "call_s": call2_s,
                  "max_abs_err": float(np.abs(y - ref).max()), "ref_max": float(np.abs(ref).max())}))
'''


def tree_rss(pid):
    """Resident bytes of a process and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_sampled(cmd, cwd=None):
    """Run cmd, streaming stderr; -> (stdout, peak tree RSS bytes, seconds)."""
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=cwd)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed ({proc.returncode})")
    return out, peak[0], time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_def.py"), "w") as f:
        f.write(MODEL)
    cfg = {"vocab": args.vocab, "d": args.d, "layers": args.layers, "heads": args.heads, "ffn": args.ffn}
    bundle = os.path.join(args.out, f"decoder-{args.layers}x{args.d}.pab")
    out, compile_peak, compile_wall = run_sampled([sys.executable, "-c", COMPILE, args.out, json.dumps(cfg), bundle])
    info = json.loads(out.strip().splitlines()[-1])
    out, run_peak, _ = run_sampled([sys.executable, "-c", RUN, bundle])
    run = json.loads(out.strip().splitlines()[-1])
    import zipfile

    with zipfile.ZipFile(bundle) as zf:
        code = sum(i.file_size for i in zf.infolist() if i.filename.endswith(".vmfb"))
    size = os.path.getsize(bundle)
    report = {"config": cfg, **info, "bundle_bytes": size, "code_bytes": code,
              "bundle_over_weights_plus_code": size / (info["weight_bytes"] + code),
              "compile_wall_s": compile_wall, "compile_peak_rss": compile_peak, "run_peak_rss": run_peak, **run}
    gib = 1 << 30
    print(f"decoder: {info['params'] / 1e9:.3f} B parameters, {info['weight_bytes'] / 1e9:.2f} GB of f32 weights")
    print(f"bundle:  {size / 1e9:.3f} GB = {report['bundle_over_weights_plus_code']:.4f} x (weights + {code / 1e6:.1f} MB code)")
    print(f"compile: {compile_wall:.0f} s, peak memory {compile_peak / gib:.1f} GiB (Python + iree-compile processes)")
    print(f"run:     load {run['load_s']:.1f} s, first call {run['first_call_s']:.1f} s, next call {run['call_s']:.2f} s, "
          f"peak memory {run_peak / gib:.1f} GiB")
    print(f"max |polyarch - eager| = {run['max_abs_err']:.2e} (logits up to {run['ref_max']:.2f})")
    with open(os.path.join(args.out, "big_decoder.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
