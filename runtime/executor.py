"""Run a bundle's schedule: segments in order, tensors moved between devices via host memory."""

import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from ..errors import BundleError, DeviceError, IndexRangeError
from .bundle import Members, aligned_empty, read_manifest
from .devices import DeviceSpec
from .dtypes import np_dtype, to_numpy, to_torch
from .identity import iree_version

if TYPE_CHECKING:
    import iree.runtime as rt

__all__ = ["Bundle", "Resident", "PhaseCall", "create_device", "take_module", "available_devices", "to_host", "check_inputs", "first_out_of_range",
           "index_bounds"]



def _rt():
    import iree.runtime as rt

    return rt


# IREE's cpu task workers keep spinning this long for the next task before they sleep: a decode
# call is ~180 dependent dispatches, and waking the workers for each cost 5-10% of it
# (bench/generate.py's model: 10.6-12.4 -> 10.1-10.5 ms a token, A B B A; docs/architecture.md).
CPU_WORKER_SPIN_US = 50


def _host_spin_s(raw: str) -> "float | None":
    """POLYARCH_HOST_SPIN_MS's milliseconds as seconds; None where it is not a number >= 0
    (create_device then refuses to start, naming it)."""
    try:
        ms = float(raw)
    except ValueError:
        return None
    return ms / 1e3 if ms >= 0 and ms != float("inf") else None


# The host's wait for a device's timeline polls its semaphore, yielding the core between looks,
# for up to this long, then blocks in the kernel. A host thread blocked in the kernel is woken
# by the worker that signals; on a 2-core Zen 4 VM (a Firecracker guest) 20-30% of the 100M
# model's f16 decode calls came back 2-5 ms late that way (a token: p90 7.6-8.1 ms against a
# median of 4.2-4.9), and none when the host polled with sched_yield (p90 5.0-5.6): llama.cpp's
# threads wait the same way (docs/cpu-speed.md). POLYARCH_HOST_SPIN_MS sets it (0: block at once).
HOST_SPIN_ENV = os.environ.get("POLYARCH_HOST_SPIN_MS", "50")
HOST_SPIN_S = _host_spin_s(HOST_SPIN_ENV)


def wait_for(sem: "rt.HalSemaphore", value: int) -> None:
    """Wait until `sem` reaches `value` (HOST_SPIN_S of polling, then blocking); raises the
    device's error where the timeline failed (the final `wait` reports it)."""
    if HOST_SPIN_S:
        query, yield_, clock = sem.query, os.sched_yield, time.perf_counter
        end = clock() + HOST_SPIN_S
        try:
            while query() < value and clock() < end:
                yield_()
        except RuntimeError:  # a failed timeline: `wait` raises its error as it always did
            pass
    sem.wait(value)


@functools.cache
def _cpu_driver_flags() -> None:
    """Set the cpu driver's flags, once, before the process creates it (flags read then)."""
    _rt().flags.parse_flags(f"--task_worker_spin_us={CPU_WORKER_SPIN_US}")


def available_devices() -> list:
    """{driver: [device info dicts]} for the IREE drivers that find devices on this host."""
    rt = _rt()
    _cpu_driver_flags()
    out = {}
    for driver in ("local-task", "vulkan", "cuda", "hip"):
        try:
            out[driver] = rt.get_driver(driver).query_available_devices()
        except Exception:
            out[driver] = []
    return out


def take_module(ctx: "rt.SystemContext", name: str | None = "module"):
    """ctx's BoundModule `name` (None: none), with ctx's own dict of them cleared. IREE's
    SystemContext and its BoundModules refer to each other, so a context, and its device, lived
    on until the garbage collector ran; an IREE Vulkan device on lavapipe keeps two threads
    polling at 100% of a core each while it lives (docs/architecture.md). Afterwards the module
    keeps the context alive, not the other way round: the device goes with the last reference.
    Call it once the context has all its modules."""
    mod = ctx.modules[name] if name is not None else None
    ctx.modules.clear()
    return mod


def create_device(spec: DeviceSpec | str) -> "rt.HalDevice":
    """The IREE HalDevice for a device spec, or DeviceError naming what is missing."""
    rt = _rt()
    if HOST_SPIN_S is None:
        raise DeviceError(f"POLYARCH_HOST_SPIN_MS={HOST_SPIN_ENV!r} is not a number of milliseconds",
                          fix="set it to a number >= 0 (how long the host polls a device before it blocks; 0 blocks "
                              "at once) or unset it (50)")
    spec = DeviceSpec.parse(spec)
    if spec.kind == "cpu":
        _cpu_driver_flags()
        return rt.get_device("local-task")
    try:
        driver = rt.get_driver(spec.driver)
        infos = driver.query_available_devices()
    except Exception as e:
        infos, err = [], str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        err = "no device found"
    if spec.ordinal >= len(infos):
        hint = spec.target.install_hint
        raise DeviceError(
            f"device '{spec.name}' is not available on this host (IREE driver '{spec.driver}': "
            f"{len(infos)} device(s), {err if not infos else 'ordinal out of range'})",
            fix=(f"{hint}; or " if hint else "") + f"load with devices={{'{spec.name}': 'cpu'}}, only if a cpu "
                "segment was compiled for it",
        )
    return driver.create_device(infos[spec.ordinal]["device_id"])


def to_host(device: "rt.HalDevice", value: "rt.DeviceArray") -> np.ndarray:
    """A DeviceArray as a numpy array (of its own dtype), owned by the host."""
    rt = _rt()
    bv = value._buffer_view
    shape = list(bv.shape)
    if value._is_mappable():
        host = value.to_host()
    else:
        # Device-local memory: copy into a page-aligned host allocation imported into the device.
        src = bv.get_buffer()
        n = src.byte_length()
        staging = aligned_empty(n)
        imported = device.allocator.import_host_allocation(
            staging,
            memory_type=int(rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE),
            allowed_usage=int(rt.BufferUsage.TRANSFER_TARGET | rt.BufferUsage.MAPPING_PERSISTENT),
        )
        sem = device.create_semaphore(0)
        device.queue_copy(src, imported, wait_semaphores=rt.HalFence.create_at(sem, 0), signal_semaphores=rt.HalFence.create_at(sem, 1))
        wait_for(sem, 1)
        raw_dtype = rt.HalElementType.map_to_dtype(bv.element_type)
        host = staging[:n].view(raw_dtype).reshape(shape)
    return np.array(host, copy=True)


def _is_torch(a):
    """A torch tensor, recognised without importing torch."""
    return hasattr(a, "detach") and hasattr(a, "numpy")


log = logging.getLogger("polyarch.runtime")


class Bundle:
    """A loaded bundle: call it with numpy arrays (or anything np.asarray takes).

    path     the .pab file, read into memory and checked there: changing the file afterwards
             changes nothing here
    mmap     True: map the file instead of reading it (modules and weights used in place, for
             weights too large to hold twice); the file must then not be rewritten in place
             while loaded (replace it by renaming), or this process may die of SIGBUS
    devices  optional {bundle device name: local device spec}, e.g. {"vulkan": "vulkan:1"}
    plan     the name of the placement plan to run (see `plans`); default: the plan with
             the lowest predicted time whose devices are all present on this host
    strict   True: if that plan (the named one, or else the best of all) cannot run here,
             raise DeviceError instead of falling back to another plan
    only_devices  load only the segments of these bundle devices (a Ray worker's share,
             runtime/ray_executor.py)
    trusted_keys  Ed25519 public keys (paths or PEM bytes): the manifest must be signed by
             one of them, checked before the file is mapped (runtime/signing.py)
    The plan chosen and why is in `plan_name` and `choice`, and logged (logger
    "polyarch.runtime", INFO; a fallback is a WARNING)."""

    def __init__(self, path, devices=None, plan=None, strict=False, only_devices=None, trusted_keys=None, mmap=False):
        rt = _rt()
        self._only = set(only_devices) if only_devices is not None else None  # a Ray worker's share
        self._closed = False
        self.path = str(path)
        self.manifest, raw = read_manifest(self.path, raw=True)
        from .signing import check, key_list

        trusted_keys = key_list(trusted_keys)  # an empty list or a string is an error, never "no check"
        if trusted_keys is not None:  # on the very manifest the members are checked against next
            check(self.path, trusted_keys, manifest=raw)
        # Read into memory and checked there (the bytes checked are the bytes run), or mapped.
        self._members = Members(self.path, self.manifest, mmap=mmap)
        self.plans = [p["name"] for p in self.manifest["plans"]]
        remap = dict(devices or {})
        known = {d for p in self.manifest["plans"] for d in p["devices"]}
        unknown = set(remap) - known
        if unknown:
            raise DeviceError(f"devices={remap} names {', '.join(sorted(unknown))}, which the bundle does not use",
                              fix=f"map the bundle's devices: {', '.join(sorted(known))}")
        self.plan, self.devices = self._choose(plan, strict, remap)
        self.plan_name = self.plan["name"]
        self.instance = rt.VmInstance()
        self._async = {}  # segment -> (VmContext, its `$async` function, manifest entry)
        self._contexts = []
        self._splat_buffers = []
        self._sems = {d: dev.create_semaphore(0) for d, dev in self.devices.items()}  # one timeline per device
        self._ticks = {d: 0 for d in self.devices}
        params = self._parameter_archive()
        for seg in self.plan["segments"]:
            if self._only is not None and seg["device"] not in self._only:
                continue
            dev = self.devices[seg["device"]]
            config = rt.Config(device=dev)
            ctx = rt.SystemContext(config=config)
            if "parameters" in seg:
                ctx.add_vm_module(self._parameters_module(ctx, params, seg))
            vm = self._module(ctx, seg)
            take_module(ctx, None)  # only the VmContext is used: freed with the last reference
            self._contexts.append(ctx)
            fn = vm.lookup_function(seg["function"] + "$async")
            if fn is None:
                raise BundleError(f"module {seg['member']} of {self.path} exports no {seg['function']}$async",
                                  fix="recompile it with `polyarch compile` (IREE 3.13 or newer)")
            self._async[seg["name"]] = (ctx.vm_context, fn, seg)
        if params is not None:
            # The modules' initialisers have loaded their parameters into device memory: the
            # archive's pages (read for the hash check) need not stay resident.
            self._members.drop_pages(self.manifest["parameters"]["member"])
        sig = self.manifest["signature"]
        self.inputs, self.outputs = sig["inputs"], sig["outputs"]
        self.phases = list(self.plan.get("phases", {}))  # a --generate bundle: prefill, decode
        self.trace = False  # True: keep every call's events in self.events (polyarch run --trace)
        self.events = []
        self.reset_counters()

    def _module(self, ctx, seg):
        """The segment's IREE module, added to its context; a member that IREE cannot load (its
        hash matched the manifest, but the bytes are no module of this IREE) is a BundleError."""
        rt = _rt()
        view = self._members.views[seg["member"]]
        try:
            if self._members.aligned[seg["member"]]:
                vm = rt.VmModule.wrap_buffer(ctx.instance, view)
            else:  # a schema-1 bundle (unaligned members): the module needs its own aligned copy
                vm = rt.VmModule.copy_buffer(ctx.instance, view)
            ctx.add_vm_module(vm)
        except (RuntimeError, ValueError, TypeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BundleError(f"module {seg['member']} of {self.path} does not load in IREE {iree_version()}: "
                              f"{first}", fix="recompile the bundle with `polyarch compile` on this polyarch") from None
        return vm

    def _choose(self, name, strict, remap):
        """-> (plan dict, {device name: HalDevice}) for the plan to run, probing devices
        in order of the plans' predicted times and keeping only the chosen plan's."""
        plans = self.manifest["plans"]
        if name is not None and name not in self.plans:
            raise DeviceError(f"the bundle has no plan '{name}'", fix=f"choose one of: {', '.join(self.plans)}")
        # measured times (compile-time verification on the devices at hand) before predictions
        order = sorted(range(len(plans)), key=lambda i: (plan_time_us(plans[i]), i))
        wanted = plans[self.plans.index(name)] if name is not None else plans[order[0]]
        probed, skipped = {}, []

        def devices_of(plan: dict) -> list:
            out = {}
            for d in dict.fromkeys(s["device"] for s in plan["segments"]):
                if self._only is not None and d not in self._only:
                    continue
                if d not in probed:
                    try:
                        probed[d] = create_device(remap.get(d, d))
                    except DeviceError as e:
                        probed[d] = e
                if isinstance(probed[d], DeviceError):
                    return None, probed[d]
                out[d] = probed[d]
            return out, None

        candidates = [wanted] + [plans[i] for i in order if plans[i] is not wanted]
        for plan in candidates:
            devs, err = devices_of(plan)
            if devs is not None:
                break
            skipped.append((plan, err))
            if strict:
                raise DeviceError(
                    f"plan '{plan['name']}' of {self.path} cannot run here: {err.what}",
                    fix=f"{err.fix}; or load without strict to fall back to another plan ({', '.join(self.plans)})"
                    if getattr(err, "fix", None) else "load without strict to fall back to another plan",
                )
        else:
            reasons = "; ".join(f"'{p['name']}': {e.what}" for p, e in skipped)
            raise DeviceError(f"no plan of {self.path} can run on this host ({reasons})",
                              fix=getattr(skipped[0][1], "fix", None))
        which = "measured" if plan.get("measured_us") else "predicted"
        why = "named" if name is not None and plan is wanted else (
            f"the lowest {which} time" if plan is wanted else f"the fastest {which} plan whose devices are present")
        pred = plan.get("plan", {}).get("predicted_us")
        self.choice = f"plan '{plan['name']}' ({why}" + (f", predicted {pred / 1e3:.3f} ms" if pred else "") + (
            f", measured {plan['measured_us'] / 1e3:.3f} ms when compiled" if plan.get("measured_us") else "") + ")"
        if skipped:
            self.choice += "; skipped " + "; ".join(f"'{p['name']}' ({e.what})" for p, e in skipped)
            log.warning("%s: %s", self.path, self.choice)
        else:
            log.info("%s: %s", self.path, self.choice)
        return plan, devs

    def _parameter_archive(self):
        """The bundle's shared parameter archive, indexed in place: {content key: (file handle, offset, length)}."""
        meta = self.manifest.get("parameters")
        if not meta:
            return None
        rt = _rt()
        view = self._members.views[meta["member"]]
        handle = rt.FileHandle.wrap_memory(view, readable=True, writable=False)
        index = rt.ParameterIndex()
        try:
            index.load_from_file_handle(handle, meta.get("format", "irpa"))
        except Exception as e:
            raise BundleError(f"the parameter archive '{meta['member']}' of {self.path} is unreadable: {e}",
                              fix="recompile it with `polyarch compile`")
        entries = {}
        for key, entry in index.items():
            fh, offset = entry.file_storage[:2]
            entries[key] = (handle, offset, entry.length)
        return entries

    def _parameters_module(self, ctx, archive, seg):
        """The io_parameters module that serves a segment's keys from the shared archive."""
        rt = _rt()
        if archive is None and any(not c.startswith("splat:") for c in seg["parameters"]["keys"].values()):
            raise BundleError(f"segment {seg['name']} of {self.path} reads parameters but the bundle has no archive",
                              fix="recompile it with `polyarch compile`")
        index = rt.ParameterIndex()
        keep = self._splat_buffers  # host copies of wide splats, alive as long as the bundle
        for key, content in seg["parameters"]["keys"].items():
            if content.startswith("splat:"):  # "splat:<pattern hex>:<length>" (compiler/parameters.py)
                _, pattern, length = content.split(":")
                pattern, length = _fill_pattern(bytes.fromhex(pattern)), int(length)
                if len(pattern) in (1, 2, 4):
                    index.add_splat(key, pattern, length)
                else:  # devices fill with 1-, 2- or 4-byte patterns only (Vulkan refuses an i64 splat)
                    keep.append(np.frombuffer(pattern * (length // len(pattern)), np.uint8))
                    index.add_buffer(key, keep[-1])
                continue
            if content not in archive:
                raise BundleError(f"parameter {content} (for {seg['name']}::{key}) is missing from {self.path}",
                                  fix="recompile it with `polyarch compile`")
            handle, offset, length = archive[content]
            index.add_from_file_handle(key, handle, length, offset)
        return rt.create_io_parameters_module(ctx.instance, index.create_provider(scope=seg["parameters"]["scope"]))

    def reset_counters(self) -> None:
        """Zero `counters`: calls, seconds, and bytes and seconds spent moving tensors."""
        self.counters = {"calls": 0, "seconds": 0.0, "transfers": 0, "bytes_moved": 0, "transfer_seconds": 0.0,
                         "segment_seconds": {d: 0.0 for d in self.devices}, "state_host_bytes": 0}

    def __call__(self, *args, **named):
        """Run the bundle. numpy arrays (or anything np.asarray takes) in, numpy out; torch
        tensors in, torch tensors out (sharing the host arrays' memory, through DLPack).
        Inputs go in order, or by name (`b(ids=a)`, the names `inputs` lists). Lists and
        Python numbers take the input's dtype where that loses nothing of their kind.
        Each segment runs to completion before the next (timed per segment, see counters);
        for a stream of requests, `stream` overlaps them."""
        if named:
            args = _by_name(self.path, self.inputs, args, named)
        return self._collect(self._submit(args, wait_each=True))

    def run_phase(self, phase: str, args: list, keep: Iterable = (), state: Iterable = ()) -> list:
        """Run one phase of a --generate bundle (`phases`: prefill, decode). args: host arrays,
        or `Resident` values that an earlier call kept on their device (passed on without a
        copy through the host); keep: indices of outputs to leave on their device (returned as
        `Resident`), the others read back as numpy arrays; state: indices of the inputs that
        are state (the cache). -> the outputs, as a list. Counters: `state_host_bytes` counts
        the bytes of state that crossed the host (state inputs given as host arrays, kept
        outputs read back)."""
        pending = self._start_phase(phase, args, state, wait_each=True)
        return self._collect(pending.call, pending.outputs, pending.specs, set(keep))

    def start_phase(self, phase: str, args: list, state: Iterable = ()) -> "PhaseCall":
        """Issue one call of a phase (run_phase's arguments) and return without waiting for
        it: its device works on it while the host goes on. `PhaseCall.resident(j)` is its
        output j left on its device, an input for a later call at once (a device runs its
        calls in order); `finish_phase` waits for outputs and reads them back. The calls of
        a plan that spans devices still wait where a tensor crosses to another device."""
        return self._start_phase(phase, args, state, wait_each=False)

    def finish_phase(self, pending: "PhaseCall", read: Iterable) -> list:
        """Wait for a started call's outputs `read` (indices) and read them back. -> numpy arrays."""
        read = list(read)
        return self._collect(pending.call, [pending.outputs[j] for j in read], [pending.specs[j] for j in read])

    def _start_phase(self, phase, args, state, wait_each):
        schedule, outputs, specs, out_specs = self._phase(phase)
        state = set(state)
        host = [(i, a) for i, a in enumerate(args) if not isinstance(a, Resident)]
        if len(args) != len(specs):
            raise BundleError(f"phase {phase} of {self.path} takes {len(specs)} input(s), got {len(args)}",
                              fix="pass " + ", ".join(s["name"] for s in specs))
        checked = check_inputs(self.path, [specs[i] for i, _ in host], [a for _, a in host])
        if phase.endswith("prefill") and host and host[0][0] == 0:
            self._check_prefill_length(checked[0])
        full = list(args)
        for (i, _), a in zip(host, checked):
            full[i] = a
            if i in state:
                self.counters["state_host_bytes"] += int(a.nbytes)
        return PhaseCall(self._submit(full, wait_each=wait_each, schedule=schedule, checked=True), outputs, out_specs)

    def _check_prefill_length(self, ids) -> None:
        """A --generate bundle's prefill takes its ids padded (with -1) to a multiple of
        generate.prefill_multiple: IREE miscompiles its attention for other lengths."""
        multiple = (self.manifest.get("generate") or {}).get("prefill_multiple", 1)
        n = ids.shape[-1] if getattr(ids, "ndim", 0) else 0
        if multiple > 1 and n % multiple:
            raise BundleError(f"prefill of {self.path} takes its ids padded to a multiple of {multiple} tokens, "
                              f"got {n}", fix=f"pad the prompt's end with -1 to {-(-n // multiple) * multiple} "
                                              "tokens, or use Bundle.generate, which does")

    def _phase(self, phase):
        """(schedule, outputs, input specs, output specs) of a phase of the chosen plan."""
        p = self.plan.get("phases", {}).get(phase)
        if p is None:
            raise BundleError(f"{self.path} has no phase {phase!r}" + (f" (its phases: {', '.join(self.phases)})"
                                                                        if self.phases else ""),
                              fix="compile the model with --generate (CompileOptions(generate=True)) for prefill and decode")
        sig = self.manifest["phases"][phase]["signature"]
        return p["schedule"], p["outputs"], sig["inputs"], sig["outputs"]

    def generate(self, prompt_ids, max_new_tokens: int = 32, **sampling) -> "Iterator":
        """Generate from a --generate bundle: see runtime/generate.py (`Generation`)."""
        from .generate import Generator

        if getattr(self, "_generator", None) is None:
            self._generator = Generator(self)
        return self._generator.generate(prompt_ids, max_new_tokens, **sampling)

    def close(self) -> None:
        """Release the bundle's modules, device memory and file mapping (after the calls in
        flight are done); a later call raises BundleError. Also `with load(...) as b:`."""
        gen = getattr(self, "_generator", None)
        if gen is not None:  # its caches are device buffers: freed now, while their device is held
            gen.release()
            self._generator = None
        self._release()
        self._closed = True
        self._members.close()

    def _release(self) -> None:
        """Let go of the devices now. An IREE Vulkan device on lavapipe keeps two threads
        polling at 100% of a core each for as long as it lives, idle or not (IREE 3.13, Mesa
        22.3): a device kept after close, or until the garbage collector found it (take_module),
        took the host's two cores from everything else (docs/architecture.md).
        Semaphores go before their devices: the other order crashes in lavapipe. Tensors
        still held elsewhere (a Generator's cache, a Resident) hold their device and
        semaphore (_OnDevice.owner), so these go only with the last of them."""
        self._sems = {}
        self._async = {}
        self._contexts = []
        self._splat_buffers = []
        self.devices = {}

    def __del__(self):
        if "devices" in self.__dict__:  # __init__ got as far as choosing devices
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stream(self, requests: Iterable, depth: int = 2) -> Iterator:
        """Run a stream of requests pipelined: yields each request's outputs, in order.

        requests: an iterable of argument tuples (or of single arrays for one-input bundles).
        depth: requests in flight at once. Segments are invoked through IREE's async entry
        points and chained with fences on their device; the host only waits where a tensor
        must cross devices or an output is read back, so while one request's later segments
        run on one device, the next request's earlier segments run on another, and its
        transfers overlap that compute. Counters count these calls; per-device segment
        seconds are not measured in this mode (the trace shows issue -> observed completion)."""
        return pipelined(lambda args: self._submit(args, wait_each=False), self._collect, requests, depth, settle)

    def _submit(self, args, wait_each, schedule=None, checked=False):
        """Issue every step of one call; -> the call in flight (outputs not yet read back)."""
        if self._closed:
            raise BundleError(f"{self.path} was closed", fix="load it again: polyarch.runtime.load(path)")
        as_torch = any(_is_torch(a) for a in args)
        if not checked:
            args = check_inputs(self.path, self.inputs, args)
            if schedule is None and args:  # the plan's own schedule: a --generate bundle's is prefill's
                self._check_prefill_length(args[0])
        clock = time.perf_counter
        call = _Call(clock(), as_torch)
        env = {f"in{i}": (a.value if isinstance(a, Resident) else a) for i, a in enumerate(args)}
        for step in schedule if schedule is not None else self.plan["schedule"]:
            if step["op"] == "transfer":  # a tensor leaves its device: read back when a consumer needs it
                env[step["dst"]] = env[step["src"]]
                continue
            self._invoke(step, env, call, wait_each)
        call.env = env
        return call

    def _invoke(self, step, env, call, wait_each):
        """Issue one segment call of the schedule: its arguments from `env` (host arrays,
        uploaded; tensors of another device, read back first; tensors of this device,
        chained by fence), its results into `env` as tensors on the device."""
        rt = _rt()
        clock = time.perf_counter
        seg_name = step["segment"]
        vm_ctx, vm_fn, seg = self._async[seg_name]
        dname = seg["device"]
        dev = self.devices[dname]
        sem = self._sems[dname]
        bvs, waits = [], []
        for name, spec in zip(step["args"], seg["inputs"]):
            v = env[name]
            if isinstance(v, _OnDevice) and v.device != dname:
                v = env[name] = self._to_host(v, call, f"{name} to host")
            elif isinstance(v, _OnDevice) and (v.bv.element_type & 0xFF) != 8 * np_dtype(spec["dtype"]).itemsize:
                # a narrow value reaching, on its own device, a segment compiled with widened
                # inputs (a Vulkan segment run on the cpu when a plan is verified there)
                v = self._to_host(v, call, f"{name} to host")
            if isinstance(v, _OnDevice):
                bvs.append(v.bv)
                waits.append((sem, v.tick))
                continue
            if v.dtype != np_dtype(spec["dtype"]):
                v = v.astype(np_dtype(spec["dtype"]))  # narrow types travel widened to some devices
            t0 = clock()
            bvs.append(rt.asdevicearray(dev, v)._buffer_view)
            if _kind(dname) != "cpu":
                call.moved("host", dname, v.nbytes, t0, clock(), f"{name} to {dname}", self.counters)
        # A device's timeline must be signalled in order: each call also waits for the
        # device's previous one (which orders the segments of pipelined calls, too).
        waits.append((sem, self._ticks[dname]))
        wait = rt.HalFence(len(waits))
        for s_, tick in waits:
            wait.insert(s_, tick)
        self._ticks[dname] += 1
        tick = self._ticks[dname]
        signal = rt.HalFence.create_at(sem, tick)
        arg_list = rt.VmVariantList(len(bvs) + 2)
        for bv in bvs:
            arg_list.push_ref(bv)
        arg_list.push_ref(wait)
        arg_list.push_ref(signal)
        rets = rt.VmVariantList(len(step["results"]))
        t0 = clock()
        try:
            vm_ctx.invoke(vm_fn, arg_list, rets)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a check in it, or arguments it does not take
            self._failed(dname, tick, seg_name, e)
        event = {"name": seg_name, "kind": "segment", "track": dname, "start": t0 - call.t0, "dur": 0.0, "bytes": 0}
        if wait_each:
            wait_for(sem, tick)
            event["dur"] = clock() - t0
            self.counters["segment_seconds"][dname] += event["dur"]
        call.events.append(event)
        owner = (dev, sem)
        for i, name in enumerate(step["results"]):
            env[name] = _OnDevice(dname, rets.get_as_object(i, rt.HalBufferView), tick, event, owner)

    def _failed(self, dname, tick, seg_name, err):
        """A segment's invocation failed (a check in it failed: guard-indices): its signal
        fence will never be signalled, so the device's timeline is moved past it (else the
        next call would wait forever), then the failure is raised as the user's error."""
        sem = self._sems[dname]
        try:
            sem.signal(tick)
        except RuntimeError:  # IREE failed the semaphore itself: start a fresh timeline
            self._sems[dname], self._ticks[dname] = self.devices[dname].create_semaphore(0), 0
        msg = str(err)
        if "polyarch: " in msg:
            what = msg.split("polyarch: ", 1)[1].split(";", 1)[0].strip()
            raise IndexRangeError(f"{what}, in segment {seg_name} on {dname}",
                                  fix="check the inputs that this index is computed from") from None
        first = msg.splitlines()[0] if msg else type(err).__name__
        raise BundleError(f"segment {seg_name} failed on {dname}: {first}",
                          fix="if the inputs match `polyarch inspect`'s signature, the bundle's manifest disagrees with "
                              "its modules (damaged or edited): recompile it with `polyarch compile`") from None

    def _to_host(self, v, call, what):
        """Wait for a tensor's producer on its device, then read it back into host memory."""
        clock = time.perf_counter
        wait_for(self._sems[v.device], v.tick)
        if not v.event["dur"]:  # completion observed now (an upper bound in stream mode)
            v.event["dur"] = clock() - call.t0 - v.event["start"]
        t1 = clock()
        dev = self.devices[v.device]
        host = to_host(dev, _rt().DeviceArray(dev, v.bv))
        if _kind(v.device) != "cpu":
            call.moved(v.device, "host", host.nbytes, t1, clock(), what, self.counters)
        return host

    def _collect(self, call, outputs=None, specs=None, keep=()):
        """Wait for a call's outputs, read them back, account for it. -> its outputs (one
        alone, else a tuple). outputs, specs: a phase's value names and signature entries
        (run_phase; then a list comes back), keep: indices of outputs left on their device as
        `Resident` (a kept output that is read back anyway counts in `state_host_bytes`)."""
        outs = []
        for j, (name, spec) in enumerate(zip(self.plan["outputs"] if outputs is None else outputs,
                                             self.outputs if specs is None else specs)):
            v = call.env[name]
            if j in keep and isinstance(v, _OnDevice):
                outs.append(Resident(v))
                continue
            if isinstance(v, _OnDevice):
                v = self._to_host(v, call, f"output {name}")
            if j in keep:
                self.counters["state_host_bytes"] += int(v.nbytes)
            outs.append(v.astype(np_dtype(spec["dtype"])) if v.dtype != np_dtype(spec["dtype"]) else v)
        c = self.counters
        c["calls"] += 1
        c["seconds"] += time.perf_counter() - call.t0
        if self.trace:
            n = c["calls"] - 1
            self.events.extend(dict(e, call=n, start=e["start"] + call.t0) for e in call.events)
        if call.as_torch:
            outs = [to_torch(o) for o in outs]
        if outputs is not None:
            return outs
        return outs[0] if len(outs) == 1 else tuple(outs)

    def write_trace(self, path: str) -> None:
        """The recorded events (set `trace = True` first) as a Chrome/Perfetto trace."""
        from .trace import write_chrome_trace

        write_chrome_trace(path, f"polyarch run {self.path}",
                           [dict(e, args={"call": e["call"], "bytes": e["bytes"]}) for e in self.events],
                           other={"counters": self.counters})


def first_out_of_range(a: np.ndarray, lo: int, hi: int) -> tuple | None:
    """(value, "[i, j]" position) of the first element of `a` outside [lo, hi], or None. Floats
    (an index cast from a float input) count as the integers they truncate to; NaN and
    infinities are out of any range."""
    if not a.size:
        return None
    v = np.trunc(a.astype(np.float64)) if a.dtype.kind == "f" else a
    if v.dtype.kind == "f":
        bad = ~np.isfinite(v) | (v < lo) | (v > hi)
    elif v.min() >= lo and v.max() <= hi:
        return None
    else:
        bad = (v < lo) | (v > hi)
    if not bad.any():
        return None
    where = np.argwhere(bad)[0]
    return a[tuple(where)], "[" + ", ".join(str(int(k)) for k in where) + "]"


def index_bounds(spec: dict, shapes: list) -> list:
    """The ranges an index input's values must lie in: [(lo, hi inclusive, op, what fixes hi)],
    from its signature entry and the shapes of the call's inputs (an index into a dimension
    of dynamic size given by another input: `sized`)."""
    r = spec.get("index_range") or {}
    out = []
    if "min" in r:
        out.append((r["min"], r["max"], r["op"], f"the model was built for {r['max'] + 1} rows"))
    for s in r.get("sized", ()):
        n = shapes[s["input"]][s["dim"]]
        out.append((-n if s["negative"] else 0, n - 1, s["op"], f"input {s['input']} has {n} rows (dimension {s['dim']})"))
    return out


def _check_index_range(a, i, spec, shapes):
    """An input used as an index must hold valid indices: IREE reads a gather's source
    unchecked (an id past the table read garbage, or crashed the process)."""
    for lo, hi, op, why in index_bounds(spec, shapes):
        bad = first_out_of_range(a, lo, hi)
        if bad is None:
            continue
        value, pos = bad
        raise IndexRangeError(
            f"input {i} ('{spec['name']}'): value {value} at {pos} is out of range for {op}, which takes {lo} to {hi}",
            fix=f"give indices (token ids) in [{lo}, {hi}]; {why}")


def _fill_pattern(pattern):
    """The shortest pattern that repeats to `pattern` (an i64 zero fills as 4 zero bytes)."""
    for n in (1, 2, 4):
        if len(pattern) > n and len(pattern) % n == 0 and pattern == pattern[:n] * (len(pattern) // n):
            return pattern[:n]
    return pattern


class Resident:
    """An output left on its device by `Bundle.run_phase(keep=...)`, to be passed back as an
    input of a later call (a KV cache between decode steps): it never crosses the host unless
    a segment on another device reads it. `device` names the bundle device that holds it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    @property
    def device(self) -> str:
        return self.value.device


class PhaseCall:
    """A phase's call in flight (`Bundle.start_phase`): `call` its values, `outputs` the
    names of its outputs, `specs` their signature entries."""

    __slots__ = ("call", "outputs", "specs")

    def __init__(self, call, outputs, specs):
        self.call, self.outputs, self.specs = call, outputs, specs

    def wait(self) -> None:
        """Wait until the device(s) finished the call, its outputs unread (`settle`)."""
        settle(self.call)

    def resident(self, j: int) -> "Resident | np.ndarray":
        """Output j where it is: a Resident on its device (a host array where the plan's
        output is one of the call's host inputs)."""
        v = self.call.env[self.outputs[j]]
        return Resident(v) if isinstance(v, _OnDevice) else v


class _OnDevice:
    """A tensor on a device: its buffer view, valid once the device's timeline reaches `tick`.
    owner: (HalDevice, its timeline semaphore), kept so that the device and the semaphore
    outlive the buffer (a tensor kept past its bundle's close: a generation's cache, a
    Resident); the slots are freed in order, the buffer first (Bundle._release)."""

    __slots__ = ("device", "bv", "tick", "event", "owner")

    def __init__(self, device, bv, tick, event, owner=None):
        self.device, self.bv, self.tick, self.event, self.owner = device, bv, tick, event, owner


class _Call:
    """One call in flight: its start time, trace events, and values by schedule name."""

    def __init__(self, t0, as_torch):
        self.t0, self.as_torch, self.events, self.env = t0, as_torch, [], {}

    def moved(self, src: str, dst: str, nbytes: int, t0: float, t1: float, what: str, counters: dict) -> None:
        nbytes = int(nbytes)
        counters["transfers"] += 1
        counters["bytes_moved"] += nbytes
        counters["transfer_seconds"] += t1 - t0
        self.events.append({"name": what, "kind": "transfer", "track": f"{src} -> {dst}", "start": t0 - self.t0,
                            "dur": t1 - t0, "bytes": nbytes})


def settle(call: _Call) -> None:
    """Wait until the device(s) finished a call in flight, its outputs unread, through each of
    its values' own semaphore (_OnDevice.owner: also after its bundle was closed). A call's
    buffers and devices must not be freed while a device works on it: a bundle dropped with
    a call in flight crashed the process. A failed timeline is left to whoever reads it."""
    for v in call.env.values():
        if isinstance(v, _OnDevice) and v.owner is not None:
            try:
                wait_for(v.owner[1], v.tick)
            except RuntimeError:
                pass


def pipelined(submit: Callable, collect: Callable, requests: Iterable, depth: int,
              settle_call: "Callable | None" = None) -> Iterator:
    """Yield collect(call) for each request in order, keeping `depth` submitted calls in flight;
    settle_call(call) for each call left in flight when the stream is dropped part-way."""
    from collections import deque

    window = deque()
    try:
        for req in requests:
            window.append(submit(tuple(req) if isinstance(req, (tuple, list)) else (req,)))
            if len(window) >= max(1, depth):
                yield collect(window.popleft())
        while window:
            yield collect(window.popleft())
    finally:
        while window and settle_call is not None:
            settle_call(window.popleft())


def plan_time_us(plan: dict) -> float:
    """A plan's expected time per call: measured at compile time where it was, else predicted."""
    return plan.get("measured_us") or plan.get("plan", {}).get("predicted_us", 0.0)


def _kind(device_name):
    return DeviceSpec.parse(device_name).kind


def format_spec(spec: dict) -> str:
    """'4x64xint64', with '?' for a dynamic dimension and its range: '?x64xint64 (dim 0: 1..64)'."""
    dynamic = {d["dim"]: d for d in spec.get("dynamic", ())}
    if not spec["shape"]:
        return f"a scalar {spec['dtype']} (0-d array)"
    text = "x".join("?" if k in dynamic else str(n) for k, n in enumerate(spec["shape"])) + "x" + spec["dtype"]
    ranges = [f"dim {k}: {d.get('min', 1)}..{d.get('max') if d.get('max') is not None else 'any'}"
              for k, d in dynamic.items() if "symbol" in d]
    return text + (f" ({', '.join(ranges)})" if ranges else "")


def check_inputs(path: str, inputs: list, args: list) -> list:
    """The call's arguments as host arrays the bundle's `inputs` (its signature entries) take,
    checked: count, shapes (dynamic dims within their bounds, equal where one symbol), dtypes
    and index ranges. Shared by Bundle and RayBundle. -> [np.ndarray]."""
    if len(args) != len(inputs):
        raise BundleError(
            f"{path} takes {len(inputs)} input(s) ({', '.join(format_spec(i) for i in inputs)}), got {len(args)}",
            fix="pass one array per input, in order: " + (", ".join(i["name"] for i in inputs) or "none"))
    out, symbols = [], {}
    for i, (a, spec) in enumerate(zip(args, inputs)):
        a = _as_array(a, np_dtype(spec["dtype"]))
        got = format_spec({"shape": list(a.shape), "dtype": str(a.dtype)})
        dynamic = {d["dim"]: d for d in spec.get("dynamic", ())}
        shape_ok = a.ndim == len(spec["shape"]) and all(
            n == want for k, (n, want) in enumerate(zip(a.shape, spec["shape"])) if k not in dynamic)
        if not shape_ok or a.dtype != np_dtype(spec["dtype"]):
            if shape_ok:  # only the element type differs: a cast, not a recompile
                raise BundleError(f"input {i} ('{spec['name']}'): expected {format_spec(spec)}, got {got}",
                                  fix=f"cast it: a.astype({'ml_dtypes' if spec['dtype'] == 'bfloat16' else 'numpy'}."
                                      f"{spec['dtype']}) (torch: t.to(torch.{spec['dtype']}))")
            fix = ("the dimensions marked ? are dynamic; the others are fixed at compile time (recompile with matching "
                   "--input specs, or --dynamic-dim for another dimension)" if dynamic else
                   "the bundle was compiled for static shapes; recompile with matching --input specs, or with "
                   "--dynamic-dim INPUT:DIM[:MAX] for a dimension that varies")
            raise BundleError(f"input {i} ('{spec['name']}'): expected {format_spec(spec)}, got {got}", fix=fix)
        for k, d in dynamic.items():
            n, lo, hi = a.shape[k], d.get("min") or 0, d.get("max")
            if n < lo or (hi is not None and n > hi):
                raise BundleError(
                    f"input {i} ('{spec['name']}'): dimension {k} is {n}; this bundle accepts {lo} to {hi} there",
                    fix=f"split the request into pieces of at most {hi}, or recompile with a larger bound "
                        f"(--dynamic-dim {spec['name']}:{k}:MAX)")
            sym = d.get("symbol")
            if sym in symbols and symbols[sym][0] != n:
                j, kk, m = symbols[sym][1:]
                raise BundleError(
                    f"input {i} ('{spec['name']}') dimension {k} is {n} but input {j} dimension {kk} is {m}; "
                    f"the model needs them equal (both are {d.get('name') or sym})", fix="give inputs of matching sizes")
            symbols.setdefault(sym, (n, i, k, n))
        out.append(a)
    shapes = [a.shape for a in out]
    for i, (a, spec) in enumerate(zip(out, inputs)):  # after all shapes are known (sized ranges)
        if "index_range" in spec:
            _check_index_range(a, i, spec, shapes)
    return out


def _as_array(a, want):
    """An input as a C-ordered host array. Lists and Python numbers (which have no dtype of
    their own) take `want` where that keeps their kind (floats stay floats, ints fit);
    arrays in the other byte order are swapped. Anything else keeps its dtype, for the
    caller's check."""
    if _is_torch(a):
        a = to_numpy(a)
    if not isinstance(a, (np.ndarray, np.generic)):
        b = np.asarray(a)  # a new array, C-ordered
        if b.dtype.kind in "biuf" and np.can_cast(b.dtype, want, "same_kind"):
            c = b.astype(want)
            if want.kind not in "iu" or np.array_equal(c, b):
                return c
        return b
    if not a.dtype.isnative and a.dtype.newbyteorder("=") == want:
        a = a.astype(want)
    return np.asarray(a, order="C")  # (np.ascontiguousarray makes a 0-d array 1-d)


def _by_name(path, inputs, args, named):
    """Positional and named arguments -> the positional list `inputs` takes."""
    names = [i["name"] for i in inputs]
    unknown = [k for k in named if k not in names]
    if unknown:
        raise BundleError(f"{path} has no input named {unknown[0]!r}", fix="its inputs are: " + ", ".join(names))
    twice = [k for k in named if names.index(k) < len(args)]
    if twice:
        raise BundleError(f"input {twice[0]!r} given both by position and by name", fix="give it once")
    missing = [n for n in names[len(args):] if n not in named]
    if missing:
        raise BundleError(f"input {missing[0]!r} is not given", fix="its inputs are: " + ", ".join(names))
    return [*args, *(named[n] for n in names[len(args):])]
