"""`polyarch serve` under load, on loopback, with the real clients (tritonclient.http, openai).

    .venv/bin/python bench/serve_load.py [--requests 40] [--quick]

1. Tensors: an MLP with a dynamic batch dimension (requests of 4 rows), 1, 8 and 32
   concurrent clients, each sending a fixed number of requests, with dynamic batching on and
   off (two servers); the in-process call rate measured in the same run is the baseline.
   Blocks ordered A B B A (in-process, batching on, batching off, batching off, batching on,
   in-process), each warmed up. Reports requests/s, p50/p99 latency, errors, the servers'
   peak RSS.
2. Generation: a Llama-style model (random weights) with 8 decode slots, 1, 4 and 8
   concurrent streams through the openai client: tokens/s in total and per stream, time to
   first token p50/p99 (client side), against `Bundle.generate` of one prompt in-process.
3. Overload: a queue of 2 and 64 clients: 503s with Retry-After, every request answered (200
   or 503, none lost), the server's RSS before and after.
4. Routing: a bundle with a cpu and a vulkan plan, 16 clients: p99 latency with `--plan all`
   (each request to the plan predicted free soonest) against the best single plan.
Writes out/bench/serve_load.json."""

import argparse
import concurrent.futures
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
POLYARCH = os.path.join(os.path.dirname(sys.executable), "polyarch")


class Server:
    def __init__(self, bundle, *args):
        self.proc = subprocess.Popen([POLYARCH, "serve", bundle, "--port", "0", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        for line in self.proc.stderr:
            m = re.search(r"serving (\S+) at http://([\d.]+):(\d+)", line)
            if m:
                self.name, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
                break
        else:
            raise RuntimeError("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        if "OpenAI" not in line:
            meta = json.loads(urllib_get(self, f"/v2/models/{self.name}"))
            self.input_name = meta["inputs"][0]["name"]

    def rss_mb(self, key="VmRSS"):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def load_tensors(server, xs, clients, per_client):
    """`clients` threads, each with its own tritonclient, `per_client` requests each. ->
    (requests/s, latencies, error count, status counts)."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    lat, errors, codes = [], [0], {}
    lock = threading.Lock()

    def client(k):
        c = th.InferenceServerClient(f"{server.host}:{server.port}", connection_timeout=120, network_timeout=120)
        for j in range(per_client):
            x = xs[(k * per_client + j) % len(xs)]
            i = th.InferInput(server.input_name, list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            t = time.perf_counter()
            try:
                c.infer(server.name, [i])
                code = 200
            except InferenceServerException as e:
                code = int(e.status() or 0) if str(e.status() or "").isdigit() else 0
            except Exception:
                code = -1  # no answer at all: lost
            dt = time.perf_counter() - t
            with lock:
                codes[code] = codes.get(code, 0) + 1
                if code == 200:
                    lat.append(dt)
                else:
                    errors[0] += 1
        c.close()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return len(lat) / wall, lat, errors[0], codes


def in_process(bundle, xs, n):
    t0 = time.perf_counter()
    for j in range(n):
        bundle(xs[j % len(xs)])
    return n / (time.perf_counter() - t0)


def mlp_bundle(path, **options):
    """The bench's MLP (256-1024-1024-64, batch dimension dynamic up to 64), compiled once."""
    import torch

    import polyarch

    if not os.path.exists(path):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                    torch.nn.ReLU(), torch.nn.Linear(1024, 64)).eval()
        polyarch.compile(model, (torch.randn(8, 256),), output=path, dynamic_dims=["input0:0:64"], tune="none",
                         **options)
    return path


def part_tensors(args, out, res):
    import numpy as np

    from polyarch.runtime import load

    path = mlp_bundle(os.path.join(out, "serve-mlp.pab"), devices=["cpu"])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 256)).astype(np.float32) for _ in range(64)]
    delay = [] if args.max_delay_ms is None else ["--max-delay-ms", str(args.max_delay_ms)]
    on, off = Server(path, *delay), Server(path, "--max-batch", "1")
    rows = []
    try:
        with load(path) as b:
            for c in args.clients:
                n = args.requests
                in_process(b, xs, 50)  # warm-up
                load_tensors(on, xs, c, 5)
                load_tensors(off, xs, c, 5)
                r = {"clients": c, "in_process": [], "on": [], "off": []}
                for engine in ("in_process", "on", "off", "off", "on", "in_process"):  # A B C C B A
                    if engine == "in_process":
                        r["in_process"].append(in_process(b, xs, n * c))
                    else:
                        r[engine].append(load_tensors(on if engine == "on" else off, xs, c, n))
                base = statistics.mean(r["in_process"])
                row = {"clients": c, "requests": n * c, "in_process_per_s": base}
                for engine in ("on", "off"):
                    rate = statistics.mean(x[0] for x in r[engine])
                    lat = [t for x in r[engine] for t in x[1]]
                    row[f"batching_{engine}"] = {"per_s": rate, "vs_in_process": rate / base,
                                                 "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                                                 "errors": sum(x[2] for x in r[engine])}
                rows.append(row)
                print(f"  {c:>2} clients: in-process {base:8.0f}/s | batching on "
                      f"{row['batching_on']['per_s']:7.0f}/s ({row['batching_on']['vs_in_process']:.2f}x) p50 "
                      f"{row['batching_on']['p50_ms']:.2f} p99 {row['batching_on']['p99_ms']:.2f} ms err "
                      f"{row['batching_on']['errors']} | off {row['batching_off']['per_s']:7.0f}/s "
                      f"({row['batching_off']['vs_in_process']:.2f}x) p50 {row['batching_off']['p50_ms']:.2f} p99 "
                      f"{row['batching_off']['p99_ms']:.2f} ms err {row['batching_off']['errors']}", flush=True)
        res["tensors"] = {"rows": rows, "peak_rss_mb": {"batching_on": on.rss_mb("VmHWM"),
                                                        "batching_off": off.rss_mb("VmHWM")}}
        print(f"  peak RSS: batching on {on.rss_mb('VmHWM'):.0f} MB, off {off.rss_mb('VmHWM'):.0f} MB")
    finally:
        on.stop()
        off.stop()


def part_generate(args, out, res):
    import openai
    import torch
    import transformers

    import polyarch
    from polyarch.runtime import load

    path = os.path.join(out, "serve-llm.pab")
    if not os.path.exists(path):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
        polyarch.compile(transformers.LlamaForCausalLM(cfg).eval(), output=path, generate=True, tune="none",
                         max_context=160, batch=8)
    new, plen = args.new_tokens, 16
    prompts = [[(7 * i + 3 * j) % 4000 + 1 for j in range(plen)] for i in range(64)]
    with load(path) as b:
        b.generate(prompts[0], 8, stop_ids=()).run()
        t = time.perf_counter()
        g = b.generate(prompts[0], new, stop_ids=())
        g.run()
        alone = new / (time.perf_counter() - t)
    s = Server(path)
    rows = []
    try:
        client = openai.OpenAI(base_url=f"http://{s.host}:{s.port}/v1", api_key="-", max_retries=0, timeout=300)

        def stream(i):
            t0 = time.perf_counter()
            first, n = None, 0
            for chunk in client.completions.create(model=s.name, prompt=prompts[i], max_tokens=new, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                k = len(chunk.choices[0].model_extra.get("token_ids") or []) if chunk.choices else 0
                if k and first is None:
                    first = time.perf_counter() - t0
                n += k
            return first, n, time.perf_counter() - t0

        stream(0)
        for c in args.streams:
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                got = list(pool.map(stream, range(c * 2)))  # two rounds of c streams
            wall = time.perf_counter() - t0
            tokens = sum(g[1] for g in got)
            ttft = [g[0] for g in got]
            row = {"streams": c, "tokens": tokens, "tokens_per_s": tokens / wall,
                   "per_stream_tokens_per_s": statistics.mean(g[1] / g[2] for g in got),
                   "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
                   "lost": sum(g[1] != new for g in got)}
            rows.append(row)
            print(f"  {c} streams: {row['tokens_per_s']:.0f} tokens/s in total ({row['tokens_per_s'] / alone:.2f}x "
                  f"one in-process generate), {row['per_stream_tokens_per_s']:.0f} per stream; TTFT p50 "
                  f"{row['ttft_p50_ms']:.1f} p99 {row['ttft_p99_ms']:.1f} ms; short streams {row['lost']}", flush=True)
        res["generate"] = {"in_process_tokens_per_s": alone, "rows": rows, "peak_rss_mb": s.rss_mb("VmHWM")}
    finally:
        s.stop()


def part_overload(args, out, res):
    import numpy as np

    path = os.path.join(out, "serve-mlp.pab")
    xs = [np.random.default_rng(i).standard_normal((64, 256)).astype(np.float32) for i in range(8)]
    s = Server(path, "--max-queue", "2", "--max-batch", "1")
    try:
        load_tensors(s, xs, 4, 3)
        before = s.rss_mb()
        rate, lat, errors, codes = load_tensors(s, xs, 64, 10)
        after = s.rss_mb()
        res["overload"] = {"clients": 64, "requests": 640, "codes": codes, "rss_mb_before": before,
                           "rss_mb_after": after, "lost": codes.get(-1, 0)}
        print(f"  64 clients x 10 on a queue of 2: answers {codes}, RSS {before:.0f} -> {after:.0f} MB, "
              f"lost {codes.get(-1, 0)}")
    finally:
        s.stop()


def part_routing(args, out, res):
    import numpy as np

    from polyarch.runtime import load

    path = mlp_bundle(os.path.join(out, "serve-two-plans.pab"), plans=[["cpu"], ["vulkan"]])
    xs = [np.random.default_rng(i).standard_normal((16, 256)).astype(np.float32) for i in range(16)]
    speed = {}
    for p in ("cpu", "vulkan"):
        with load(path, plan=p, strict=True) as b:
            in_process(b, xs, 10)
            speed[p] = in_process(b, xs, 40)
    best = max(speed, key=speed.get)
    single, routed = Server(path, "--plan", best, "--max-batch", "16"), Server(path, "--plan", "all", "--max-batch", "16")
    try:
        r = {"single": [], "routed": []}
        load_tensors(single, xs, 16, 2)
        load_tensors(routed, xs, 16, 2)
        for engine in ("single", "routed", "routed", "single"):
            r[engine].append(load_tensors(single if engine == "single" else routed, xs, 16, args.requests // 2))
        row = {"in_process_per_s": speed, "best_single_plan": best}
        for engine in r:
            lat = [t for x in r[engine] for t in x[1]]
            row[engine] = {"per_s": statistics.mean(x[0] for x in r[engine]), "p50_ms": pct(lat, 50) * 1e3,
                           "p99_ms": pct(lat, 99) * 1e3, "errors": sum(x[2] for x in r[engine])}
        text = urllib_get(routed, "/metrics")
        row["routed_by_plan"] = {m.group(1): float(m.group(2)) for m in
                                 re.finditer(r'polyarch_plan_requests_total\{plan="(\w+)"\} (\S+)', text)}
        res["routing"] = row
        print(f"  in-process calls/s {', '.join(f'{k} {v:.0f}' for k, v in speed.items())}; 16 clients: best single "
              f"plan ({best}) p99 {row['single']['p99_ms']:.2f} ms, {row['single']['per_s']:.0f}/s; --plan all p99 "
              f"{row['routed']['p99_ms']:.2f} ms, {row['routed']['per_s']:.0f}/s (p99 ratio "
              f"{row['routed']['p99_ms'] / row['single']['p99_ms']:.2f}); routed {row['routed_by_plan']}")
    finally:
        single.stop()
        routed.stop()


def urllib_get(server, path):
    import urllib.request

    with urllib.request.urlopen(f"http://{server.host}:{server.port}{path}", timeout=30) as r:
        return r.read().decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40, help="requests per client in a block")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=None, help="the batching server's --max-delay-ms "
                    "(default: serve's own)")
    ap.add_argument("--parts", default="tensors,generate,overload,routing")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.streams = [int(c) for c in args.streams.split(",")]
    os.makedirs(args.out, exist_ok=True)
    res = {"load_before": os.getloadavg()[0], "cores": os.cpu_count()}
    for part in args.parts.split(","):
        print(f"{part}:", flush=True)
        globals()[f"part_{part}"](args, args.out, res)
    res["load_after"] = os.getloadavg()[0]
    print(f"load average {res['load_before']:.1f} -> {res['load_after']:.1f} on {res['cores']} cores")
    with open(os.path.join(args.out, "serve_load.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
