"""The polyarch runtime: load a `.pab` bundle and run it across the devices of this host.

    run = polyarch.runtime.load("m.pab")
    (y,) = run(x)            # numpy arrays in, numpy arrays out

Depends only on iree-base-runtime and numpy."""

import os
from typing import TYPE_CHECKING, Any

from .bundle import verify
from .devices import DeviceSpec
from .executor import Bundle

if TYPE_CHECKING:
    from .ray_executor import RayBundle

__all__ = ["load", "Bundle", "verify", "DeviceSpec"]


def load(path: str | os.PathLike, devices: dict | None = None, plan: str | None = None, strict: bool = False,
         cluster: str | None = None, trusted_keys: Any = None, mmap: bool = False) -> "Bundle | RayBundle":
    """Load a bundle for execution on this host. -> a callable Bundle.

    devices: optional {bundle device name: local device spec} to run a segment on
    another device of the same kind, e.g. {"vulkan": "vulkan:1"}.
    plan: the placement plan to run (default: the fastest predicted one this host can run).
    strict: raise DeviceError rather than fall back when that plan's devices are missing.
    cluster: a Ray address ("ray://HOST:10001"): run each device's segments in a Ray actor
    on a node that offers that device -> a RayBundle (see runtime/ray_executor.py).
    trusted_keys: a list of paths of Ed25519 public keys (`polyarch keygen`): the bundle must be
    signed by one of them (`polyarch sign`), checked before any module is loaded
    (runtime/signing.py), and again by each Ray actor on the bytes it was sent. None: no check;
    an empty list, a single string or anything else is refused.
    mmap: False (default) reads the members into memory and checks them there, so the bytes
    checked are the bytes run and a bundle changed on disk later changes nothing (nor crashes
    the process); True maps the file instead (no copy: for weights too large to hold twice),
    and the file must then only ever be replaced by renaming a new one over it."""
    if cluster is not None and mmap:
        from ..errors import BundleError

        raise BundleError("mmap=True is for local loads; a cluster's actors get the bundle's bytes",
                          fix="drop mmap= with cluster=")
    if cluster is not None:
        from .ray_executor import RayBundle

        return RayBundle(path, cluster, plan=plan, devices=devices, trusted_keys=trusted_keys)
    return Bundle(path, devices=devices, plan=plan, strict=strict, trusted_keys=trusted_keys, mmap=mmap)
