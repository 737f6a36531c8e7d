"""Signed bundles: an Ed25519 signature over the manifest, which holds every member's SHA-256.

A bundle is native code (each cpu segment is a shared object run in the loading process);
its hashes catch damage, not tampering. A signature says who made it:

    polyarch keygen -o release.key          # release.key (private, mode 0600) + release.key.pub
    polyarch sign m.pab --key release.key   # adds member `manifest.sig`
    polyarch run m.pab --trusted-key release.key.pub
    polyarch.runtime.load("m.pab", trusted_keys=["release.key.pub"])

With trusted keys given, a bundle that is unsigned, signed by another key or whose manifest
changed after signing is refused before any of its modules is mapped; the members are then
checked against the signed manifest's hashes as always. Keys are PEM files (PKCS#8 private,
SubjectPublicKeyInfo public), as `cryptography` and OpenSSL write them."""

import base64
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from typing import Any

from ..errors import BundleError, PolyarchError
from ..files import real_target
from .bundle import MANIFEST, read_manifest

__all__ = ["keygen", "sign", "check", "read_keys", "signature_of", "key_id", "key_list", "SIGNATURE"]

SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"
MAX_SIGNATURE = 64 << 10  # bytes; a signature record is about 150


def key_list(trusted_keys: Any) -> list | None:
    """`trusted_keys` as a list of key paths (or PEM bytes), or None for no signature check.
    Anything else is refused rather than read as something it is not: a list that trusts no key
    (which would let nothing through, or everything if read as 'no check'), a single path given as
    a string (which would be read letter by letter), an item that is not a path."""
    if trusted_keys is None:
        return None
    fix = "give a list of public key files, e.g. trusted_keys=['release.key.pub'] (or None: no signature check)"
    if isinstance(trusted_keys, (str, bytes, os.PathLike)):
        raise BundleError(f"trusted_keys is one {type(trusted_keys).__name__} ({str(trusted_keys)[:60]!r}), "
                          "not a list of keys", fix=fix)
    try:
        keys = list(trusted_keys)
    except TypeError:
        raise BundleError(f"trusted_keys is a {type(trusted_keys).__name__}, not a list of keys", fix=fix) from None
    if not keys:
        raise BundleError("trusted_keys is empty: no key is trusted, so no bundle could be checked", fix=fix)
    for k in keys:
        if not isinstance(k, (str, bytes, os.PathLike)):
            raise BundleError(f"trusted_keys holds a {type(k).__name__} ({k!r:.60}), not a key path", fix=fix)
    return keys


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise PolyarchError("signing needs the `cryptography` package", fix="pip install 'polyarch[signing]'") from None
    return serialization, ed25519


def key_id(public_pem: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of the SHA-256 of its PEM."""
    return hashlib.sha256(public_pem.strip()).hexdigest()[:16]


def keygen(path: str) -> str:
    """Write a new Ed25519 private key to `path` (mode 0600) and its public key to
    `path`.pub. -> (private path, public path, key id)."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for p in (path, path + ".pub"):
        if os.path.lexists(p):  # a file, or a link (dangling too): never written through
            what = "a symbolic link" if os.path.islink(p) else "exists"
            raise PolyarchError(f"{p} {what}; not overwriting a key", fix="choose another name, or remove it first")
    # O_EXCL: created here or not at all (a link or file that appeared meanwhile is refused too)
    for p, data, mode in ((path, private, 0o600), (path + ".pub", public, 0o644)):
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        except FileExistsError:
            raise PolyarchError(f"{p} appeared while writing the key; not overwriting it",
                                fix="choose another name") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return path, path + ".pub", key_id(public)


def read_keys(trusted_keys: Any) -> list:
    """The PEM bytes of public keys given as paths (or already as PEM bytes), each checked to
    be an Ed25519 public key: what travels to Ray actors, which have no key files."""
    return [_public_pem(_load_key(k, private=False)) for k in key_list(trusted_keys)]


def _load_key(path, private):
    serialization, ed25519 = _crypto()
    mode = None
    if isinstance(path, bytes):  # PEM already read (read_keys)
        data, path = path, "a trusted key"
    else:
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(MAX_SIGNATURE)
        except OSError as e:
            raise PolyarchError(f"cannot read key {path}: {e.strerror}", fix="give the file `polyarch keygen` wrote") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        kind = "private" if private else "public"
        raise PolyarchError(f"{path} is not a PEM {kind} key ({e})",
                            fix=f"give the {'KEY' if private else 'KEY.pub'} file `polyarch keygen -o KEY` wrote") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise PolyarchError(f"{path} is a {type(key).__name__}, not an Ed25519 key", fix="make one with `polyarch keygen`")
    if private and mode is not None and mode & 0o077:  # as ssh: a key others can read may have been copied
        raise PolyarchError(f"permissions {mode & 0o777:04o} for the private key {path} are too open: others "
                            "can read it", fix=f"chmod 600 {path} (and make a new key if others may have copied it)")
    return key


def _public_pem(key):
    serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(bundle: str, key_path: str) -> str:
    """Sign `bundle` in place (a new file renamed over it: processes that mapped the old one
    keep it; through a symbolic link, the file it names, and the link stays) with the private
    key at `key_path`. A bundle that fails its own checks is refused. -> the key id."""
    from .bundle import verify

    bundle = real_target(bundle)
    verify(bundle)  # a bundle at all, and every member as its manifest says: never vouch for damage
    key = _load_key(key_path, private=True)
    with zipfile.ZipFile(bundle) as z:
        manifest = z.read(MANIFEST)
        names = z.namelist()
    kid = key_id(_public_pem(key.public_key()))
    record = json.dumps({"algorithm": ALGORITHM, "key_id": kid,
                         "signature": base64.b64encode(key.sign(manifest)).decode()}).encode()
    folder = os.path.dirname(os.path.abspath(bundle))
    fd, tmp = tempfile.mkstemp(prefix=".pab-", dir=folder)
    os.close(fd)
    try:
        if SIGNATURE in names:  # re-signing: copy every member but the old signature
            with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(tmp, "w") as dst:
                for info in src.infolist():
                    if info.filename != SIGNATURE:
                        dst.writestr(info, src.read(info))
        else:  # appending leaves the members (and their alignment) where they are
            shutil.copyfile(bundle, tmp)
        with zipfile.ZipFile(tmp, "a") as z:
            z.writestr(SIGNATURE, record)
        shutil.copymode(bundle, tmp)
        os.replace(tmp, bundle)
    except BaseException:
        os.unlink(tmp)
        raise
    return kid


def signature_of(bundle: str) -> dict | None:
    """The bundle's signature record ({"algorithm", "key_id", "signature"}), or None."""
    with zipfile.ZipFile(bundle) as z:
        if SIGNATURE not in z.namelist():
            return None
        if z.getinfo(SIGNATURE).file_size > MAX_SIGNATURE:  # never inflate what a damaged header claims
            return {"damaged": True}
        try:
            with z.open(SIGNATURE) as f:
                rec = json.loads(f.read(MAX_SIGNATURE))
        except (ValueError, RecursionError, zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error):
            return {"damaged": True}
    return rec if isinstance(rec, dict) else {"damaged": True}


def check(bundle: str, trusted_keys: Any, manifest: bytes | None = None) -> str:
    """Raise BundleError unless `bundle`'s manifest is signed by one of `trusted_keys` (paths
    of public keys, or their PEM bytes). manifest: the manifest bytes to check (those the
    caller parsed and will check the members against); default: read from `bundle`.
    -> the id of the key that signed it."""
    from cryptography.exceptions import InvalidSignature

    keys = [_load_key(p, private=False) for p in key_list(trusted_keys)]
    if manifest is None:
        _, manifest = read_manifest(bundle, raw=True)
    rec = signature_of(bundle)
    fix = "sign it with `polyarch sign BUNDLE --key KEY` (KEY.pub among the trusted keys), or load it without trusted keys"
    if rec is None:
        raise BundleError(f"{bundle} is not signed, and trusted keys were given", fix=fix)
    if rec.get("algorithm") != ALGORITHM or "signature" not in rec:
        raise BundleError(f"the signature of {bundle} is damaged or not {ALGORITHM}", fix=fix)
    try:
        sig = base64.b64decode(rec["signature"], validate=True)
    except ValueError:
        raise BundleError(f"the signature of {bundle} is damaged", fix=fix) from None
    for k in keys:
        try:
            k.verify(sig, manifest)
            return key_id(_public_pem(k))
        except InvalidSignature:
            continue
    ids = ", ".join(key_id(_public_pem(k)) for k in keys)
    raise BundleError(f"{bundle} is signed by key {rec.get('key_id', '?')}, which is not trusted (trusted: {ids}), "
                      "or its manifest changed after signing", fix=fix)
