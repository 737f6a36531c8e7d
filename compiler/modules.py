"""The partitioned module as the compiler reads it: its segments, its schedule, its text.

Helpers over a module after outline-segments (dialects/polyarch.py names the attributes)."""

from typing import TYPE_CHECKING

from ..dialects import polyarch as pa
from ..errors import PolyarchError

if TYPE_CHECKING:
    from torch_mlir import ir


def clone_module(module: "ir.Module") -> "ir.Module":
    """A copy of a module in its context. Clones share the context's weight blobs (dense
    resources), so a copy costs IR, not weights. Call inside `with module.context`."""
    from torch_mlir import ir

    copy = ir.Module.parse("module {}")
    for op in module.body.operations:
        op.operation.clone(ip=ir.InsertionPoint(copy.body))
    attrs = module.operation.attributes
    for i in range(len(attrs)):
        named = attrs[i]
        copy.operation.attributes[named.name] = named.attr
    return copy


def segments_of(module: "ir.Module") -> list:
    """[(name, device, func op)] in module order."""
    return [(s.name, s.device, s.fn) for s in pa.Segment.all(module)]


def tensor_desc(type_: "ir.Type") -> dict:
    shape, et = pa.tensor_info(type_)
    return {"shape": shape, "dtype": DTYPE_NAMES.get(et, et)}


# Segment boundary dtypes as the compiled function sees them. IREE demotes f64 to f32
# for every target (its default), so an f64 tensor crossing segments is a float32 buffer.
DTYPE_NAMES = {
    "f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float32", "si64": "int64", "si32": "int32",
    "si16": "int16", "si8": "int8", "ui8": "uint8", "i1": "bool", "complex<f32>": "complex64", "complex<f64>": "complex64",
}


def schedule_of(module: "ir.Module") -> tuple:
    """@main after outline-segments -> (schedule steps, output value names)."""
    from ..passes.common import main_func, tensor_bytes

    main = main_func(module)
    names = {}
    for i, a in enumerate(main.regions[0].blocks[0].arguments):
        names[a] = f"in{i}"
    steps, counter = [], [0]

    def fresh(v):
        names[v] = f"v{counter[0]}"
        counter[0] += 1
        return names[v]

    for op in main.regions[0].blocks[0].operations:
        name = op.operation.name
        if name == "func.call":
            steps.append({"op": "call", "segment": op.attributes["callee"].value,
                          "args": [names[a] for a in op.operands], "results": [fresh(r) for r in op.results]})
        elif name == pa.TRANSFER:
            steps.append({"op": "transfer", "from": op.attributes["from"].value, "to": op.attributes["to"].value,
                          "src": names[op.operands[0]], "dst": fresh(op.results[0]), "bytes": tensor_bytes(op.operands[0])})
        elif name == "func.return":
            return steps, [names[v] for v in op.operands]
        else:
            raise PolyarchError(f"unexpected op {name} in @main after outline-segments")
    raise PolyarchError("@main has no return")


def plan_text(module: "ir.Module") -> str:
    """The partitioned module as text, weights and large constants elided."""
    return module.operation.get_asm(large_elements_limit=16, large_resource_limit=64, enable_debug_info=True, pretty_debug_info=False)


