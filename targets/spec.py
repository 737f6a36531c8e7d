"""Device specs: `KIND[:ORDINAL][@ARCH]`, KIND one of the kinds in targets/kinds.py.

Shared by the compiler and the runtime (device creation)."""

import re
from dataclasses import dataclass
from typing import Iterable

from ..errors import DeviceError
from .kinds import TARGETS, Target

__all__ = ["DeviceSpec", "parse_devices", "SPEC_HELP"]

_SPEC = re.compile(r"^(?P<kind>[a-z]+)(?::(?P<ordinal>\d+))?(?:@(?P<arch>[A-Za-z0-9_.+-]+))?$")

SPEC_HELP = (
    "a device is KIND[:ORDINAL][@ARCH] with KIND one of "
    + ", ".join(TARGETS)
    + ", e.g. cpu, vulkan, cuda:1@sm_86, rocm@gfx942"
)


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    ordinal: int = 0
    arch: str | None = None

    @classmethod
    def parse(cls, text: "str | DeviceSpec") -> "DeviceSpec":
        if isinstance(text, DeviceSpec):
            return text
        m = _SPEC.match(str(text).strip())
        if not m:
            raise DeviceError(f"bad device spec '{text}'", fix=SPEC_HELP)
        kind = m["kind"]
        if kind not in TARGETS:
            raise DeviceError(f"unknown device kind '{kind}' in '{text}'", fix=SPEC_HELP)
        return cls(kind, int(m["ordinal"] or 0), m["arch"])

    @property
    def name(self) -> str:
        """The canonical spelling, used as the device's name in plans and bundles."""
        s = self.kind
        if self.ordinal:
            s += f":{self.ordinal}"
        if self.arch:
            s += f"@{self.arch}"
        return s

    @property
    def target(self) -> Target:
        """What polyarch knows about the device's kind (targets/kinds.py)."""
        return TARGETS[self.kind]

    @property
    def driver(self) -> str:
        """The IREE runtime HAL driver that opens it."""
        return TARGETS[self.kind].hal_driver

    def __str__(self):
        return self.name


def parse_devices(specs: Iterable) -> list:
    """Parse a list of device specs; rejects duplicates."""
    out = []
    for s in specs:
        d = DeviceSpec.parse(s)
        if d.name in [o.name for o in out]:
            raise DeviceError(f"device '{d.name}' given twice", fix="name each device once")
        out.append(d)
    if not out:
        raise DeviceError("no devices given", fix="pass at least one device, e.g. --device cpu")
    return out
