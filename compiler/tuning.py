"""Per-segment tuning: try candidate lowerings on the device, keep the fastest, cache the choice.

    tune="none"    IREE's default lowering and the device's flags (targets/__init__.py)
    tune="quick"   (default) every distinct convolution of a cpu segment that conv-to-matmul can
                   rewrite (by op fingerprint: shapes, strides, padding...) is compiled both ways,
                   IREE's convolution and the rewrite (im2col + matmul; a sum of taps for a
                   depthwise one), each run alone on this host's CPU; the rewrite is marked where
                   it is at least 5% faster (WIN). Then a segment with marked convolutions is
                   compiled whole and timed on random inputs with them rewritten, with each kind
                   of rewrite alone, and with none: the probes time each convolution alone, but
                   what a rewrite costs or saves among its neighbours shows only there (ConvNeXt:
                   faster 7x7 depthwise taps alone, slower fused with its LayerNorm transposes)
    tune="full"    as quick, every segment compiled whole with each lowering variant and each
                   candidate flag set (FLAG_CANDIDATES); the fastest kept (by 5%)

Time budget (quick and full): after the two convolution probes are compiled, tuning may spend
BUDGET times what IREE took to compile the probe of its own lowering (a measure of what the
convolutions cost to compile untuned), at least MIN_BUDGET_S. Convolutions are timed largest
first (by FLOPs: where the predicted gain is largest), each result cached as it is measured, so
a compile that runs out of budget or is killed keeps what it measured and the next compile goes
on from there; a shape not measured yet keeps IREE's lowering for now. A segment is timed whole
only when the budget left covers two compiles of it (IREE's lowering and a rewrite: WHOLE_COMPILES
probe compile times); otherwise it keeps IREE's lowering this time, and the next compile (every
shape cached, no budget) times it whole. Each probe prints a progress line with the time left.

Choices are cached per device identity and IREE version (compiler/measured.py's cache,
`tuning/<identity key>-iree<version>.json`): convolutions by op fingerprint, whole segments
by the SHA-256 of their compiled source; a second compile measures nothing. Only devices
of this host are tuned: a cpu spec with another arch (a cross-compile, `cpu@znver4`) keeps
the defaults. Each segment's choice is recorded in the manifest (`segments[].tuning`).

Why convolutions (docs/cpu-speed.md): IREE 3.13's llvm-cpu convolution
tiling is 0.5x-4x the time of its own data-tiled matmul on the same FLOPs, depending on
the shape (measured per shape on this host, so measured rather than guessed)."""

import hashlib
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..files import temp_dir
from ..dialects import polyarch as pa
from ..errors import PolyarchError
from ..runtime.devices import DeviceSpec
from ..targets import tunable  # noqa: F401 (part of this module's face: tuning.tunable)

if TYPE_CHECKING:
    from torch_mlir import ir

MODES = ("none", "quick", "full")
DEFAULT = "quick"
WIN = 0.95  # a candidate replaces the default only when it takes at most this fraction of its time
BUDGET = 1.0  # tuning time / the compile time of the untuned convolution probe
MIN_BUDGET_S = 10.0
PROBE_S = 0.05  # timing budget per probe function (at least MIN_CALLS calls)
MIN_CALLS = 3
WHOLE_COMPILES = 3  # budget a whole-segment check needs, in probe compile times (two compiles of a whole segment,
#                    each measured at 1.1-1.4x the probe's on ResNet-18 and ConvNeXt)
FLAG_CANDIDATES = {"cpu": {"default": (), "ukernels": ("--iree-llvmcpu-enable-ukernels=all",)}}
SCHEMA = "polyarch-tuning/4"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise PolyarchError(f"unknown tuning mode {mode!r}", fix="use --tune none, quick or full")
    return mode


def _cache_path(ident):
    from .measured import _path

    return _path("tuning", ident)


def _load(ident):
    from .measured import _read

    obj = _read(_cache_path(ident))
    if not obj or obj.get("schema") != SCHEMA or obj.get("identity") != ident["key"]:
        return {"convs": {}, "segments": {}}
    return {"convs": dict(obj.get("convs", {})), "segments": dict(obj.get("segments", {}))}


def _store(ident, cache):
    from .measured import _write, iree_version

    _write(_cache_path(ident), {"schema": SCHEMA, "identity": ident["key"], "iree": iree_version(), **cache})


class Budget:
    """Seconds tuning may still spend; `left()` counts down from when it was given its size."""

    def __init__(self):
        self.start, self.seconds = time.perf_counter(), None  # None: no size yet (nothing to compile), no limit
        self.compile_s = 0.0  # the expected time of a whole-segment compile, once known

    def set(self, seconds: float) -> None:
        """Give the budget its size, counted from now."""
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def text(self) -> str:
        return "" if self.seconds is None else f" ({max(0.0, self.left()):.0f} s of the {self.seconds:.0f} s budget left)"


def time_function(fn: "ir.Operation", args: list, budget_s: float = 0.3, min_calls: int = 5,
                  max_calls: int = 200) -> float:
    """Median seconds of fn(*args) after two warm-up calls."""
    for _ in range(2):
        fn(*args)
    ts, start = [], time.perf_counter()
    while len(ts) < min_calls or (time.perf_counter() - start < budget_s and len(ts) < max_calls):
        t = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _random_args(types, seed=0):
    """Host arrays for tensor types: floats N(0, 1), integers and booleans zero (valid indices)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in types:
        shape, et = pa.tensor_info(t)
        if et.startswith("f") or et == "bf16":
            out.append(rng.standard_normal(shape).astype(np.float32 if et in ("f32", "f64", "bf16") else np.float16))
        elif et == "i1":
            out.append(np.zeros(shape, np.bool_))
        elif et.startswith("complex"):  # boundaries carry complex<f64> as complex64, as f64 as f32
            out.append(rng.standard_normal(shape).astype(np.complex64))
        else:
            out.append(np.zeros(shape, {"si64": np.int64, "i64": np.int64, "si8": np.int8, "ui8": np.uint8,
                                         "si16": np.int16}.get(et, np.int32)))
    return out


def _compile(module, device, tmp, tag, flags=(), kinds=(), export=False):
    """iree-compile a probe module (conv-to-matmul first on the convolutions marked with one
    of `kinds`; export: its weights exported as parameters to `<tag>.irpa`, scope `tag`, as
    compile_segments does: IREE fuses and refuses differently with them inline).
    -> vmfb path, or None with the first error line when IREE refuses it."""
    from . import parameters

    from ..passes import conv_to_matmul
    from .iree import compile_with_retries, iree_compile_tool
    from ..targets import iree_flags

    if kinds:
        conv_to_matmul.run(module, convs="marked", kinds=kinds)
    src, out = os.path.join(tmp, f"{tag}.mlirbc"), os.path.join(tmp, f"{tag}.vmfb")
    with module.context:
        with open(src, "wb") as f:
            module.operation.write_bytecode(f)
    spec = DeviceSpec.parse(device)
    export_flags = parameters.export_flags(tag, os.path.join(tmp, f"{tag}.irpa")) if export else []
    r, _, _ = compile_with_retries([iree_compile_tool(), src, "--iree-input-type=torch", *iree_flags(spec), *flags,
                                    *export_flags, "-o", out], spec.kind)
    if r.returncode:
        return None, next((l for l in r.stderr.splitlines() if "error" in l), r.stderr.strip()[:200])
    return out, None


def _load_module(device, vmfb):
    """The module of a vmfb on the device, with its parameters (`<vmfb stem>.irpa`, as
    _compile(export=True) writes them) where there are any. -> (device, module)."""
    import iree.runtime as rt

    from ..runtime.executor import create_device, take_module

    dev = create_device(DeviceSpec.parse(device))
    ctx = rt.SystemContext(config=rt.Config(device=dev))
    archive = vmfb[:-len(".vmfb")] + ".irpa"
    if os.path.exists(archive):
        index = rt.ParameterIndex()
        index.load(archive)
        ctx.add_vm_module(rt.create_io_parameters_module(
            ctx.instance, index.create_provider(scope=os.path.basename(vmfb)[:-len(".vmfb")])))
    with open(vmfb, "rb") as f:
        ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, f.read()))
    return dev, take_module(ctx)


def _time_probe(device, vmfb, calls):
    """calls: [(function name, host args)] -> {function name: median seconds}."""
    import iree.runtime as rt

    dev, mod = _load_module(device, vmfb)
    out = {}
    for name, args in calls:
        dargs = [rt.asdevicearray(dev, a) for a in args]
        out[name] = time_function(mod[name], dargs)
    return out


def _conv_probes(ir, module, items):
    """Two probe modules (IREE's convolution; conv-to-matmul's rewrite: im2col, or taps for a
    depthwise one) holding one function per convolution.
    items: [(segment function, conv op)] -> (direct, rewritten, [(name, arg types)])."""
    from ..passes.conv_to_matmul import conv_params

    from ..passes.common import body_ops, remat_set
    from ..passes.outline_segments import _needs, make_function, program_order

    mods = [ir.Module.create(), ir.Module.create()]
    sigs = []
    for i, (fn, op) in enumerate(items):
        ops, _ = body_ops(fn)
        inputs, glue = _needs(ir, [op], remat_set(fn))
        for k, m in enumerate(mods):
            new, in_types, _ = make_function(ir, f"conv{i}", inputs, [op.results[0]], program_order(glue + [op], ops),
                                             False, ir.InsertionPoint(m.body))
            if k == 1:
                conv = [o for o in new.regions[0].blocks[0].operations if o.operation.name == "torch.aten.convolution"][-1]
                pa.set_lowering(conv, conv_params(op)["lowering"])
        sigs.append((f"conv{i}", in_types))
    return mods[0], mods[1], sigs


def _measure_convs(module, device, items, tmp, jobs, progress, budget, done, alongside=None):
    """Time each convolution both ways on the device, largest first (items come sorted), while
    the budget lasts; done(i, times) is called as each finishes (the caller caches it). The
    budget's size is set here, once the probes are compiled: BUDGET times the untuned probe's
    compile time. alongside: the plan's untuned compile, started with the probes' (the final
    compile takes its result where tuning keeps IREE's lowering) and ended before any timing."""
    import iree.runtime as rt
    from torch_mlir import ir

    with module.context, ir.Location.unknown():
        direct, rewritten, sigs = _conv_probes(ir, module, items)
    progress(f"tune: timing {len(items)} convolution shape(s) on {device}, IREE's convolution against "
             "im2col + matmul (taps for depthwise); compiling both")
    t0 = time.perf_counter()
    timed = {}

    def compile_one(args):
        r = _compile(*args)
        timed[args[3]] = time.perf_counter() - t0
        return r

    if alongside is not None:
        alongside.start()
    with ThreadPoolExecutor(min(2, jobs)) as pool:
        (d_path, d_err), (i_path, i_err) = pool.map(compile_one, [
            (direct, device, tmp, "conv-direct"), (rewritten, device, tmp, "conv-rewritten", (), ("im2col", "taps"))])
    if alongside is not None:
        t1 = time.perf_counter()
        alongside.wait()  # nothing is timed while a compile shares the cores
        progress(f"tune: the untuned compile alongside the probes ended {time.perf_counter() - t1:.1f} s after them")
    if d_err or i_err:
        raise PolyarchError(f"IREE could not compile the tuning probes for {device}: {d_err or i_err}",
                            fix="compile with --tune none (and report the convolution shapes)")
    budget.compile_s = time.perf_counter() - t0  # both probes: what a whole segment's compile takes at least
    budget.set(max(MIN_BUDGET_S, BUDGET * timed["conv-direct"]))
    progress(f"tune: probes compiled in {time.perf_counter() - t0:.1f} s; timing each shape, largest first"
             + budget.text())
    (dd, dm), (id_, im) = _load_module(device, d_path), _load_module(device, i_path)
    for i, (name, types) in enumerate(sigs):
        if budget.left() <= 0:
            progress(f"tune: budget spent after {i} of {len(sigs)} shape(s); the other {len(sigs) - i} keep IREE's "
                     "lowering this time (the next compile measures them)")
            break
        args = _random_args(types, seed=i)
        td = time_function(dm[name], [rt.asdevicearray(dd, a) for a in args], PROBE_S, MIN_CALLS)
        ti = time_function(im[name], [rt.asdevicearray(id_, a) for a in args], PROBE_S, MIN_CALLS)
        done(i, {"direct_us": round(td * 1e6, 1), "rewritten_us": round(ti * 1e6, 1)})
        progress(f"tune: shape {i + 1}/{len(sigs)}: IREE {td * 1e3:.3f} ms, rewritten {ti * 1e3:.3f} ms"
                 + budget.text())


def _segment_digest(fn, extra):
    """What a segment's whole-segment timing depends on: its ops' fingerprints (names, types,
    constant operands) and lowering marks, in order; not the weights' values. Deterministic
    across imports (the bytecode is not: resource names differ)."""
    from ..passes.common import op_fingerprint

    lines = [op_fingerprint(op) + (f" {pa.lowering_of(op)}" if pa.lowering_of(op) else "")
             for block in fn.regions[0].blocks for op in block.operations]
    return hashlib.sha256("\n".join(lines + list(extra)).encode()).hexdigest()[:24]


def _variants(kinds):
    """Lowering variants of a segment whose marked convolutions have these kinds: all of
    them, each alone (when several), none."""
    kinds = tuple(sorted(kinds))
    return [kinds] + ([(k,) for k in kinds] if len(kinds) > 1 else []) + ([()] if kinds else [])


def _tune_segment(fn, device, name, tmp, progress, kinds, flagsets, budget):
    """Compile and time one segment whole with each lowering variant and flag set: the probes
    time each convolution alone, but what a rewrite costs or saves among its neighbours
    (fusion, layouts) shows only here. -> (chosen (kinds, flag set), {label: us or error})."""
    from torch_mlir import ir

    from .iree import segment_module

    types = [a.type for a in fn.regions[0].blocks[0].arguments]
    default = ((), "default")
    if any(pa.tensor_info(t) is None or -1 in pa.tensor_info(t)[0] for t in types):
        return default, {"skipped": "dynamic or non-tensor inputs"}
    args = _random_args(types)
    times, label = {}, lambda c: f"{'+'.join(c[0]) or 'iree'}/{c[1]}"
    cands = [(k, f) for k in _variants(kinds) or [()] for f in flagsets]
    cands.sort(key=lambda c: c != default)  # IREE's own first: the reference every other is weighed against
    last = budget.compile_s  # seconds the previous whole compile took (first: the probe's): what another takes
    for cand in cands:
        if budget.left() < last:
            times[label(cand)] = "skipped: budget spent"
            continue
        with fn.context, ir.Location.unknown():
            seg = segment_module(ir, fn)
        t0 = time.perf_counter()
        path, err = _compile(seg, device, tmp, f"{name}-{len(times)}", FLAG_CANDIDATES["cpu"][cand[1]], kinds=cand[0],
                             export=True)
        last = time.perf_counter() - t0
        if err:
            times[label(cand)] = f"failed: {err}"
            continue
        times[label(cand)] = round(_time_probe(device, path, [(name, args)])[name] * 1e6, 1)
        progress(f"tune: {name} whole as {label(cand)}: {times[label(cand)] / 1e3:.2f} ms (compiled in {last:.1f} s)"
                 + budget.text())
    ok = {c: times[label(c)] for c in cands if isinstance(times[label(c)], float)}
    best = min(ok, key=ok.get) if ok else default
    if best != default and default in ok and ok[best] > WIN * ok[default]:
        best = default
    progress(f"tune: {name} on {device}: " + ", ".join(f"{k} {v / 1e3:.2f} ms" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in times.items()) + f" -> {label(best)}")
    return best, times


def tune_plan(module: "ir.Module", mode: str = DEFAULT, jobs: int | None = None,
              progress: Callable[[str], None] | None = None, alongside=None) -> dict:
    """Choose each cpu segment's lowering (module after outline-segments): marks the
    convolutions to compile as im2col + matmul (`polyarch.lowering`) in place, within the budget
    (module docstring). alongside: a compiler.build.Alongside, started with the convolution
    probes' compile (when there are convolutions to measure) and waited for before any timing.
    -> {segment name: {"mode", "convs", "rewritten": {lowering: count}, "flags", "extra_flags", "source"}}."""
    from ..passes.common import op_fingerprint
    from ..passes.conv_to_matmul import convolutions
    from ..runtime.identity import identify
    from .modules import segments_of

    check_mode(mode)
    progress = progress or (lambda m: None)
    segs = [(n, d, fn) for n, d, fn in segments_of(module) if tunable(d)]
    if mode == "none" or not segs:
        return {}
    ident = identify("cpu")
    cache = _load(ident)
    store = lambda: _store(ident, cache)
    budget = Budget()
    convs = {n: [(op, op_fingerprint(op)) for op in convolutions(fn)] for n, _, fn in segs}
    with temp_dir(prefix="polyarch-tune-") as tmp:
        measured = _measure_new_convs(module, segs, convs, cache, tmp, jobs or max(1, os.cpu_count() or 1), progress,
                                      budget, store, alongside)
        out = _mark_convs(module, segs, convs, cache, mode, measured)
        flagsets = list(FLAG_CANDIDATES["cpu"]) if mode == "full" else ["default"]
        for n, d, fn in segs:
            if out[n]["rewritten"] or mode == "full":
                _tune_whole(module, n, d, fn, convs[n], out[n], cache, mode, flagsets, tmp, progress, budget, store)
    return out


def _measure_new_convs(module, segs, convs, cache, tmp, jobs, progress, budget, store, alongside=None):
    """Each convolution shape not in the cache measured both ways (largest first, while the
    budget lasts), its choice cached as soon as it is measured. -> any measured."""
    from ..passes.conv_to_matmul import conv_params

    firsts = {}
    for n, d, fn in segs:
        for op, fp in convs[n]:
            if fp not in cache["convs"] and fp not in firsts:
                firsts[fp] = (fn, op)
    if not firsts:
        return False
    flops = lambda op: (pa.Cost.of(op).flops if pa.Cost.of(op) else 0)
    order = sorted(firsts, key=lambda fp: -flops(firsts[fp][1]))

    def done(i, t):
        fp, op = order[i], firsts[order[i]][1]
        t["lowering"] = conv_params(op)["lowering"]
        t["choice"] = t["lowering"] if t["rewritten_us"] <= WIN * t["direct_us"] else "direct"
        cache["convs"][fp] = t
        store()  # now: a compile killed later keeps it

    _measure_convs(module, "cpu", [firsts[fp] for fp in order], tmp, jobs, progress, budget, done, alongside)
    return True


def _mark_convs(module, segs, convs, cache, mode, measured):
    """Each convolution whose shape is faster rewritten gets polyarch.lowering. -> the choices."""
    from torch_mlir import ir

    out = {}
    with module.context, ir.Location.unknown():
        for n, d, fn in segs:
            marked = {}
            for op, fp in convs[n]:
                choice = cache["convs"][fp]["choice"] if fp in cache["convs"] else "direct"  # (not measured yet)
                if choice != "direct":
                    pa.set_lowering(op, choice)
                    marked[choice] = marked.get(choice, 0) + 1
            out[n] = {"mode": mode, "convs": len(convs[n]), "rewritten": marked, "flags": "default", "extra_flags": [],
                      "source": "measured now" if measured else "cached"}
    return out


def _tune_whole(module, n, d, fn, seg_convs, rec, cache, mode, flagsets, tmp, progress, budget, store):
    """A whole segment timed with each rewrite kind and flag set (cached per segment digest);
    the convolutions of the kinds it does not keep are unmarked, `rec` updated. Out of budget,
    the rewrites of the measured convolutions are kept unchecked whole (not cached: the next
    compile checks them)."""
    from torch_mlir import ir

    key = _segment_digest(fn, (mode,))
    hit = cache["segments"].get(key)
    if hit is None and budget.left() < WHOLE_COMPILES * budget.compile_s:  # no time to time it whole
        # rewrites faster alone can be slower among their neighbours (ConvNeXt's taps: the cold compile
        # took 3.3x the untuned one and the segment ran slower): none is kept unchecked
        with module.context, ir.Location.unknown():
            for op, _ in seg_convs:
                pa.set_lowering(op, None)
        progress(f"tune: {n}: the budget left does not cover timing it whole; IREE's lowering this time "
                 f"(the next compile, every shape cached, times the rewrites of {sum(rec['rewritten'].values())} "
                 "convolution(s) whole)")
        rec["rewritten"] = {}
        rec["source"] = "measured now, not checked whole (budget spent)"
        return
    if hit is None:
        (kinds, flags), times = _tune_segment(fn, d, n, tmp, progress, rec["rewritten"], flagsets, budget)
        hit = {"lowering": list(kinds), "flags": flags, "times_us": times}
        if not any(isinstance(v, str) and v.startswith("skipped: budget") for v in times.values()):
            cache["segments"][key] = hit
            store()
        rec["source"] = "measured now"
    with module.context, ir.Location.unknown():
        for op, _ in seg_convs:
            if pa.lowering_of(op) not in (None, *hit["lowering"]):
                pa.set_lowering(op, None)
    rec["rewritten"] = {k: v for k, v in rec["rewritten"].items() if k in hit["lowering"]}
    rec["flags"] = hit["flags"]
    rec["extra_flags"] = list(FLAG_CANDIDATES["cpu"].get(hit["flags"], ()))
    rec["segment_us"] = hit["times_us"]
