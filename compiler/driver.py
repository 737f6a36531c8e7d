"""The compile pipeline: import -> passes -> IREE per segment (in parallel) -> bundle.

    polyarch.compile(model, example_inputs, devices=["cpu", "vulkan"], output="m.pab")
"""

import datetime
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
from .targets import iree_flags


def _stderr_progress(msg):
    print(f"polyarch: {msg}", file=sys.stderr, flush=True)


def _quiet(msg):
    pass


def plan(model, example_inputs=(), devices=("cpu",), pins=(), progress=None, objective="latency", solver="auto", profiles=()):
    """Import and partition without compiling: -> (ir.Module after the three passes, signature)."""
    from torch_mlir import ir

    from ..passes import run_pipeline
    from .importer import import_model

    progress = progress or _quiet
    specs = parse_devices(devices)
    t = time.time()
    module, sig = import_model(model, example_inputs)
    progress(f"imported {type(model).__name__} into the torch dialect in {time.time() - t:.1f}s")
    t = time.time()
    with module.context, ir.Location.unknown():
        run_pipeline(
            module,
            [
                ("annotate-costs", {"devices": [s.name for s in specs], "profile": list(profiles)}),
                ("assign-devices", {"devices": [s.name for s in specs], "pin": list(pins), "objective": objective,
                                    "solver": solver, "profile": list(profiles)}),
                ("outline-segments", {}),
            ],
        )
    progress(f"partitioned over {', '.join(s.name for s in specs)} in {time.time() - t:.1f}s")
    return module, sig


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
    "si16": "int16", "si8": "int8", "ui8": "uint8", "i1": "bool",
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


_ERR = re.compile(r"^(?P<loc>[^\n]*?):(?P<line>\d+):\d+: error: (?P<msg>.*)$", re.M)


def _iree_error(stderr, segment, device):
    m = _ERR.search(stderr)
    if m:
        loc = m["loc"]
        where = f"{os.path.basename(loc)}:{m['line']}" if loc not in ("-", "") else None
        return PolyarchError(
            f"IREE could not compile segment {segment} for {device}: {m['msg']}",
            where,
            f"keep the op at that line off {device} (polyarch compile --pin PATTERN=cpu), or choose another target arch",
        )
    first = next((l for l in stderr.splitlines() if l.strip()), "no output")
    return PolyarchError(f"IREE could not compile segment {segment} for {device}: {first}")


def compile_segments(module, jobs=None, progress=None, extra_flags=()):
    """Compile every segment with iree-compile, in parallel. -> {segment name: vmfb bytes}."""
    from torch_mlir import ir

    progress = progress or _quiet
    segs = segments_of(module)
    tool = _iree_compile_tool()
    jobs = jobs or max(1, min(len(segs), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="polyarch-") as tmp:
        inputs = []
        with module.context, ir.Location.unknown():
            for name, device, fn in segs:
                src = os.path.join(tmp, f"{name}.mlirbc")
                with open(src, "wb") as f:
                    _segment_module(ir, fn).operation.write_bytecode(f)
                inputs.append((name, device, src))

        def one(item):
            name, device, src = item
            out = os.path.join(tmp, f"{name}.vmfb")
            spec = DeviceSpec.parse(device)
            cmd = [tool, src, "--iree-input-type=torch", *iree_flags(spec), *extra_flags, "-o", out]
            t = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise _iree_error(r.stderr, name, device)
            with open(out, "rb") as f:
                data = f.read()
            return name, device, data, time.time() - t, cmd

        results = {}
        done = 0
        with ThreadPoolExecutor(jobs) as pool:
            for name, device, data, secs, cmd in pool.map(one, inputs):
                done += 1
                progress(f"[{done}/{len(inputs)}] compiled {name} for {device} in {secs:.1f}s ({len(data) / 1e6:.1f} MB)")
                results[name] = (data, cmd)
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


def build_manifest(module, sig, vmfbs):
    from .. import __version__
    from ..passes.common import body_ops, module_path, source_line

    steps, outputs = schedule_of(module)
    plan_attr = module.operation.attributes[pa.PLAN]
    segments = []
    for name, device, fn in segments_of(module):
        ftype = fn.type
        ops, _ = body_ops(fn)
        data, cmd = vmfbs[name]
        segments.append({
            "name": name,
            "device": device,
            "member": f"{name}.{device.replace(':', '_').replace('@', '_')}.vmfb",
            "function": name,
            "inputs": [_tensor_desc(t) for t in ftype.inputs],
            "outputs": [_tensor_desc(t) for t in ftype.results],
            "predicted_us": fn.attributes[pa.TIME_US].value,
            "ops": sum(1 for op in ops if pa.DEVICE in op.attributes),
            "op_list": [
                {"op": op.operation.name, "path": module_path(op), "source": source_line(op),
                 "predicted_us": op.attributes[pa.TIME_US][device].value if pa.TIME_US in op.attributes and device in op.attributes[pa.TIME_US] else 0.0}
                for op in ops if pa.DEVICE in op.attributes
            ],
            "iree_flags": [c for c in cmd[2:] if c.startswith("--")],
        })
    return {
        "polyarch_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "compiler": _versions(),
        "signature": sig,
        "devices": [a.value for a in module.operation.attributes[pa.DEVICES]],
        "plan": attr_to_py(plan_attr),
        "profiles": attr_to_py(module.operation.attributes[pa.PROFILES]) if pa.PROFILES in module.operation.attributes else {},
        "segments": segments,
        "schedule": steps,
        "outputs": outputs,
    }


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
            objective="latency", solver="auto", profiles=()):
    """Compile a model into a bundle. Returns the bundle's path.

    model          torch.nn.Module (with example_inputs) or torch.export.ExportedProgram
    devices        device specs, e.g. ["cpu", "vulkan"] or ["cpu", "cuda@sm_86"]
    output         bundle path (default: <ModelClass>.pab in the current directory)
    pins           ["PATTERN=DEVICE", ...]: op names or module path prefixes forced onto a device
    objective      latency | throughput | cost | energy | "latency:1,energy:0.5" (see passes/assign_devices.py)
    solver         auto | brute | chain-dp | mincut | heft
    profiles       device profile JSON files (polyarch calibrate); default: built-in spec-sheet profiles
    jobs           parallel iree-compile processes (default: one per core)
    progress       callable(str) for progress lines; True prints them to stderr
    """
    from .bundle import write_bundle

    if progress is True:
        progress = _stderr_progress
    progress = progress or _quiet
    t0 = time.time()
    module, sig = plan(model, example_inputs, devices=devices, pins=pins, progress=progress, objective=objective,
                       solver=solver, profiles=profiles)
    vmfbs = compile_segments(module, jobs=jobs, progress=progress, extra_flags=iree_extra_flags)
    manifest = build_manifest(module, sig, vmfbs)
    members = {s["member"]: vmfbs[s["name"]][0] for s in manifest["segments"]}
    members["plan.mlir"] = plan_text(module).encode()
    output = output or f"{type(model).__name__}.pab"
    write_bundle(output, manifest, members)
    size = os.path.getsize(output)
    progress(f"wrote {output} ({size / 1e6:.1f} MB, {len(manifest['segments'])} segments) in {time.time() - t0:.1f}s")
    return output
