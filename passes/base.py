"""A pass with typed options, declared once as dataclass fields.

    @dataclass(frozen=True)
    class AssignDevices(Pass):
        NAME = "assign-devices"
        devices: tuple = option(("cpu",), "device specs", sep=",")
        pin: tuple = option((), "PATTERN=DEVICE", repeat=True)
        objective: str = option("latency", "latency | throughput | ...")

        def apply(self, module): ...

Python callers build the pass with Python values (`AssignDevices(devices=["cpu"])`); the
pipeline parser (passes/__init__.py, `polyarch-opt`) builds it from text with `from_text`,
which converts each option to its declared type. A pass checks its option values once, in
`check()`, before it touches the module."""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import PolyarchError

if TYPE_CHECKING:
    from torch_mlir import ir

__all__ = ["Pass", "option"]


def option(default: Any, help: str, *, sep: str | None = None, repeat: bool = False,
           choices: tuple = ()) -> Any:
    """A pass option: its default, a line of help, and how it is written in a pipeline:
    `sep` splits one value into a tuple (devices=cpu,vulkan), `repeat` collects a repeated
    option into a tuple (pin=a=cpu pin=b=vulkan), `choices` the values allowed."""
    meta = {"help": help, "sep": sep, "repeat": repeat, "choices": tuple(choices)}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Pass:
    """Base of the passes: NAME (as a pipeline names it) and apply(module)."""

    NAME: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (f.metadata.get("sep") or f.metadata.get("repeat")) and isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise PolyarchError(f"{self.NAME}: {f.name}={value!r}",
                                    fix="use " + ", ".join(f"{f.name}={c}" for c in choices[:-1])
                                        + f" or {f.name}={choices[-1]}")
        self.check()

    def check(self) -> None:
        """Check the option values (after the declared choices); raise PolyarchError."""

    def apply(self, module: "ir.Module") -> Any:
        raise NotImplementedError

    @classmethod
    def options(cls) -> dict:
        """{option name: help (with the values allowed, the default)} in declaration order."""
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = (f.metadata.get("sep") or ",").join(default) if isinstance(default, tuple) else default
            choices = f.metadata.get("choices")
            out[f.name] = (f.metadata.get("help", "") + (f" ({' | '.join(choices)})" if choices else "")
                           + (f"; default {shown}" if shown not in ("", None) else ""))
        return out

    @classmethod
    def from_text(cls, items: list) -> "Pass":
        """The pass from its pipeline options as written: [(key, text value)] in order."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, text in items:
            f = fields.get(key)
            if f is None:
                raise PolyarchError(f"unknown option {key} for pass {cls.NAME}",
                                    fix=f"{cls.NAME} takes {', '.join(fields) or 'no options'}")
            values[key] = _convert(cls, f, text, values.get(key))
        return cls(**values)


def _convert(cls, f, text: str, before):
    meta = f.metadata
    default = f.default
    if meta.get("sep"):
        value = tuple(t for t in text.split(meta["sep"]) if t)
    elif isinstance(default, bool):  # a flag: written true/false (or 1/0)
        if text.lower() not in ("true", "false", "1", "0"):
            raise PolyarchError(f"option {f.name} of pass {cls.NAME} is true or false, got {text!r}",
                                fix=f"{f.name}=true or {f.name}=false")
        value = text.lower() in ("true", "1")
    elif isinstance(default, int):
        if not text.lstrip("-").isdigit():
            raise PolyarchError(f"option {f.name} of pass {cls.NAME} is a whole number, got {text!r}",
                                fix=f"{f.name}=N")
        value = int(text)
    else:
        value = text
    if meta.get("repeat"):
        return (before or ()) + (value if isinstance(value, tuple) else (value,))
    if before is not None:
        raise PolyarchError(f"option {f.name} of pass {cls.NAME} is given twice", fix="give it once")
    return value
