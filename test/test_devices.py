import pytest

from polyarch.errors import DeviceError
from polyarch.runtime.devices import DeviceSpec, parse_devices


@pytest.mark.parametrize("text,kind,ordinal,arch", [
    ("cpu", "cpu", 0, None),
    ("vulkan", "vulkan", 0, None),
    ("cuda:1@sm_90", "cuda", 1, "sm_90"),
    ("rocm@gfx942", "rocm", 0, "gfx942"),
])
def test_parse(text, kind, ordinal, arch):
    d = DeviceSpec.parse(text)
    assert (d.kind, d.ordinal, d.arch) == (kind, ordinal, arch)
    assert d.name == text


@pytest.mark.parametrize("text,msg", [
    ("tpu", "unknown device kind 'tpu'"),
    ("cuda:x", "bad device spec 'cuda:x'"),
    ("cpu@", "bad device spec 'cpu@'"),
    ("", "bad device spec"),
])
def test_bad_specs_are_rejected(text, msg):
    with pytest.raises(DeviceError) as e:
        DeviceSpec.parse(text)
    assert msg in str(e.value)
    assert "KIND[:ORDINAL][@ARCH]" in str(e.value)
    assert "\n" not in str(e.value)


def test_duplicates_rejected():
    with pytest.raises(DeviceError, match="given twice"):
        parse_devices(["cpu", "cpu"])
