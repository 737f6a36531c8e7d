"""Bundle load time and memory: a ~100 MB bundle, mapped (aligned members) vs copied.

    .venv/bin/python bench/bundle_load.py [--mb 100] [--runs 5]

Builds (once, cached in out/bench/) a cpu bundle of a model with ~100 MB of weights,
and a copy of it rewritten as a plain zip (members unaligned, so the runtime must copy
them: the baseline, as bundles were loaded before). Each load runs in a fresh process:
time of `polyarch.runtime.load` and extra resident memory (VmRSS after - before, split
into anonymous and file-backed pages; the peak, VmHWM, too), as ratios to the bundle size.
Targets (issue 4): load < 1 s, extra memory < 1.2x the bundle size, bundle size within 5%
of the raw weight bytes + code."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PROBE = r"""
import json, sys, time
def rss():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
import numpy as np, iree.runtime, polyarch.runtime
before = rss()
t = time.perf_counter()
b = polyarch.runtime.load(sys.argv[1])
load_s = time.perf_counter() - t
after = rss()
x = np.ones(b.inputs[0]["shape"], np.float32)
t = time.perf_counter()
b(x)
first_s = time.perf_counter() - t
print(json.dumps({"load_s": load_s, "first_call_s": first_s, "extra_rss": after["VmRSS"] - before["VmRSS"],
                  "peak_extra": rss()["VmHWM"] - before["VmRSS"], "extra_anon": after["RssAnon"] - before["RssAnon"],
                  "extra_file": after["RssFile"] - before["RssFile"]}))
"""


def build(path, mb):
    import torch

    import polyarch

    d = 2560
    layers = max(1, round(mb * 1e6 / (4 * d * d)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)]).eval()
    polyarch.compile(model, (torch.randn(4, d),), devices=["cpu"], output=path, progress=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    aligned = os.path.join(args.out, f"weights{args.mb}.pab")
    plain = os.path.join(args.out, f"weights{args.mb}-plain.pab")
    if not os.path.exists(aligned):
        build(aligned, args.mb)
    with zipfile.ZipFile(aligned) as zin, zipfile.ZipFile(plain, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
    size = os.path.getsize(aligned)
    report = {"bundle_bytes": size}
    print(f"bundle: {size / 1e6:.1f} MB; {args.runs} fresh processes each")
    for label, path in (("copied (unaligned, baseline)", plain), ("mapped (aligned)", aligned)):
        rows = []
        for _ in range(args.runs):
            r = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
        report[label] = med
        print(f"{label:30s} load {med['load_s'] * 1000:7.1f} ms  first call {med['first_call_s'] * 1000:7.1f} ms  "
              f"extra RSS {med['extra_rss'] / size:5.2f}x size (anonymous {med['extra_anon'] / size:4.2f}x, "
              f"file-backed {med['extra_file'] / size:4.2f}x)  peak {med['peak_extra'] / size:5.2f}x size")
    m, c = report["mapped (aligned)"], report["copied (unaligned, baseline)"]
    print(f"mapped / copied: load time {m['load_s'] / c['load_s']:.2f}, extra memory {m['extra_rss'] / c['extra_rss']:.2f}")
    d = 2560
    raw = max(1, round(args.mb * 1e6 / (4 * d * d))) * d * d * 4  # the model build() makes
    with zipfile.ZipFile(aligned) as zf:
        code = sum(i.file_size for i in zf.infolist() if i.filename.endswith(".vmfb"))
    report["bundle_over_weights_plus_code"] = size / (raw + code)
    print(f"bundle size: {size / (raw + code):.4f} x (raw weights {raw / 1e6:.1f} MB + code {code / 1e6:.2f} MB)")
    print(f"targets: load < 1 s: {'met' if m['load_s'] < 1 else 'NOT met'}; "
          f"extra memory once loaded < 1.2x: {'met' if m['extra_rss'] / size < 1.2 else 'NOT met'} "
          f"(peak while loading {m['peak_extra'] / size:.2f}x: {'under' if m['peak_extra'] / size < 1.2 else 'over'} 1.2x); "
          f"bundle within 5% of weights + code: {'met' if size / (raw + code) <= 1.05 else 'NOT met'}")
    with open(os.path.join(args.out, "bundle_load.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
