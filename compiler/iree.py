"""iree-compile: finding it, running it, retrying known refusals, and turning its errors
into a PolyarchError that names the op, its module path and a fix."""

import os
import re
import subprocess
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Iterable

from ..dialects import polyarch as pa
from ..errors import PolyarchError
from ..files import die_with_parent
from ..targets import TARGETS

if TYPE_CHECKING:
    from torch_mlir import ir


# Decode's matmuls have a handful of rows (the batch): IREE's data tiling packs their weights into
# a copy of their own when the module initialises (+300 MB for a 100M model, per module) for no
# gain at batch 1 and less at batch 8 (measured: bench/generate.py, docs/architecture.md); without
# it the weights are used from the bundle's archive in place. Prefill (compute-bound) keeps it. The
# draft's decode and the verify phase (speculate + 1 rows) are decode-like: the same flags. With
# 16-bit weights the products are rowdot's either way (PHASE_KERNELS) and data tiling only changes
# attention: on an AVX-512 Xeon it gained (f16 decode 8.5-8.9 -> 7.1-7.3 ms a token), on an AVX2
# Zen 2 it costs (it packs the f16 cache every step: 9.3 -> 9.8 ms a token, A B B A): f16 decode
# keeps it where the host has AVX-512 only (the cpu target compiles for the host). bf16 keeps it.
def _phase_flags() -> dict:
    from .kernels import host_vector_regs

    off = {p: ["--iree-opt-data-tiling=false"] for p in ("decode", "verify")}
    return {"f32": off, **({} if host_vector_regs()[1] == 16 else {"f16": off})}


PHASE_FLAGS = _phase_flags()  # by weights dtype
# Decode-like phases multiply each weight by a few rows: on cpu, with compiler/kernels.py's
# hand-written dispatch (passes/rowdot.py), which streams the weights faster than IREE's own code.
# Prefill's head multiplies the last token's row only (its other products have dynamic rows):
# the same dispatch, reading the head's weights in place (data tiling would pack a copy).
PHASE_KERNELS = ("prefill", "decode", "verify")


def segment_module(ir: ModuleType, fn: "ir.Operation") -> "ir.Module":
    """A module holding just this segment function, public, for iree-compile."""
    m = ir.Module.create()
    new = fn.operation.clone(ip=ir.InsertionPoint(m.body))
    if "sym_visibility" in new.attributes:
        del new.attributes["sym_visibility"]
    for key in (pa.DEVICE, pa.TIME_US):
        if key in new.attributes:
            del new.attributes[key]
    return m


def iree_compile_tool() -> str:
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


def run_iree_compile(cmd: list) -> subprocess.CompletedProcess:
    """Run one iree-compile command line (cmd[1] is the source, after `-o` the output);
    -> the CompletedProcess. Every segment and verification probe goes through here; the child
    is killed if this process dies (SIGKILL included), so no iree-compile outlives its compile."""
    return subprocess.run(die_with_parent(cmd), capture_output=True, text=True)


def first_error(stderr: str, default: str = "") -> str:
    """The message of the first `: error: ` line iree-compile printed, or `default`."""
    return next((l.partition(": error: ")[2].strip() for l in stderr.splitlines() if ": error: " in l), default)


# IREE refusals that a flag gets past, per device kind, each retried once with it: (what
# stderr says, the flags, what it is); from each kind's record (targets/kinds.py).
KNOWN_RETRIES = {kind: t.known_retries for kind, t in TARGETS.items()}


def compile_with_retries(cmd: list, kind: str, progress: Callable[[str], None] | None = None,
                         what: str = "a module") -> tuple:
    """run_iree_compile, and where IREE refuses for a known reason that a flag gets past
    (KNOWN_RETRIES), again with that flag. -> (CompletedProcess, [retry notes], the command last run)."""
    r, notes = run_iree_compile(cmd), []
    for pattern, flags, why in KNOWN_RETRIES.get(kind, ()):
        if r.returncode == 0:
            break
        if pattern.search(r.stderr) and not set(flags) <= set(cmd):
            first = first_error(r.stderr)
            cmd = cmd[:-2] + list(flags) + cmd[-2:]
            r = run_iree_compile(cmd)
            notes.append({"error": first, "retried_with": list(flags), "known": why,
                          "result": "compiled" if r.returncode == 0 else "failed again"})
            if progress:
                progress(f"{what}: IREE refused it ({first[:100]}); known IREE 3.13 limitation ({why}): "
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


def iree_error(stderr: str, segment: str, device: str, fn: "ir.Operation" = None,
               devices: Iterable = ()) -> PolyarchError:
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
    from ..targets import tunable

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


