"""Plans grounded in the devices at hand: compile, verify, measure, re-plan.

    round k: partition (profiles + what was measured so far) -> compile -> verify and time
             every plan (compiler/verify.py)
             - ops measured wrong: recorded as verdicts for that device identity (cached,
               so the next compile avoids them at once), re-plan, recompile
             - all right: the measured segment times correct the cost model per device and
               op class; re-plan; stop when the plan no longer changes (or MAX_ROUNDS)
    then     a plan that uses another device than the CPU (alone or with it) is measured
             against the same model on the CPU alone; if the CPU alone is faster, the plan runs on the CPU alone (adding a
             device never makes a model slower). Not done where the user pinned ops.

The result is the fastest verified round; a bundle known to be wrong is never returned."""

import os
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ..runtime.dtypes import np_dtype, to_numpy, to_torch
from ..errors import PolyarchError
from . import measured
from .verify import verify_plan

if TYPE_CHECKING:
    from torch_mlir import ir

MAX_ROUNDS = 4
# a plan on one device replaces a multi-device one when faster by more than this factor
SINGLE_MARGIN = 1.02
CORRECTION_RANGE = (1e-3, 1e4)
# segments shorter than this (measured) do not correct op classes: the runtime's own
# per-segment overhead (~0.05-0.1 ms in Python here) would swamp their ops
MIN_SEGMENT_US = 300.0


def example_arrays(example_inputs: Iterable, sig: dict) -> list:
    """The example inputs as numpy arrays; for inputs given only as shapes (ONNX), zeros for
    integers (a valid index for any table) and a fixed normal sample for floats."""
    out = []
    rng = np.random.default_rng(0)
    for i, spec in enumerate(sig["inputs"]):
        x = example_inputs[i] if i < len(example_inputs or ()) else None
        if x is not None and not isinstance(x, str):
            out.append(np.asarray(to_numpy(x) if hasattr(x, "detach") else x, order="C"))
            continue
        dt = np_dtype(spec["dtype"])
        if dt.kind in "biu":
            out.append(np.zeros(spec["shape"], dt))
        else:
            out.append(rng.standard_normal(spec["shape"]).astype(dt))
    return out


def eager_outputs(model: Any, inputs: list) -> list | None:
    """PyTorch's own outputs on the example inputs (a list of arrays), or None when the
    model is not at hand as PyTorch (an ONNX file)."""
    try:
        import torch
    except ImportError:
        return None
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.nn.Module):
        return None
    from torch.utils import _pytree

    args = [to_torch(np.array(x)) for x in inputs]
    try:
        with torch.no_grad():
            out = model(*args)
    except Exception as e:  # torch.export traced it with fake tensors, which check less than eager does
        import traceback

        from .importer import in_torch

        frames = traceback.extract_tb(e.__traceback__)
        mine = [f for f in frames if not in_torch(f.filename)] or frames
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        given = ", ".join("x".join(map(str, a.shape)) + "x" + str(a.dtype).replace("torch.", "") for a in args)
        raise PolyarchError(f"PyTorch eager fails on the example inputs ({given}), so the bundle cannot be verified: "
                            f"{type(e).__name__}: {first}", f"{mine[-1].filename}:{mine[-1].lineno}",
                            fix="give inputs of the shapes and dtypes the model takes (-i, e.g. 32x256xf32), "
                                "or compile with --no-verify if eager is not the reference") from None
    kinds = {bool: np.bool_, int: np.int64, float: np.float32}  # numbers come back as 0-d arrays (importer)
    return [to_numpy(t) if isinstance(t, torch.Tensor) else np.asarray(t, kinds[type(t)])
            for t in _pytree.tree_leaves(out) if isinstance(t, torch.Tensor) or type(t) in kinds]


def _placement(modules):
    """What identifies a plan: every segment's device and op count, per plan."""
    from .modules import segments_of
    from ..passes.common import body_ops
    from ..dialects import polyarch as pa

    key = []
    for name, module in modules:
        for seg, device, fn in segments_of(module):
            key.append((name, device, tuple(op.operation.name for op in body_ops(fn)[0] if pa.is_placed(op))))
    return tuple(key)


def _record_wrong(priced, record, progress):
    """Culprits of a wrong plan -> verdicts (in this compile and in the per-host cache)."""
    n = 0
    for c in record["culprits"]:
        device = record["segments"][c["segment"]]["device"]
        ident = priced["devices"][device]["identity"]
        err = "no single op wrong alone (fused code)" if c.get("fused") else f"max error {c['max_rel_error']:.2g} of max output"
        reason = (f"measured wrong on {device} ({ident['name'] if ident else device}): {err} against llvm-cpu; "
                  f"IREE {measured.iree_version()}")
        wrong = priced["verdicts"][device]["wrong_ops"]
        if c["fingerprint"] not in wrong:
            n += 1
        wrong[c["fingerprint"]] = {"op": c["op"], "path": c["path"], "reason": reason, "error": c["max_rel_error"],
                                   "date": measured.now()}
        if ident:  # a fact about the device, whatever profile priced it
            cached = measured.load_verdicts(ident)
            cached["wrong_ops"][c["fingerprint"]] = wrong[c["fingerprint"]]
            measured.store_verdicts(ident, cached)
    progress(f"{n} op kind(s) measured wrong; re-planning without them there")
    return n


def _update_corrections(priced, plan_manifest, record, applied):
    """Per device and op class, measured / predicted over the plan's segments (time-weighted),
    folded into the corrections the next partition uses (and the per-host cache). applied:
    {device: {class: factor}}, the corrections the plan's predictions were made with.

    The ratios are taken against the predictions without corrections (the profile's own), and
    a class's new correction is the geometric mean of its previous one and this plan's ratio
    (the ratio alone the first time): a correction stays within the ratios measured. Taken
    against the corrected predictions and multiplied in (as before), corrections ran away
    where no correction per class explains the segments (docs/architecture.md)."""
    acc = _segment_ratios(priced, plan_manifest, record, applied)
    changed = {}
    for device, classes in acc.items():
        corr = priced["verdicts"][device]["corrections"]
        for klass, (num, den) in classes.items():
            if den <= 0:
                continue
            lo, hi = CORRECTION_RANGE
            factor = min(hi, max(lo, num / den))
            corr[klass] = (corr[klass] * factor) ** 0.5 if klass in corr else factor
            changed.setdefault(device, {})[klass] = round(corr[klass], 4)
        info = priced["devices"][device]
        if info["identity"] and info["source"].startswith("measured"):
            cached = measured.load_verdicts(info["identity"])
            cached["corrections"] = dict(corr)
            measured.store_verdicts(info["identity"], cached)
    return changed


def _segment_ratios(priced, plan_manifest, record, applied):
    """{device: {class: [sum of profile-predicted time x measured / predicted, sum of
    profile-predicted time]}} over the plan's segments, and "transfer" for devices off the CPU."""
    from ..passes.annotate_costs import class_of
    from ..runtime.identity import is_software

    profs = {p.device: p for p in priced["profiles"]}
    used = {s["device"] for s in plan_manifest["segments"]}
    # a device emulated on the CPU's cores (lavapipe) slows CPU work in the same process while it
    # is live: CPU segments measured beside one say little about the CPU alone
    emulated = any(is_software(priced["devices"][d]["identity"]) for d in used)
    acc = {}
    for seg in plan_manifest["segments"]:
        got = record["segments"].get(seg["name"], {}).get("measured_us")
        pred = seg["predicted_us"]
        if not got or pred <= 0 or got < MIN_SEGMENT_US:
            continue  # a short segment measures the runtime's overhead more than its ops
        if emulated and seg["device"].startswith("cpu"):
            continue
        before = applied.get(seg["device"], {})
        ops = [(class_of(op["op"]) or "other", op["predicted_us"]) for op in seg["op_list"]]
        raw = [(klass, t / before.get(klass, 1.0)) for klass, t in ops]  # the profile's own prediction
        beside = max(0.0, pred - sum(t for _, t in ops))  # what the segment predicts beside its ops
        raw_pred = sum(t for _, t in raw) + beside
        if raw_pred <= 0:
            continue
        call_us = profs[seg["device"]].call_s * 1e6 if seg["device"] in profs else 0.0
        ratio = max(got - call_us, 0.1 * got) / raw_pred
        for klass, w in raw:
            a = acc.setdefault(seg["device"], {}).setdefault(klass, [0.0, 0.0])
            a[0] += w * ratio
            a[1] += w
    # What the segments do not explain (moving tensors, waiting on devices) against what the
    # plan predicted for its transfers: the "transfer" correction of the devices off the CPU
    # (passes/assign_devices.py multiplies a transfer's time by the larger of its two ends'
    # corrections, the host's being 1).
    seg_meas = sum(record["segments"].get(s["name"], {}).get("measured_us") or 0.0 for s in plan_manifest["segments"])
    seg_pred = sum(s["predicted_us"] for s in plan_manifest["segments"])
    pred_rest = plan_manifest["plan"]["predicted_us"] - seg_pred
    off_cpu = {s["device"] for s in plan_manifest["segments"] if not s["device"].startswith("cpu")}
    if off_cpu and pred_rest > 0 and record.get("measured_us"):
        rest = max(record["measured_us"] - seg_meas - (priced.get("host_overhead_us") or 0.0), 0.0)
        for device in off_cpu:
            acc.setdefault(device, {})["transfer"] = [rest, pred_rest / max(1.0, applied.get(device, {}).get("transfer", 1.0))]
    return acc


def ground(model: Any, example_inputs: Iterable, base: "ir.Module", sig: dict, sets: list, pins: Iterable,
           objective: str, solver: str, priced: dict, tmp: str, jobs: int | None = None,
           progress: Callable[[str], None] | None = None, extra_flags: Iterable = (), tune: str = "none") -> tuple:
    """The compile loop above. -> (path of the chosen bundle in tmp, its manifest with
    verification, measured times and the rounds' history)."""
    from .planning import partition

    progress = progress or (lambda m: None)
    inputs = example_arrays(example_inputs, sig)
    expected = eager_outputs(model, inputs)
    plan = lambda say=progress: partition(base, sets, pins, say, objective, solver, priced, keep_base=True)
    rounds = _Rounds(sig, priced, tmp, inputs, expected, jobs, progress, extra_flags, tune)
    for rnd in range(1, MAX_ROUNDS + 1):
        if not rounds.run(rnd, plan()):
            break
    if rounds.best is None:
        raise PolyarchError(f"no plan verified right within {MAX_ROUNDS} rounds",
                            fix="compile for cpu alone, or with --no-verify to write an unverified bundle")
    _, path, manifest, modules = rounds.best
    if not pins:
        path, manifest, modules = _single_device_check(base, sig, sets, objective, solver, priced, tmp, inputs, expected,
                                                       path, manifest, modules, jobs, progress, extra_flags, tune)
    _final_prediction(manifest, modules, plan(lambda m: None), priced, rounds.history)
    return path, manifest


class _Rounds:
    """The rounds of ground(): each compiles the plans, verifies and times them, and keeps
    off their devices the ops measured wrong or corrects the cost model by the times measured."""

    def __init__(self, sig, priced, tmp, inputs, expected, jobs, progress, extra_flags, tune):
        self.sig, self.priced, self.tmp, self.inputs, self.expected = sig, priced, tmp, inputs, expected
        self.jobs, self.progress, self.extra_flags, self.tune = jobs, progress, extra_flags, tune
        self.present = {d for d, info in priced["devices"].items() if info["identity"]}
        self.history, self.best, self.seen = [], None, set()

    def run(self, rnd, modules):
        """One round on a partition. -> False when the plan is one already measured (done)."""
        from .build import build_bundle

        key = _placement(modules)
        if key in self.seen:
            self.progress(f"round {rnd}: the plan is one already measured; done")
            return False
        self.seen.add(key)
        path = os.path.join(self.tmp, f"round{rnd}.pab")
        manifest = build_bundle(modules, self.sig, path, jobs=self.jobs, progress=self.progress,
                                extra_flags=self.extra_flags, tune=self.tune)
        records = {name: verify_plan(module, name, path, self.inputs, self.expected, self.present, jobs=self.jobs,
                                     progress=self.progress) for name, module in modules}
        entry = {"round": rnd, "plans": {}}
        for p in manifest["plans"]:
            r = records[p["name"]]
            entry["plans"][p["name"]] = {"segments": [f"{s['name']}:{s['device']}" for s in p["segments"]],
                                         "predicted_us": p["plan"]["predicted_us"], "measured_us": r.get("measured_us"),
                                         "status": r["status"]}
        self.history.append(entry)
        wrong = [(n, r) for n, r in records.items() if r["status"] == "wrong"]
        if wrong:
            self.wrong(wrong, entry)
        else:
            self.right(rnd, path, manifest, modules, records, entry)
        return True

    def wrong(self, wrong, entry):
        """Ops measured wrong are recorded against their device (and kept off it next round)."""
        found = 0
        for name, r in wrong:
            if not r["culprits"]:
                w = r.get("whole", {})
                raise PolyarchError(
                    f"plan {name} computes wrong ({w.get('max_rel_error', float('nan')):.2g} of the largest output "
                    f"against {w.get('against', 'the reference')}) and no single segment is to blame (each "
                    f"off-CPU segment matches llvm-cpu)",
                    fix="the compiled CPU code differs from PyTorch: report the model; `--no-verify` writes the "
                        "bundle anyway")
            found += _record_wrong(self.priced, r, self.progress)
        entry["wrong_ops"] = [c["describe"] for _, r in wrong for c in r["culprits"]]
        if not found:
            raise PolyarchError("verification found the same ops wrong again after re-planning",
                                fix="report the model; `--no-verify` skips verification")

    def right(self, rnd, path, manifest, modules, records, entry):
        """Every plan verified: the fastest round so far is kept, the cost model corrected."""
        score = sum(r.get("measured_us") or 0.0 for r in records.values())
        for p in manifest["plans"]:
            _attach(p, records[p["name"]])
            _host_overhead(self.priced, p, records[p["name"]])
        if self.best is None or score < self.best[0]:
            self.best = (score, path, manifest, modules)
        changed = {}
        applied = {d: dict(v["corrections"]) for d, v in self.priced["verdicts"].items()}  # the plans were priced with
        for p in manifest["plans"]:
            if records[p["name"]].get("measured_us"):
                changed.update(_update_corrections(self.priced, p, records[p["name"]], applied))
        entry["corrections"] = changed
        self.progress(f"round {rnd}: measured " + ", ".join(
            f"{p['name']} {p.get('measured_us', 0) / 1e3:.3f} ms (predicted {p['plan']['predicted_us'] / 1e3:.3f} ms)"
            for p in manifest["plans"]) + "; re-planning with the measured times")


def _final_prediction(manifest, modules, final, priced, history):
    """The final prediction: the chosen placement re-costed with every correction measured
    (where re-planning gives another placement, the chosen plan's own prediction), plus the
    runtime's measured overhead per call; and the rounds' history, in each plan's record."""
    from ..dialects import polyarch as pa

    for p, (_, module) in zip(manifest["plans"], final):
        same = _placement([(p["name"], module)]) == _placement([(n, m) for n, m in modules if n == p["name"]])
        pred = pa.Plan.of(module).summary["predicted_us"] if same else p["plan"]["predicted_us"]
        p["plan"]["predicted_corrected_us"] = round(pred + (priced.get("host_overhead_us") or 0.0), 3)
        p["verification"]["rounds"] = history


def _host_overhead(priced, plan, record):
    """The runtime's own time per call (input checks, uploads, reading outputs back: what a
    call on the CPU alone spends outside its segments), measured; priced["host_overhead_us"].
    The cost model's plans do not include it; the corrected prediction and the transfer
    correction do."""
    segs = plan["segments"]
    if record.get("measured_us") and all(s["device"].startswith("cpu") for s in segs) and all(
            s.get("measured_us") for s in segs):
        priced["host_overhead_us"] = max(0.0, record["measured_us"] - sum(s["measured_us"] for s in segs))


def _attach(plan, record):
    """Put a verification record into a plan's manifest entry."""
    plan["verification"] = {k: v for k, v in record.items() if k not in ("segments", "measured_us")}
    plan["verification"]["segments"] = {n: {k: v for k, v in s.items() if k != "measured_us"}
                                        for n, s in record.get("segments", {}).items()}
    if record.get("measured_us"):
        plan["measured_us"] = record["measured_us"]
    for seg in plan["segments"]:
        got = record.get("segments", {}).get(seg["name"], {}).get("measured_us")
        if got:
            seg["measured_us"] = got


def _single_device_check(base, sig, sets, objective, solver, priced, tmp, inputs, expected, path, manifest,
                         modules, jobs, progress, extra_flags, tune):
    """Measure each multi-device plan against the CPU alone; keep the faster (see the module doc)."""
    from .build import build_bundle
    from .options import parse_device_sets
    from .planning import partition

    if len(sets) != 1:
        return path, manifest, modules  # several plans: each already competes at load by measured time
    plan = manifest["plans"][0]
    used = {s["device"] for s in plan["segments"]}
    cpu = [s.name for s in sets[0] if s.kind == "cpu"]
    if not cpu or used == {cpu[0]} or not plan.get("measured_us"):  # (a plan all on another device counts too)
        return path, manifest, modules
    progress(f"measuring {cpu[0]} alone against the {'+'.join(sorted(used))} plan")
    single = partition(base, parse_device_sets([[cpu[0]]]), (), progress, objective, solver, priced, keep_base=True)
    alt = os.path.join(tmp, "single.pab")
    alt_manifest = build_bundle([(plan["name"], single[0][1])], sig, alt, jobs=jobs, progress=progress,
                                extra_flags=extra_flags, tune=tune)
    rec = verify_plan(single[0][1], plan["name"], alt, inputs, expected, {cpu[0]}, jobs=jobs, progress=progress)
    multi_us, single_us = plan["measured_us"], rec.get("measured_us")
    if rec["status"] != "verified" or not single_us or single_us * SINGLE_MARGIN >= multi_us:
        progress(f"kept the {'+'.join(sorted(used))} plan: {multi_us / 1e3:.3f} ms measured, {cpu[0]} alone "
                 f"{(single_us or 0) / 1e3:.3f} ms")
        plan.setdefault("verification", {})["single_device"] = {"device": cpu[0], "measured_us": single_us}
        return path, manifest, modules
    progress(f"{cpu[0]} alone measured faster ({single_us / 1e3:.3f} ms) than the {'+'.join(sorted(used))} plan "
             f"({multi_us / 1e3:.3f} ms): the bundle runs on {cpu[0]} alone")
    new = alt_manifest["plans"][0]
    _attach(new, rec)
    _host_overhead(priced, new, rec)
    new["verification"]["single_device"] = {"device": cpu[0], "measured_us": single_us,
                                            "replaced": {"devices": sorted(used), "measured_us": multi_us}}
    return alt, alt_manifest, single
