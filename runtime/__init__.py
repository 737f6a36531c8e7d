"""The polyarch runtime: load a `.pab` bundle and run it across the devices of this host.

    run = polyarch.runtime.load("m.pab")
    (y,) = run(x)            # numpy arrays in, numpy arrays out

Depends only on iree-base-runtime and numpy."""

from .bundle import verify
from .devices import DeviceSpec
from .executor import Bundle, load

__all__ = ["load", "Bundle", "verify", "DeviceSpec"]
