"""Weights stored once: segments' large constants become IREE parameters, merged into one
archive (`.irpa`) keyed by content, which every segment of every plan in a bundle reads.

iree-compile does the externalising: `iree-flow-outline-constants` (run as the
preprocessing pipeline, after torch input conversion) turns inline constants into
globals, and the parameter export moves every global of at least MIN_BYTES into an
archive under the segment's own scope. `merge` then hashes each exported value and
writes each distinct value once; the manifest maps (scope, key in the module) -> hash
(or, for a splat, its pattern and length),
and the runtime builds each segment's parameter provider from that map (runtime/bundle.py).
A weight used by ops in two segments (tied embeddings, or a plan per device set) is
thus stored once.
"""

import hashlib

from ..errors import PolyarchError

MIN_BYTES = 1024  # constants smaller than this stay inline in the module
FORMAT = "irpa"
SPLAT = "splat:"  # content keys of splat parameters: "splat:<pattern hex>:<length>"


def export_flags(scope: str, archive_path: str) -> list:
    """iree-compile flags that export a segment's constants of MIN_BYTES or more to `archive_path`."""
    return [
        "--iree-preprocessing-pass-pipeline=builtin.module(iree-flow-outline-constants)",
        f"--iree-parameter-export={scope}={archive_path}",
        f"--iree-parameter-export-minimum-size={MIN_BYTES}",
    ]


def content_key(data: bytes) -> str:
    """The key a value is stored under in the merged archive: its SHA-256 (128 bits, hex)."""
    return hashlib.sha256(data).hexdigest()[:32]


def merge(archives: dict, output: str) -> tuple:
    """Merge per-segment archives ({scope: path or None}) into one archive at `output`,
    each distinct value once. -> (scopes {scope: {module key: content key}}, summary dict).
    Returns no archive (None summary) when no segment exported anything."""
    import os

    import iree.runtime as rt

    merged = rt.ParameterIndex()
    scopes, stored, refs, total = {}, set(), 0, 0
    keep = []  # indexes whose mapped files back the buffers added to `merged`
    for scope, path in archives.items():
        scopes[scope] = {}
        if not path or not os.path.exists(path):
            continue
        index = rt.ParameterIndex()
        try:
            index.load(path)
        except Exception as e:
            raise PolyarchError(f"could not read the parameters IREE exported for {scope} ({path}): {e}")
        keep.append(index)
        for key, entry in index.items():
            if entry.is_splat:  # a repeated pattern (IREE hoists some splat constants): no data to store
                scopes[scope][key] = f"{SPLAT}{bytes(entry.splat_pattern).hex()}:{entry.length}"
                continue
            view = entry.file_view
            h = content_key(view)
            scopes[scope][key] = h
            refs += 1
            total += entry.length
            if h not in stored:
                stored.add(h)
                merged.add_buffer(h, view)
    if not stored:
        return scopes, None
    merged.create_archive_file(output)
    del keep
    return scopes, {"format": FORMAT, "count": len(stored), "references": refs, "referenced_bytes": total,
                    "min_bytes": MIN_BYTES}
