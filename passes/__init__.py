"""The pass table, shared by the compiler and `polyarch-opt`: each pass a class with typed
options (passes/base.py), named as a pipeline names it.

A pipeline is written as in mlir-opt: `annotate-costs,assign-devices{devices=cpu,vulkan pin=torch.aten.mm=cpu},outline-segments`.
Inside braces, options are separated by spaces; each option is converted to its declared
type; a repeatable option given again adds to its list."""

from typing import TYPE_CHECKING

from ..errors import PolyarchError
from .annotate_costs import AnnotateCosts
from .assign_devices import AssignDevices
from .base import Pass
from .conv_to_matmul import ConvToMatmul
from .guard_indices import GuardIndices
from .outline_segments import OutlineSegments
from .pool_to_mean import PoolToMean
from .rowdot import Rowdot

if TYPE_CHECKING:
    from torch_mlir import ir

__all__ = ["PASSES", "Pass", "AnnotateCosts", "AssignDevices", "OutlineSegments", "ConvToMatmul", "PoolToMean",
           "GuardIndices", "Rowdot", "parse_pipeline", "run_pipeline"]

PASSES = {p.NAME: p for p in (AnnotateCosts, AssignDevices, OutlineSegments, ConvToMatmul, PoolToMean, GuardIndices, Rowdot)}


def parse_pipeline(text: str) -> list:
    """'a,b{k=v k2=v2},c' -> [Pass], each built from its options as written (converted to
    their declared types by Pass.from_text)."""
    out, i, text = [], 0, text.strip()
    while i < len(text):
        j = i
        while j < len(text) and text[j] not in ",{":
            j += 1
        name = text[i:j].strip()
        items = []
        if j < len(text) and text[j] == "{":
            close = text.find("}", j)
            if close < 0:
                raise PolyarchError(f"unclosed '{{' in pass pipeline '{text}'")
            for item in text[j + 1 : close].split():
                key, sep, val = item.partition("=")
                if not sep:
                    raise PolyarchError(f"pass option '{item}' of {name} is not KEY=VALUE")
                items.append((key, val))
            j = close + 1
        if name not in PASSES:
            raise PolyarchError(f"unknown pass '{name}'", fix=f"use one of {', '.join(PASSES)}")
        out.append(PASSES[name].from_text(items))
        while j < len(text) and text[j] in ", ":
            j += 1
        i = j
    return out


def run_pipeline(module: "ir.Module", pipeline: str | list, verify_each: bool = True) -> "ir.Module":
    """Run passes on `module` in place. pipeline: a string (as parse_pipeline reads), or a
    list of Pass objects or (name, {option: Python value}) pairs. The module's polyarch
    contracts and attributes are verified after every pass (dialects/polyarch.py)."""
    from ..dialects import polyarch as pa

    if isinstance(pipeline, str):
        pipeline = parse_pipeline(pipeline)
    for p in pipeline:
        if not isinstance(p, Pass):
            name, opts = p
            if name not in PASSES:
                raise PolyarchError(f"unknown pass '{name}'", fix=f"use one of {', '.join(PASSES)}")
            p = PASSES[name](**opts)
        p.apply(module)
        if verify_each:
            try:
                pa.verify(module)
            except PolyarchError as e:
                raise PolyarchError(f"after {p.NAME}: {e.what}", e.where, e.fix) from None
    return module
