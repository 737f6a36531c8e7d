"""The pass table: one entry per pass, shared by the driver and `polyarch-opt`.

A pipeline is written as in mlir-opt: `annotate-costs,assign-devices{devices=cpu,vulkan pin=torch.aten.mm=cpu},outline-segments`.
Inside braces, options are separated by spaces; a repeated option collects a list."""

from dataclasses import dataclass

from ..errors import PolyarchError
from . import annotate_costs, assign_devices, conv_to_matmul, guard_indices, outline_segments, pool_to_mean


@dataclass(frozen=True)
class PassInfo:
    name: str
    run: object
    options: dict
    doc: str


PASSES = {
    p.name: p
    for p in (
        PassInfo("annotate-costs", annotate_costs.run, annotate_costs.OPTIONS, annotate_costs.__doc__),
        PassInfo("assign-devices", assign_devices.run, assign_devices.OPTIONS, assign_devices.__doc__),
        PassInfo("outline-segments", outline_segments.run, outline_segments.OPTIONS, outline_segments.__doc__),
        PassInfo("conv-to-matmul", conv_to_matmul.run, conv_to_matmul.OPTIONS, conv_to_matmul.__doc__),
        PassInfo("pool-to-mean", pool_to_mean.run, pool_to_mean.OPTIONS, pool_to_mean.__doc__),
        PassInfo("guard-indices", guard_indices.run, guard_indices.OPTIONS, guard_indices.__doc__),
    )
}

LIST_OPTIONS = {"pin", "profile", "verdicts"}


def parse_pipeline(text):
    """'a,b{k=v k2=v2},c' -> [(name, {k: v})]."""
    out, i, text = [], 0, text.strip()
    while i < len(text):
        j = i
        while j < len(text) and text[j] not in ",{":
            j += 1
        name = text[i:j].strip()
        opts = {}
        if j < len(text) and text[j] == "{":
            close = text.find("}", j)
            if close < 0:
                raise PolyarchError(f"unclosed '{{' in pass pipeline '{text}'")
            for item in text[j + 1 : close].split():
                key, sep, val = item.partition("=")
                if not sep:
                    raise PolyarchError(f"pass option '{item}' of {name} is not KEY=VALUE")
                if key in LIST_OPTIONS:
                    opts.setdefault(key, []).append(val)
                else:
                    opts[key] = val
            j = close + 1
        if name not in PASSES:
            raise PolyarchError(f"unknown pass '{name}'", fix=f"use one of {', '.join(PASSES)}")
        unknown = set(opts) - set(PASSES[name].options)
        if unknown:
            raise PolyarchError(f"unknown option(s) {', '.join(sorted(unknown))} for pass {name}", fix=f"{name} takes {', '.join(PASSES[name].options) or 'no options'}")
        out.append((name, opts))
        while j < len(text) and text[j] in ", ":
            j += 1
        i = j
    return out


def run_pipeline(module, pipeline):
    """Run passes on `module` in place; `pipeline` is a string or a list of (name, options)."""
    from ..dialects import polyarch as pa

    if isinstance(pipeline, str):
        pipeline = parse_pipeline(pipeline)
    for name, opts in pipeline:
        PASSES[name].run(module, **opts)
    pa.verify(module)
    return module
