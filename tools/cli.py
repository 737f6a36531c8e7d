"""polyarch: compile a PyTorch model across devices, and run or inspect the bundle.

Each subcommand's --help has examples. Errors are one line: what, where, and the fix."""

import importlib.util
import json
import os
import sys
import time
from typing import Callable

import click

from ..errors import PolyarchError
from ..files import atomic_write, check_outputs, printable, unwind
from ..targets import TARGETS


def _load_array(path):
    import numpy as np

    try:
        return np.load(path)  # (allow_pickle=False: an .npy of Python objects is refused)
    except (ValueError, OSError) as e:
        raise PolyarchError(f"cannot read input {path}: {e}",
                            fix="give an .npy file of a numeric array (np.save(path, array.astype(np.float32)))") from None


def _load_model(target):
    """MODEL.py[:ATTR] -> (nn.Module, module namespace). ATTR is a class, factory or instance;
    default: Model, then build, then model."""
    from ..compiler.importer import is_onnx

    path, _, attr = target.partition(":")
    if is_onnx(path):
        if not os.path.isfile(path):
            raise PolyarchError(f"no ONNX model '{path}'", fix="check the path")
        return os.path.abspath(path), None
    if not os.path.isfile(path):
        raise PolyarchError(f"no model file '{path}'", fix="give a Python file, e.g. examples/mlp.py or examples/mlp.py:MLP")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise PolyarchError(f"{path}:{e.lineno}: syntax error: {e.msg}", fix="fix the model file") from None
    except SystemExit as e:  # would end polyarch itself, with the model's status
        raise PolyarchError(f"loading {path} called sys.exit({e.code!r})",
                            fix="guard the model file's script part with `if __name__ == \"__main__\":`") from None
    except Exception as e:  # an import the model needs is missing, or its top level raises
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        raise PolyarchError(f"loading {path} raised {type(e).__name__}: {e} (at {where})",
                            fix="run `python " + path + "` to see the whole error; install what it imports") from None
    finally:
        sys.path.pop(0)
    names = [attr] if attr else ["Model", "build", "model"]
    for name in names:
        if hasattr(mod, name):
            obj = getattr(mod, name)
            import torch

            if isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram)):
                return obj, mod
            if callable(obj):
                return obj(), mod
    raise PolyarchError(f"{path} defines none of {', '.join(names)}", fix="name the model: MODEL.py:ATTR (a class, factory or nn.Module)")


def _local_sources(module_names):
    """Source files of newly imported modules that belong to the user's project: not the
    standard library, not installed packages, not polyarch itself."""
    import sysconfig

    skip = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                          sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"],
                                          os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
    out = set()
    for name in module_names:
        f = getattr(sys.modules.get(name), "__file__", None)
        if f and f.endswith(".py") and os.path.isabs(f) and os.path.isfile(f):  # torch has modules with made-up names
            real = os.path.realpath(f)
            if not any(real == s or real.startswith(s + os.sep) for s in skip):
                out.add(os.path.abspath(f))
    return out


def _write_depfile(path, target, deps):
    """A Makefile-style depfile (what Ninja and CMake's DEPFILE read)."""
    esc = lambda p: os.path.abspath(p).replace("\\", "\\\\").replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")
    with atomic_write(path) as f:
        f.write(f"{esc(target)}: " + " \\\n  ".join(esc(d) for d in dict.fromkeys(deps)) + "\n")


def _example_inputs(inputs, namespace):
    from ..compiler.importer import example_from_spec

    if namespace is None:  # an ONNX model: shapes come from the file, --input fixes symbolic ones
        return tuple(inputs)
    if inputs:
        return tuple(example_from_spec(s, seed=i) for i, s in enumerate(inputs))
    if hasattr(namespace, "example_inputs"):
        ex = namespace.example_inputs
        return tuple(ex() if callable(ex) else ex)
    raise PolyarchError("no example inputs", fix="pass --input DIMSxDTYPE per input (e.g. --input 4x64xi64), or define example_inputs() in the model file")


_model_options = [
    click.argument("model"),
    click.option("-i", "--input", "inputs", multiple=True, metavar="DIMSxDTYPE",
                 help="Shape and dtype of each model input, in order, e.g. 4x64xi64 or 1x3x32x32xf32. "
                      "Default: the model file's example_inputs()."),
    click.option("--dynamic-dim", "dynamic_dims", multiple=True, metavar="INPUT:DIM[:MAX][=NAME]",
                 help="Keep a dimension dynamic through partitioning and IREE, repeatable: INPUT is an input's name "
                      "or inputN (from 0), DIM its dimension, MAX the largest size the bundle accepts (default 1024); "
                      "dimensions given the same NAME must be equal (checked at run time). E.g. --dynamic-dim "
                      "input0:0:64 for any batch from 1 to 64; --dynamic-dim input_ids:0:16=batch --dynamic-dim "
                      "attention_mask:0:16=batch for two inputs sharing one batch. Costs are predicted at the "
                      "--input (example) size. PyTorch models only."),
    click.option("-d", "--device", "devices", multiple=True, metavar="SPEC",
                 help="Target device, repeatable: KIND[:ORDINAL][@ARCH] with KIND " + ", ".join(TARGETS) + " "
                      "(e.g. cpu, vulkan, cuda:1@sm_86, rocm@gfx942). Default: the devices of the --profile "
                      "files, else cpu."),
    click.option("--pin", "pins", multiple=True, metavar="PATTERN=DEVICE",
                 help="Force ops onto a device: PATTERN is an op name (torch.aten.mm) or a module path prefix "
                      "(encoder.layer.0). Repeatable."),
    click.option("--objective", default="latency", show_default=True, metavar="OBJ",
                 help="What placement minimises: latency, throughput (pipelined stages: the busiest device), "
                      "cost ($ per 1M calls), energy (J per call), or a weighted mix such as latency:1,energy:0.5 "
                      "(each term relative to its best single-device plan)."),
    click.option("--solver", default="auto", show_default=True,
                 type=click.Choice(["auto", "brute", "chain-dp", "mincut", "heft"]),
                 help="Placement algorithm. auto takes an exact one where it applies (enumeration for tiny graphs, "
                      "DP on chains, min-cut for two devices) and HEFT-style list scheduling + local search "
                      "otherwise; the plan says which was used."),
    click.option("--profile", "profiles", multiple=True, type=click.Path(dir_okay=False), metavar="FILE.json",
                 help="Device profile(s) from `polyarch calibrate -o` (or written by hand, see targets/profiles.py). "
                      "Without one, a device this host has is priced by its measured profile (cached per user by "
                      "`polyarch calibrate`, or measured now), a device it lacks by its built-in spec sheet. Repeatable."),
    click.option("--options", "options_file", type=click.Path(exists=True, dir_okay=False), metavar="FILE.json",
                 help="Read the compile options from a JSON file instead of the flags (what CMake's "
                      "polyarch_add_bundle and the setuptools hook write): an object with any of devices, plans, "
                      "pins, objective, solver, profiles, dynamic_dims, calibrate, verify, tune, iree_flags, jobs "
                      "(see compiler/options.py), e.g. {\"devices\": [\"cpu\", \"vulkan\"], \"tune\": \"none\"}. "
                      "Not together with those flags."),
    click.option("--no-calibrate", "no_calibrate", is_flag=True,
                 help="Do not calibrate a present device that has no cached profile (about 15 s a device): price it "
                      "by an estimate instead (a software Vulkan such as lavapipe by a CPU-emulation estimate, never "
                      "a GPU's spec sheet)."),
]


def _devices(devices, profiles):
    if devices:
        return devices
    if profiles:
        from ..targets import profiles as P

        return tuple(dict.fromkeys(p.device for p in P.load_all(profiles)))
    return ("cpu",)


def model_options(f: Callable) -> Callable:
    for opt in reversed(_model_options):
        f = opt(f)
    return f


class _Polyarch(click.Group):
    """Every error a user can cause ends as one line, never a traceback: polyarch's own
    errors, and the system's (a full disk, a missing folder, an unreadable file)."""

    def invoke(self, ctx):
        import errno

        try:
            return super().invoke(ctx)
        except PolyarchError as e:
            raise click.ClickException(printable(e)) from None
        except OSError as e:
            if e.errno == errno.EPIPE:  # `polyarch inspect b.pab | head`: the reader has what it wanted
                _quiet_exit()
            if e.errno is None:
                raise
            what = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
            fix = {errno.ENOSPC: "free some space (or set TMPDIR to a larger disk) and run it again",
                   errno.ENOENT: "check the path; a folder to write into must exist",
                   errno.EACCES: "check the file's permissions"}.get(e.errno, "")
            raise click.ClickException(what + (f". Fix: {fix}" if fix else "")) from None


def _need_compiler(command: str) -> None:
    """One line, with the install command, when this install has the runtime only."""
    for module in ("torch", "torch_mlir", "iree.compiler"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a parent package missing
            found = False
        if not found:
            raise PolyarchError(f"`polyarch {command}` needs the compiler, which this install does not have "
                                f"(no module {module}); run, inspect, generate and serve need only the runtime",
                                fix="pip install 'polyarch[compiler]'")


def _quiet_exit():
    """Stop printing to a pipe whose reader is gone: no error, and none at exit either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(0)


@click.group(cls=_Polyarch, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="polyarch")
@click.option("-v", "--verbose", is_flag=True,
              help="Also show the warnings of the libraries polyarch drives (torch, IREE), hidden by default. "
                   "Give it before the command: polyarch -v compile ...")
def cli(verbose: bool) -> None:
    """Split one PyTorch model across heterogeneous devices, ahead of time.

    \b
    Typical session:
      polyarch calibrate --device cpu --device vulkan -o profile.json
      polyarch plan    examples/minilm.py --profile profile.json --explain
      polyarch compile examples/minilm.py --profile profile.json -o minilm.pab
      polyarch inspect minilm.pab
      polyarch run     minilm.pab

    MODEL is a Python file, optionally with :ATTR naming a class, factory or
    nn.Module in it (default: Model, build or model), or an ONNX file (model.onnx;
    --input fixes its symbolic dimensions).
    """
    import warnings

    if verbose:
        warnings.resetwarnings()
    else:  # torch's FutureWarnings and the like are for the authors of the code they name, not for users
        warnings.simplefilter("ignore")


@cli.command()
@model_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Bundle to write (default: MODEL's name with .pab).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Parallel IREE compiles (default: one per core).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@click.option("--depfile", type=click.Path(dir_okay=False), metavar="FILE.d",
              help="Also write a Makefile-style depfile: the bundle depends on the model file, the local Python "
                   "modules it imports and the profiles (CMake's polyarch_add_bundle uses it).")
@click.option("--no-verify", "no_verify", is_flag=True,
              help="Do not run the compiled plan here: no check against llvm-cpu and PyTorch eager, no measured "
                   "re-planning (for cross-compiles; by default a device this host lacks is not verified anyway).")
@click.option("--plans", "plans", multiple=True, metavar="SPEC,SPEC,...",
              help="One placement plan per device set, repeatable, all in one bundle sharing one copy of the "
                   "weights (replaces --device). At load the runtime runs the fastest predicted plan whose "
                   "devices it finds, or the one named with `polyarch run --plan` (`--strict`: no fallback).")
@click.option("--tune", type=click.Choice(["none", "quick", "full"]), default="quick", show_default=True,
              help="Lowering choices measured on this host's CPU, cached per host (a recompile measures nothing): "
                   "quick: each convolution shape as IREE's convolution or as im2col + matmul, whichever is faster; "
                   "full: also each cpu segment with each candidate flag set; none: IREE's defaults.")
@click.option("--iree-flag", "iree_flags", multiple=True, metavar="FLAG",
              help="Pass FLAG to every iree-compile (repeatable), after polyarch's own flags, e.g. "
                   "--iree-flag=--iree-llvmcpu-enable-ukernels=all. Write it with '=' when FLAG starts with '-'.")
@click.option("--generate", "generate", is_flag=True,
              help="MODEL is a causal language model (a transformers *ForCausalLM, or a module following the cache "
                   "protocol of compiler/causal_lm.py): compile it as prefill + decode over one copy of the weights, "
                   "the KV cache kept on its device; run it with `polyarch generate`. No --input needed.")
@click.option("--max-context", "max_context", type=click.IntRange(min=2), default=256, show_default=True,
              help="With --generate: the most tokens (prompt + generated) one sequence may hold.")
@click.option("--batch", "batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --generate: sequences decoded together (several prompts fill the batch).")
@click.option("--tokenizer", "tokenizer", type=click.Path(), default=None, metavar="PATH",
              help="With --generate: a tokenizer.json (or its folder) to carry in the bundle, so that `polyarch "
                   "generate --prompt TEXT` takes and prints text. Default: the tokenizer.json beside the model file, "
                   "if there is one.")
@click.option("--weights-dtype", "weights_dtype", type=click.Choice(["f32", "f16", "bf16"]), default="f32",
              show_default=True, help="With --generate: store and compute the weights, activations and KV cache in "
                                      "16 bits (decode reads every weight once a token: half the bytes).")
@click.option("--draft", "draft", default=None, metavar="DRAFT.py[:ATTR]",
              help="With --generate: a smaller causal LM of the same vocabulary (a model file, as MODEL is) compiled "
                   "into the bundle for speculative decoding: it drafts tokens, MODEL checks them all in one call. "
                   "Greedy output is MODEL's own, token for token.")
@click.option("--speculate", "speculate", type=click.IntRange(1, 16), default=4, show_default=True,
              help="With --draft: the most tokens drafted a step (the runtime adapts it to the acceptance rate).")
@click.option("--draft-pin", "draft_pins", multiple=True, metavar="PATTERN=DEVICE",
              help="With --draft: force the draft's ops (its module paths) onto a device, e.g. "
                   "--draft-pin model.layers=vulkan; --pin applies to MODEL's phases.")
@click.option("--draft-dtype", "draft_dtype", type=click.Choice(["f32", "f16", "bf16"]), default=None,
              help="With --draft: the draft's weights dtype (default: --weights-dtype), e.g. f16 for an f32 model: "
                   "a draft call then reads half the bytes.")
@click.option("--phase-pin", "phase_pins", multiple=True, metavar="PHASE:PATTERN=DEVICE",
              help="With --generate: a pin for one phase only (prefill, decode, verify, draft_prefill, draft_decode, "
                   "draft_verify; a draft_decode pin also applies to draft_verify, the draft's 2-token catch-up), "
                   "e.g. --phase-pin prefill:model.layers=vulkan --phase-pin decode:model=cpu runs prefill and decode "
                   "on different devices; the KV cache then moves between them once per prompt.")
def compile(model: str, inputs: tuple, dynamic_dims: tuple, devices: tuple, pins: tuple, objective: str, solver: str,
            profiles: tuple, options_file: str | None, no_calibrate: bool, output: str | None, jobs: int | None,
            quiet: bool, depfile: str | None, no_verify: bool, plans: tuple, tune: str, iree_flags: tuple,
            generate: bool, max_context: int, batch: int, weights_dtype: str, tokenizer: str | None,
            draft: str | None, speculate: int, draft_pins: tuple, draft_dtype: str | None, phase_pins: tuple) -> None:
    """Compile MODEL into a .pab bundle for the given devices.

    Weights are stored once, in an IREE parameter archive inside the bundle,
    whatever the number of segments or plans that use them.

    Plans are grounded in the devices at hand: each device this host has is
    identified and priced by its measured profile (calibrated once, then
    cached); after compiling, each plan runs on the example inputs, every
    off-CPU segment is checked against the same segment on llvm-cpu and the
    whole against PyTorch eager. Ops that compute wrong on a device are kept
    off it (remembered for that device), measured times correct the cost
    model, and the model is re-planned until the plan stops changing. A plan
    that puts work off the CPU and is slower than the CPU alone is replaced by the
    CPU alone (unless --pin asks otherwise). A bundle known to be wrong is
    never written.

    \b
    Examples:
      polyarch compile examples/mlp.py --plans cuda,cpu --plans vulkan,cpu --plans cpu -o mlp.pab
      polyarch compile examples/mlp.py --input 8x64xf32 --device cpu --device vulkan -o mlp.pab
      polyarch compile examples/minilm.py --input 4x64xi64 --input 4x64xi64 -d cpu -d vulkan -o m.pab
      polyarch compile model.py:Net -i 1x3x32x32xf32 -d cpu -d vulkan --pin torch.aten.convolution=vulkan
      polyarch compile model.onnx -i 8x128xi64 -d cpu -d vulkan -o m.pab    # ONNX; -i fixes symbolic dims
      polyarch compile examples/mlp.py -i 8x64xf32 --dynamic-dim input0:0:256 -o mlp.pab  # batch 1..256
      polyarch compile examples/minilm.py --dynamic-dim input_ids:0:16=b --dynamic-dim attention_mask:0:16=b
      polyarch compile model.py -i 1x3x224x224xf32 --tune full --iree-flag=--iree-llvmcpu-enable-ukernels=all
      polyarch compile llm.py --generate --max-context 512 --batch 4 -o llm.pab   # then: polyarch generate llm.pab
      polyarch compile llm.py --generate --draft small.py --speculate 4 -o spec.pab  # speculative decoding
    """
    _need_compiler("compile")
    from ..compiler.driver import import_model

    options = _compile_options(click.get_current_context())
    output = output or os.path.splitext(os.path.basename(model.partition(":")[0]))[0] + ".pab"
    sources = _read_files(model, options, options_file)
    writes = {"the bundle (-o)": output, "the depfile (--depfile)": depfile}
    check_outputs(writes, _named_inputs(sources))  # before any work: nothing of the user's is replaced
    before = set(sys.modules)
    m, ns = _load_model(model)
    if isinstance(options.draft, str):  # the draft model file, loaded as MODEL is
        import dataclasses

        options = dataclasses.replace(options, draft=_load_model(options.draft)[0])
    local = _local_sources(set(sys.modules) - before)
    sources += sorted(local)
    check_outputs(writes, _named_inputs(sources))  # the modules the model file imports, too
    ex = () if options.generate else _example_inputs(inputs, ns)
    progress = None if quiet else (lambda msg: click.echo(f"polyarch: {msg}", err=True))
    import_model(m, ex, options, progress).plan().write(output)
    if depfile:
        _write_depfile(depfile, output, sources)
    click.echo(output)


# The flags that make a CompileOptions (compiler/options.py): parameter -> flag.
_OPTION_FLAGS = {"devices": "--device", "plans": "--plans", "pins": "--pin", "objective": "--objective",
                 "solver": "--solver", "profiles": "--profile", "dynamic_dims": "--dynamic-dim",
                 "no_calibrate": "--no-calibrate", "no_verify": "--no-verify", "tune": "--tune",
                 "iree_flags": "--iree-flag", "jobs": "--jobs", "generate": "--generate",
                 "max_context": "--max-context", "batch": "--batch", "weights_dtype": "--weights-dtype",
                 "tokenizer": "--tokenizer", "draft": "--draft", "speculate": "--speculate", "draft_pins": "--draft-pin",
                 "phase_pins": "--phase-pin", "draft_dtype": "--draft-dtype"}


def _tokenizer(p):
    """--tokenizer, or with --generate the tokenizer.json beside the model file."""
    if p.get("tokenizer") or not p.get("generate"):
        return p.get("tokenizer")
    beside = os.path.join(os.path.dirname(os.path.abspath(p["model"].partition(":")[0])), "tokenizer.json")
    return beside if os.path.isfile(beside) else None


def _compile_options(ctx):
    """The CompileOptions of a compile or plan command: from --options FILE.json, or from its flags."""
    from click.core import ParameterSource

    from ..compiler.options import CompileOptions

    p = ctx.params
    given = [f for f in _OPTION_FLAGS if f in p and ctx.get_parameter_source(f) == ParameterSource.COMMANDLINE]
    if p.get("options_file"):
        if given:
            raise PolyarchError(f"--options and {_OPTION_FLAGS[given[0]]} both given",
                                fix="put that option in the options file, or drop --options")
        return CompileOptions.load(p["options_file"])
    if p.get("plans") and p.get("devices"):
        raise PolyarchError("--plans and --device both given", fix="give the device sets with --plans only")
    sets = [tuple(d.strip() for d in plan.split(",") if d.strip()) for plan in p.get("plans", ())]
    return CompileOptions(devices=tuple(_devices(p["devices"], p["profiles"])), plans=tuple(sets), pins=p["pins"],
                          objective=p["objective"], solver=p["solver"], profiles=p["profiles"],
                          dynamic_dims=p["dynamic_dims"], calibrate=not p["no_calibrate"],
                          verify=not p.get("no_verify", False), tune=p.get("tune", "quick"),
                          iree_flags=p.get("iree_flags", ()), jobs=p.get("jobs"), generate=p.get("generate", False),
                          max_context=p.get("max_context", 256), batch=p.get("batch", 1),
                          weights_dtype=p.get("weights_dtype", "f32"), tokenizer=_tokenizer(p),
                          draft=p.get("draft"), speculate=p.get("speculate", 4), draft_pins=p.get("draft_pins", ()),
                          phase_pins=p.get("phase_pins", ()), draft_dtype=p.get("draft_dtype"))


@cli.command()
@model_options
@click.option("--explain", is_flag=True, help="Per segment: its ops, device, predicted time (and on the other devices), "
              "bytes moved in and out, and why it is there.")
@click.option("--ops", "show_ops", is_flag=True, help="List every placed op with its device and predicted time.")
@click.option("--trace", "trace_out", type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Write the predicted timeline as a Chrome trace (open in chrome://tracing or ui.perfetto.dev).")
@click.option("--gantt", "gantt_out", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Draw the predicted timeline as a Gantt chart (PNG).")
@click.option("--requests", type=int, default=None, metavar="N",
              help="Simulate N calls in the timeline (default: 1; 4 for the throughput objective, pipelined).")
@click.option("--mlir", "mlir_out", type=click.Path(dir_okay=False), help="Also write the partitioned module here.")
@click.option("--generate", "generate", is_flag=True,
              help="MODEL is a causal LM: predict generation instead (no import, no compile): time to first token, "
                   "time per output token, tokens/s per user and in total, $ per million tokens and J per token of "
                   "single-device, phase-split and (with --draft) speculative plans over the -d devices and the "
                   "--profile files (which may describe devices polyarch cannot compile for), sweeping --batches and "
                   "--draft-lengths. MODEL may be built on torch's meta device (no memory for weights).")
@click.option("--draft", "draft", default=None, metavar="DRAFT.py[:ATTR]", help="With --generate: a draft model.")
@click.option("--batches", default="1,4,16,64,256", show_default=True, metavar="B,B,...",
              help="With --generate: the decode batch sizes to sweep.")
@click.option("--draft-lengths", "draft_lengths", default="1,2,4,8", show_default=True, metavar="K,K,...",
              help="With --generate --draft: the draft lengths to sweep.")
@click.option("--acceptance", type=click.FloatRange(0, 1, max_open=True), default=0.7, show_default=True,
              help="With --draft: the probability that the model accepts a drafted token.")
@click.option("--prompt-tokens", "prompt_tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="With --generate: prompt length.")
@click.option("--new-tokens", "new_tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="With --generate: tokens generated per request.")
@click.option("--weights-dtype", "weights_dtype", type=click.Choice(["f32", "f16", "bf16"]), default="f32",
              show_default=True, help="With --generate: the weights', activations' and cache's element type.")
@click.option("--pareto", "pareto_out", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="With --generate: draw tokens/s per device against tokens/s per user, each plan kind's Pareto front.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), metavar="FILE.json",
              help="With --generate: write every predicted plan.")
def plan(model: str, inputs: tuple, dynamic_dims: tuple, devices: tuple, pins: tuple, objective: str, solver: str,
         profiles: tuple, options_file: str | None, no_calibrate: bool, explain: bool, show_ops: bool,
         trace_out: str | None, gantt_out: str | None, requests: int | None, mlir_out: str | None, generate: bool,
         **gen) -> None:
    """Show where each part of MODEL would run, without compiling.

    With --profile files for devices this host does not have, this simulates a
    fleet: the plan and its predicted timeline are for those devices. (With
    --options naming several plans, the first is shown.) With --generate,
    predicts a language model's generation on a fleet instead
    (compiler/fleet.py).

    \b
    Examples:
      polyarch plan examples/minilm.py -d cpu -d vulkan --explain
      polyarch plan examples/minilm.py --profile profile.json --objective energy
      polyarch plan examples/minilm.py --profile h100.json --profile cpu.json --trace t.json --gantt t.png
      polyarch plan llm.py --generate --draft small.py -d cuda \\
          --profile examples/profiles/sram-decode-accelerator.json --weights-dtype bf16 --pareto p.png
    """
    _need_compiler("plan")
    if generate:
        given = [flag for flag, v in (("--input", inputs), ("--dynamic-dim", dynamic_dims), ("--pin", pins),
                                      ("--options", options_file), ("--explain", explain), ("--ops", show_ops),
                                      ("--trace", trace_out), ("--gantt", gantt_out), ("--mlir", mlir_out)) if v]
        if given:
            raise PolyarchError(f"{given[0]} does not apply to plan --generate (a fleet prediction from profiles: "
                                "no import, no placement of ops)", fix=f"drop {given[0]}, or drop --generate")
        return _plan_generate(model, devices, profiles, **gen)
    from ..compiler import simulate
    from ..compiler.driver import import_model
    from ..compiler.measured import pricing_line

    options = _compile_options(click.get_current_context())
    check_outputs({"the trace (--trace)": trace_out, "the chart (--gantt)": gantt_out, "the module (--mlir)": mlir_out},
                  _named_inputs(_read_files(model, options, options_file)))
    m, ns = _load_model(model)
    ex = _example_inputs(inputs, ns)
    progress = lambda msg: click.echo(f"polyarch: {msg}", err=True)
    planned = import_model(m, ex, options, progress).plan()
    report = planned.explain()
    for line in report.lines(explain=explain, ops=show_ops):
        click.echo(line)
    if explain:
        shown = {s.name for s in planned.sets[0]}
        for d, info in planned.priced["devices"].items():
            if d in shown:
                click.echo(f"device {pricing_line(d, info)}")
    if trace_out or gantt_out:
        n = requests or (4 if report.objective == "throughput" else 1)
        events = simulate.timeline(report, requests=n)
        if trace_out:
            simulate.write_chrome_trace(trace_out, events, report)
            click.echo(f"wrote {trace_out} ({n} call(s), {len(events)} events)")
        if gantt_out:
            simulate.write_gantt(gantt_out, events, report)
            click.echo(f"wrote {gantt_out}")
    if mlir_out:
        with atomic_write(mlir_out) as f:
            f.write(planned.as_text())


def _plan_generate(model, devices, profile_files, draft, batches, draft_lengths, acceptance, prompt_tokens, new_tokens,
                   weights_dtype, pareto_out, json_out):
    """`plan --generate`: the fleet prediction of compiler/fleet.py, as a table (each kind's
    Pareto plans), a JSON file and a PNG."""
    import json

    from ..compiler import fleet, measured
    from ..targets import profiles as P

    check_outputs({"the chart (--pareto)": pareto_out, "the table (--json)": json_out},
                  _named_inputs([model.partition(":")[0], *profile_files, draft and draft.partition(":")[0]]))
    progress = lambda msg: click.echo(f"polyarch: {msg}", err=True)
    profs = {}
    if devices:  # this host's measured profiles where cached, else spec sheets
        for d, p in zip(devices, measured.resolve_profiles(list(devices), (), False, progress)[0]):
            profs[d] = p
    for f in profile_files:
        for p in P.load(f, prediction_only=True):
            profs[p.name] = p
    if not profs:
        raise PolyarchError("no devices to predict for", fix="give -d DEVICE (e.g. -d cuda: the H100 spec sheet) "
                                                            "and/or --profile FILE.json")
    ints = lambda text, what: _sizes(text, what)
    spec = fleet.LMSpec.of(_load_model(model)[0], weights_dtype)
    dspec = fleet.LMSpec.of(_load_model(draft)[0], weights_dtype) if draft else None
    if dspec is not None and dspec.vocab != spec.vocab:
        raise PolyarchError(f"the draft's vocabulary has {dspec.vocab} tokens, the model's {spec.vocab}",
                            fix="give a draft trained with the same tokenizer")
    rows = fleet.predict(spec, profs, prompt_tokens, new_tokens, ints(batches, "--batches"), dspec,
                         ints(draft_lengths, "--draft-lengths") if draft else (1,), acceptance, weights_dtype)
    title = (f"{spec.name}: {spec.params / 1e9:.2f}B parameters, {weights_dtype}, prompt {prompt_tokens}, "
             f"{new_tokens} new" + (f"; draft {dspec.params / 1e9:.2f}B, acceptance {acceptance}" if dspec else ""))
    click.echo(title)
    click.echo("| plan | devices | batch | k | TTFT ms | TPOT ms | tok/s per user | tok/s | devices used | $ per 1M tok "
               "| J per tok |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(fleet.pareto(rows), key=lambda r: (fleet.KINDS.index(r["kind"]), -r["tokens_per_s_per_user"])):
        click.echo(f"| {r['kind']} | {r['devices']} | {r['batch']} | {r['k'] or '-'} | {r['ttft_ms']:.2f} | "
                   f"{r['tpot_ms']:.3f} | {r['tokens_per_s_per_user']:.1f} | {r['tokens_per_s']:.0f} | "
                   f"{r['devices_used']} | {r['usd_per_m_tokens']:.3f} | {r['joules_per_token']:.3f} |")
    click.echo(f"({len(rows)} plans predicted; the Pareto plans of each kind shown: none faster per user and per device)")
    if json_out:
        with atomic_write(json_out) as f:
            json.dump({"title": title, "profiles": {k: p.to_json() for k, p in profs.items()}, "plans": rows}, f, indent=1)
        click.echo(f"wrote {json_out}")
    if pareto_out:
        fleet.write_pareto_png(pareto_out, rows, title)
        click.echo(f"wrote {pareto_out}")


def _phase_devices(plan, cache_bytes):
    """Where each phase of a --generate plan runs, and whether the cache moves from prefill's
    devices to decode's."""
    used = {}
    for seg in plan.get("segments", []):
        phase = next((p for p in sorted(plan.get("phases", {}), key=len, reverse=True)
                      if str(seg.get("name", "")).startswith(p + "_seg_")), None)
        if phase:
            used.setdefault(phase, []).append(seg.get("device"))
    text = ", ".join(f"{p} on {'+'.join(dict.fromkeys(d))}" for p, d in used.items())
    pre, dec = set(used.get("prefill", ())), set(used.get("decode", ()))
    if pre and dec and pre != dec:
        text += f"; the KV cache ({cache_bytes / 1e6:.1f} MB) moves from prefill's devices to decode's once per prompt"
    return text


def _itemsize(dtype):
    return {"float16": 2, "bfloat16": 2}.get(dtype, 4)


def _sizes(text, what):
    """--batches / --draft-lengths: whole numbers of 1 or more, comma-separated."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise PolyarchError(f"{what} {text!r} is not a list of whole numbers of 1 or more",
                            fix=f"e.g. {what} 1,4,16")
    return out


@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("-i", "--input", "inputs", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE.npy",
              help="An input as a .npy file, one per model input, in order. Default: deterministic random inputs.")
@click.option("-o", "--output", "outputs", multiple=True, type=click.Path(dir_okay=False), metavar="FILE.npy",
              help="Save each output to a .npy file.")
@click.option("-n", "--repeat", type=click.IntRange(min=1), default=1, show_default=True, help="Run this many times and report the median time.")
@click.option("--trace", "trace_out", type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Write a Chrome/Perfetto trace of the runs: each segment on its device, each transfer with its bytes.")
@click.option("--plan", "plan_name", metavar="NAME",
              help="Run this placement plan (see `polyarch inspect`). Default: the fastest predicted plan whose "
                   "devices are present; the choice is printed.")
@click.option("--strict", is_flag=True,
              help="Fail if that plan's devices are missing, instead of falling back to another plan.")
@click.option("--cluster", metavar="ADDRESS",
              help="Run on a Ray cluster (ray://HOST:10001, or HOST:PORT from one of its nodes): one actor per "
                   "device, on a node that offers it as the resource polyarch_<device> (see the README).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False), metavar="KEY.pub",
              help="Run the bundle only if it is signed by this public key (`polyarch sign`); repeatable. A bundle "
                   "is native code: use this for bundles from elsewhere.")
def run(bundle: str, inputs: tuple, outputs: tuple, repeat: int, trace_out: str | None, plan_name: str | None,
        strict: bool, cluster: str | None, trusted_keys: tuple) -> None:
    """Load BUNDLE on this host's devices and run it.

    \b
    Examples:
      polyarch run multi.pab --plan vulkan+cpu --strict
      polyarch run mlp.pab
      polyarch run minilm.pab -i ids.npy -i mask.npy -o hidden.npy -n 20
      polyarch run minilm.pab -n 5 --trace run.json     # open in ui.perfetto.dev
      polyarch run minilm.pab --cluster ray://head:10001  # one Ray actor per device
      polyarch run minilm.pab --trusted-key release.key.pub  # refused unless signed by that key
    """
    import numpy as np

    from ..runtime import load
    from ..runtime.executor import index_bounds

    import logging

    logging.getLogger("polyarch.runtime").addHandler(logging.NullHandler())  # the choice is printed below
    if cluster and (trace_out or strict):
        raise PolyarchError("--trace and --strict are not supported with --cluster",
                            fix="drop them (on a cluster the plan is the fastest one whose devices some node offers)")
    outputs = [p if p.endswith(".npy") else p + ".npy" for p in outputs]  # as numpy.save names them
    writes = {f"output file {i} (-o)": p for i, p in enumerate(outputs)}
    check_outputs(dict(writes, **{"the trace (--trace)": trace_out}),
                  dict(_named_inputs([*inputs, *trusted_keys]), **{"the bundle being run": bundle}))
    t = time.perf_counter()
    b = load(bundle, plan=plan_name, strict=strict, cluster=cluster, trusted_keys=list(trusted_keys) or None)
    load_s = time.perf_counter() - t
    if inputs:
        args = [_load_array(p) for p in inputs]
    else:
        rng = np.random.default_rng(0)
        args = []
        for spec in b.inputs:
            dt = np.dtype(spec["dtype"])
            if dt == np.bool_:
                args.append(rng.random(spec["shape"]) > 0.5)
            elif dt.kind in "iu" or "index_range" in spec:  # an index input: valid indices (token ids) of its table
                bounds = index_bounds(spec, [i["shape"] for i in b.inputs]) or [(0, 99, "", "")]
                lo, hi = max(max(lo for lo, *_ in bounds), 0), min(min(hi for _, hi, *_ in bounds), 99)
                args.append(rng.integers(lo, hi + 1, spec["shape"]).astype(dt))
            else:
                args.append(rng.standard_normal(spec["shape"]).astype(dt))
    b.trace = bool(trace_out)
    times = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        res = b(*args)
        times.append(time.perf_counter() - t)
    if trace_out:
        b.write_trace(trace_out)
    if cluster:
        workers = b.worker_counters()
        b.close()
    res = res if isinstance(res, tuple) else (res,)
    if cluster:
        where = ", ".join(f"{d} (actor pid {p['pid']} on {p['host']})" for d, p in b.placement.items())
        _say(f"loaded {bundle} in {load_s * 1000:.1f} ms on Ray cluster {cluster}: {where}")
    else:
        _say(f"loaded {bundle} in {load_s * 1000:.1f} ms on {', '.join(f'{k} ({v})' for k, v in b.devices.items())}")
    _say(f"running {b.choice}")
    for i, r in enumerate(res):
        _say(f"output {i}: {'x'.join(map(str, r.shape))}x{r.dtype}  mean {float(np.mean(r)):.6g}  std {float(np.std(r)):.6g}")
        if i < len(outputs):
            with atomic_write(outputs[i], "wb") as f:
                np.save(f, r)
    times.sort()
    _say(f"time: median {times[len(times) // 2] * 1000:.3f} ms over {len(times)} run(s)")
    c = b.counters
    if cluster:
        _say(f"per call: {c['transfers'] / c['calls']:.0f} tensor(s) handed between actors; segments: "
                   + ", ".join(f"{d} {w['segment_seconds'][d] / c['calls'] * 1000:.3f} ms" for d, w in workers.items()))
        return
    _say(f"per call: {c['transfers'] / c['calls']:.0f} transfer(s), {c['bytes_moved'] / c['calls'] / 1e6:.3f} MB moved in "
               f"{c['transfer_seconds'] / c['calls'] * 1000:.3f} ms; segments: "
               + ", ".join(f"{d} {t / c['calls'] * 1000:.3f} ms" for d, t in c["segment_seconds"].items()))
    if trace_out:
        _say(f"wrote {trace_out}")


@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--ops", "show_ops", is_flag=True, help="Every op: source line, module path, segment, device, predicted time.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False), metavar="KEY.pub",
              help="Check the signature against this public key (repeatable) and fail unless one of them signed "
                   "the bundle. Without it the key id a signature claims is shown, not verified.")
def inspect(bundle: str, as_json: bool, show_ops: bool, trusted_keys: tuple) -> None:
    """Describe BUNDLE: signature, segments, devices, predicted cost, sizes; checks every hash
    against the manifest (and the manifest against a signature with --trusted-key).

    \b
    Examples:
      polyarch inspect minilm.pab
      polyarch inspect minilm.pab --trusted-key release.key.pub   # fails unless signed by that key
    """
    from ..runtime.bundle import Members, read_manifest
    from ..runtime.executor import format_spec as fmt
    from ..runtime.signing import check, signature_of

    m, raw = read_manifest(bundle, raw=True)
    # the signature on the very manifest bytes that the members are then checked against
    verified = check(bundle, list(trusted_keys), manifest=raw) if trusted_keys else None
    Members(bundle, m, mmap=None).close()
    if as_json:
        click.echo(json.dumps(m, indent=1, sort_keys=True))  # (json escapes control characters in strings itself)
        return
    _say(f"{bundle}: polyarch bundle schema {m['schema_version']}, made by polyarch {m['polyarch_version']} on {m['created']}")
    _say(f"  compiled with {', '.join(f'{k} {v}' for k, v in m['compiler'].items())}")
    sig = signature_of(bundle)
    _say("  signature: " + ("none (a bundle is native code: sign it with `polyarch sign`)" if sig is None else
                            "damaged" if sig.get("damaged") else
                            f"{sig.get('algorithm')}, verified: signed by trusted key {verified}" if verified else
                            f"signed, claims key id {sig.get('key_id')}, not verified (pass --trusted-key KEY.pub)"))
    _say(f"  inputs:  {', '.join(i['name'] + ' ' + fmt(i) for i in m['signature']['inputs'])}")
    _say(f"  outputs: {', '.join(o['name'] + ' ' + fmt(o) for o in m['signature']['outputs'])}")
    params = m.get("parameters")
    if params:
        size = m["members"][params["member"]]["size"]
        _say(f"  weights: {params['member']}, {params['count']} distinct parameters, {size / 1e6:.2f} MB "
                   f"({params['references']} references, {params['referenced_bytes'] / 1e6:.2f} MB if each were stored "
                   f"where it is used)")
    else:
        _say("  weights: inline in each module")
    g = m.get("generate")
    if g:
        cache = 2 * g["layers"] * g["batch"] * g["kv_heads"] * g["max_context"] * g["head_dim"]
        _say(f"  generate: {g.get('model', '?')}, phases {' + '.join(sorted(m.get('phases', {}), reverse=True))} "
             f"(inputs and outputs above: prefill's), context {g['max_context']} tokens, batch {g['batch']}, "
             f"{g['dtype']}; KV cache {g['layers']} layers x {g['kv_heads']} kv heads x {g['head_dim']} "
             f"({cache} values); run it with `polyarch generate {bundle} --ids 1,2,3`")
        for plan in m["plans"]:
            _say(f"  phases of plan {plan.get('name')}: " + _phase_devices(plan, cache * _itemsize(g.get("dtype"))))
        d = g.get("draft")
        if isinstance(d, dict):
            _say(f"  draft: {d.get('model', '?')}, {d.get('layers')} layers, drafts up to {d.get('speculate')} tokens "
                 f"a step, checked by the verify phase (speculative decoding; `generate --no-draft` decodes without)")
    for plan in m["plans"]:
        p = plan.get("plan", {})
        measured = f", measured {plan['measured_us'] / 1000:.3f} ms when compiled" if plan.get("measured_us") else ""
        _say(f"  plan '{plan['name']}' over {', '.join(plan['devices'])}: {p.get('objective', '?')} ({p.get('algorithm', '?')}); "
                   f"predicted {p.get('predicted_us', 0) / 1000:.3f} ms{measured}, {p.get('transfer_bytes', 0) / 1e6:.3f} MB transferred")
        for line in _device_lines(plan):
            _say(f"    {line}")
        for line in _verification_lines(plan.get("verification")):
            _say(f"    {line}")
        for s in plan["segments"]:
            size = m["members"][s["member"]]["size"]
            nparams = len(s.get("parameters", {}).get("keys", {}))
            got = f"  measured {s['measured_us'] / 1000:8.3f} ms" if s.get("measured_us") else ""
            _say(f"    {s['name']:8s} {s['device']:10s} {s['ops']:5d} ops  predicted {s['predicted_us'] / 1000:8.3f} ms{got}  "
                       f"{size / 1e6:8.2f} MB  {nparams:3d} params  {s['member']}")
            if show_ops:
                for op in s.get("op_list", []):
                    where = " ".join(x for x in (f"({op['path']})" if op["path"] else "", f"at {op['source']}" if op["source"] else "") if x)
                    _say(f"        {op['predicted_us']:10.2f} us  {op['op']} {where}")
        transfers = [s for s in plan["schedule"] if s["op"] == "transfer"]
        if transfers:
            _say(f"    transfers: {len(transfers)}, {sum(t['bytes'] for t in transfers) / 1e6:.3f} MB per call")
    total = sum(v["size"] for v in m["members"].values())
    _say(f"  members: {len(m['members'])}, {total / 1e6:.2f} MB, each matching the SHA-256 its manifest lists"
         + ("" if verified else " (which proves no origin: only a verified signature does)"))


def _device_lines(plan):
    from ..compiler.measured import pricing_line

    for d, info in plan.get("device_info", {}).items():
        yield f"device {pricing_line(d, info)}"


def _verification_lines(v):
    if not v:
        yield "verification: none recorded (bundle made before polyarch verified plans)"
        return
    status = v.get("status", "?")
    line = f"verification: {status}" + (f" against {v['against']}" if v.get("against") else "")
    if "greedy_tokens" in v:
        line += (f"; {v['greedy_tokens']} greedy tokens equal to PyTorch's, logits within "
                 f"{v['max_rel_logits_error']:.1e} of their range (tolerance {v['tolerance']:g})")
    whole = v.get("whole")
    if whole:
        line += f"; max error {whole['max_rel_error']:.2e} of the largest output vs {whole['against']} (tolerance {whole['tolerance']:g})"
    yield line
    for name, seg in v.get("segments", {}).items():
        if "max_rel_error" in seg:
            yield f"  {name} on {seg['device']}: max error {seg['max_rel_error']:.2e} vs llvm-cpu"
    rounds = v.get("rounds", [])
    for r in rounds:
        parts = [f"{n}: {'/'.join(e['segments'])} {e['status']}"
                 + (f", measured {e['measured_us'] / 1000:.3f} ms" if e.get("measured_us") else "")
                 + f", predicted {e['predicted_us'] / 1000:.3f} ms" for n, e in r["plans"].items()]
        yield f"  round {r['round']}: " + "; ".join(parts)
        for w in r.get("wrong_ops", []):
            yield f"    measured wrong, moved off its device: {w}"
    single = v.get("single_device")
    if single and single.get("replaced"):
        yield (f"  {single['device']} alone measured {single['measured_us'] / 1000:.3f} ms, faster than "
               f"{'+'.join(single['replaced']['devices'])} ({single['replaced']['measured_us'] / 1000:.3f} ms): runs on {single['device']} alone")
    elif single:
        yield f"  {single['device']} alone measured {(single.get('measured_us') or 0) / 1000:.3f} ms (slower; the split is kept)"


@cli.command()
@click.option("-d", "--device", "devices", multiple=True, default=("cpu",), show_default=True, metavar="SPEC",
              help="Device to measure, repeatable (it must be present on this host).")
@click.option("-o", "--output", default="profile.json", show_default=True, type=click.Path(dir_okay=False),
              help="Profile file to write (one entry per device).")
@click.option("--quick", is_flag=True, help="Fewer sizes: about half the time, somewhat less precise.")
@click.option("--like", "like", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE.json",
              help="Take the figures calibration cannot measure (watts, price, memory capacity) from this profile "
                   "instead of the built-in one of the device's kind.")
@click.option("--kernels", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep the compiled microbenchmarks here and reuse them (a host with the runtime only can "
                   "calibrate from a folder filled on a host with the compiler).")
def calibrate(devices: tuple, output: str, quick: bool, like: tuple, kernels: str | None) -> None:
    """Measure this host's devices and write a device profile for the cost model.

    Runs IREE-compiled microbenchmarks on each device: a matmul sweep (peak
    FLOP/s), an elementwise sweep (memory bandwidth), chains of tiny dispatches
    (launch and call overhead) and a host<->device transfer sweep (link
    bandwidth and latency). Takes 10-60 s per device.

    The profiles are also stored in this user's cache ($POLYARCH_CACHE_DIR, else
    $XDG_CACHE_HOME/polyarch, else ~/.cache/polyarch), keyed by the device's identity
    and the IREE version: `compile` and `plan` then use them without --profile.

    \b
    Examples:
      polyarch calibrate --device cpu --device vulkan -o profile.json
      polyarch plan examples/minilm.py --profile profile.json --explain
      polyarch compile examples/minilm.py --profile profile.json -o m.pab
    """
    if not (kernels and os.path.isdir(kernels) and os.listdir(kernels)):  # else: measure the kernels kept there
        _need_compiler("calibrate")
    from ..compiler import calibrate as C, measured as M
    from ..targets import profiles as P
    from ..runtime.identity import identify

    check_outputs({"the profile (-o)": output}, _named_inputs(like))  # before the minute of measuring
    progress = lambda msg: click.echo(f"polyarch: {msg}", err=True)
    profs = C.calibrate(list(devices), like=list(like) or None, progress=progress, quick=quick, kernels=kernels)
    P.save(output, profs)
    cached = []
    for d, prof in zip(devices, profs):
        ident = identify(d)
        if ident is not None:
            M.store_profile(ident, prof)
            cached.append(d)
    for p in profs:
        weights = (", matrix-vector " + " / ".join(f"{v / 1e9:.1f} ({d})" for d, v in p.weight_bw.items()) + " GB/s"
                   if p.weight_bw else "")
        click.echo(f"{p.device}: {p.peak_flops['f32'] / 1e9:.1f} GFLOP/s f32, {p.mem_bw / 1e9:.1f} GB/s{weights}, "
                   f"call {p.call_s * 1e6:.1f} us, dispatch {p.launch_s * 1e6:.2f} us, "
                   f"link {p.link_bw / 1e9:.2f} GB/s + {p.link_latency_s * 1e6:.1f} us")
    click.echo(f"wrote {output}")
    if cached:
        click.echo(f"cached for compile and plan (used without --profile): {', '.join(cached)} in {M.cache_dir()}")


@cli.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="KEY",
              help="Where to write the private key (mode 0600); the public key goes to KEY.pub.")
def keygen(output: str) -> None:
    """Make an Ed25519 key pair for signing bundles.

    \b
    Example:
      polyarch keygen -o release.key      # keep release.key secret; give out release.key.pub
    """
    from ..runtime.signing import keygen as make

    private, public, kid = make(output)
    click.echo(f"wrote {private} (private, keep it secret) and {public} (public); key id {kid}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key", required=True, type=click.Path(exists=True, dir_okay=False), metavar="KEY",
              help="The private key from `polyarch keygen`.")
def sign(bundle: str, key: str) -> None:
    """Sign BUNDLE: an Ed25519 signature over its manifest, which holds every member's SHA-256.

    \b
    Example:
      polyarch sign m.pab --key release.key
      polyarch run m.pab --trusted-key release.key.pub   # refuses unsigned or re-signed bundles
    """
    from ..runtime.signing import sign as do_sign

    kid = do_sign(bundle, key)
    click.echo(f"signed {bundle} with key {kid}")


def _say(line: str = "") -> None:
    """click.echo, with control characters escaped: bundles carry text of others (plan names,
    paths, versions) that must not reach the terminal raw."""
    click.echo(printable(line))


def _read_files(model, options, options_file):
    """The files a compile or plan reads before the model runs: the model file, the profiles, the options file."""
    return [p for p in (model.partition(":")[0], *(p for p in options.profiles if isinstance(p, str)), options_file,
                        options.tokenizer, options.draft.partition(":")[0] if isinstance(options.draft, str) else None)
            if p]


def _named_inputs(paths):
    """{what it is: path} for the files a command reads, as check_outputs names them."""
    return {f"an input of this command ({p})": p for p in paths if p}


def main() -> None:
    import signal
    import warnings

    if not any(a in ("-v", "--verbose") for a in sys.argv[1:2]):
        warnings.simplefilter("ignore")  # also while the options are parsed (the group's callback runs later)

    signal.signal(signal.SIGTERM, unwind)
    signal.signal(signal.SIGINT, unwind)
    cli()



@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--ids", "ids", multiple=True, metavar="ID,ID,...",
              help="A prompt as token ids, comma-separated; repeat for several prompts (they share the decode batch).")
@click.option("-p", "--prompt", "texts", multiple=True, metavar="TEXT",
              help="A prompt as text (the bundle must carry a tokenizer: compile --tokenizer); repeatable. The "
                   "output is text too.")
@click.option("-n", "--max-new-tokens", "max_new", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens to generate per prompt (at most: a stop id ends a sequence earlier).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy (the most likely token); above 0: sampled from softmax(logits / temperature).")
@click.option("--top-k", "top_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the K most likely tokens only (0: all).")
@click.option("--top-p", "top_p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Sample among the most likely tokens whose probabilities sum to P.")
@click.option("--stop", "stops", multiple=True, type=int, metavar="ID",
              help="A token id that ends a sequence (repeatable; default: the model's end-of-sequence ids).")
@click.option("--no-stop", "no_stop", is_flag=True, help="Do not stop at the end-of-sequence ids: always -n tokens.")
@click.option("--seed", type=int, default=None, help="Seed of the sampler: the same seed gives the same tokens.")
@click.option("--no-draft", "no_draft", is_flag=True,
              help="A bundle compiled with --draft: decode with the model alone (no speculative decoding).")
@click.option("--trace", "trace_out", type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Write a Chrome/Perfetto trace of the generation: every phase's segments on their device "
                   "(prefill_*, decode_*, and with a draft draft_* and verify_*), every transfer with its bytes.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Load only if the bundle is signed by this Ed25519 public key (repeatable: any of them).")
def generate(bundle: str, ids: tuple, texts: tuple, max_new: int, temperature: float, top_k: int, top_p: float,
             stops: tuple, no_stop: bool, seed: int | None, no_draft: bool, trace_out: str | None,
             trusted_keys: tuple) -> None:
    """Generate tokens from a BUNDLE compiled with `compile --generate`.

    Prints each new token id as it comes (one line per prompt: `N: id id ...`
    for several prompts, in the order the tokens come), then the time to first
    token, the time per output token and the KV-cache bytes that crossed the
    host per decode step (0: the cache stayed on its device). A bundle compiled
    with --draft decodes speculatively (unless --no-draft) and also prints
    the drafted tokens' acceptance rate and the draft's and verify's times.

    \b
    Examples:
      polyarch generate llm.pab --ids 1,2,3 -n 64
      polyarch generate llm.pab --ids 1,2,3 --ids 7,8 -n 16 --temperature 0.8 --top-k 40 --seed 1
    """
    from ..runtime import load

    if bool(ids) == bool(texts):
        raise PolyarchError("give the prompts as --ids or as --prompt text" + (", not both" if ids else ""),
                            fix="e.g. polyarch generate m.pab --ids 1,2,3 (or --prompt 'Once upon a time')")
    prompts = list(texts)
    for text in ids:
        try:
            prompts.append([int(t) for t in text.split(",") if t.strip()])
        except ValueError:
            raise PolyarchError(f"--ids {text!r} is not a list of token ids", fix="write ids as 1,2,3") from None
    check_outputs({"the trace (--trace)": trace_out}, {"the bundle": bundle})
    with load(bundle, trusted_keys=list(trusted_keys) or None) as b:
        b.trace = bool(trace_out)
        g = b.generate(prompts if len(prompts) > 1 else prompts[0], max_new, temperature=temperature, top_k=top_k,
                       top_p=top_p, stop_ids=() if no_stop else (stops or None), seed=seed,
                       speculative=False if no_draft else None)
        shown = ""
        for item in g:
            if texts and len(prompts) == 1:  # the text grows as tokens come (a token may end mid-character)
                now = g.text
                click.echo(now[len(shown):] if now.startswith(shown) else "\n" + now, nl=False)
                shown = now
            else:
                click.echo(f"{item} " if len(prompts) == 1 else f"{item[0]}: {item[1]}", nl=len(prompts) > 1)
            sys.stdout.flush()  # each token as it comes
        if len(prompts) == 1:
            click.echo()
        elif texts:
            for i, t in enumerate(g.text):
                click.echo(f"{i}: {t}")
        st = g.stats
        ttft = ", ".join(f"{t * 1e3:.1f}" for t in st["ttft_s"])
        tpot = f"{st['tpot_s'] * 1e3:.2f} ms" if st["tpot_s"] else "-"
        click.echo(f"polyarch: {st['tokens']} tokens in {st['seconds']:.2f} s; time to first token {ttft} ms; "
                   f"{tpot} per output token ({st['decode_steps']} decode steps of {b.manifest['generate']['batch']}); "
                   f"KV-cache bytes through the host per step: {st.get('state_host_bytes_per_step', 0):.0f}", err=True)
        sp = st.get("speculative")
        if sp:
            rate = f"{sp['acceptance_rate']:.2f}" if sp["acceptance_rate"] is not None else "-"
            click.echo(f"polyarch: speculative: {sp['accepted']} of {sp['drafted']} drafted tokens accepted ({rate}), "
                       f"{sp['mean_k'] or 0:.1f} drafted a step; draft {sp['draft_calls']} calls, "
                       f"{sp['draft_s'] * 1e3:.1f} ms, and {sp['catch_up_calls']} 2-token catch-up calls, "
                       f"{sp['catch_up_s'] * 1e3:.1f} ms; verify {sp['verify_calls']} calls, "
                       f"{sp['verify_s'] * 1e3:.1f} ms",
                       err=True)
        if trace_out:
            b.write_trace(trace_out)
            click.echo(f"polyarch: wrote {trace_out} ({len(b.events)} events; open in ui.perfetto.dev)", err=True)


@cli.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; put a proxy with TLS and authentication in "
                   "front of it: the server has neither).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port; the one taken is printed).")
@click.option("--name", metavar="NAME", help="The model's name in the APIs (default: the bundle's file name without .pab).")
@click.option("--plan", "plans", multiple=True, metavar="NAME|all",
              help="Serve this placement plan (repeatable), or `all` the plans this host can run: each request goes "
                   "to the plan whose devices are free soonest by prediction (requests waiting x measured time per "
                   "call). Default: the plan `run` would choose.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Dynamic batching (a bundle whose batch dimension is dynamic): rows per call at most (default: "
                   "the bundle's bound on that dimension, or 64). 1: no batching.")
@click.option("--max-delay-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="How long the first request of a batch waits for others to join it. 0: a batch is what queued "
                   "while the previous call ran (measured here: as much throughput under load as 2 ms, and half "
                   "the latency of a lone client).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting per plan at most; more are answered 503 with Retry-After.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds a request may wait in the queue (504 after that).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False), metavar="KEY.pub",
              help="Serve the bundle only if it is signed by this public key (repeatable).")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Deploy on the Ray cluster at ADDRESS (HOST:PORT of its GCS, or ray://HOST:10001) with Ray Serve: "
                   "its HTTP proxy listens on --host/--port of the head node, replicas are placed on nodes that offer "
                   "the plan's devices (resources polyarch_<device>, as `run --cluster`).")
@click.option("--replicas", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --ray: replicas of the bundle (default 1), each holding one unit of each device it uses.")
def serve(bundle: str, host: str, port: int, name: str | None, plans: tuple, max_batch: int | None,
          max_delay_ms: float, max_queue: int, timeout_s: float, trusted_keys: tuple, ray_address: str | None,
          replicas: int | None) -> None:
    """Serve BUNDLE over HTTP until stopped (Ctrl-C or SIGTERM: requests in flight finish first).

    \b
    Speaks:
      KServe v2 / Triton inference protocol (JSON and binary tensors):
        GET /v2/health/live, /v2/health/ready, /v2/models/NAME, /v2/models/NAME/ready
        POST /v2/models/NAME/infer            (tritonclient.http works unchanged)
      OpenAI completions, for a bundle compiled with --generate:
        POST /v1/completions (stream: true for server-sent events), GET /v1/models
                                              (the openai client works unchanged)
      Prometheus metrics: GET /metrics
    Concurrent requests to a bundle with a dynamic batch dimension are batched
    (--max-batch, --max-delay-ms); a --generate bundle batches its streams
    continuously (a new one joins the decode batch between steps).

    \b
    Examples:
      polyarch serve minilm.pab --port 8000
      polyarch serve mlp.pab --max-batch 32 --max-delay-ms 5
      polyarch serve llm.pab --port 8000   # then: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
      polyarch serve multi.pab --plan all  # route each request to the plan free soonest
    """
    try:
        import uvicorn

        from ..server.app import Served, create_app
    except ImportError as e:
        raise PolyarchError(f"`polyarch serve` needs {e.name}, which this install does not have",
                            fix="pip install polyarch (its dependencies bring FastAPI, uvicorn and prometheus-client)") from None
    import socket

    chosen = None if not plans else "all" if "all" in plans else list(plans)
    if replicas is not None and ray_address is None:
        raise PolyarchError("--replicas is for a deployment on Ray Serve", fix="add --ray ADDRESS, or drop --replicas")
    if ray_address is not None:
        return _serve_on_ray(bundle, ray_address, replicas or 1, host, port, chosen, name=name, max_batch=max_batch,
                             max_delay_ms=max_delay_ms, max_queue=max_queue, timeout_s=timeout_s,
                             trusted_keys=list(trusted_keys) or None)
    served = Served(bundle, name=name, plans=chosen, max_batch=max_batch, max_delay_ms=max_delay_ms,
                    max_queue=max_queue, timeout_s=timeout_s, trusted_keys=list(trusted_keys) or None)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (inherited by each connection)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until the server takes them
    except OSError as e:
        served.close()
        import errno

        bad_host = isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL
        raise PolyarchError(f"cannot listen on {host}:{port}: {e.strerror}",
                            fix="give --host an address of this machine (127.0.0.1: this machine only; 0.0.0.0: "
                                "every interface)" if bad_host else "choose another --port (0: any free one)") from None
    port = sock.getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    what = []
    for p in served.plans:
        w = p.worker
        what.append(f"plan {p.name}" + ("" if served.generate else
                                        f" (batching up to {w.max_batch} rows, {max_delay_ms:g} ms)" if w.max_batch > 1
                                        else " (no batching: the bundle's batch dimension is static)"))
    api = (f"OpenAI {url}/v1/completions (continuous batching over {served.manifest['generate']['batch']} slots)"
           if served.generate else f"KServe v2 {url}/v2/models/{served.name}/infer")
    click.echo(f"polyarch: serving {served.name} at {url}: {api}; metrics {url}/metrics; {', '.join(what)}", err=True)
    sys.stderr.flush()
    config = uvicorn.Config(create_app(served), log_level="warning", timeout_graceful_shutdown=None, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except (SystemExit, KeyboardInterrupt):
        # uvicorn sends the signal that stopped it again once it has shut down gracefully: that
        # is the stop asked for, not an error (a second signal during the shutdown is)
        if not server.should_exit or server.force_exit:
            raise
    finally:
        served.close()
    click.echo("polyarch: stopped (the requests in flight were answered)", err=True)


def _serve_on_ray(bundle, address, replicas, host, port, plans, trusted_keys, **options):
    """serve --ray: deploy on Ray Serve, wait for Ctrl-C or SIGTERM, then take the app down."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise PolyarchError("`polyarch serve --ray` needs Ray Serve", fix="pip install 'polyarch[ray]'") from None
    from ..server import ray_serve

    if port == 0:
        raise PolyarchError("--port 0 is not for --ray (Ray Serve's proxy takes a fixed port)", fix="give --port N")
    url = ray_serve.deploy(bundle, address, replicas, port, host=host, plans=plans, trusted_keys=trusted_keys,
                           **options)
    name = options.get("name") or os.path.splitext(os.path.basename(bundle))[0]
    click.echo(f"polyarch: serving {name} at {url} on the Ray cluster {address}: {replicas} replica(s) "
               f"(Ray Serve; KServe v2 {url}/v2/models/{name}, OpenAI {url}/v1, metrics per replica at {url}/metrics)",
               err=True)
    sys.stderr.flush()
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # (ray.init put its own handler there, which aborts)
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        ray_serve.undeploy()
    click.echo("polyarch: stopped (the Ray Serve app is removed; the cluster runs on)", err=True)


if __name__ == "__main__":
    main()
