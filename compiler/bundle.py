"""Write `.pab` bundles (format: polyarch.runtime.bundle)."""

import json
import os
import tempfile
import zipfile

from ..runtime.bundle import FORMAT, MANIFEST, SCHEMA_VERSION, sha256


def write_bundle(path, manifest, members):
    """Write `members` ({name: bytes}) and the manifest (hashes filled in) atomically to `path`."""
    manifest = dict(manifest, format=FORMAT, schema_version=SCHEMA_VERSION)
    manifest["members"] = {name: {"sha256": sha256(data), "size": len(data)} for name, data in members.items()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pab-", dir=directory)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            for name, data in members.items():
                zf.writestr(name, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return manifest
