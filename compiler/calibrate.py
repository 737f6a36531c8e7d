"""`polyarch calibrate`: measure local devices with IREE-compiled microbenchmarks and
write a device profile.

The suite (one module per device, f32):
  matmul sweep      linalg.matmul, M x K x N from 64^3 to 1024^3 and transformer-like shapes
  convolution sweep 3x3 linalg.conv_2d_nchw_fchw, CNN-like shapes (-> op_efficiency.conv)
  elementwise sweep a + b over 64K .. 16M elements (memory bound)
  empty dispatch    a chain of 1 and of 16 dependent tiny matmuls (one dispatch each)
  transfer sweep    host -> device and device -> host copies, 4 KB .. 64 MB
  matrix-vector     1 and 8 rows through a chain of dependent up and down projections ([4096,
                    1024] and [1024, 4096], a Linear's layout), 256 MiB of weights held as
                    parameters, f32 and (where the device stores 16 bits) f16, each in a module
                    of its own compiled with the flags a decode phase of that dtype gets
                    (compiler/iree.py PHASE_FLAGS): a decode step streams its weights at about this rate,
                    which is not the elementwise one (IREE 3.13, 2-core Xeon: 17-23 GB/s
                    against 49; one 64 MB product that stays in cache: 46)

Fitted figures: launch_s = (t16 - t1) / 15; call_s = min(t1, the fastest kernel) - launch_s;
peak f32 and half_flops by fitting rate = peak x flops / (flops + half_flops) to the matmul
sweep; op_efficiency.conv = the median rate of the convolutions that take over 4x the
overheads (else the longest), relative to that; mem_bw = median achieved bytes/s over the
large elementwise sizes; weight_bw[dtype] = the weights' bytes over a one-row matrix-vector
call's time less the overheads, row_cost[dtype] = (the 8-row call's time / the one-row call's
- 1) / 7; link bandwidth and latency by least squares over the transfer sweep. Power, price
and memory capacity cannot be measured this way: they are kept from the built-in profile of
the device's kind (or --like FILE)."""

import datetime
import os
import statistics
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ..files import temp_dir
from ..errors import PolyarchError
from ..runtime.devices import DeviceSpec
from ..targets import profiles as P

if TYPE_CHECKING:
    from torch_mlir import ir
    from ..targets.profiles import DeviceProfile

MATMULS = [(64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
           (256, 384, 384), (256, 384, 1536), (256, 1536, 384), (2048, 512, 512)]
# (N, C, H, W, F): 3x3 convolutions, no padding
CONVS = [(4, 3, 34, 34, 16), (4, 16, 18, 18, 32), (8, 32, 34, 34, 64), (8, 64, 18, 18, 64)]
ELEMENTWISE = [1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24]
CHAIN = (1, 16)
TRANSFERS = [1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24, 1 << 26]
QUICK = {"MATMULS": MATMULS[:4] + MATMULS[5:7], "ELEMENTWISE": ELEMENTWISE[:4], "TRANSFERS": TRANSFERS[:5], "CONVS": CONVS[:3]}
# A decode-like chain of dependent matrix-vector products: up [I, H] then down [H, I], PAIRS[dtype]
# times, 256 MiB of weights in all (more than a cache holds: a decode step streams every weight)
MATVEC_H, MATVEC_I = 1024, 4096
MATVEC_PAIRS = {"f32": 8, "f16": 16}
MATVEC_ROWS = (1, 8)  # rows (tokens) a call multiplies: one (decode at batch 1) and a few (batch, verify)
CAL_SCOPE = "polyarch-calibrate"
SUITE_VERSION = 8  # profiles measured by an older suite are measured again (3: weight_bw, row_cost; 4: cpu weight_bw with the hand-written products; 5: their prefetch and f16 flags by host; 6: their rows read in strands; 7: call no more than the fastest kernel, convolution rate from the long ones; 8: 7-8 rows of x read 4 weight rows a step)


def _sizes(quick):
    """(matmuls, convolutions, elementwise sizes, transfer sizes) of the suite."""
    if quick:
        return QUICK["MATMULS"], QUICK["CONVS"], QUICK["ELEMENTWISE"], QUICK["TRANSFERS"]
    return MATMULS, CONVS, ELEMENTWISE, TRANSFERS


def _mm_func(m, k, n):
    t = lambda a, b: f"tensor<{a}x{b}xf32>"
    return f"""
  func.func @mm_{m}_{k}_{n}(%a: {t(m, k)}, %b: {t(k, n)}) -> {t(m, n)} {{
    %z = arith.constant 0.0 : f32
    %e = tensor.empty() : {t(m, n)}
    %f = linalg.fill ins(%z : f32) outs(%e : {t(m, n)}) -> {t(m, n)}
    %r = linalg.matmul ins(%a, %b : {t(m, k)}, {t(k, n)}) outs(%f : {t(m, n)}) -> {t(m, n)}
    return %r : {t(m, n)}
  }}"""


def _conv_func(n, c, h, w, f):
    ho, wo = h - 2, w - 2
    x, k, o = f"tensor<{n}x{c}x{h}x{w}xf32>", f"tensor<{f}x{c}x3x3xf32>", f"tensor<{n}x{f}x{ho}x{wo}xf32>"
    return f"""
  func.func @conv_{n}_{c}_{h}_{w}_{f}(%x: {x}, %k: {k}) -> {o} {{
    %z = arith.constant 0.0 : f32
    %e = tensor.empty() : {o}
    %f = linalg.fill ins(%z : f32) outs(%e : {o}) -> {o}
    %r = linalg.conv_2d_nchw_fchw {{dilations = dense<1> : tensor<2xi64>, strides = dense<1> : tensor<2xi64>}}
           ins(%x, %k : {x}, {k}) outs(%f : {o}) -> {o}
    return %r : {o}
  }}"""


def _add_func(n):
    t = f"tensor<{n}xf32>"
    return f"""
  func.func @add_{n}(%a: {t}, %b: {t}) -> {t} {{
    %e = tensor.empty() : {t}
    %r = linalg.generic {{indexing_maps = [affine_map<(i) -> (i)>, affine_map<(i) -> (i)>, affine_map<(i) -> (i)>],
                          iterator_types = ["parallel"]}} ins(%a, %b : {t}, {t}) outs(%e : {t}) {{
      ^bb0(%x: f32, %y: f32, %o: f32):
        %s = arith.addf %x, %y : f32
        linalg.yield %s : f32
    }} -> {t}
    return %r : {t}
  }}"""


def _chain_func(k):
    t = "tensor<8x8xf32>"
    body, cur = [], "%a"
    for i in range(k):
        body.append(f"    %e{i} = tensor.empty() : {t}\n    %f{i} = linalg.fill ins(%z : f32) outs(%e{i} : {t}) -> {t}\n"
                    f"    %m{i} = linalg.matmul ins({cur}, %w : {t}, {t}) outs(%f{i} : {t}) -> {t}")
        cur = f"%m{i}"
    return f"""
  func.func @chain_{k}(%a: {t}, %w: {t}) -> {t} {{
    %z = arith.constant 0.0 : f32
{chr(10).join(body)}
    return {cur} : {t}
  }}"""


def matvec_mlir(dtype: str, kernels: bool = False) -> str:
    """A module whose functions run MATVEC_ROWS[0] and MATVEC_ROWS[1] rows through MATVEC_PAIRS[dtype]
    up and down projections, each output the next input (@mv_<rows>), the weights held as
    parameters (scope CAL_SCOPE, keys <dtype>_u<i>, <dtype>_d<i>) as a bundle's decode phase holds
    them. kernels: the products call the hand-written dispatch a cpu decode phase uses
    (compiler/kernels.py), else they are IREE's linalg.matmul."""
    from .kernels import name as kernel_name
    from .kernels import rowdot_source

    h, i_ = MATVEC_H, MATVEC_I
    t = lambda a, b: f"tensor<{a}x{b}x{dtype}>"
    maps = "[affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>, affine_map<(m, n, k) -> (m, n)>]"
    layers = [(f"{kind}{p}", n, k) for p in range(MATVEC_PAIRS[dtype]) for kind, n, k in (("u", i_, h), ("d", h, i_))]
    globs = [f'  util.global private @{name} = #flow.parameter.named<"{CAL_SCOPE}"::"{dtype}_{name}"> : {t(n, k)}'
             for name, n, k in layers]
    funcs = []
    for rows in MATVEC_ROWS:
        body, cur = [], "%x"
        for name, n, k in layers:
            body.append(f"    %w_{name} = util.global.load @{name} : {t(n, k)}")
            if kernels:
                body.append(f"    %r_{name} = func.call @{kernel_name(rows, n, k, dtype)}({cur}, %w_{name}) : "
                            f"({t(rows, k)}, {t(n, k)}) -> {t(rows, n)}")
            else:
                body.append(f"""    %e_{name} = tensor.empty() : {t(rows, n)}
    %f_{name} = linalg.fill ins(%z : {dtype}) outs(%e_{name} : {t(rows, n)}) -> {t(rows, n)}
    %r_{name} = linalg.matmul indexing_maps = {maps} ins({cur}, %w_{name} : {t(rows, k)}, {t(n, k)}) outs(%f_{name} : {t(rows, n)}) -> {t(rows, n)}""")
            cur = f"%r_{name}"
        funcs.append(f"""  func.func @mv_{rows}(%x: {t(rows, h)}) -> {t(rows, h)} {{
    %z = arith.constant 0.0 : {dtype}
{chr(10).join(body)}
    return {cur} : {t(rows, h)}
  }}""")
    defs = [rowdot_source(rows, n, k, dtype) for rows in MATVEC_ROWS for n, k in ((i_, h), (h, i_))] if kernels else []
    return f"""module @mv_{dtype} {{
{chr(10).join(globs)}
{chr(10).join(defs)}
{chr(10).join(funcs)}
}}
"""


def matvec_bytes(dtype: str) -> int:
    return 2 * MATVEC_H * MATVEC_I * MATVEC_PAIRS[dtype] * int(dtype[1:]) // 8


def matvec_dtypes(spec: Any) -> list:
    """The weight dtypes whose matrix-vector rate is measured on a device."""
    from ..targets import has_narrow_storage

    return ["f32", "f16"] if has_narrow_storage(DeviceSpec.parse(spec)) else ["f32"]


def compile_matvec(spec: Any, dtype: str) -> bytes:
    """The matrix-vector module of a weight dtype compiled for a device with the flags a decode
    phase of that dtype gets (compiler/iree.py's PHASE_FLAGS; on cpu the hand-written products of
    PHASE_KERNELS) -> vmfb bytes."""
    from .iree import PHASE_FLAGS, PHASE_KERNELS

    kernels = DeviceSpec.parse(spec).kind == "cpu" and "decode" in PHASE_KERNELS
    return _compile_text(spec, matvec_mlir(dtype, kernels), PHASE_FLAGS.get(dtype, {}).get("decode", []),
                         f"{dtype} matrix-vector module")


def suite_mlir(quick: bool = False) -> str:
    mms, convs, adds, _ = _sizes(quick)
    funcs = [_mm_func(*s) for s in mms] + [_conv_func(*s) for s in convs] + [_add_func(n) for n in adds] + [_chain_func(k) for k in CHAIN]
    return "module {" + "".join(funcs) + "\n}\n"


def compile_suite(spec: Any, quick: bool = False) -> bytes:
    """The microbenchmark module compiled for a device -> vmfb bytes."""
    return _compile_text(spec, suite_mlir(quick), [], "calibration suite")


def _compile_text(spec, text, flags, what) -> bytes:
    from .iree import iree_compile_tool, run_iree_compile
    from ..targets import iree_flags

    spec = DeviceSpec.parse(spec)
    with temp_dir(prefix="polyarch-cal-") as tmp:
        src, out = os.path.join(tmp, "suite.mlir"), os.path.join(tmp, "suite.vmfb")
        with open(src, "w") as f:
            f.write(text)
        r = run_iree_compile([iree_compile_tool(), src, *iree_flags(spec), *flags, "-o", out])
        if r.returncode:
            raise PolyarchError(f"IREE could not compile the {what} for {spec.name}: {r.stderr.strip().splitlines()[0] if r.stderr.strip() else r.returncode}")
        with open(out, "rb") as f:
            return f.read()


def time_median(fn: "ir.Operation", min_s: float = 0.15, max_reps: int = 40) -> float:
    """Median seconds of fn(): one warm-up call (lazy initialisation), then at least 3 calls
    and more while under min_s seconds in all."""
    fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < 3 or (time.perf_counter() - start < min_s and len(ts) < max_reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure(spec: Any, vmfb: bytes, like: Any = None, progress: Callable[[str], None] | None = None,
            quick: bool = False, matvecs: dict | None = None) -> tuple:
    """Run the suite (and the matrix-vector modules, {dtype: vmfb}, when given) on the device ->
    (DeviceProfile fitted to it, raw measurements)."""
    import iree.runtime as rt

    from ..runtime.executor import create_device, take_module

    spec = DeviceSpec.parse(spec)
    dev = create_device(spec)
    ctx = rt.SystemContext(config=rt.Config(device=dev))
    ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, vmfb))
    mod = take_module(ctx)
    sizes = _sizes(quick)
    jobs = _kernel_jobs(mod, lambda a: rt.asdevicearray(dev, a), *sizes[:3])
    times = _time_jobs(jobs)
    raw = _raw(times, *sizes[:3])
    raw["upload"], raw["download"] = _transfers(dev, sizes[3])
    if matvecs:
        raw["matvec"] = _matvecs(rt, dev, matvecs)
    return fit(spec, raw, like or P.BUILTIN[spec.kind], progress or (lambda m: None), quick), raw


def _sync(result):
    return result._buffer_view  # calls are synchronous (IREE's default execution model)


def _kernel_jobs(mod, up, mms, convs, adds):
    """[(key, function, device arguments)] for every kernel of the suite."""
    rng = np.random.default_rng(0)
    jobs = []
    for k in CHAIN:
        a, w = up(rng.standard_normal((8, 8), np.float32)), up(rng.standard_normal((8, 8), np.float32) * 0.1)
        jobs.append((("chain", k), mod[f"chain_{k}"], (a, w)))
    for m, k, n in mms:
        a, b = up(rng.standard_normal((m, k), np.float32)), up(rng.standard_normal((k, n), np.float32))
        jobs.append((("matmul", (m, k, n)), mod[f"mm_{m}_{k}_{n}"], (a, b)))
    for n, c, h, w, f in convs:
        x, k = up(rng.standard_normal((n, c, h, w), np.float32)), up(rng.standard_normal((f, c, 3, 3), np.float32))
        jobs.append((("conv", (n, c, h, w, f)), mod[f"conv_{n}_{c}_{h}_{w}_{f}"], (x, k)))
    for n in adds:
        a, b = up(rng.standard_normal(n, np.float32)), up(rng.standard_normal(n, np.float32))
        jobs.append((("elementwise", n), mod[f"add_{n}"], (a, b)))
    return jobs


def _time_jobs(jobs):
    """{key: median seconds} of every job."""
    # Every kernel once before any timing: drivers may compile pipelines lazily or in
    # background threads (lavapipe does), which would pollute the first measurements.
    for _, f, args in jobs:
        _sync(f(*args))
    # Spin up: an idle GPU (or a CPU in a power-saving state) starts at low clocks.
    big = max((j for j in jobs if j[0][0] == "matmul"), key=lambda j: j[0][1][0] * j[0][1][1] * j[0][1][2])
    until = time.perf_counter() + 0.5
    while time.perf_counter() < until:
        _sync(big[1](*big[2]))
    times = {key: time_median(lambda: _sync(f(*args))) for key, f, args in jobs if key[0] != "chain"}
    # Overheads are small and noisy (thread wake-ups): the two chains alternate, many times.
    chains = [(key, f, args) for key, f, args in jobs if key[0] == "chain"]
    samples = {key: [] for key, _, _ in chains}
    deadline = time.perf_counter() + 0.5
    while len(samples[chains[0][0]]) < 20 or (time.perf_counter() < deadline and len(samples[chains[0][0]]) < 300):
        for key, f, args in chains:
            t = time.perf_counter()
            _sync(f(*args))
            samples[key].append(time.perf_counter() - t)
    times.update({key: statistics.median(v) for key, v in samples.items()})
    return times


def _raw(times, mms, convs, adds):
    """The kernels' measurements as the profile fit reads them."""
    raw = {"matmul": [], "conv": [], "elementwise": [], "chain": {k: times[("chain", k)] for k in CHAIN}}
    for m, k, n in mms:
        raw["matmul"].append({"m": m, "k": k, "n": n, "s": times[("matmul", (m, k, n))], "flops": 2 * m * k * n})
    for n, c, h, w, f in convs:
        raw["conv"].append({"shape": [n, c, h, w, f], "s": times[("conv", (n, c, h, w, f))],
                            "flops": 2 * n * f * (h - 2) * (w - 2) * c * 9, "outputs": n * f * (h - 2) * (w - 2)})
    for n in adds:
        raw["elementwise"].append({"n": n, "s": times[("elementwise", n)], "bytes": 12 * n})
    return raw


def _matvecs(rt, dev, vmfbs):
    """[{dtype, rows, bytes, calls, s}]: each matrix-vector chain's call timed at each of
    MATVEC_ROWS, its weights given as parameters (loaded, and packed where data tiling does,
    when the module initialises)."""
    from ..runtime.executor import take_module

    index = rt.ParameterIndex()
    np_types = {d: np.dtype(d.replace("f", "float")) for d in vmfbs}
    for d, np_type in np_types.items():
        for p in range(MATVEC_PAIRS[d]):  # a fill that keeps the vector's scale (values do not change the time)
            index.add_buffer(f"{d}_u{p}", np.full((MATVEC_I, MATVEC_H), 1 / MATVEC_H, np_type))
            index.add_buffer(f"{d}_d{p}", np.full((MATVEC_H, MATVEC_I), 1 / MATVEC_I, np_type))
    ctx = rt.SystemContext(config=rt.Config(device=dev))
    ctx.add_vm_module(rt.create_io_parameters_module(ctx.instance, index.create_provider(scope=CAL_SCOPE)))
    out = []
    for d, vmfb in vmfbs.items():
        ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, vmfb))
        mod = take_module(ctx, f"mv_{d}")
        for rows in MATVEC_ROWS:
            x = rt.asdevicearray(dev, np.full((rows, MATVEC_H), 0.5, np_types[d]))
            f = mod[f"mv_{rows}"]
            out.append({"dtype": d, "rows": rows, "bytes": matvec_bytes(d), "calls": 2 * MATVEC_PAIRS[d],
                        "s": time_median(lambda: _sync(f(x)))})
    return out


def _transfers(dev, sizes):
    """(uploads, downloads) timed for each size in bytes."""
    import iree.runtime as rt

    from ..runtime.executor import to_host

    up, down = [], []
    for nbytes in sizes:
        host = np.ones(nbytes // 4, np.float32)
        up.append({"bytes": nbytes, "s": time_median(lambda: _sync(rt.asdevicearray(dev, host)))})
        darr = rt.asdevicearray(dev, host)
        down.append({"bytes": nbytes, "s": time_median(lambda: to_host(dev, darr))})
    return up, down


def fit(spec: Any, raw: dict, base: "DeviceProfile", progress: Callable[[str], None] | None = None,
        quick: bool = False) -> "DeviceProfile":
    """The profile's figures from raw suite measurements (see the module docstring)."""
    progress = progress or (lambda m: None)
    spec = DeviceSpec.parse(spec)
    chain = {int(k): v for k, v in raw["chain"].items()}
    launch = max(0.0, (chain[CHAIN[1]] - chain[CHAIN[0]]) / (CHAIN[1] - CHAIN[0]))
    # A call costs one of two amounts, the executor's threads awake or woken (2-core Zen 4,
    # local-task: about 25 or 130 us), and a median lands on whichever came more often: the
    # chain's could exceed a whole kernel's (128 us against 83 for the smallest addition,
    # which made the small convolutions' rates 10x). No call costs more than the fastest one.
    fastest = min(r["s"] for what in ("matmul", "conv", "elementwise") for r in raw.get(what, ()))
    call = max(0.0, min(chain[CHAIN[0]], fastest) - launch)
    progress(f"{spec.name}: call {call * 1e6:.1f} us, dispatch {launch * 1e6:.2f} us")
    # Points where the overheads are most of the time say little about the rate.
    useful = [r for r in raw["matmul"] if r["s"] > 1.5 * (call + launch)] or raw["matmul"]
    pts = [(r["flops"], r["flops"] / max(r["s"] * 0.1, r["s"] - call - launch)) for r in useful]
    peak, half = _fit_saturation(pts)
    progress(f"{spec.name}: matmul {peak / 1e9:.1f} GFLOP/s at full occupancy, half of it at {half / 1e6:.2f} MFLOP per op "
             f"(measured {min(p for _, p in pts) / 1e9:.1f} .. {max(p for _, p in pts) / 1e9:.1f})")
    # convolutions long next to the overheads (which vary, above), else the longest
    long_convs = [r for r in raw["conv"] if r["s"] > 4 * (call + launch)] or [max(raw["conv"], key=lambda r: r["s"])]
    conv_eff = statistics.median(
        r["flops"] / max(r["s"] * 0.1, r["s"] - call - launch) / (peak * r["flops"] / (r["flops"] + half)) for r in long_convs)
    progress(f"{spec.name}: convolution at {conv_eff:.2f} x the matmul rate")
    bws = [r["bytes"] / max(r["s"] * 0.1, r["s"] - call - launch) for r in raw["elementwise"] if r["n"] >= (1 << 20)]
    bw = statistics.median(bws)
    progress(f"{spec.name}: elementwise {bw / 1e9:.1f} GB/s")
    link_bw, link_lat = _fit_link(raw["upload"], raw["download"])
    progress(f"{spec.name}: host link {link_bw / 1e9:.2f} GB/s, {link_lat * 1e6:.1f} us per transfer")
    net = {(r["dtype"], r["rows"]): max(r["s"] * 0.1, r["s"] - call - r["calls"] * launch)
           for r in raw.get("matvec", ())}
    weight_bw = {r["dtype"]: r["bytes"] / net[r["dtype"], 1] for r in raw.get("matvec", ()) if r["rows"] == 1}
    top = MATVEC_ROWS[-1]
    row_cost = {d: max(0.0, (net[d, top] / net[d, 1] - 1) / (top - 1)) for d in weight_bw if (d, top) in net}
    if weight_bw:
        progress(f"{spec.name}: matrix-vector weights read at " +
                 ", ".join(f"{v / 1e9:.1f} GB/s ({d}; each row more +{row_cost.get(d, 0):.2f})"
                           for d, v in weight_bw.items()))

    from ..version import __version__

    return replace(
        base,
        name=f"calibrated-{spec.name}",
        device=spec.name,
        peak_flops={"f32": peak, **{k: v * peak / base.peak_flops["f32"] for k, v in base.peak_flops.items() if k != "f32"}},
        op_efficiency={**base.op_efficiency, "conv": conv_eff}, half_flops=half,
        mem_bw=bw, launch_s=launch, call_s=call, link_bw=link_bw, link_latency_s=link_lat, weight_bw=weight_bw,
        row_cost=row_cost,
        source=f"measured by polyarch calibrate; watts, price and mem_capacity from {base.name}; "
               f"non-f32 peaks scaled from it by the measured f32 ratio",
        calibrated={"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "polyarch": __version__, "quick": quick, "raw": raw},
    )


def _fit_saturation(points):
    """Fit rate = peak x n / (n + half) to (work n, achieved FLOP/s) points:
    1/rate = 1/peak + (half/peak) / n is linear in 1/n (least squares, relative)."""
    x = np.array([1.0 / n for n, _ in points])
    y = np.array([1.0 / r for _, r in points])
    w = 1.0 / y  # relative error weighting
    b, a = np.polyfit(x, y, 1, w=w)
    if a <= 0 or b < 0:
        return float(statistics.median(r for _, r in points)), 0.0
    return float(1.0 / a), float(b / a)


def _fit_link(upload, download):
    """Latency from the smallest transfer, bandwidth from the smallest to the largest
    (robust to a noisy pair of large sizes), averaged over both directions."""
    bws, lats = [], []
    for rows in (upload, download):
        rows = sorted(rows, key=lambda r: r["bytes"])
        lo, hi = rows[0], rows[-1]
        bw = (hi["bytes"] - lo["bytes"]) / max(1e-9, hi["s"] - lo["s"])
        bws.append(bw)
        lats.append(max(0.0, lo["s"] - lo["bytes"] / bw))
    return float(statistics.mean(bws)), float(statistics.mean(lats))


def calibrate(devices: Iterable, like: Any = None, progress: Callable[[str], None] | None = None, quick: bool = False,
              kernels: str | None = None) -> list:
    """Measure each device -> [DeviceProfile]. kernels: a folder to reuse/store compiled suites."""
    out = []
    for d in devices:
        spec = DeviceSpec.parse(d)
        import hashlib

        builds = [("suite", suite_mlir(quick), lambda: compile_suite(spec, quick))]
        builds += [(d, matvec_mlir(d), lambda d=d: compile_matvec(spec, d)) for d in matvec_dtypes(spec)]
        vmfbs = {}
        for what, text, build in builds:
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]  # a changed suite is recompiled
            path = os.path.join(kernels, f"calibrate-{spec.name.replace(':', '_').replace('@', '_')}-{digest}.vmfb") if kernels else None
            vmfb = None
            if path and os.path.exists(path):
                with open(path, "rb") as f:
                    vmfb = f.read()
            if vmfb is None:
                t = time.time()
                vmfb = build()
                if progress:
                    progress(f"{spec.name}: compiled the {'suite' if what == 'suite' else what + ' matrix-vector module'} "
                             f"in {time.time() - t:.1f}s")
                if path:
                    os.makedirs(kernels, exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(vmfb)
            vmfbs[what] = vmfb
        base = None
        if like:
            cands = [p for p in P.load_all(like) if DeviceSpec.parse(p.device).kind == spec.kind]
            base = cands[0] if cands else None
        suite = vmfbs.pop("suite")
        out.append(measure(spec, suite, like=base, progress=progress, quick=quick, matvecs=vmfbs)[0])
    return out
