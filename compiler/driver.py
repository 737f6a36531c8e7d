"""The compile pipeline in stages: import -> plan (price the devices, partition) -> write
(IREE per segment, verified on the devices at hand, one bundle).

    imported = import_model(model, (x,), CompileOptions(devices=("cpu", "vulkan")))
    planned = imported.plan()          # or .plan(other_options): the import is reused
    print(planned.as_text())           # the partitioned module; planned.explain(): the report
    planned.write("m.pab")

`compile(model, example_inputs, ...)` does all three; `plan` and `plan_many` stop after
partitioning. Every front end (this API, the CLI, CMake, the setuptools hook) describes the
compile with one CompileOptions (compiler/options.py)."""

import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..files import temp_dir, terminate_unwinds
from ..errors import PolyarchError
from .build import build_bundle, rewrite_bundle
from .modules import plan_text
from .options import CompileOptions
from .planning import import_module, model_name, partition, price_devices

if TYPE_CHECKING:
    from . import simulate

__all__ = ["compile", "import_model", "Imported", "Planned", "plan", "plan_many", "CompileOptions"]

# progress: a callable taking each progress line, True (lines to stderr) or None (quiet)
Progress = Callable[[str], None] | bool | None


def _stderr_progress(msg: str) -> None:
    print(f"polyarch: {msg}", file=sys.stderr, flush=True)


def _progress(progress):
    if progress is True:
        return _stderr_progress
    return progress or (lambda msg: None)


def import_model(model: Any, example_inputs: tuple = (), options: CompileOptions | None = None,
                 progress: Progress = None) -> "Imported":
    """Stage 1: the model in the torch dialect, with its signature. model: an nn.Module (with
    example_inputs), a torch.export.ExportedProgram, or the path of an .onnx file (then
    example_inputs optional: arrays or "DIMSxDTYPE" specs that fix symbolic dimensions)."""
    options = options or CompileOptions()
    progress = _progress(progress)
    if options.generate:  # a causal LM: prefill and decode phases (compiler/lm.py)
        from .lm import ImportedLM

        return ImportedLM(model, options, progress)
    t0 = time.time()
    base, sig = import_module(model, example_inputs, options.dynamic_dims, progress)
    return Imported(model, tuple(example_inputs), base, sig, options, progress, t0)


class Imported:
    """An imported model: `module` (torch dialect, index ops marked) and `signature`."""

    def __init__(self, model, example_inputs, module, signature, options, progress, started):
        self.model, self.example_inputs, self.module, self.signature = model, example_inputs, module, signature
        self.options, self.progress, self.started = options, progress, started

    def plan(self, options: CompileOptions | None = None) -> "Planned":
        """Stage 2: identify and price the devices of every plan (measured where this host
        has them). The partition itself is made when first asked for (`plans`), so that a
        verified write, which re-plans on what it measures, does not make it twice."""
        options = options or self.options
        if options.dynamic_dims != self.options.dynamic_dims:
            raise PolyarchError("dynamic_dims differ from the import's: they are fixed when the model is imported",
                                fix="import the model again with these options")
        priced = price_devices(options.device_specs, options.profiles, options.calibrate, self.progress)
        return Planned(self, options, priced)


class Planned:
    """A model priced for its device sets: `plans` [(plan name, partitioned module)], `priced`
    {"profiles", "devices", "verdicts"} (what each device was priced by and measured wrong)."""

    def __init__(self, imported, options, priced):
        self.imported, self.options, self.priced = imported, options, priced
        self._plans = None

    @property
    def sets(self) -> list:
        """[[DeviceSpec]] per plan."""
        return self.options.device_specs

    @property
    def plans(self) -> list:
        if self._plans is None:
            o = self.options
            self._plans = partition(self.imported.module, self.sets, o.pins, self.imported.progress, o.objective,
                                    o.solver, self.priced, keep_base=True)
        return self._plans

    def as_text(self, plan: int = 0) -> str:
        """A plan's partitioned module as MLIR text, weights and large constants elided."""
        return plan_text(self.plans[plan][1])

    def explain(self, plan: int = 0) -> "simulate.Report":
        """The plan report (compiler/simulate.py): segments, devices, predicted times, why."""
        from . import simulate

        return simulate.explain(self.plans[plan][1], self.priced["profiles"])

    def compile(self, output: str | None = None) -> str:
        """Stage 3 to the default path (<ModelClass>.pab in the current directory)."""
        return self.write(output or f"{model_name(self.imported.model)}.pab")

    def write(self, output: str) -> str:
        """Stage 3: compile every plan's segments with IREE and write the bundle. With
        options.verify, every plan this host can run is run, checked and timed first, and
        re-planned on what is measured (compiler/grounding.py). -> the bundle's path. A SIGTERM
        meanwhile unwinds (files.terminate_unwinds): temporary folders go, the old bundle stays."""
        with terminate_unwinds():
            return self._write(output)

    def _write(self, output: str) -> str:
        imp, o, progress = self.imported, self.options, self.imported.progress
        _check_output(imp.model, output)
        examples = _fit_index_examples(imp.example_inputs, imp.signature, progress)
        if o.verify:
            from . import grounding

            with temp_dir(prefix="polyarch-rounds-") as tmp:
                path, manifest = grounding.ground(imp.model, examples, imp.module, imp.signature, self.sets, o.pins,
                                                  o.objective, o.solver, self.priced, tmp, jobs=o.jobs,
                                                  progress=progress, extra_flags=o.iree_flags, tune=o.tune)
                rewrite_bundle(path, output, manifest)  # with what was verified and measured
        else:
            manifest = build_bundle(self.plans, imp.signature, output, jobs=o.jobs, progress=progress,
                                    extra_flags=o.iree_flags, tune=o.tune,
                                    verification={"status": "not verified (verify=False / --no-verify)"})
        segs = sum(len(p["segments"]) for p in manifest["plans"])
        progress(f"wrote {output} ({os.path.getsize(output) / 1e6:.1f} MB, {len(manifest['plans'])} plan(s), "
                 f"{segs} segments) in {time.time() - imp.started:.1f}s")
        return output


def _check_output(model, output):
    from .importer import is_onnx

    if is_onnx(model) and os.path.exists(output) and os.path.samefile(model, output):
        raise PolyarchError(f"the output {output} is the ONNX model being compiled: writing the bundle there would "
                            "replace it", fix="write the bundle elsewhere, e.g. output='model.pab'")


def plan(model: Any, example_inputs: tuple = (), devices: Iterable = ("cpu",), pins: Iterable = (),
         progress: Progress = None, objective: str = "latency", solver: str = "auto", profiles: Iterable = (),
         dynamic_dims: Iterable = (), calibrate: bool = True, details: dict | None = None) -> tuple:
    """Import and partition without compiling: -> (ir.Module after the three passes, signature).
    details: a dict to fill with "profiles" (the DeviceProfiles used) and "devices" (per
    device: identity, profile name, where the profile came from)."""
    plans, sig = plan_many(model, example_inputs, [devices], pins=pins, progress=progress, objective=objective,
                           solver=solver, profiles=profiles, dynamic_dims=dynamic_dims, calibrate=calibrate,
                           details=details)
    return plans[0][1], sig


def plan_many(model: Any, example_inputs: tuple = (), device_sets: Iterable = (("cpu",),), pins: Iterable = (),
              progress: Progress = None, objective: str = "latency", solver: str = "auto", profiles: Iterable = (),
              dynamic_dims: Iterable = (), calibrate: bool = True, details: dict | None = None) -> tuple:
    """Import once, partition once per device set. -> ([(plan name, module)], signature).
    A plan's name is its device set joined by '+', e.g. "vulkan+cpu". dynamic_dims: see
    compile; calibrate, details: see plan."""
    options = CompileOptions(plans=tuple(device_sets), pins=pins, objective=objective, solver=solver,
                             profiles=profiles, dynamic_dims=dynamic_dims, calibrate=calibrate)
    planned = import_model(model, example_inputs, options, progress).plan()
    if details is not None:
        details.update(planned.priced)
    return planned.plans, planned.imported.signature


def compile(model: Any, example_inputs: tuple = (), devices: Iterable = ("cpu",), output: str | None = None,
            pins: Iterable = (), jobs: int | None = None, progress: Progress = None, iree_extra_flags: Iterable = (),
            objective: str = "latency", solver: str = "auto", profiles: Iterable = (), plans: Any = None,
            dynamic_dims: Iterable = (), calibrate: bool = True, verify: bool = True, tune: str = "quick",
            generate: bool = False, max_context: int = 256, batch: int = 1, weights_dtype: str = "f32",
            tokenizer: str | None = None, draft: Any = None, speculate: int = 4, draft_pins: Iterable = (),
            phase_pins: Iterable = (), draft_dtype: str | None = None, options: CompileOptions | None = None) -> str:
    """Compile a model into a bundle. Returns the bundle's path.

    model          torch.nn.Module (with example_inputs), torch.export.ExportedProgram, or the path of
                   an .onnx file (example_inputs then optional: arrays or "DIMSxDTYPE" specs that fix
                   symbolic input dimensions)
    output         bundle path (default: <ModelClass>.pab in the current directory)
    progress       callable(str) for progress lines; True prints them to stderr
    options        a CompileOptions (compiler/options.py), instead of the keywords below, which
                   build one (iree_extra_flags is its iree_flags):
    devices        device specs, e.g. ["cpu", "vulkan"] or ["cpu", "cuda@sm_86"]
    plans          several device sets, one placement plan each, in one bundle sharing the weights,
                   e.g. [["cuda", "cpu"], ["vulkan", "cpu"], ["cpu"]]; the runtime runs the fastest
                   plan whose devices it finds (replaces `devices`)
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
    dynamic_dims   ["INPUT:DIM[:MAX]", ...]: dimensions that stay dynamic (nn.Module only), e.g.
                   ["input0:0:64"]: the bundle then takes any size from 1 to MAX (default 1024) there;
                   costs are predicted at the example's size
    generate       a causal language model (transformers *ForCausalLM, or the cache protocol of
                   compiler/causal_lm.py) compiled as prefill + decode sharing the weights, its KV cache
                   kept on its device; example_inputs are not needed. Run it with `bundle.generate`
    max_context, batch  with generate: the most tokens (prompt + generated) a sequence holds; sequences decoded together
    weights_dtype  with generate: f32, f16 or bf16 (weights, activations and cache in 16 bits)
    tokenizer      with generate: a tokenizer.json (or its folder) carried in the bundle: text in, text out
    draft, speculate, draft_pins, draft_dtype, phase_pins  with generate: a draft LM (compiler/options.py)
    """
    if options is None:
        options = CompileOptions(devices=tuple(devices), plans=tuple(plans or ()), pins=pins, objective=objective,
                                 solver=solver, profiles=profiles, dynamic_dims=dynamic_dims, calibrate=calibrate,
                                 verify=verify, tune=tune, iree_flags=iree_extra_flags, jobs=jobs, generate=generate,
                                 max_context=max_context, batch=batch, weights_dtype=weights_dtype, tokenizer=tokenizer,
                                 draft=draft, speculate=speculate, draft_pins=draft_pins, phase_pins=phase_pins,
                                 draft_dtype=draft_dtype)
    _check_output(model, output := output or f"{model_name(model)}.pab")
    return import_model(model, example_inputs, options, progress).plan().write(output)


def _fit_index_examples(examples, sig, progress):
    """Example inputs used as indices must be valid ones: PyTorch raises IndexError on the
    others when the model is verified against it. Examples made from a DIMSxDTYPE spec (ints
    in [0, 100), the table's size unknown then) are folded into the range, said in the
    progress; the user's own arrays are refused with the value and the range."""
    import numpy as np

    from ..runtime.executor import first_out_of_range, index_bounds

    out = list(examples)
    if any(isinstance(x, str) for x in out):  # an ONNX model's specs: no arrays yet
        return tuple(out)
    shapes = [tuple(x.shape) for x in out]
    for i, spec in enumerate(sig["inputs"]):
        if "index_range" not in spec or i >= len(out):
            continue
        for lo, hi, op, _ in index_bounds(spec, shapes):
            a = np.asarray(out[i].detach().cpu() if hasattr(out[i], "detach") else out[i])
            bad = first_out_of_range(a, lo, hi)
            if bad is None:
                continue
            if getattr(out[i], "polyarch_made_from_spec", False):
                n = hi + 1 - max(lo, 0)
                out[i] = out[i] % n + max(lo, 0)
                out[i].polyarch_made_from_spec = True
                progress(f"example input {i} ('{spec['name']}') made from its spec holds indices up to {int(a.max())}; "
                         f"{op} takes {lo} to {hi}: verifying with them taken modulo {n}")
                continue
            raise PolyarchError(f"example input {i} ('{spec['name']}') holds {bad[0]} at {bad[1]}, "
                                f"outside the {lo} to {hi} that {op} takes (PyTorch raises IndexError on it)",
                                fix=f"give example indices in [{lo}, {hi}]")
    return tuple(out)


