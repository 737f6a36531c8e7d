"""Write `.pab` bundles (format: polyarch.runtime.bundle): members stored, each starting
at a 4096-byte boundary of the file so that the runtime maps them without copying."""

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile

from ..files import real_target
from ..runtime.bundle import ALIGN, FORMAT, MANIFEST, PAD_EXTRA_ID, SCHEMA_VERSION, sha256


def _aligned_info(zf, name, size):
    """A ZipInfo whose data will start at a multiple of ALIGN in the file: the local
    header's extra field is padded (an extra field of id PAD_EXTRA_ID, as zipalign does).
    Members near 4 GiB or over get zipfile's 20-byte zip64 extra field after ours."""
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for members written through open()
    data_start = zf.fp.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = (-data_start) % ALIGN
    zi.extra = struct.pack("<HH", PAD_EXTRA_ID, pad) + bytes(pad)
    return zi, zip64


CHUNK = 64 << 20


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(path: str, manifest: dict, members: dict) -> dict:
    """Write `members` ({name: bytes, or the path of a file to stream in}) and the manifest
    (hashes filled in) atomically to `path`. -> the manifest written."""
    def size(data):
        return os.path.getsize(data) if isinstance(data, (str, os.PathLike)) else len(data)

    def digest(data):
        return _file_sha256(data) if isinstance(data, (str, os.PathLike)) else sha256(data)

    manifest = dict(manifest, format=FORMAT, schema_version=SCHEMA_VERSION)
    manifest["members"] = {name: {"sha256": digest(data), "size": size(data)} for name, data in members.items()}
    path = real_target(path)  # through a link: the file it names is replaced, the link stays
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pab-", dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any file the user creates (mkstemp makes it 0600)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            text = json.dumps(manifest, indent=1, sort_keys=True).encode()
            for name, data in [(MANIFEST, text), *members.items()]:
                zi, zip64 = _aligned_info(zf, name, size(data))
                with zf.open(zi, "w", force_zip64=zip64) as out:
                    if isinstance(data, (str, os.PathLike)):
                        with open(data, "rb") as f:
                            shutil.copyfileobj(f, out, CHUNK)
                    else:
                        out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return manifest
