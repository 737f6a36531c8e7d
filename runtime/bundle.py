"""The `.pab` bundle format, read side (the compiler's writer builds on it).

A bundle is a zip archive whose members are stored uncompressed:
  manifest.json          versioned description: signature, devices, segments, schedule,
                         predicted costs, and the SHA-256 and size of every other member
  <segment>.<device>.vmfb  one IREE module per segment and target
  plan.mlir              the partitioned module (weights elided), for people to read
"""

import hashlib
import json
import zipfile

from ..errors import BundleError

FORMAT = "polyarch-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def read_manifest(path):
    """The manifest of the bundle at `path`, with its structure checked (not the hashes)."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise BundleError(f"no bundle at '{path}'", fix="check the path; bundles are made by `polyarch compile`")
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"'{path}' is not a polyarch bundle (corrupt or truncated: {e})", fix="recompile it with `polyarch compile`")
    with zf:
        try:
            manifest = json.loads(zf.read(MANIFEST))
        except KeyError:
            raise BundleError(f"'{path}' has no {MANIFEST}", fix="recompile it with `polyarch compile`")
        except (ValueError, zipfile.BadZipFile, OSError) as e:
            raise BundleError(f"the manifest of '{path}' is unreadable: {e}", fix="recompile it with `polyarch compile`")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"'{path}' is not a polyarch bundle (manifest format is not '{FORMAT}')")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BundleError(
            f"'{path}' has manifest schema {version}, newer than this runtime reads ({SCHEMA_VERSION})",
            fix="upgrade polyarch on this host, or recompile with this version",
        )
    for key in ("signature", "devices", "segments", "schedule", "outputs", "members"):
        if key not in manifest:
            raise BundleError(f"the manifest of '{path}' lacks '{key}'", fix="recompile it with `polyarch compile`")
    return manifest


def read_members(path, manifest):
    """{member name: bytes} for every member the manifest lists, each checked against its SHA-256."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for name, meta in manifest["members"].items():
                if name not in names:
                    raise BundleError(f"'{path}' is missing member '{name}'", fix="recompile it with `polyarch compile`")
                data = zf.read(name)
                if len(data) != meta["size"] or sha256(data) != meta["sha256"]:
                    raise BundleError(f"member '{name}' of '{path}' fails its SHA-256 check (corrupt bundle)", fix="recompile it or copy it again")
                out[name] = data
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"'{path}' is corrupt: {e}", fix="recompile it or copy it again")
    return out


def verify(path):
    """Check structure and every hash; returns the manifest."""
    manifest = read_manifest(path)
    read_members(path, manifest)
    return manifest
