"""Write `.pab` bundles (format: polyarch.runtime.bundle): members stored, each starting
at a 4096-byte boundary of the file so that the runtime maps them without copying."""

import json
import os
import struct
import tempfile
import zipfile

from ..runtime.bundle import ALIGN, FORMAT, MANIFEST, PAD_EXTRA_ID, SCHEMA_VERSION, sha256


def _aligned_info(zf, name):
    """A ZipInfo whose data will start at a multiple of ALIGN in the file: the local
    header's extra field is padded (an extra field of id PAD_EXTRA_ID, as zipalign does)."""
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    data_start = zf.fp.tell() + 30 + len(name.encode()) + 4
    pad = (-data_start) % ALIGN
    zi.extra = struct.pack("<HH", PAD_EXTRA_ID, pad) + bytes(pad)
    return zi


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
            zf.writestr(_aligned_info(zf, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
            for name, data in members.items():
                zf.writestr(_aligned_info(zf, name), data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return manifest
