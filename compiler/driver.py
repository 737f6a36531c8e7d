"""The compile pipeline: import -> passes -> IREE per segment (in parallel) -> bundle.

    polyarch.compile(model, example_inputs, devices=["cpu", "vulkan"], output="m.pab")
"""

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from ..dialects import polyarch as pa
from ..errors import PolyarchError
from ..runtime.devices import DeviceSpec, parse_devices
from ..targets import iree_flags


def _stderr_progress(msg):
    print(f"polyarch: {msg}", file=sys.stderr, flush=True)


def _quiet(msg):
    pass


def plan(model, example_inputs=(), devices=("cpu",), pins=(), progress=None, objective="latency", solver="auto", profiles=(),
         dynamic_dims=(), calibrate=True, details=None):
    """Import and partition without compiling: -> (ir.Module after the three passes, signature).
    details: a dict to fill with "profiles" (the DeviceProfiles used) and "devices" (per
    device: identity, profile name, where the profile came from)."""
    plans, sig = plan_many(model, example_inputs, [devices], pins=pins, progress=progress, objective=objective,
                           solver=solver, profiles=profiles, dynamic_dims=dynamic_dims, calibrate=calibrate, details=details)
    return plans[0][1], sig


def plan_many(model, example_inputs=(), device_sets=(("cpu",),), pins=(), progress=None, objective="latency",
              solver="auto", profiles=(), dynamic_dims=(), calibrate=True, details=None):
    """Import once, partition once per device set. -> ([(plan name, module)], signature).
    A plan's name is its device set joined by '+', e.g. "vulkan+cpu". dynamic_dims: see
    compile; calibrate, details: see plan."""
    progress = progress or _quiet
    sets = _device_sets(device_sets)
    base, sig, priced = _import_and_price(model, example_inputs, dynamic_dims, sets, profiles, calibrate, progress)
    if details is not None:
        details.update(priced)
    return partition(base, sets, pins, progress, objective, solver, priced), sig


def _import_and_price(model, example_inputs, dynamic_dims, sets, profiles, calibrate, progress):
    """-> (torch-dialect module, signature, price_devices(...)) for a compile or a plan."""
    from .importer import import_model

    from ..passes import guard_indices

    t = time.time()
    base, sig = import_model(model, example_inputs, dynamic_dims)
    progress(f"imported {_model_name(model)} into the torch dialect in {time.time() - t:.1f}s")
    # inputs used as indices get their valid range in the signature (checked by the runtime);
    # indices computed in the model are marked for a check inside their segment
    for arg, r in guard_indices.mark(base).items():
        sig["inputs"][arg]["index_range"] = r
    for desc in dynamic_summary(sig):
        progress(desc)
    return base, sig, price_devices(sets, profiles, calibrate, progress)


def _device_sets(device_sets):
    sets = [parse_devices(d) for d in device_sets]
    names = ["+".join(s.name for s in specs) for specs in sets]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PolyarchError(f"plan {sorted(dup)[0]} is given twice", fix="give each --plans device set once")
    return sets


def price_devices(sets, profiles, calibrate, progress):
    """Identify the devices of all plans, choose each one's profile (measured where the
    host has the device: compiler/measured.py) and read what was measured wrong on it.
    -> {"profiles": [DeviceProfile], "devices": {name: info}, "verdicts": {name: verdicts}}"""
    from . import measured

    names = list(dict.fromkeys(s.name for specs in sets for s in specs))
    profs, info = measured.resolve_profiles(names, profiles, calibrate, progress)
    verdicts = {}
    for d in names:
        ident = info[d]["identity"]
        progress(measured.pricing_line(d, info[d]))
        verdicts[d] = measured.load_verdicts(ident) if ident else {"wrong_ops": {}, "corrections": {}}
        if not info[d]["source"].startswith("measured"):
            # corrections are relative to the measured profile's predictions: another profile starts afresh
            verdicts[d]["corrections"] = {}
        if verdicts[d]["wrong_ops"]:
            progress(f"{d}: {len(verdicts[d]['wrong_ops'])} op kind(s) measured wrong there before are kept off it")
    return {"profiles": profs, "devices": info, "verdicts": verdicts}


def partition(base, sets, pins, progress, objective, solver, priced, keep_base=False):
    """Run the three passes once per device set on (a copy of) the imported module."""
    from torch_mlir import ir

    from ..passes import run_pipeline

    names = ["+".join(s.name for s in specs) for specs in sets]
    verdicts = [{"device": d, **v} for d, v in priced["verdicts"].items()]
    out = []
    for i, (name, specs) in enumerate(zip(names, sets)):
        t = time.time()
        plan_pins = list(pins)
        if len(sets) > 1:  # a pin to a device outside this plan's set applies to the other plans only
            plan_pins = [p for p in pins if DeviceSpec.parse(p.rpartition("=")[2]).name in {s.name for s in specs}]
            for p in sorted(set(pins) - set(plan_pins)):
                progress(f"plan {name}: pin {p} does not apply (no such device in this plan)")
        devs = [s.name for s in specs]
        with base.context, ir.Location.unknown():
            module = base if (i == len(sets) - 1 and not keep_base) else clone_module(base)
            run_pipeline(
                module,
                [
                    ("annotate-costs", {"devices": devs, "profile": list(priced["profiles"]), "verdicts": verdicts}),
                    ("assign-devices", {"devices": devs, "pin": plan_pins, "objective": objective,
                                        "solver": solver, "profile": list(priced["profiles"]), "verdicts": verdicts}),
                    ("outline-segments", {}),
                ],
            )
            info = {d: priced["devices"][d] for d in devs}
            module.operation.attributes[pa.DEVICE_INFO] = ir.StringAttr.get(json.dumps(info, sort_keys=True))
        progress(f"partitioned over {', '.join(devs)} in {time.time() - t:.1f}s")
        out.append((name, module))
    return out


def dynamic_summary(sig):
    """One line per dynamic input dimension: where it is, its bound, the size costs are predicted at."""
    out = []
    for i, inp in enumerate(sig["inputs"]):
        for d in inp.get("dynamic", ()):
            top = "unbounded" if d.get("max") is None else f"up to {d['max']}"
            out.append(f"input {i} ('{inp['name']}') dimension {d['dim']} is dynamic: {d.get('min', 1)} {top}"
                       f" (symbol {d.get('symbol', d.get('expr'))}; costs predicted at {inp['shape'][d['dim']]})")
    return out


def _model_name(model):
    if isinstance(model, (str, os.PathLike)):  # an ONNX file
        return os.path.splitext(os.path.basename(os.fspath(model)))[0]
    return type(model).__name__


def clone_module(module):
    """A copy of a module in its context. Clones share the context's weight blobs (dense
    resources), so a copy costs IR, not weights. Call inside `with module.context`."""
    from torch_mlir import ir

    copy = ir.Module.parse("module {}")
    for op in module.body.operations:
        op.operation.clone(ip=ir.InsertionPoint(copy.body))
    attrs = module.operation.attributes
    for i in range(len(attrs)):
        named = attrs[i]
        copy.operation.attributes[named.name] = named.attr
    return copy


def segments_of(module):
    """[(name, device, func op)] in module order."""
    out = []
    for op in module.body.operations:
        if op.operation.name == "func.func" and pa.DEVICE in op.attributes:
            out.append((op.attributes["sym_name"].value, op.attributes[pa.DEVICE].value, op))
    return out


def _tensor_desc(type_):
    shape, et = pa.tensor_info(type_)
    return {"shape": shape, "dtype": _DTYPE_NAMES.get(et, et)}


# Segment boundary dtypes as the compiled function sees them. IREE demotes f64 to f32
# for every target (its default), so an f64 tensor crossing segments is a float32 buffer.
_DTYPE_NAMES = {
    "f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float32", "si64": "int64", "si32": "int32",
    "si16": "int16", "si8": "int8", "ui8": "uint8", "i1": "bool", "complex<f32>": "complex64", "complex<f64>": "complex64",
}


def schedule_of(module):
    """@main after outline-segments -> (schedule steps, output value names)."""
    from ..passes.common import main_func, tensor_bytes

    main = main_func(module)
    names = {}
    for i, a in enumerate(main.regions[0].blocks[0].arguments):
        names[a] = f"in{i}"
    steps, counter = [], [0]

    def fresh(v):
        names[v] = f"v{counter[0]}"
        counter[0] += 1
        return names[v]

    for op in main.regions[0].blocks[0].operations:
        name = op.operation.name
        if name == "func.call":
            steps.append({"op": "call", "segment": op.attributes["callee"].value,
                          "args": [names[a] for a in op.operands], "results": [fresh(r) for r in op.results]})
        elif name == pa.TRANSFER:
            steps.append({"op": "transfer", "from": op.attributes["from"].value, "to": op.attributes["to"].value,
                          "src": names[op.operands[0]], "dst": fresh(op.results[0]), "bytes": tensor_bytes(op.operands[0])})
        elif name == "func.return":
            return steps, [names[v] for v in op.operands]
        else:
            raise PolyarchError(f"unexpected op {name} in @main after outline-segments")
    raise PolyarchError("@main has no return")


def _segment_module(ir, fn):
    """A module holding just this segment function, public, for iree-compile."""
    m = ir.Module.create()
    new = fn.operation.clone(ip=ir.InsertionPoint(m.body))
    if "sym_visibility" in new.attributes:
        del new.attributes["sym_visibility"]
    for key in (pa.DEVICE, pa.TIME_US):
        if key in new.attributes:
            del new.attributes[key]
    return m


def _iree_compile_tool():
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


def run_iree_compile(cmd):
    """Run one iree-compile command line (cmd[1] is the source, after `-o` the output);
    -> the CompletedProcess. Every segment and verification probe goes through here."""
    return subprocess.run(cmd, capture_output=True, text=True)


# IREE 3.13 llvm-cpu refusals that a flag gets past, each retried once with it:
# (what stderr says, the flags, what it is). Met on public models (docs/cpu-speed.md).
KNOWN_RETRIES = {
    "cpu": (
        (re.compile(r"large vector sizes"), ("--iree-llvmcpu-fail-on-large-vector=false",),
         "llvm-cpu's check on large vectors (EfficientNet's squeeze-excite)"),
        # 64 KiB: half of the runtime's 128 KiB worker stack (--task_worker_stack_size), the rest
        # left to the task system; a dispatch needing more still fails, with the error
        (re.compile(r"exceeded stack allocation limit"), ("--iree-llvmcpu-stack-allocation-limit=65536",),
         "llvm-cpu's 32 KiB stack limit per dispatch (EfficientNet-B0 once the large-vector check is off; MiniLM at -O3)"),
    ),
}


def compile_with_retries(cmd, kind, progress=None, what="a module"):
    """run_iree_compile, and where IREE refuses for a known reason that a flag gets past
    (KNOWN_RETRIES), again with that flag. -> (CompletedProcess, [retry notes], the command last run)."""
    r, notes = run_iree_compile(cmd), []
    for pattern, flags, why in KNOWN_RETRIES.get(kind, ()):
        if r.returncode == 0:
            break
        if pattern.search(r.stderr) and not set(flags) <= set(cmd):
            first = next((l for l in r.stderr.splitlines() if ": error: " in l), "").partition(": error: ")[2]
            cmd = cmd[:-2] + list(flags) + cmd[-2:]
            r = run_iree_compile(cmd)
            notes.append({"error": first.strip(), "retried_with": list(flags), "known": why,
                          "result": "compiled" if r.returncode == 0 else "failed again"})
            if progress:
                progress(f"{what}: IREE refused it ({first.strip()[:100]}); known IREE 3.13 limitation ({why}): "
                         f"retried with {' '.join(flags)}: {notes[-1]['result']}")
    return r, notes, cmd


_ERR = re.compile(r"^(?P<loc>[^\n]*?):(?P<line>\d+):\d+: (?P<kind>error|note): (?P<msg>.*)$", re.M)
_LOC_FRAME = re.compile(r'"([^"]+)":(\d+):\d+')


def _ops_at(fn, frames):
    """The ops of a segment whose source call stack is `frames` [(file basename, line)], innermost first."""
    from ..passes.common import body_ops

    ops, _ = body_ops(fn)
    out = []
    for op in ops:
        if pa.DEVICE not in op.attributes:
            continue  # weights and glue (lists, scalars) share the line of the op they feed
        stack = [(os.path.basename(f), int(l)) for f, l in _LOC_FRAME.findall(str(op.location))]
        if stack and stack == frames[:len(stack)] and len(stack) == len(frames):
            out.append(op)
    return out


def _iree_error(stderr, segment, device, fn=None, devices=()):
    """A PolyarchError for a failed segment compile: the message, the module path of the op
    IREE names (matched on its source call stack), and a fix the user can follow."""
    from ..passes.common import describe

    lines = list(_ERR.finditer(stderr))
    first = next((m for m in lines if m["kind"] == "error"), None)
    if first is None:
        msg = next((l for l in stderr.splitlines() if l.strip()), "no output")
        unknown = re.search(r"Unknown command line argument '([^']+)'", msg)
        if unknown:
            return PolyarchError(f"iree-compile does not know the flag {unknown[1]}",
                                 fix="correct or drop that --iree-flag (Python: iree_extra_flags); "
                                     "`iree-compile --help` (installed with iree-base-compiler) lists them")
        return PolyarchError(f"IREE could not compile segment {segment} for {device}: {msg}",
                             fix="please report the model and this message; --iree-flag FLAG passes flags to iree-compile")
    frames = [(os.path.basename(first["loc"]), int(first["line"]))]
    for m in lines[lines.index(first) + 1:]:
        if m["kind"] != "note" or "called from" not in m["msg"]:
            break
        frames.append((os.path.basename(m["loc"]), int(m["line"])))
    where = f"{frames[0][0]}:{frames[0][1]}" if first["loc"] not in ("-", "") else None
    ops = _ops_at(fn, frames) if fn is not None else []
    if ops:
        where = describe(ops[0]) + (f" (or one of {len(ops) - 1} more op(s) from the same source line: "
                                    + ", ".join(describe(o) for o in ops[1:3]) + ("..." if len(ops) > 3 else "") + ")"
                                    if len(ops) > 1 else "")
    others = [d for d in devices if d != device]
    from .tuning import tunable

    # IREE 3.13 lowers few complex-valued ops, on any device; its message does not always say
    # complex ("Only integer/float dtype supported"), the op's types do.
    if "complex" in first["msg"] or any("complex<" in str(v.type) for o in ops for v in (*o.operands, *o.results)):
        fix = ("keep complex numbers out of the compiled model: return torch.view_as_real(z) and finish on the host, "
               "or compute with real and imaginary parts as two real tensors")
    elif others:
        fix = f"keep that op off {device}: polyarch compile --pin PATTERN={others[0]} (PATTERN: its module path)"
    else:
        fix = ("pass an IREE flag that avoids it with --iree-flag=FLAG (Python: iree_extra_flags=[...])"
               + (", or compile with --tune none" if tunable(device) else "") + "; please report the op and the message")
    return PolyarchError(f"IREE could not compile segment {segment} for {device}: {first['msg']}", where, fix)


def _fallback_order(choice):
    """The lowering variants to try for a segment, best first: its tuned rewrite kinds, then
    the variants its whole-segment timing measured faster than IREE's own (fastest first),
    then IREE's own. A variant never measured in the model is never tried: one rewrite kind
    alone can be slower than none (ConvNeXt-T's depthwise taps without the matmuls)."""
    kinds = tuple(sorted(choice.get("rewritten") or ()))
    if not kinds:
        return [()]
    times = {k: v for k, v in (choice.get("segment_us") or {}).items() if isinstance(v, (int, float))}
    plain = times.get("iree/default")
    flags = choice.get("flags", "default")
    ranked = sorted((v, tuple(label.split("/")[0].split("+"))) for label, v in times.items()
                    if label.endswith("/" + flags) and not label.startswith("iree/") and (plain is None or v < plain))
    order = [kinds] + [k for _, k in ranked if k != kinds]
    return order + [()]


def compile_segments(module, jobs=None, progress=None, extra_flags=(), params_dir=None, scope_prefix="", tuning=None):
    """Compile every segment with iree-compile, in parallel.
    -> {segment name: (vmfb bytes, iree-compile command, parameter archive path or None)}.

    tuning: {segment name: choice} from compiler/tuning.py: its convolutions marked
    `polyarch.lowering` are rewritten by conv-to-matmul, its extra flags added.

    params_dir: export each segment's weights (constants of parameters.MIN_BYTES or more)
    to `<params_dir>/<scope>.irpa`, scope `<scope_prefix><segment>`, instead of inlining
    them in the module (compiler/parameters.py merges the archives)."""
    from torch_mlir import ir

    from ..passes import conv_to_matmul, guard_indices, pool_to_mean
    from . import parameters

    progress = progress or _quiet
    tuning = tuning or {}
    segs = segments_of(module)
    fns = {name: fn for name, _, fn in segs}
    devices = sorted({d for _, d, _ in segs})
    tool = _iree_compile_tool()
    jobs = jobs or max(1, min(len(segs), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="polyarch-") as tmp:
        inputs = []
        with module.context, ir.Location.unknown():
            for name, device, fn in segs:
                # the tuned lowering first; where IREE refuses it among its neighbours (it compiled
                # alone when tuned; e.g. a fused dispatch over the stack limit): each kind of
                # rewrite alone, then IREE's own lowering. Never a failed compile for tuning's sake.
                variants = _fallback_order(tuning.get(name, {}))
                srcs = []
                for i, variant in enumerate(variants or [()]):
                    srcs.append((variant, os.path.join(tmp, f"{name}.{i}.mlirbc")))
                    seg = _segment_module(ir, fn)
                    pool_to_mean.run(seg)  # works around an IREE 3.13 failure (passes/pool_to_mean.py)
                    guard_indices.insert(seg)  # computed indices are checked before they are used
                    if variant:
                        conv_to_matmul.run(seg, convs="marked", kinds=variant)
                    with open(srcs[-1][1], "wb") as f:
                        seg.operation.write_bytecode(f)
                inputs.append((name, device, srcs))

        def one(item):
            name, device, srcs = item
            src = srcs[0][1]
            out = os.path.join(tmp, f"{name}.vmfb")
            spec = DeviceSpec.parse(device)
            # async-external: each function also comes as `NAME$async(args, wait fence, signal fence)`,
            # which the runtime chains (runtime/executor.py)
            cmd = [tool, src, "--iree-input-type=torch", "--iree-execution-model=async-external", *iree_flags(spec),
                   *tuning.get(name, {}).get("extra_flags", ()), *extra_flags, "-o", out]
            archive = None
            if params_dir:
                archive = os.path.join(params_dir, f"{scope_prefix}{name}.irpa")
                cmd[-2:-2] = parameters.export_flags(scope_prefix + name, archive)
            t = time.time()
            r, _, cmd = compile_with_retries(cmd, spec.kind, progress, f"{scope_prefix}{name} for {device}")
            for (tried, _), (variant, fallback) in zip(srcs, srcs[1:]):
                if r.returncode == 0:
                    break
                err = next((l.partition(": error: ")[2] for l in r.stderr.splitlines() if ": error: " in l), "?").strip()
                progress(f"{scope_prefix}{name} for {device}: IREE refused the tuned lowering ({'+'.join(tried)}: "
                         f"{err[:100]}); trying {'+'.join(variant) or 'IREE' + chr(39) + 's own'}")
                rec = tuning[name]
                rec.setdefault("refused", []).append({"lowering": list(tried), "error": err[:200]})
                rec["rewritten"] = {k: v for k, v in rec["rewritten"].items() if k in variant}
                cmd[1] = fallback
                r, _, cmd = compile_with_retries(cmd, spec.kind, progress, f"{scope_prefix}{name} for {device}")
            if r.returncode != 0:
                raise _iree_error(r.stderr, name, device, fns[name], devices)
            with open(out, "rb") as f:
                data = f.read()
            return name, device, data, time.time() - t, cmd, archive

        results = {}
        done = 0
        with ThreadPoolExecutor(jobs) as pool:
            for name, device, data, secs, cmd, archive in pool.map(one, inputs):
                done += 1
                weights = f" + {os.path.getsize(archive) / 1e6:.1f} MB weights" if archive and os.path.exists(archive) else ""
                progress(f"[{done}/{len(inputs)}] compiled {scope_prefix}{name} for {device} in {secs:.1f}s "
                         f"({len(data) / 1e6:.1f} MB{weights})")
                results[name] = (data, cmd, archive)
    return results


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("iree-base-compiler", "torch-mlir", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def plan_manifest(module, vmfbs, name=None, member_prefix="", scopes=None, scope_prefix=""):
    """The manifest entry of one placement plan (module after outline-segments).
    scopes: {parameter scope: {module key: content key}} from parameters.merge, where a
    segment's scope is `<scope_prefix><segment>` (as compile_segments exports it)."""
    from ..passes.common import body_ops, module_path, source_line

    steps, outputs = schedule_of(module)
    devices = [a.value for a in module.operation.attributes[pa.DEVICES]]
    segments = []
    for seg, device, fn in segments_of(module):
        ftype = fn.type
        ops, _ = body_ops(fn)
        data, cmd, _ = vmfbs[seg]
        entry = {
            "name": seg,
            "device": device,
            "member": f"{member_prefix}{seg}.{device.replace(':', '_').replace('@', '_')}.vmfb",
            "function": seg,
            "inputs": [_tensor_desc(t) for t in ftype.inputs],
            "outputs": [_tensor_desc(t) for t in ftype.results],
            "predicted_us": fn.attributes[pa.TIME_US].value,
            "ops": sum(1 for op in ops if pa.DEVICE in op.attributes),
            "op_list": [
                {"op": op.operation.name, "path": module_path(op), "source": source_line(op),
                 "predicted_us": op.attributes[pa.TIME_US][device].value if pa.TIME_US in op.attributes and device in op.attributes[pa.TIME_US] else 0.0}
                for op in ops if pa.DEVICE in op.attributes
            ],
            "iree_flags": [c for c in cmd[2:] if c.startswith("--") and "--iree-parameter-export=" not in c],
        }
        scope = scope_prefix + seg
        if scopes and scopes.get(scope):
            entry["parameters"] = {"scope": scope, "keys": scopes[scope]}
        segments.append(entry)
    return {
        "name": name or "+".join(devices),
        "devices": devices,
        "plan": attr_to_py(module.operation.attributes[pa.PLAN]),
        "profiles": attr_to_py(module.operation.attributes[pa.PROFILES]) if pa.PROFILES in module.operation.attributes else {},
        "device_info": json.loads(module.operation.attributes[pa.DEVICE_INFO].value)
        if pa.DEVICE_INFO in module.operation.attributes else {},
        "segments": segments,
        "schedule": steps,
        "outputs": outputs,
    }


def _manifest(sig, plans, parameters=None):
    from ..version import __version__

    out = {
        "polyarch_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "compiler": _versions(),
        "signature": sig,
        "plans": plans,
    }
    if parameters:
        out["parameters"] = parameters
    return out


PARAMS_MEMBER = "weights.irpa"


def build_bundle(plans, sig, output, jobs=None, progress=None, extra_flags=(), externalize=True, verification=None,
                 tune="none"):
    """Compile every plan's segments and write one bundle. plans: [(name or None, module)].
    externalize: weights go to one shared parameter archive (each distinct value once)
    rather than inline in every module. verification: a record every plan's manifest entry
    gets as it is written. tune: none | quick | full (compiler/tuning.py), each segment's
    choice recorded in its manifest entry. -> the manifest written."""
    from . import parameters, tuning
    from .bundle import write_bundle

    progress = progress or _quiet
    with tempfile.TemporaryDirectory(prefix="polyarch-params-") as tmp:
        compiled = []
        for i, (name, module) in enumerate(plans):
            prefix = f"p{i}_" if len(plans) > 1 else ""
            if len(plans) > 1:
                progress(f"plan {i + 1}/{len(plans)}: {name}")
            choices = tuning.tune_plan(module, tune, jobs=jobs, progress=progress)
            vmfbs = compile_segments(module, jobs=jobs, progress=progress, extra_flags=extra_flags,
                                     params_dir=tmp if externalize else None, scope_prefix=prefix, tuning=choices)
            compiled.append((name, module, vmfbs, prefix, choices))
        scopes, summary = {}, None
        members = {}
        if externalize:
            archives = {prefix + seg: v[2] for _, _, vmfbs, prefix, _ in compiled for seg, v in vmfbs.items()}
            archive = os.path.join(tmp, PARAMS_MEMBER)
            scopes, summary = parameters.merge(archives, archive)
            if summary:
                summary["member"] = PARAMS_MEMBER
                members[PARAMS_MEMBER] = archive  # streamed from the file, not read into memory
                progress(f"weights: {summary['count']} distinct parameters, {os.path.getsize(archive) / 1e6:.1f} MB "
                         f"({summary['references']} references, {summary['referenced_bytes'] / 1e6:.1f} MB before sharing)")
        plan_entries = []
        for name, module, vmfbs, prefix, choices in compiled:
            member_prefix = name.replace(":", "_").replace("@", "_") + "/" if len(plans) > 1 else ""
            entry = plan_manifest(module, vmfbs, name=name, member_prefix=member_prefix, scopes=scopes, scope_prefix=prefix)
            plan_entries.append(entry)
            for seg in entry["segments"]:
                members[seg["member"]] = vmfbs[seg["name"]][0]
                if seg["name"] in choices:
                    seg["tuning"] = choices[seg["name"]]
            members[f"{member_prefix}plan.mlir"] = plan_text(module).encode()
        if verification is not None:
            for entry in plan_entries:
                entry["verification"] = dict(verification)
        manifest = _manifest(sig, plan_entries, summary)
        return write_bundle(output, manifest, members)


def attr_to_py(attr):
    """A (nested) MLIR dictionary/string/number attribute as plain Python."""
    from torch_mlir import ir

    if isinstance(attr, ir.DictAttr):
        return {a.name: attr_to_py(a.attr) for a in attr}
    if isinstance(attr, ir.ArrayAttr):
        return [attr_to_py(a) for a in attr]
    if isinstance(attr, (ir.StringAttr, ir.IntegerAttr, ir.FloatAttr, ir.BoolAttr)):
        return attr.value
    return str(attr)


def plan_text(module):
    """The partitioned module as text, weights and large constants elided."""
    return module.operation.get_asm(large_elements_limit=16, large_resource_limit=64, enable_debug_info=True, pretty_debug_info=False)


def compile(model, example_inputs=(), devices=("cpu",), output=None, pins=(), jobs=None, progress=None, iree_extra_flags=(),
            objective="latency", solver="auto", profiles=(), plans=None, dynamic_dims=(), calibrate=True, verify=True,
            tune="quick"):
    """Compile a model into a bundle. Returns the bundle's path.

    model          torch.nn.Module (with example_inputs), torch.export.ExportedProgram, or the path of
                   an .onnx file (example_inputs then optional: arrays or "DIMSxDTYPE" specs that fix
                   symbolic input dimensions)
    devices        device specs, e.g. ["cpu", "vulkan"] or ["cpu", "cuda@sm_86"]
    plans          several device sets, one placement plan each, in one bundle sharing the weights,
                   e.g. [["cuda", "cpu"], ["vulkan", "cpu"], ["cpu"]]; the runtime runs the fastest
                   plan whose devices it finds (replaces `devices`)
    output         bundle path (default: <ModelClass>.pab in the current directory)
    pins           ["PATTERN=DEVICE", ...]: op names or module path prefixes forced onto a device
    objective      latency | throughput | cost | energy | "latency:1,energy:0.5" (see passes/assign_devices.py)
    solver         auto | brute | chain-dp | mincut | heft
    profiles       device profile JSON files (polyarch calibrate); a device without one is priced by
                   its measured profile cached on this host (compiler/measured.py), else by its built-in
                   spec-sheet profile if this host lacks it
    calibrate      True: a device of this host with no cached profile is calibrated now (quick suite,
                   about 15 s a device here) and the result cached; False: estimates instead
    verify         True: every plan whose devices this host has is run on the example inputs and checked
                   (each off-CPU segment against the same segment on llvm-cpu, the whole against
                   PyTorch eager) and timed; ops measured wrong are kept off their device (and
                   remembered for this device), the measured times correct the cost model, and the
                   model is re-planned until the plan stops changing (at most MAX_ROUNDS compiles).
                   A bundle known to be wrong is never written. False: cross-compiles.
    tune           none | quick | full: per-segment lowering choices measured on this host's CPU
                   (compiler/tuning.py; quick: each convolution shape as IREE's convolution or
                   im2col + matmul; full: also whole segments with each candidate flag set),
                   cached per host so that a recompile measures nothing
    iree_extra_flags  flags added to every iree-compile command (after polyarch's own)
    jobs           parallel iree-compile processes (default: one per core)
    progress       callable(str) for progress lines; True prints them to stderr
    dynamic_dims   ["INPUT:DIM[:MAX]", ...]: dimensions that stay dynamic (nn.Module only), e.g.
                   ["input0:0:64"]: the bundle then takes any size from 1 to MAX (default 1024) there;
                   costs are predicted at the example's size
    """
    if progress is True:
        progress = _stderr_progress
    progress = progress or _quiet
    t0 = time.time()
    output = output or f"{_model_name(model)}.pab"
    from .importer import is_onnx
    from .tuning import check_mode

    if is_onnx(model) and os.path.exists(output) and os.path.samefile(model, output):
        raise PolyarchError(f"the output {output} is the ONNX model being compiled: writing the bundle there would "
                            "replace it", fix="write the bundle elsewhere, e.g. output='model.pab'")

    check_mode(tune)
    sets = _device_sets(plans or [devices])
    base, sig, priced = _import_and_price(model, example_inputs, dynamic_dims, sets, profiles, calibrate, progress)
    example_inputs = _fit_index_examples(example_inputs, sig, progress)
    if verify:
        from . import grounding

        with tempfile.TemporaryDirectory(prefix="polyarch-rounds-") as tmp:
            path, manifest = grounding.ground(model, example_inputs, base, sig, sets, pins, objective, solver, priced,
                                              tmp, jobs=jobs, progress=progress, extra_flags=iree_extra_flags, tune=tune)
            rewrite_bundle(path, output, manifest)  # with what was verified and measured
    else:
        manifest = build_bundle(partition(base, sets, pins, progress, objective, solver, priced), sig, output, jobs=jobs,
                                progress=progress, extra_flags=iree_extra_flags, tune=tune,
                                verification={"status": "not verified (verify=False / --no-verify)"})
    size = os.path.getsize(output)
    segs = sum(len(p["segments"]) for p in manifest["plans"])
    progress(f"wrote {output} ({size / 1e6:.1f} MB, {len(manifest['plans'])} plan(s), {segs} segments) in {time.time() - t0:.1f}s")
    return output


def _fit_index_examples(examples, sig, progress):
    """Example inputs used as indices must be valid ones: PyTorch raises IndexError on the
    others when the model is verified against it. Examples made from a DIMSxDTYPE spec (ints
    in [0, 100), the table's size unknown then) are folded into the range, said in the
    progress; the user's own arrays are refused with the value and the range."""
    import numpy as np

    from ..runtime.executor import first_out_of_range

    out = list(examples)
    for i, spec in enumerate(sig["inputs"]):
        r = spec.get("index_range")
        if r is None or i >= len(out) or isinstance(out[i], str):
            continue
        a = np.asarray(out[i].detach().cpu() if hasattr(out[i], "detach") else out[i])
        bad = first_out_of_range(a, r["min"], r["max"])
        if bad is None:
            continue
        if getattr(out[i], "polyarch_made_from_spec", False):
            n = r["max"] + 1 - max(r["min"], 0)
            out[i] = out[i] % n + max(r["min"], 0)
            progress(f"example input {i} ('{spec['name']}') made from its spec holds indices up to {int(a.max())}; "
                     f"{r['op']} takes {r['min']} to {r['max']}: verifying with them taken modulo {n}")
            continue
        raise PolyarchError(f"example input {i} ('{spec['name']}') holds {bad[0]} at {bad[1]}, "
                            f"outside the {r['min']} to {r['max']} that {r['op']} takes (PyTorch raises IndexError on it)",
                            fix=f"give example indices in [{r['min']}, {r['max']}]")
    return tuple(out)


def rewrite_bundle(src, dst, manifest):
    """Write the bundle at `src` to `dst` with a new manifest (members unchanged, streamed)."""
    import shutil
    import zipfile

    from ..runtime.bundle import MANIFEST
    from .bundle import write_bundle

    with tempfile.TemporaryDirectory(prefix="polyarch-pack-", dir=os.path.dirname(os.path.abspath(src))) as tmp:
        members = {}
        with zipfile.ZipFile(src) as zf:
            for i, name in enumerate(zf.namelist()):
                if name == MANIFEST:
                    continue
                path = os.path.join(tmp, str(i))
                with zf.open(name) as f, open(path, "wb") as out:
                    shutil.copyfileobj(f, out, 64 << 20)
                members[name] = path
        keep = {k: v for k, v in manifest.items() if k not in ("members", "format", "schema_version")}
        write_bundle(dst, keep, members)
