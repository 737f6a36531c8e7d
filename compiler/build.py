"""Building a bundle: each plan's segments compiled by IREE (in parallel, with their tuned
lowering), the weights merged into one parameter archive, the manifest written."""

import datetime
import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..files import temp_dir
from ..dialects import polyarch as pa
from ..runtime.devices import DeviceSpec
from ..targets import iree_flags
from .iree import compile_with_retries, first_error, iree_compile_tool, iree_error, segment_module
from .modules import plan_text, schedule_of, segments_of, tensor_desc

if TYPE_CHECKING:
    from torch_mlir import ir


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


def compile_segments(module: "ir.Module", jobs: int | None = None, progress: Callable[[str], None] | None = None,
                     extra_flags: Iterable = (), params_dir: str | None = None, scope_prefix: str = "",
                     tuning: dict | None = None, alongside: "Alongside | None" = None, kernels: bool = False) -> dict:
    """Compile every segment with iree-compile, in parallel.
    -> {segment name: (vmfb bytes, iree-compile command, parameter archive path or None)}.

    tuning: {segment name: choice} from compiler/tuning.py: its convolutions marked
    `polyarch.lowering` are rewritten by conv-to-matmul, its extra flags added.

    params_dir: export each segment's weights (constants of parameters.MIN_BYTES or more)
    to `<params_dir>/<scope>.irpa`, scope `<scope_prefix><segment>`, instead of inlining
    them in the module (compiler/parameters.py merges the archives).

    alongside: the untuned compile run while tuning measured (Alongside): a segment whose
    source and command are the ones it compiled takes its result.

    kernels: cpu segments multiply a few rows by a transposed weight with the hand-written
    dispatch (passes/rowdot.py, compiler/kernels.py): a decode-like phase's matmuls."""
    progress = progress or (lambda msg: None)
    job = _SegmentJob(module, tuning or {}, extra_flags, params_dir, scope_prefix, progress, kernels)
    compile_one = (lambda item: alongside.take(job, item) or job.compile(item)) if alongside else job.compile
    with temp_dir(prefix="polyarch-") as tmp:
        inputs = job.sources(tmp)
        results = {}
        with ThreadPoolExecutor(_workers(jobs, len(inputs))) as pool:
            for done, (name, device, data, secs, cmd, archive) in enumerate(pool.map(compile_one, inputs), 1):
                weights = f" + {os.path.getsize(archive) / 1e6:.1f} MB weights" if archive and os.path.exists(archive) else ""
                when = " alongside tuning" if alongside and name in alongside.taken else ""
                progress(f"[{done}/{len(inputs)}] compiled {scope_prefix}{name} for {device} in {secs:.1f}s{when} "
                         f"({len(data) / 1e6:.1f} MB{weights})")
                results[name] = (data, cmd, archive)
    return results


class _SegmentJob:
    """The compile of one plan's segments: each segment's source variants, then each compiled
    (one thread per segment), falling back variant by variant where IREE refuses one."""

    def __init__(self, module, tuning, extra_flags, params_dir, scope_prefix, progress, kernels=False):
        self.module, self.tuning, self.extra_flags, self.kernels = module, tuning, extra_flags, kernels
        self.params_dir, self.scope_prefix, self.progress = params_dir, scope_prefix, progress
        self.segs = segments_of(module)
        self.fns = {name: fn for name, _, fn in self.segs}
        self.devices = sorted({d for _, d, _ in self.segs})
        self.tool = iree_compile_tool()

    def sources(self, tmp):
        """[(name, device, [(lowering variant, .mlirbc path)])]: the tuned lowering first;
        where IREE refuses it among its neighbours (it compiled alone when tuned; e.g. a fused
        dispatch over the stack limit): each kind of rewrite alone, then IREE's own lowering.
        Never a failed compile for tuning's sake."""
        from torch_mlir import ir

        from ..passes import conv_to_matmul, guard_indices, pool_to_mean, rowdot
        from .kernels import define

        out = []
        with self.module.context, ir.Location.unknown():
            for name, device, fn in self.segs:
                srcs = []
                for i, variant in enumerate(_fallback_order(self.tuning.get(name, {})) or [()]):
                    srcs.append((variant, os.path.join(tmp, f"{name}.{i}.mlirbc")))
                    seg = segment_module(ir, fn)
                    pool_to_mean.run(seg)  # works around an IREE 3.13 failure (passes/pool_to_mean.py)
                    guard_indices.insert(seg)  # computed indices are checked before they are used
                    if variant:
                        conv_to_matmul.run(seg, convs="marked", kinds=variant)
                    rows = self.kernels and DeviceSpec.parse(device).kind == "cpu" and rowdot.run(seg)
                    with open(srcs[-1][1], "wb") as f:
                        seg.operation.write_bytecode(f)
                    if rows:
                        define(srcs[-1][1])
                out.append((name, device, srcs))
        return out

    def command(self, name, device, src, out):
        """The iree-compile command of a segment (and where its weights go, or None).
        async-external: each function also comes as `NAME$async(args, wait fence, signal
        fence)`, which the runtime chains (runtime/executor.py)."""
        from . import parameters

        cmd = [self.tool, src, "--iree-input-type=torch", "--iree-execution-model=async-external",
               *iree_flags(DeviceSpec.parse(device)), *self.tuning.get(name, {}).get("extra_flags", ()),
               *self.extra_flags, "-o", out]
        archive = None
        if self.params_dir:
            archive = os.path.join(self.params_dir, f"{self.scope_prefix}{name}.irpa")
            cmd[-2:-2] = parameters.export_flags(self.scope_prefix + name, archive)
        return cmd, archive

    def compile(self, item):
        """-> (name, device, vmfb bytes, seconds, the command that compiled it, archive)."""
        name, device, srcs = item
        out = os.path.join(os.path.dirname(srcs[0][1]), f"{name}.vmfb")
        cmd, archive = self.command(name, device, srcs[0][1], out)
        kind, what = DeviceSpec.parse(device).kind, f"{self.scope_prefix}{name} for {device}"
        t = time.time()
        r, _, cmd = compile_with_retries(cmd, kind, self.progress, what)
        for (tried, _), (variant, fallback) in zip(srcs, srcs[1:]):
            if r.returncode == 0:
                break
            self._refused(name, what, tried, variant, r.stderr)
            cmd[1] = fallback
            r, _, cmd = compile_with_retries(cmd, kind, self.progress, what)
        if r.returncode != 0:
            raise iree_error(r.stderr, name, device, self.fns[name], self.devices)
        with open(out, "rb") as f:
            data = f.read()
        return name, device, data, time.time() - t, cmd, archive

    def _refused(self, name, what, tried, variant, stderr):
        """Say and record that IREE refused a tuned lowering, before the next variant is tried."""
        err = first_error(stderr, "?")
        self.progress(f"{what}: IREE refused the tuned lowering ({'+'.join(tried)}: {err[:100]}); "
                      f"trying {'+'.join(variant) or 'IREE' + chr(39) + 's own'}")
        rec = self.tuning[name]
        rec.setdefault("refused", []).append({"lowering": list(tried), "error": err[:200]})
        rec["rewritten"] = {k: v for k, v in rec["rewritten"].items() if k in variant}


def _workers(jobs, n) -> int:
    """Parallel iree-compile processes for n segments: `jobs`, else one per core (at most n)."""
    return jobs or max(1, min(n, os.cpu_count() or 1))


def _command_key(cmd) -> tuple:
    """What an iree-compile command compiles with, its paths left out (the source, the output,
    where the weights are exported)."""
    return tuple(c for c in cmd[2:-2] if not c.startswith("--iree-parameter-export="))


class Alongside:
    """The untuned compile of one plan's segments, run while tuning compiles its convolution
    probes. Tuning starts it (compiler/tuning.py, only when it has convolutions to measure)
    and waits for it before timing anything, so no timing shares the cores with a compile.
    A segment that comes out of tuning with the same source and command (IREE's own lowering:
    what a compile that measures convolutions keeps, unless its budget covers timing the
    segment whole) takes that result instead of compiling again, so the cold compile's probes
    and its final compile overlap (bench/cpu_zoo.py: cold against untuned compile time).
    Use as a context manager: leaving it waits for its compiles and removes its files."""

    def __init__(self, module: "ir.Module", extra_flags: Iterable = (), export: bool = True,
                 scope_prefix: str = "", jobs: int | None = None, kernels: bool = False):
        self.module, self.extra_flags, self.export, self.kernels = module, list(extra_flags), export, kernels
        self.scope_prefix, self.jobs = scope_prefix, jobs
        self.pool, self.futures, self.taken, self._tmp = None, {}, set(), None

    def start(self) -> None:
        """Write the segments' sources as they are now and start compiling them (once)."""
        if self.pool is not None:
            return
        self._tmp = temp_dir(prefix="polyarch-alongside-")
        tmp = self._tmp.__enter__()
        job = _SegmentJob(self.module, {}, self.extra_flags, tmp if self.export else None, self.scope_prefix,
                          lambda msg: None, self.kernels)
        items = job.sources(tmp)
        self.pool = ThreadPoolExecutor(_workers(self.jobs, len(items)))
        for item in items:
            name, device, srcs = item
            cmd, _ = job.command(name, device, srcs[0][1], "out")
            self.futures[name] = (_digest(srcs[0][1]), _command_key(cmd), self.pool.submit(job.compile, item))

    def wait(self) -> None:
        """Until every compile started has ended (a failed one is left to the final compile to report)."""
        for _, _, future in self.futures.values():
            future.exception()

    def take(self, job: "_SegmentJob", item) -> tuple | None:
        """The result for a segment of the final compile (`job`, `item` as _SegmentJob.compile
        takes it) when this compiled the same source with the same command, its weights moved
        where the final compile would write them; else None."""
        name, device, srcs = item
        if name not in self.futures:
            return None
        digest, key, future = self.futures[name]
        cmd, archive = job.command(name, device, srcs[0][1], "out")
        if future.exception() is not None or (digest, key) != (_digest(srcs[0][1]), _command_key(cmd)):
            return None
        name, device, data, secs, used, made = future.result()
        if archive and made and os.path.exists(made):
            shutil.move(made, archive)
        elif archive:
            return None
        self.taken.add(name)
        return name, device, data, secs, used, archive

    def __enter__(self) -> "Alongside":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self._tmp.__exit__(None, None, None)


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("iree-base-compiler", "torch-mlir", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def plan_manifest(module: "ir.Module", vmfbs: dict, name: str | None = None, member_prefix: str = "",
                  scopes: dict | None = None, scope_prefix: str = "") -> dict:
    """The manifest entry of one placement plan (module after outline-segments).
    scopes: {parameter scope: {module key: content key}} from parameters.merge, where a
    segment's scope is `<scope_prefix><segment>` (as compile_segments exports it)."""
    from ..passes.common import body_ops, module_path, source_line

    steps, outputs = schedule_of(module)
    plan = pa.Plan.of(module)
    devices = list(plan.devices)
    segments = []
    for s in pa.Segment.all(module):
        seg, device, fn = s.name, s.device, s.fn
        ftype = fn.type
        ops = [op for op in body_ops(fn)[0] if pa.is_placed(op)]
        data, cmd, _ = vmfbs[seg]
        entry = {
            "name": seg,
            "device": device,
            "member": f"{member_prefix}{seg}.{device.replace(':', '_').replace('@', '_')}.vmfb",
            "function": seg,
            "inputs": [tensor_desc(t) for t in ftype.inputs],
            "outputs": [tensor_desc(t) for t in ftype.results],
            "predicted_us": s.predicted_us,
            "ops": len(ops),
            "op_list": [
                {"op": op.operation.name, "path": module_path(op), "source": source_line(op),
                 "predicted_us": (pa.Times.of(op) or pa.Times({})).us.get(device, 0.0)}
                for op in ops
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
        "plan": plan.summary,
        "profiles": plan.profiles,
        "device_info": plan.device_info or {},
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


def build_bundle(plans: Any, sig: dict, output: str, jobs: int | None = None,
                 progress: Callable[[str], None] | None = None, extra_flags: Iterable = (), externalize: bool = True,
                 verification: dict | None = None, tune: str = "none") -> dict:
    """Compile every plan's segments and write one bundle. plans: [(name or None, module)].
    externalize: weights go to one shared parameter archive (each distinct value once)
    rather than inline in every module. verification: a record every plan's manifest entry
    gets as it is written. tune: none | quick | full (compiler/tuning.py), each segment's
    choice recorded in its manifest entry. -> the manifest written."""
    from . import tuning
    from .bundle import write_bundle

    progress = progress or (lambda msg: None)
    with temp_dir(prefix="polyarch-params-") as tmp:
        compiled = []
        for i, (name, module) in enumerate(plans):
            prefix = f"p{i}_" if len(plans) > 1 else ""
            if len(plans) > 1:
                progress(f"plan {i + 1}/{len(plans)}: {name}")
            with Alongside(module, extra_flags, externalize, prefix, jobs) as alongside:
                choices = tuning.tune_plan(module, tune, jobs=jobs, progress=progress, alongside=alongside)
                vmfbs = compile_segments(module, jobs=jobs, progress=progress, extra_flags=extra_flags,
                                         params_dir=tmp if externalize else None, scope_prefix=prefix, tuning=choices,
                                         alongside=alongside)
            compiled.append((name, module, vmfbs, prefix, choices))
        scopes, summary = {}, None
        members = {}
        if externalize:
            scopes, summary = _merge_weights({prefix + seg: v[2] for _, _, vmfbs, prefix, _ in compiled
                                              for seg, v in vmfbs.items()}, tmp, members, progress)
        plan_entries = []
        for name, module, vmfbs, prefix, choices in compiled:
            member_prefix = name.replace(":", "_").replace("@", "_") + "/" if len(plans) > 1 else ""
            entry = plan_manifest(module, vmfbs, name=name, member_prefix=member_prefix, scopes=scopes, scope_prefix=prefix)
            plan_entries.append(entry)
            _plan_members(entry, module, vmfbs, choices, member_prefix, members)
        if verification is not None:
            for entry in plan_entries:
                entry["verification"] = dict(verification)
        manifest = _manifest(sig, plan_entries, summary)
        return write_bundle(output, manifest, members)


def _merge_weights(archives, tmp, members, progress, shared_by=()):
    """The segments' exported weights merged into one archive, each distinct value once, added
    to `members` (streamed from the file, not read into memory). -> (scopes, summary or None)."""
    from . import parameters

    archive = os.path.join(tmp, PARAMS_MEMBER)
    scopes, summary = parameters.merge(archives, archive)
    if summary:
        summary["member"] = PARAMS_MEMBER
        members[PARAMS_MEMBER] = archive
        progress(f"weights: {summary['count']} distinct parameters, {os.path.getsize(archive) / 1e6:.1f} MB"
                 + (f", shared by {', '.join(shared_by)}" if shared_by else "")
                 + f" ({summary['references']} references, {summary['referenced_bytes'] / 1e6:.1f} MB before sharing)")
    return scopes, summary


def _plan_members(entry, module, vmfbs, choices, member_prefix, members):
    """A plan entry's modules (and each segment's tuning record) and its plan.mlir into `members`."""
    for seg in entry["segments"]:
        members[seg["member"]] = vmfbs[seg["name"]][0]
        if seg["name"] in choices:
            seg["tuning"] = choices[seg["name"]]
    members[f"{member_prefix}plan.mlir"] = plan_text(module).encode()


def rewrite_bundle(src: str, dst: str, manifest: dict) -> None:
    """Write the bundle at `src` to `dst` with a new manifest (members unchanged, streamed)."""
    import shutil
    import zipfile

    from ..runtime.bundle import MANIFEST
    from .bundle import write_bundle

    with temp_dir(prefix="polyarch-pack-", dir=os.path.dirname(os.path.abspath(src))) as tmp:
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


def build_phases_bundle(phase_plans: dict, phase_sigs: dict, output: str, extra: dict,
                        jobs: int | None = None, progress: Callable[[str], None] | None = None,
                        extra_flags: Iterable = (), verification: dict | None = None, tune: str = "none",
                        phase_flags: dict | None = None, extra_members: dict | None = None,
                        phase_kernels: Iterable = ()) -> dict:
    """One bundle of several entry functions over one copy of the weights (a --generate
    bundle: prefill and decode). phase_plans: {phase: [(plan name, module)]}, the same device
    sets in the same order for every phase; phase_sigs: {phase: signature}. Each plan entry
    holds every phase's segments (named `<phase>_seg_N`) and `phases: {phase: {schedule,
    outputs}}`; its own schedule and outputs, and the manifest's signature, are the first
    phase's. extra: top-level manifest keys (e.g. "generate"); phase_flags: {phase: iree-compile
    flags for its segments}, before `extra_flags`; extra_members: {member name: file path}
    stored beside them (a tokenizer); phase_kernels: the phases whose cpu segments use the
    hand-written few-rows matmul (compile_segments' `kernels`). -> the manifest written."""
    from . import tuning
    from .bundle import write_bundle

    progress = progress or (lambda msg: None)
    phase_flags = phase_flags or {}
    phases = list(phase_plans)
    n_sets = len(phase_plans[phases[0]])
    with temp_dir(prefix="polyarch-params-") as tmp:
        compiled = {}  # (set, phase) -> (module, vmfbs, scope prefix, tuning choices)
        for k in range(n_sets):
            for phase in phases:
                name, module = phase_plans[phase][k]
                prefix = (f"p{k}_" if n_sets > 1 else "") + f"{phase}_"
                progress(f"{phase} on {name}")
                flags = [*phase_flags.get(phase, ()), *extra_flags]  # the user's last: they win
                rows = phase in set(phase_kernels)
                with Alongside(module, flags, True, prefix, jobs, kernels=rows) as alongside:
                    choices = tuning.tune_plan(module, tune, jobs=jobs, progress=progress, alongside=alongside)
                    vmfbs = compile_segments(module, jobs=jobs, progress=progress, extra_flags=flags, params_dir=tmp,
                                             scope_prefix=prefix, tuning=choices, alongside=alongside, kernels=rows)
                compiled[k, phase] = (module, vmfbs, prefix, choices)
        members = dict(extra_members or {})
        scopes, summary = _merge_weights({pre + seg: v[2] for _, vmfbs, pre, _ in compiled.values()
                                          for seg, v in vmfbs.items()}, tmp, members, progress, shared_by=phases)
        entries = [_phases_entry(k, phase_plans, compiled, scopes, members, n_sets) for k in range(n_sets)]
        if verification is not None:
            for entry in entries:
                entry["verification"] = dict(verification)
        manifest = _manifest(phase_sigs[phases[0]], entries, summary)
        manifest["phases"] = {p: {"signature": phase_sigs[p]} for p in phases}
        manifest.update(extra)
        return write_bundle(output, manifest, members)


def _phases_entry(k, phase_plans, compiled, scopes, members, n_sets):
    """The manifest entry of device set k: every phase's segments, renamed `<phase>_seg_N`."""
    entry = None
    for phase in phase_plans:
        name, _ = phase_plans[phase][k]
        module, vmfbs, prefix, choices = compiled[k, phase]
        member_prefix = (name.replace(":", "_").replace("@", "_") + "/" if n_sets > 1 else "") + f"{phase}_"
        e = plan_manifest(module, vmfbs, name=name, member_prefix=member_prefix, scopes=scopes, scope_prefix=prefix)
        _plan_members(e, module, vmfbs, choices, member_prefix, members)
        rename = {s["name"]: f"{phase}_{s['name']}" for s in e["segments"]}
        for seg in e["segments"]:
            seg["name"] = rename[seg["name"]]
        for step in e["schedule"]:
            if step["op"] == "call":
                step["segment"] = rename[step["segment"]]
        if entry is None:
            entry = dict(e, segments=[], phases={})
        entry["segments"] += e["segments"]
        entry["devices"] = list(dict.fromkeys(entry["devices"] + e["devices"]))
        entry["phases"][phase] = {"schedule": e["schedule"], "outputs": e["outputs"], "plan": e["plan"]}
    return entry
