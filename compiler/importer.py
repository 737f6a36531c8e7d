"""PyTorch -> torch dialect (backend contract) through torch.export and torch-mlir's FxImporter.

    module, signature = import_model(model_or_exported_program, example_inputs)

Every op carries its source as an MLIR location: a name (the nn.Module path, e.g.
'encoder.layer.0.attention.self') around the file:line call stack of the FX node;
passes use it for pins and error messages."""

import functools
import os
import re
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import PolyarchError

if TYPE_CHECKING:
    import torch

_DTYPES = {
    "f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64",
    "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "i1": "bool", "bool": "bool",
}
_INPUT = re.compile(r"^(?P<dims>(\d+x)*)(?P<dtype>[a-z0-9]+)$")

INPUT_HELP = "write an input as DIMSxDTYPE, e.g. 4x64xi64 or 1x3x224x224xf32 (dtypes: " + ", ".join(_DTYPES) + ")"


DEFAULT_MAX = 1024
_DYNAMIC = re.compile(r"^(?P<input>[A-Za-z_][A-Za-z0-9_.]*):(?P<dim>\d+)(?::(?P<max>\d+))?(?:=(?P<name>[A-Za-z_]\w*))?$")
DYNAMIC_HELP = (f"write a dynamic dimension as INPUT:DIM[:MAX][=NAME]: INPUT is an input's name or inputN (N counts "
                f"from 0), DIM its dimension, MAX the largest size the bundle accepts (default {DEFAULT_MAX}); "
                "dimensions given the same NAME must be equal, e.g. input0:0:64=batch input1:0:64=batch for "
                "two inputs sharing a batch of 1 to 64")


def parse_dynamic_dim(text: str) -> tuple:
    """'input0:0:64=batch' -> ('input0', 0, 64, 'batch'); MAX defaults to DEFAULT_MAX, NAME to None."""
    m = _DYNAMIC.match(str(text).strip())
    if not m or (m["max"] is not None and int(m["max"]) < 1):
        raise PolyarchError(f"bad dynamic dimension '{text}'", fix=DYNAMIC_HELP)
    return m["input"], int(m["dim"]), int(m["max"]) if m["max"] else DEFAULT_MAX, m["name"]


def parse_input_spec(text: str) -> tuple:
    """'4x64xi64' -> ((4, 64), 'int64')."""
    m = _INPUT.match(text.strip())
    if not m or m["dtype"] not in _DTYPES:
        raise PolyarchError(f"bad input spec '{text}'", fix=INPUT_HELP)
    dims = tuple(int(d) for d in m["dims"].split("x") if d)
    return dims, _DTYPES[m["dtype"]]


def example_from_spec(text: str, seed: int = 0) -> "torch.Tensor":
    """A deterministic example tensor for an input spec: small non-negative ints, normal floats."""
    import torch

    dims, dtype = parse_input_spec(text)
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    if dt == torch.bool:
        return torch.rand(dims, generator=g) > 0.5
    try:
        if dt.is_floating_point:
            return torch.randn(dims, generator=g).to(dt)
        t = torch.randint(0, 100, dims, generator=g, dtype=dt)
    except (RuntimeError, MemoryError) as e:  # more memory than the host has
        size = dt.itemsize
        for d in dims:
            size *= d
        raise PolyarchError(f"cannot make an example input of {text} ({size / 2**30:.3g} GiB): {str(e).splitlines()[0]}",
                            fix="give the shapes of one real call with -i (a dynamic dimension's example can be small: "
                                "--dynamic-dim INPUT:DIM:MAX)") from None
    t.polyarch_made_from_spec = True  # the driver may fold it into an index input's range
    return t


def _persist_buffers(ep):
    """torch-mlir's frozen import reads buffers from state_dict, where torch.export leaves
    out non-persistent ones (e.g. BERT's position_ids); move them there."""
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "BUFFER" and not spec.persistent and spec.target in ep.constants:
            ep.state_dict[spec.target] = ep.constants.pop(spec.target)
            spec.persistent = True


def _constant_values(ep):
    """{placeholder name: the tensor} for the graph inputs torch-mlir's frozen import replaces by
    their values (parameters, buffers, lifted constants), left out where the model writes them."""
    values = {}
    for spec in ep.graph_signature.input_specs:
        kind, target = spec.kind.name, spec.target
        if kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") and target is not None:
            t = ep.state_dict.get(target) if target in ep.state_dict else ep.constants.get(target)
            if t is not None:
                values[spec.arg.name] = t
    return values


def _prepare_constants(ep):
    """Two rewrites of the exported graph that torch-mlir's frozen import needs, as it puts the
    values of parameters, buffers and constants in place of their graph inputs:
    - a constant inside a list argument (`biases[:, self.idxs]`: aten.index.Tensor's list of
      indices; LeViT, EfficientFormer, Swin) became a raw tensor in a list of graph values
      ("Heterogeneous lists are not supported: expected vtensor, got torch.Tensor"): it is
      read through an aten.clone node of the graph instead;
    - `int(self.buffer)` (aten.item of a constant, kept by a strict export) had no value to
      import: folded to the number. -> the number of rewrites."""
    import torch

    values = _constant_values(ep)
    graph, done = ep.graph_module.graph, 0
    consts = {n for n in graph.nodes if n.op == "placeholder" and n.name in values}

    def through_graph(x, node):
        """x, or an aten.clone of x in front of `node` where x is a constant's placeholder."""
        if x not in consts:
            return x
        with graph.inserting_before(node):
            x2 = graph.call_function(torch.ops.aten.clone.default, (x,))
        x2.meta = dict(x.meta)
        return x2

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default) \
                and node.args[0] in consts and values[node.args[0].name].numel() == 1:
            node.replace_all_uses_with(values[node.args[0].name].item())
            graph.erase_node(node)
            done += 1
            continue
        for i, a in enumerate(node.args):
            if isinstance(a, (list, tuple)) and any(x in consts for x in a if isinstance(x, torch.fx.Node)):
                done += sum(1 for x in a if isinstance(x, torch.fx.Node) and x in consts)
                node.update_arg(i, type(a)(through_graph(x, node) if isinstance(x, torch.fx.Node) else x for x in a))
    if done:
        graph.lint()
        ep.graph_module.recompile()
    return done


def _number_outputs_as_tensors(ep):
    """Outputs that are Python numbers or bools (constants, or sizes such as x.shape[0]) become
    0-d tensors of the graph (int64, float32, bool), so that they come back as 0-d arrays.
    -> the number of outputs rewritten."""
    import torch

    graph = ep.graph_module.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    dtypes = {bool: torch.bool, int: torch.int64, float: torch.float32}
    new, done = [], 0
    for a in out_node.args[0]:
        val = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        kind = next((k for k in (bool, int, float) if isinstance(val, k)), None)
        if isinstance(val, torch.SymInt):
            kind = int
        elif isinstance(val, torch.SymFloat):
            kind = float
        if kind is None:
            new.append(a)
            continue
        with graph.inserting_before(out_node):
            t = graph.call_function(torch.ops.aten.scalar_tensor.default, (a,), {"dtype": dtypes[kind]})
        t.meta["val"] = torch.empty((), dtype=dtypes[kind])
        new.append(t)
        done += 1
    if done:
        out_node.args = (type(out_node.args[0])(new),) + tuple(out_node.args[1:])
        graph.lint()
        ep.graph_module.recompile()
    return done


def in_torch(path: str) -> bool:
    """Whether a source file is torch's own (nn.Linear's forward, functional.py...): a frame that
    names no line of the user's model."""
    return os.path.abspath(path).startswith(_torch_dir())


@functools.lru_cache(maxsize=1)
def _torch_dir():
    import torch

    return os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _importer_with_module_paths(ctx):
    """A FxImporter whose op locations are NameLoc(module path) around the file:line call stack,
    its innermost frame the model's own line (torch's frames, nn.Linear's forward for every
    Linear, dropped from the inner end)."""
    from torch_mlir import ir
    from torch_mlir.extras.fx_importer import ContextCache, FxImporter

    class _ModulePathCache(ContextCache):
        __slots__ = []

        def _frames_loc(self, node):
            frames = re.findall(r'File "([^"]+)", line ([0-9]+),', node.meta.get("stack_trace") or "")
            while len(frames) > 1 and in_torch(frames[-1][0]):
                frames.pop()
            locs = [ir.Location.file(f, int(n), col=0, context=self._c) for f, n in frames]
            if len(locs) > 1:
                return ir.Location.callsite(locs[-1], locs[-2::-1], context=self._c)
            return locs[0] if locs else None

        def get_node_location(self, node):
            loc = self._frames_loc(node) if node.meta.get("stack_trace") else super().get_node_location(node)
            stack = node.meta.get("nn_module_stack") or {}
            path = ""
            if stack:
                fqn = list(stack.values())[-1][0]
                path = re.sub(r"^L\['self'\]\.?|^L__self___", "", str(fqn))
            if not path:
                return loc
            return ir.Location.name(path, childLoc=loc or ir.Location.unknown(self._c), context=self._c)

    importer = FxImporter(context=ctx, hooks=_zero_copy_literals())
    importer._cc = _ModulePathCache(ctx, py_attr_tracker=importer._py_attr_tracker)
    return importer


def _zero_copy_literals():
    """FxImporter hooks under which weights enter the IR as resources referencing the
    tensors' own memory. torch-mlir's default path copies each through `tensor.tolist()`:
    some 30 bytes of Python objects per element at its peak, so a 1B-parameter model
    needs more than 24 GiB for that alone. Tensors it cannot view (fake tensors, bf16,
    single elements) take the default path."""
    import numpy as np
    import torch
    from torch_mlir import ir
    from torch_mlir.extras.fx_importer import FxImporterHooks, create_mlir_tensor_type

    as_numpy = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
                torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8}

    class ZeroCopyLiterals(FxImporterHooks):
        def __init__(self):
            self._attrs = {}  # id(tensor) -> (tensor, attribute): a tensor used twice is one resource

        def resolve_literal(self, gni, literal, info):
            if not isinstance(literal, torch.Tensor) or literal.dtype not in as_numpy or literal.numel() <= 1:
                return None
            cached = self._attrs.get(id(literal))
            if cached is None or cached[0] is not literal:
                try:
                    array = literal.detach().contiguous().numpy()  # shares the tensor's memory
                except Exception:
                    return None
                shape = "_".join(str(d) for d in literal.shape)
                attr = ir.DenseResourceElementsAttr.get_from_buffer(
                    array, f"torch_tensor_{shape}_{literal.dtype}", create_mlir_tensor_type(literal))
                cached = self._attrs[id(literal)] = (literal, attr)
            op = ir.Operation.create("torch.vtensor.literal", results=[gni._cc.tensor_to_vtensor_type(literal)],
                                     attributes={"value": cached[1]})
            return op.result

    return ZeroCopyLiterals()


def _one_line(exc):
    text = str(exc)
    errs = re.findall(r"error: ([^\n]+)", text)
    if errs:
        locs = re.findall(r'"([^"]+\.py)":(\d+)', text)
        where = f" at {locs[0][0]}:{locs[0][1]}" if locs else ""
        return errs[0] + where
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def signature_of(ep: "torch.export.ExportedProgram") -> dict:
    """Input and output names/shapes/dtypes of the user-visible signature. A dynamic
    dimension has its example size in `shape` and an entry in `dynamic`:
    {"dim", "symbol" (inputs whose dims share a symbol must agree), "min", "max"
    (None: unbounded)}; an output's entry has the size's expression instead."""
    import torch

    ranges = {str(k): v for k, v in ep.range_constraints.items()}

    def bound(x):
        try:
            return int(x)
        except (TypeError, ValueError, OverflowError):
            return None  # int_oo: no upper bound

    def desc(val, output=False):
        shape, dynamic = [], []
        for i, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt):
                expr = str(d.node.expr)
                if d.node.hint is None:  # an unbacked size: it depends on the values, not the shapes
                    raise PolyarchError(
                        f"an output's dimension {i} depends on the input values (size {expr}), as after x[mask], "
                        "nonzero or unique", fix="return a fixed-size result (torch.where(mask, x, 0) instead of "
                        "x[mask]) and select on the host")
                shape.append(int(d.node.hint))
                if output or expr not in ranges:
                    dynamic.append({"dim": i, "expr": expr})
                else:
                    r = ranges[expr]
                    dynamic.append({"dim": i, "symbol": expr, "min": bound(r.lower), "max": bound(r.upper)})
            else:
                shape.append(int(d))
        out = {"shape": shape, "dtype": str(val.dtype).replace("torch.", "")}
        if dynamic:
            out["dynamic"] = dynamic
        return out

    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            val = placeholders[spec.arg.name].meta["val"]
            if not isinstance(val, torch.Tensor):
                raise PolyarchError(f"input '{spec.arg.name}' is not a tensor", fix="pass only tensors as example inputs")
            inputs.append({"name": spec.arg.name, **desc(val)})
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outputs = []
    for i, a in enumerate(out_node.args[0]):
        val = a.meta.get("val") if hasattr(a, "meta") else a
        if isinstance(val, torch.Tensor):
            outputs.append({"name": f"output{i}", **desc(val, output=True)})
        elif val is not None:
            raise PolyarchError(f"output {i} of the model is {val}, a Python {type(val).__name__}, not a tensor; "
                                "a bundle returns tensors", fix=f"return torch.tensor({val}) if it is needed, or leave it out")
    return {"inputs": inputs, "outputs": outputs}


def _input_names(model, n):
    import inspect

    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return (params + [f"input{i}" for i in range(len(params), n)])[:n]


def _dynamic_shapes(model, example_inputs, dynamic_dims):
    """--dynamic-dim specs -> (torch.export dynamic_shapes, example inputs). An example of
    size 1 in a dynamic dimension is repeated to size 2 for tracing (torch.export would
    otherwise fix the dimension to 1)."""
    import torch
    from torch.export import Dim

    names = _input_names(model, len(example_inputs))
    shapes = [None] * len(example_inputs)
    examples = list(example_inputs)
    named = {}  # NAME -> (Dim, max): dimensions sharing a name share one symbol
    for text in dynamic_dims:
        ref, dim, top, dim_name = parse_dynamic_dim(text)
        idx = _input_index(ref, names)
        if idx is None:
            raise PolyarchError(f"--dynamic-dim {text}: the model has no input '{ref}'",
                                fix=f"name one of {', '.join(names) or 'no inputs'}, or inputN by position")
        x = examples[idx]
        if not isinstance(x, torch.Tensor) or dim >= x.dim():
            raise PolyarchError(f"--dynamic-dim {text}: input '{names[idx]}' has rank {getattr(x, 'ndim', 0)}, no dimension {dim}",
                                fix=f"give a dimension below {getattr(x, 'ndim', 0)}")
        if x.shape[dim] > top:
            raise PolyarchError(f"--dynamic-dim {text}: the example's size {x.shape[dim]} is above the bound {top}",
                                fix="raise MAX or give a smaller example")
        if x.shape[dim] == 1:
            examples[idx] = x = torch.cat([x, x], dim)
        if dim_name is None:
            spec = Dim.DYNAMIC(min=1, max=top)
        else:
            if dim_name in named and named[dim_name][1] != top:
                raise PolyarchError(f"--dynamic-dim {text}: '{dim_name}' was given the bound {named[dim_name][1]} before",
                                    fix="give dimensions that share a name the same MAX")
            spec = named.setdefault(dim_name, (Dim(dim_name, min=1, max=top), top))[0]
        shapes[idx] = {**(shapes[idx] or {}), dim: spec}
    return tuple(shapes), tuple(examples)


def _input_index(ref, names):
    """An input's position from its name or 'inputN' (a real name wins); None if neither."""
    if ref in names:
        return names.index(ref)
    m = re.fullmatch(r"input(\d+)", ref)
    return int(m[1]) if m and int(m[1]) < len(names) else None


def export(model: Any, example_inputs: Iterable, dynamic_dims: Iterable = ()) -> "torch.export.ExportedProgram":
    """nn.Module + example inputs -> ExportedProgram (an ExportedProgram is returned as is;
    its dynamic dimensions, if it was exported with any, are kept).
    dynamic_dims: INPUT:DIM[:MAX] specs (see DYNAMIC_HELP)."""
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        if dynamic_dims:
            raise PolyarchError("--dynamic-dim applies to an nn.Module; an ExportedProgram keeps the dynamic dimensions it was exported with",
                                fix="export it with dynamic_shapes=..., or pass the nn.Module")
        return model
    if not isinstance(model, torch.nn.Module):
        raise PolyarchError(f"cannot compile a {type(model).__name__}", fix="pass a torch.nn.Module or a torch.export.ExportedProgram")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model = model.eval()
    dynamic_shapes = None
    if dynamic_dims:
        dynamic_shapes, example_inputs = _dynamic_shapes(model, tuple(example_inputs), dynamic_dims)
    import contextlib
    import torch.fx.experimental._config as fx_config

    # Size-oblivious tracing: a dynamic dimension's range then includes 1 (torch.export
    # otherwise assumes >= 2 and may specialise code for it).
    oblivious = fx_config.patch(backed_size_oblivious=True) if dynamic_dims else contextlib.nullcontext()
    import logging

    # torch logs a failed op's whole traceback (and a data-dependent guard's graph) before
    # raising; the error is reported below.
    quiet = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), oblivious:
            try:
                return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
            except Exception as e:
                if not _data_dependent(e):
                    raise
                # non-strict export traces with fake tensors: int(self.buffer) has no value there;
                # strict export (TorchDynamo) sees the buffer's real value and can take it
                return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=True)
    except Exception as e:  # torch.export's errors are long; keep the first line and the cause
        if dynamic_dims and ("Constraint" in type(e).__name__ or "specializ" in str(e) or "dynamic" in str(e).lower()):
            raise PolyarchError(f"a dimension marked dynamic ({', '.join(dynamic_dims)}) cannot stay dynamic in {type(model).__name__}: "
                                f"{_first_lines(e)}",
                                fix="the model fixes that size (a reshape to a constant, an op against a fixed-size tensor): "
                                    "drop that --dynamic-dim, or make the model size-generic") from e
        shapes = ", ".join("x".join(map(str, t.shape)) + "x" + str(t.dtype).replace("torch.", "")
                           for t in example_inputs if isinstance(t, torch.Tensor))
        raise PolyarchError(f"torch.export failed for {type(model).__name__}: {_one_line(e).rstrip('.')}",
                            fix=f"check that the example inputs ({shapes or 'none'}) have the shapes and dtypes the model "
                                "takes (-i); otherwise make the model exportable (no data-dependent Python control "
                                "flow), or pass an ExportedProgram") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _data_dependent(exc: BaseException) -> bool:
    """Whether a non-strict export failed on a value it could not know (int() of a tensor)."""
    return "DataDependent" in type(exc).__name__ or "data-dependent expression" in str(exc)


def _first_lines(exc, n=3):
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip() and not l.strip().startswith(("-", "For more"))]
    return " ".join(lines[:n])


# What fx.export_and_import(output_type="torch") runs after importing. Run here because
# torch-mlir's runner first prints the whole module, weights included as hex, for its
# error report: about 4x the weight bytes of transient memory.
BACKEND_PIPELINE = ("builtin.module(func.func(torch-match-quantized-custom-ops), "
                    "torchdynamo-export-to-torch-backend-pipeline{ extra-library=})")


def _lower_to_backend_contract(module):
    from torch_mlir.passmanager import PassManager

    with module.context:
        PassManager.parse(BACKEND_PIPELINE).run(module.operation)


def is_onnx(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx")


def import_onnx(path: str, example_inputs: Iterable = ()) -> tuple:
    """An ONNX model file -> (torch-dialect ir.Module, signature), through torch-mlir's ONNX
    importer and its onnx -> torch lowering. example_inputs (arrays, tensors or DIMSxDTYPE
    specs, optional) fix the shapes of inputs whose dimensions are symbolic in the file."""
    import numpy as np
    import onnx
    from onnx import helper

    path = os.fspath(path)
    try:
        proto = onnx.load(path)
    except FileNotFoundError:
        raise PolyarchError(f"no ONNX model at '{path}'", fix="check the path")
    except Exception as e:
        raise PolyarchError(f"'{path}' is not a readable ONNX model: {_one_line(e)}", fix="re-export it (torch.onnx.export)")
    inits = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    if example_inputs and len(example_inputs) != len(graph_inputs):
        raise PolyarchError(f"{path} has {len(graph_inputs)} input(s) ({', '.join(i.name for i in graph_inputs)}), "
                            f"{len(example_inputs)} shape(s) given", fix="give one --input per model input, in order")
    for vi, ex in zip(graph_inputs, example_inputs or [None] * len(graph_inputs)):
        _fix_onnx_input(path, vi, ex)
    module, proto = _onnx_to_torch(path, proto)  # proto: with the shapes inferred

    def desc(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "shape": [d.dim_value for d in t.shape.dim],
                "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name}

    return module, {"inputs": [desc(v) for v in graph_inputs], "outputs": [desc(v) for v in proto.graph.output]}


def _fix_onnx_input(path, vi, ex):
    """Set an ONNX graph input's symbolic dimensions from its example (None: none given);
    refuses a rank or a fixed dimension that differs, and a symbolic dimension left."""
    dims = vi.type.tensor_type.shape.dim
    if ex is not None:
        shape = _spec_shape(ex) if isinstance(ex, str) else list(ex.shape)
        if len(shape) != len(dims):
            raise PolyarchError(f"input '{vi.name}' of {path} has rank {len(dims)}, the shape given has rank {len(shape)}",
                                fix="give a shape of the model's rank")
        for d, n in zip(dims, shape):
            if d.HasField("dim_value") and d.dim_value != n:
                raise PolyarchError(f"input '{vi.name}' of {path} has dimension {d.dim_value} where {n} was given",
                                    fix="only symbolic dimensions can be set")
            d.ClearField("dim_param")
            d.dim_value = int(n)
    free = [d.dim_param or "?" for d in dims if not d.HasField("dim_value")]
    if free:
        example = "x".join("1" if not d.HasField("dim_value") else str(d.dim_value) for d in dims)
        raise PolyarchError(f"input '{vi.name}' of {path} has symbolic dimension(s) {', '.join(free)}",
                            fix=f"fix them with --input (e.g. --input {example}x...)")


def _onnx_to_torch(path, proto):
    """The ONNX graph imported by torch-mlir and lowered to the torch backend contract, its
    function named main. -> (module, the graph with its shapes inferred)."""
    import onnx
    from torch_mlir import ir
    from torch_mlir.extras import onnx_importer
    from torch_mlir.passmanager import PassManager

    from ..dialects.polyarch import make_context

    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        ctx = make_context()
        info = onnx_importer.ModelInfo(proto)
        module = info.create_module(context=ctx)
        onnx_importer.NodeImporter.define_function(info.main_graph, module.operation).import_all()
    except Exception as e:
        raise PolyarchError(f"torch-mlir could not import {path}: {_one_line(e)}",
                            fix="the ONNX op named is not supported by torch-mlir 20261001's importer") from e
    try:
        with ctx:
            PassManager.parse("builtin.module(torch-onnx-to-torch-backend-pipeline)").run(module.operation)
    except Exception as e:
        raise PolyarchError(f"torch-mlir could not lower {path} to the torch backend contract: {_one_line(e)}",
                            fix="the ONNX op named is not supported by torch-mlir 20261001; re-export with another opset or file an issue") from e
    funcs = [op for op in module.body.operations if op.operation.name == "func.func"]
    with ctx:
        funcs[0].attributes["sym_name"] = ir.StringAttr.get("main")
    return module, proto


def _spec_shape(spec):
    *dims, _ = spec.split("x")
    return [int(d) for d in dims]


def _name_dynamic_dims(sig, dynamic_dims):
    """Put the NAME of INPUT:DIM:MAX=NAME specs on the signature's dynamic entries (for messages)."""
    names = [i["name"] for i in sig["inputs"]]
    for text in dynamic_dims:
        ref, dim, _, name = parse_dynamic_dim(text)
        idx = _input_index(ref, names)
        if name and idx is not None:
            for d in sig["inputs"][idx].get("dynamic", ()):
                if d["dim"] == dim:
                    d["name"] = name


def _record_nominal_shapes(module, sig):
    """Turn torch-mlir's symbolic shape bindings into polyarch.shapes / polyarch.arg_shapes
    (every dynamic dim at its example size, for the cost model) and drop the binding ops.
    A result torch-mlir left unbound takes the sizes of a same-rank operand, else every
    dynamic dim takes the first symbol's example size."""
    from torch_mlir import ir

    from ..dialects import polyarch as pa

    values = {d["symbol"]: s for i in sig["inputs"] for d in i.get("dynamic", ()) if "symbol" in d
              for s in [i["shape"][d["dim"]]]}
    default = next(iter(values.values()), 1)
    main = next(op for op in module.body.operations if op.operation.name == "func.func")
    block = main.regions[0].blocks[0]
    with module.context:
        bound = _take_shape_bindings(block, values, default)

        def shape_of(v):
            info = pa.tensor_info(v.type)
            if info is None:
                return []
            shape = info[0]
            if -1 not in shape:
                return shape
            if v in bound and len(bound[v]) == len(shape):
                return bound[v]
            for o in v.owner.operands if not isinstance(v.owner, ir.Block) else ():
                oi = pa.tensor_info(o.type)
                if oi and len(oi[0]) == len(shape) and -1 in oi[0]:
                    known = pa.nominal_shape(o)
                    return [k if d == -1 else d for d, k in zip(shape, known)]
            return [default if d == -1 else d for d in shape]

        pa.set_nominal_shapes(ir, main, list(block.arguments), pa.ARG_SHAPES, shape_of)
        for op in block.operations:
            pa.set_nominal_shapes(ir, op, list(op.results), pa.SHAPES, shape_of)


def _take_shape_bindings(block, values, default):
    """{tensor value: its shape at the example sizes} from the block's torch.symbolic_int and
    torch.bind_symbolic_shape ops, which are erased."""
    names, bound, drop = {}, {}, []
    for op in block.operations:
        name = op.operation.name
        if name == "torch.symbolic_int":
            names[op.results[0]] = values.get(op.attributes["symbol_name"].value, default)
            drop.append(op)
        elif name == "torch.bind_symbolic_shape":
            syms = [names.get(v, default) for v in list(op.operands)[1:]]
            try:
                bound[op.operands[0]] = [_evaluate(e, syms) for e in op.attributes["shape_expressions"].value.results]
            except (ValueError, ZeroDivisionError):
                pass
            drop.append(op)
    names.clear()
    for op in reversed(drop):  # the bindings before the symbols they use
        op.operation.erase()
    return bound


def _evaluate(e, syms):
    """An affine expression over symbols at the given symbol values."""
    from torch_mlir import ir

    if isinstance(e, ir.AffineConstantExpr):
        return e.value
    if isinstance(e, ir.AffineSymbolExpr):
        return syms[e.position]
    a, b = _evaluate(e.lhs, syms), _evaluate(e.rhs, syms)
    if isinstance(e, ir.AffineAddExpr):
        return a + b
    if isinstance(e, ir.AffineMulExpr):
        return a * b
    if isinstance(e, ir.AffineFloorDivExpr):
        return a // b
    if isinstance(e, ir.AffineCeilDivExpr):
        return -(-a // b)
    if isinstance(e, ir.AffineModExpr):
        return a % b
    raise ValueError(str(e))


def _refuse_state_writes(ep):
    """Refuse a forward that writes in place into a buffer or an input (through views too).
    A bundle is a function without state: such a buffer was frozen at its exported value
    and the write lost, a silently wrong result from the second call on. An input written in
    place and returned (`x.mul_(2); return x`) has a well-defined result: allowed, and the
    names of those inputs are returned (the caller's array is not written)."""
    kinds = {s.arg.name: (s.kind.name, s.target) for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    returned = {_view_base(a).name for a in out_node.args[0] if isinstance(a, type(out_node))}
    written = []
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for i, arg in enumerate(schema.arguments):
            if not (arg.alias_info and arg.alias_info.is_write):
                continue
            base = _view_base(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
            kind, target = kinds.get(getattr(base, "name", None), (None, None))
            if kind not in ("BUFFER", "USER_INPUT"):
                continue
            if kind == "USER_INPUT" and base.name in returned and base is node.args[i]:  # written whole, returned
                written.append(base.name)
                continue
            frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
            where = f"{frames[-1][0]}:{frames[-1][1]}" if frames else None
            if kind == "BUFFER":
                raise PolyarchError(
                    f"the model writes into its buffer '{target}' in place ({schema.name}); a bundle has no state, so "
                    "the buffer would keep its exported value and the write be lost", where,
                    fix="return the new value as an output and pass it back in as an input on the next call "
                        "(a functional cache)")
            raise PolyarchError(f"the model writes into its input '{base.name}' in place ({schema.name}); a bundle does "
                                "not change the arrays it is given", where,
                                fix="compute a new tensor instead (y = x + 1, not x.add_(1)) and return it if needed")
    return list(dict.fromkeys(written))


def _drop_input_writes(ep):
    """The program with its writes into inputs made functional (torch-mlir's decompositions, as
    its import runs them) and the written values left out of the outputs (a bundle does not
    write its inputs back). -> the new ExportedProgram."""
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    ep = ep.run_decompositions(get_decomposition_table())
    specs = ep.graph_signature.output_specs
    drop = {i for i, s in enumerate(specs) if s.kind.name == "USER_INPUT_MUTATION"}
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    out_node.args = (tuple(a for i, a in enumerate(out_node.args[0]) if i not in drop),) + tuple(out_node.args[1:])
    specs[:] = [s for i, s in enumerate(specs) if i not in drop]
    ep.graph_module.recompile()
    return ep


def _view_base(value):
    """The tensor a value views (through view, slice, transpose... and in-place results)."""
    while getattr(value, "op", None) == "call_function":
        schema = getattr(value.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None or not value.args:
            break
        value = value.args[0]
    return value


def import_model(model: Any, example_inputs: Iterable = (), dynamic_dims: Iterable = ()) -> tuple:
    """-> (torch-dialect ir.Module in a polyarch context, signature dict). `model` is an
    nn.Module, an ExportedProgram, or the path of an ONNX model. dynamic_dims:
    INPUT:DIM[:MAX] specs of dimensions that stay dynamic (nn.Module only)."""
    from torch_mlir import fx

    from ..dialects.polyarch import make_context

    if is_onnx(model):
        if dynamic_dims:
            raise PolyarchError("--dynamic-dim is not supported for ONNX models yet",
                                fix="compile the PyTorch model with --dynamic-dim, or fix the ONNX model's symbolic dimensions with --input")
        return import_onnx(model, example_inputs)

    ep = export(model, example_inputs, dynamic_dims)
    written = _refuse_state_writes(ep)
    if written:
        ep = _drop_input_writes(ep)
    _persist_buffers(ep)
    _prepare_constants(ep)
    _number_outputs_as_tensors(ep)
    sig = signature_of(ep)
    _name_dynamic_dims(sig, dynamic_dims)
    dynamic = any("dynamic" in i for i in sig["inputs"])
    ctx = make_context()
    importer = _importer_with_module_paths(ctx)
    try:
        try:
            module = fx.export_and_import(ep, output_type="raw", fx_importer=importer, func_name="main",
                                          import_symbolic_shape_expressions=dynamic)
        except NotImplementedError:
            if not dynamic:
                raise
            # torch-mlir cannot write every size expression (e.g. FloorDiv) as an affine map:
            # import without them; the sizes costs are predicted at are then estimated.
            importer = _importer_with_module_paths(ctx)
            module = fx.export_and_import(ep, output_type="raw", fx_importer=importer, func_name="main")
        _lower_to_backend_contract(module)
    except Exception as e:
        text = _one_line(e)
        op = re.search(r"'([a-z_]+\.[a-z_.]+)' op|\b(torch\.aten\.[a-z_0-9.]+)", text)
        where = re.search(r" at (\S+\.py:\d+)$", text)
        what = (f"the op {op.group(1) or op.group(2)}" if op else "an op") + (f" at {where.group(1)}" if where else "")
        raise PolyarchError(f"torch-mlir could not lower the model to the torch backend contract: {text}",
                            fix=f"{what} is not supported by torch-mlir 20261001 (its FX importer or lowering): rewrite "
                                "that line with other ops, or file an issue with torch-mlir") from e
    if dynamic:
        _record_nominal_shapes(module, sig)
    if written:  # (said by the driver as progress; not part of the signature)
        sig["notes"] = [f"the model writes into its input '{n}' in place and returns it: the bundle returns the written "
                        "value, and leaves the caller's array as it was (PyTorch would have written it)" for n in written]
    return module, sig
