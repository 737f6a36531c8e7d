"""The `.pab` bundle format, read side (the compiler's writer builds on it).

A bundle is a zip archive whose members are stored uncompressed, each member's data
starting at a multiple of 4096 bytes in the file (schema 2; the local header's extra
field carries the padding), so that the runtime maps modules straight from the file:
  manifest.json          versioned description: signature, placement plans (each: devices,
                         segments, schedule, predicted costs), parameters, and the SHA-256
                         and size of every other member
  weights.irpa           the weights, an IREE parameter archive holding each distinct value
                         once, keyed by content (schema 3; absent when weights are inline)
  [<plan>/]<segment>.<device>.vmfb  one IREE module per segment and target; a segment's
                         manifest entry maps its parameter keys to the archive's keys
  [<plan>/]plan.mlir     the partitioned module (weights elided), for people to read
The plan prefix appears when a bundle holds several plans (`polyarch compile --plans`).
"""

import hashlib
import json
import mmap as _mmap
import os
import struct
import zipfile
import zlib
from typing import TYPE_CHECKING

from ..errors import BundleError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["read_manifest", "verify", "sha256", "Members", "MappedMembers", "aligned_empty", "FORMAT", "SCHEMA_VERSION", "MANIFEST", "PLAN_KEYS"]

FORMAT = "polyarch-bundle"
SCHEMA_VERSION = 3  # 3: plans + shared parameter archive; 2: members 4096-aligned; 1: unaligned (read by copying)
MANIFEST = "manifest.json"
ALIGN = 4096
PAD_EXTRA_ID = 0x5041  # zip extra field used for alignment padding ("PA")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MAX_MANIFEST = 64 << 20  # bytes; a real manifest is kilobytes to a few megabytes (every op listed)
MAX_DEPTH = 64  # nesting of the manifest's JSON; a real one nests about 8 deep
PLAN_KEYS = ("devices", "segments", "schedule", "outputs")  # what every plan of a manifest holds


def read_manifest(path: str | os.PathLike, raw: bool = False) -> dict | tuple:
    """The manifest of the bundle at `path`, with its structure checked (not the hashes).
    raw=True: -> (manifest, the bytes it was parsed from), for a signature check on exactly
    the manifest that the members are then checked against."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise BundleError(f"no bundle at '{path}'", fix="check the path; bundles are made by `polyarch compile`")
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"'{path}' is not a polyarch bundle (corrupt or truncated: {e})", fix="recompile it with `polyarch compile`")
    with zf:
        try:
            size = zf.getinfo(MANIFEST).file_size
            if size > MAX_MANIFEST:  # a damaged header: do not try to inflate gigabytes
                raise BundleError(f"the manifest of '{path}' claims {size} bytes (at most {MAX_MANIFEST}: damaged)",
                                  fix="recompile it with `polyarch compile`")
            with zf.open(MANIFEST) as f:
                data = f.read(MAX_MANIFEST + 1)
            if len(data) > MAX_MANIFEST or _depth(data) > MAX_DEPTH:
                raise BundleError(f"the manifest of '{path}' is over {MAX_MANIFEST >> 20} MB or nested over "
                                  f"{MAX_DEPTH} levels deep (damaged or not made by polyarch)",
                                  fix="recompile it with `polyarch compile`")
            manifest = json.loads(data)
        except KeyError:
            raise BundleError(f"'{path}' has no {MANIFEST}", fix="recompile it with `polyarch compile`")
        except (ValueError, RecursionError, zipfile.BadZipFile, OSError, EOFError, NotImplementedError,
                zlib.error) as e:
            raise BundleError(f"the manifest of '{path}' is unreadable: {type(e).__name__}: {e}",
                              fix="recompile it with `polyarch compile`")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"'{path}' is not a polyarch bundle (manifest format is not '{FORMAT}')",
                          fix="check the path; bundles are made by `polyarch compile` (recompile a damaged one)")
    version = manifest.get("schema_version")
    if not _is_int(version) or version < 1:
        kind = "not a whole number" if not _is_int(version) else "below 1, the first schema"
        raise BundleError(f"the manifest of '{path}' has schema_version {version!r}, {kind} (damaged?)",
                          fix="recompile it with `polyarch compile`")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"'{path}' has manifest schema {version}, newer than this runtime reads ({SCHEMA_VERSION})",
            fix="upgrade polyarch on this host, or recompile with this version",
        )
    if version < 3 and "plans" not in manifest:  # one plan at the top level: the same data, one level up
        missing = [k for k in PLAN_KEYS if k not in manifest]
        if not missing:
            first = {k: manifest.pop(k) for k in (*PLAN_KEYS, "plan", "profiles") if k in manifest}
            first["name"] = "+".join(dict.fromkeys(s["device"] for s in first["segments"]))
            manifest["plans"] = [first]
    for key in ("signature", "plans", "members"):
        if key not in manifest:
            raise BundleError(f"the manifest of '{path}' lacks '{key}'", fix="recompile it with `polyarch compile`")
    _check_structure(manifest, path)
    return (manifest, data) if raw else manifest


def _depth(data: bytes) -> int:
    """How deep the JSON text nests (brackets outside strings), without parsing it: the parser
    recurses, and a manifest nested 100000 deep must be refused, not overflow the stack."""
    import re

    text = re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b"", data)
    depth = deepest = 0
    for m in re.finditer(rb"[\[\]{}]", text):
        depth += 1 if m.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _damaged(path, what):
    return BundleError(f"the manifest of '{path}' is damaged: {what}", fix="recompile it with `polyarch compile`")


def _check_structure(manifest, path):
    """Raise BundleError naming the first part of the manifest that the runtime could not use
    (damaged or edited by hand), so that no load or call fails later with a KeyError."""
    import numpy as np

    from .devices import DeviceError, DeviceSpec
    from .dtypes import np_dtype

    members, sig, plans = manifest["members"], manifest["signature"], manifest["plans"]
    if not isinstance(members, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("sha256"), str) and _is_int(m.get("size")) for m in members.values()):
        raise _damaged(path, "'members' is not a table of {sha256, size}")
    if not isinstance(sig, dict) or not all(isinstance(sig.get(k), list) for k in ("inputs", "outputs")):
        raise _damaged(path, "'signature' lacks its lists of inputs and outputs")
    for i, spec in enumerate(sig["inputs"] + sig["outputs"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list) or not all(map(_is_int, spec["shape"])):
            raise _damaged(path, f"signature entry {i} has no shape")
        try:
            np_dtype(spec.get("dtype"))
        except TypeError:
            raise _damaged(path, f"signature entry {i} has dtype {spec.get('dtype')!r}") from None
    if not isinstance(plans, list) or not plans or not all(isinstance(p, dict) for p in plans):
        raise _damaged(path, "'plans' is not a list of plans")
    params = manifest.get("parameters")
    if params is not None and (not isinstance(params, dict) or params.get("member") not in members):
        raise _damaged(path, "'parameters' names no member that the bundle lists")
    for plan in plans:
        missing = [k for k in PLAN_KEYS if k not in plan]
        if missing:
            raise BundleError(f"plan '{plan.get('name')}' in the manifest of '{path}' lacks '{missing[0]}'",
                              fix="recompile it with `polyarch compile`")
        segments = {}
        for seg in plan["segments"] if isinstance(plan["segments"], list) else [None]:
            if not isinstance(seg, dict) or not all(isinstance(seg.get(k), str) for k in ("name", "device", "member")):
                raise _damaged(path, f"plan '{plan.get('name')}' has a segment without name, device and member")
            try:
                DeviceSpec.parse(seg["device"])
            except DeviceError as e:
                raise _damaged(path, f"segment {seg['name']}: {e.what}") from None
            if seg["member"] not in members:
                raise _damaged(path, f"segment {seg['name']} names member '{seg['member']}', which it does not list")
            _check_segment_parameters(path, seg, params)
            segments[seg["name"]] = seg
        _check_schedule(path, plan, segments, len(sig["inputs"]))
        _check_agreement(path, plan, segments, sig)
        _check_phases(manifest, path, plan, segments)


def _check_phases(manifest, path, plan, segments):
    """A --generate bundle's phases: each with its signature, schedule and outputs, and the
    generation settings the runtime reads."""
    phases = plan.get("phases")
    if phases is None:
        return
    sigs = manifest.get("phases")
    gen = manifest.get("generate")
    if not isinstance(phases, dict) or not isinstance(sigs, dict) or not isinstance(gen, dict) or not all(
            _is_int(gen.get(k)) and gen[k] > 0 for k in ("max_context", "batch", "layers", "vocab")):
        raise _damaged(path, f"plan '{plan.get('name')}' has phases without their signatures or generation settings")
    if "prefill_multiple" in gen and not (_is_int(gen["prefill_multiple"]) and gen["prefill_multiple"] > 0):
        raise _damaged(path, f"plan '{plan.get('name')}' has a prefill length multiple that is not a positive integer")
    draft = gen.get("draft")
    if draft is not None and not (isinstance(draft, dict) and _is_int(draft.get("layers")) and draft["layers"] > 0
                                  and _is_int(draft.get("speculate")) and draft["speculate"] > 0):
        raise _damaged(path, "its draft model's generation settings lack their layers or speculate count")
    for name, phase in phases.items():
        layers = draft["layers"] if name.startswith("draft_") and draft is not None else gen["layers"]
        sig = sigs.get(name, {}).get("signature") if isinstance(sigs.get(name), dict) else None
        if not isinstance(phase, dict) or not isinstance(sig, dict) or not all(
                isinstance(sig.get(k), list) for k in ("inputs", "outputs")):
            raise _damaged(path, f"phase {name!r} of plan '{plan.get('name')}' lacks its schedule or signature")
        # decode gives its greedy tokens after the cache (int64 [batch]; not in bundles made before)
        greedy = name.endswith("decode") and len(sig["outputs"]) == 2 + 2 * layers
        if len(sig["inputs"]) != 2 + 2 * layers or len(sig["outputs"]) != 1 + 2 * layers + greedy:
            raise _damaged(path, f"phase {name!r} does not take and give the {2 * layers} cache tensors "
                                 "its generation settings say")
        last = sig["outputs"][-1]
        if greedy and not (isinstance(last, dict) and last.get("dtype") == "int64" and last.get("shape") == [gen["batch"]]):
            raise _damaged(path, f"phase {name!r}'s last output is not its {gen['batch']} greedy tokens (int64)")
        view = {"name": f"{plan.get('name')}/{name}", "schedule": phase.get("schedule"), "outputs": phase.get("outputs")}
        _check_schedule(path, view, segments, len(sig["inputs"]))
        _check_agreement(path, view, segments, sig)


def _check_segment_parameters(path, seg, archive):
    """A segment's parameters: {scope, keys: {key: archive key or "splat:<hex>:<bytes>"}}."""
    if "parameters" not in seg:
        return
    p = seg["parameters"]
    if not isinstance(p, dict) or not isinstance(p.get("scope"), str) or not isinstance(p.get("keys"), dict):
        raise _damaged(path, f"segment {seg['name']}'s parameters lack their scope and keys")
    for key, content in p["keys"].items():
        if not isinstance(content, str):
            raise _damaged(path, f"parameter {key} of segment {seg['name']} is not named by a string")
        if content.startswith("splat:"):
            parts = content.split(":")
            try:
                ok = len(parts) == 3 and len(bytes.fromhex(parts[1])) > 0 and int(parts[2]) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise _damaged(path, f"parameter {key} of segment {seg['name']} is a bad splat {content[:40]!r}")
        elif archive is None:
            raise _damaged(path, f"segment {seg['name']} reads parameter {key} but the bundle has no archive")


# (signature dtype, the dtype a segment takes or gives it as): f64 and complex128 cross as 32-bit
# values everywhere, narrow types widened where a device has 32-bit storage only
_CROSSES_AS = {("float64", "float32"), ("complex128", "complex64"), ("float16", "float32"), ("bfloat16", "float32"),
               ("bool", "int32"), ("int8", "int32"), ("uint8", "int32"), ("int16", "int32")}


def _agrees(entry, seg_spec):
    """Whether a segment's argument or result spec can hold the signature entry's values."""
    if not isinstance(seg_spec, dict) or not isinstance(seg_spec.get("shape"), list):
        return True  # (older manifests list no per-segment specs)
    dynamic = {d.get("dim") for d in entry.get("dynamic", ()) if isinstance(d, dict)}
    shape, theirs = entry["shape"], seg_spec["shape"]
    same_shape = len(shape) == len(theirs) and all(a == b for k, (a, b) in enumerate(zip(shape, theirs))
                                                   if k not in dynamic and isinstance(b, int) and b >= 0)
    dt = (entry.get("dtype"), seg_spec.get("dtype"))
    return same_shape and (dt[0] == dt[1] or dt in _CROSSES_AS)


def _check_agreement(path, plan, segments, sig):
    """The signature agrees with the segments that take the inputs and give the outputs: a
    manifest edited to claim other shapes or dtypes than its modules were compiled for is refused
    (IREE does not check a buffer's element type against the function's)."""
    made = {}
    for step in plan["schedule"]:
        if step["op"] != "call":
            continue
        seg = segments[step["segment"]]
        for j, name in enumerate(step["args"]):
            if name.startswith("in") and name[2:].isdigit() and int(name[2:]) < len(sig["inputs"]):
                spec = seg["inputs"][j] if j < len(seg.get("inputs") or []) else None
                if spec is not None and not _agrees(sig["inputs"][int(name[2:])], spec):
                    raise _damaged(path, f"input {name[2:]} of the signature is not what segment {seg['name']} takes")
        for j, name in enumerate(step["results"]):
            outs = seg.get("outputs") or []
            made[name] = outs[j] if j < len(outs) else None
    for entry, name in zip(sig["outputs"], plan["outputs"]):
        if made.get(name) is not None and not _agrees(entry, made[name]):
            raise _damaged(path, f"output {entry.get('name')} of the signature is not what plan '{plan.get('name')}' makes")


def _check_schedule(path, plan, segments, n_inputs):
    """Each step of a plan's schedule reads only values defined before it."""
    defined = {f"in{i}" for i in range(n_inputs)}
    for k, step in enumerate(plan["schedule"] if isinstance(plan["schedule"], list) else [None]):
        op = step.get("op") if isinstance(step, dict) else None
        if op == "call" and step.get("segment") in segments and isinstance(step.get("results"), list):
            reads, writes = step.get("args"), step["results"]
        elif op == "transfer" and isinstance(step.get("dst"), str):
            reads, writes = [step.get("src")], [step["dst"]]
        else:
            raise _damaged(path, f"step {k} of plan '{plan.get('name')}' is not a call of one of its segments "
                                 "or a transfer")
        if not isinstance(reads, list) or not all(isinstance(r, str) and r in defined for r in reads):
            raise _damaged(path, f"step {k} of plan '{plan.get('name')}' reads values no earlier step makes")
        defined.update(w for w in writes if isinstance(w, str))
    if not isinstance(plan["outputs"], list) or not all(isinstance(o, str) and o in defined for o in plan["outputs"]):
        raise _damaged(path, f"the outputs of plan '{plan.get('name')}' are values no step makes")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def aligned_empty(nbytes: int) -> "np.ndarray":
    """Uninitialised host bytes starting on an ALIGN boundary, rounded up to a multiple of ALIGN
    (IREE takes modules and parameters there without a copy of its own; lavapipe imports host
    memory only at 4096-byte alignment and size)."""
    import numpy as np

    size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
    raw = np.empty(size + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off : off + size]


class Members:
    """The members of a bundle checked against the manifest's SHA-256 and sizes; `views[name]` is
    a memoryview of each member's bytes.

    mmap=False (the default): each member is read into memory of its own (page-aligned) and
    checked there, so the bytes checked are the bytes run, and a bundle truncated, replaced or
    rewritten on disk afterwards changes nothing in this process.
    mmap=True: the file is mapped read-only and used in place (no copy; the weights' pages are
    given back to the kernel once loaded onto the devices): for bundles whose weights do not
    fit in memory twice. The file must then not change while it is loaded: replace it by
    renaming a new file over it (as `polyarch compile` and `polyarch sign` do); truncating or
    rewriting it in place can kill this process with SIGBUS.
    mmap=None: the hashes are checked reading the file in pieces, and nothing is kept (`verify`).
    Keep this object alive while modules made from the views are in use."""

    def __init__(self, path, manifest, mmap=False):
        self.mmapped, self._keep = bool(mmap), mmap is not None
        self._map = None
        try:
            with zipfile.ZipFile(path) as zf:
                infos = {i.filename: i for i in zf.infolist()}
            self._file = open(path, "rb")
            self._size = os.fstat(self._file.fileno()).st_size
            if self.mmapped:
                self._map = _mmap.mmap(self._file.fileno(), 0, access=_mmap.ACCESS_READ)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise BundleError(f"'{path}' is corrupt: {e}", fix="recompile it or copy it again")
        self.views, self.starts = {}, {}  # member -> memoryview of its bytes, its offset in the file
        try:
            for name, meta in manifest["members"].items():
                self._member(path, name, meta, infos.get(name))
        finally:
            if not self.mmapped:  # everything is in memory: the file is no longer needed
                self._file.close()

    def _member(self, path, name, meta, info):
        if info is None:
            raise BundleError(f"'{path}' is missing member '{name}'", fix="recompile it with `polyarch compile`")
        if info.compress_type != zipfile.ZIP_STORED:
            raise BundleError(f"member '{name}' of '{path}' is compressed; bundles store members as is",
                              fix="recompile it with `polyarch compile` (do not re-zip bundles)")
        head = self._read(info.header_offset, 30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise BundleError(f"member '{name}' of '{path}' has a bad local header (corrupt bundle)",
                              fix="recompile it or copy it again")
        n, e = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + n + e
        if info.file_size != meta["size"] or start + meta["size"] > self._size:  # before reading anything
            raise BundleError(f"member '{name}' of '{path}' is not the size its manifest says (truncated or corrupt "
                              "bundle)", fix="recompile it or copy it again")
        if not self._keep:
            view, digest = None, self._digest(start, meta["size"])
        else:
            view = self._read(start, meta["size"], copy=True)
            digest = sha256(view) if len(view) == meta["size"] else None
        if digest != meta["sha256"]:
            raise BundleError(f"member '{name}' of '{path}' fails its SHA-256 check (corrupt bundle)",
                              fix="recompile it or copy it again")
        self.views[name] = view
        self.starts[name] = start

    def _digest(self, offset, size):
        h, done = hashlib.sha256(), 0
        while done < size:
            piece = os.pread(self._file.fileno(), min(16 << 20, size - done), offset + done)
            if not piece:
                return None
            h.update(piece)
            done += len(piece)
        return h.hexdigest()

    def _read(self, offset, size, copy=False):
        """`size` bytes at `offset`: a view of the mapping, or (in memory) bytes read now; a copy
        is page-aligned, as IREE takes modules and parameters without a copy of its own."""
        if self._map is not None:
            return memoryview(self._map)[offset : offset + size]
        if not copy:
            return os.pread(self._file.fileno(), size, offset)
        buf = aligned_empty(size)[:size]
        got = self._file.readinto(memoryview(buf)) if self._file.seek(offset) == offset else 0
        return memoryview(buf)[:got]

    @property
    def aligned(self) -> dict:
        """{member: whether its bytes start on an ALIGN boundary} (a member read into memory always
        does; a mapped one where the bundle aligned it: schema 2 and later)."""
        return {name: not self.mmapped or start % ALIGN == 0 for name, start in self.starts.items()}

    def drop_pages(self, name: str) -> None:
        """Mapped: let the kernel take back the resident pages of a member (after its data has been
        copied elsewhere, e.g. weights loaded into device memory). The mapping stays valid: a later
        read faults the pages in again from the file. In memory: nothing (the bytes are the only copy)."""
        if self._map is None:
            return
        start, size = self.starts[name], len(self.views[name])
        first = start - start % _mmap.PAGESIZE
        if hasattr(self._map, "madvise") and hasattr(_mmap, "MADV_DONTNEED") and size:
            self._map.madvise(_mmap.MADV_DONTNEED, first, start + size - first)

    def close(self) -> None:
        self.views.clear()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a module still uses a view; the mapping goes with the last reference
                pass
        self._file.close()


MappedMembers = Members  # the name before members were read into memory by default


def verify(path: str | os.PathLike) -> dict:
    """Check structure and every hash; returns the manifest."""
    manifest = read_manifest(path)
    Members(path, manifest, mmap=None).close()
    return manifest
