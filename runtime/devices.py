"""Device specs as the runtime names them (defined in targets/spec.py, with the device kinds
of targets/kinds.py, which import nothing of the compiler)."""

from ..errors import DeviceError
from ..targets.kinds import TARGETS
from ..targets.spec import SPEC_HELP, DeviceSpec, parse_devices

__all__ = ["DeviceSpec", "parse_devices", "DeviceError", "DRIVERS", "SPEC_HELP"]

# kind -> IREE runtime HAL driver
DRIVERS = {kind: t.hal_driver for kind, t in TARGETS.items()}
