"""annotate-costs: give every placeable op in @main `polyarch.cost`, and with
`devices=` its predicted time on each device.

Options:
  devices=cpu,vulkan        devices to predict times for (none: costs only)
  profile=FILE.json         (repeatable) device profiles; devices without one use the
                            built-in spec-sheet profile of their kind (targets/profiles.py)
  verdicts=FILE.json        (repeatable) what was measured on a device (compiler/grounding.py):
                            its "corrections" {matmul|conv|other: factor} multiply the
                            predicted times of ops of that class there

    polyarch.cost = {bytes_read = R : i64, bytes_written = W : i64, flops = F : i64}
    polyarch.time_us = {cpu = T0 : f64, vulkan = T1 : f64}

The time is a roofline: max(flops / rate, bytes / memory bandwidth) + dispatches x
launch overhead, where rate is peak[element type], and for matmuls and convolutions
x op_efficiency[class] x flops / (flops + half_flops) (see op_time). The module gets polyarch.profiles naming the
profile used for each device.

FLOPs come from shapes (a multiply-add counts 2); bytes_read sums the tensor
operands (weights included), bytes_written the tensor results. Views cost nothing;
gathers (embedding, index) read only the rows they fetch."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dialects import polyarch as pa
from .base import Pass, option
from .common import load_verdicts, main_func, placeable_ops, tensor_bytes

if TYPE_CHECKING:
    from torch_mlir import ir
    from ..targets.profiles import DeviceProfile

VIEWS = {
    "view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "flatten", "expand", "broadcast_to",
    "slice", "select", "alias", "detach", "_unsafe_view", "as_strided", "unflatten", "numpy_T",
}
COPIES = {"permute", "transpose", "t", "contiguous", "clone", "cat", "stack", "copy", "pad", "constant_pad_nd", "repeat", "empty", "zeros", "ones", "full", "arange", "zeros_like", "ones_like", "full_like", "empty_like"}
MATMULS = {"mm", "bmm", "matmul", "linear", "addmm", "baddbmm"}
CONVS = {"convolution", "conv1d", "conv2d", "conv3d", "_convolution"}
GATHERS = {"embedding", "index", "index_select", "gather", "take"}
# FLOPs per input element
REDUCTIONS = {
    "sum": 1, "mean": 1, "max": 1, "min": 1, "amax": 1, "amin": 1, "all": 1, "any": 1, "argmax": 1, "argmin": 1,
    "prod": 1, "cumsum": 1, "var": 3, "std": 4, "var_mean": 4, "softmax": 5, "_softmax": 5, "log_softmax": 6,
    "_log_softmax": 6, "layer_norm": 8, "native_layer_norm": 8, "group_norm": 8, "native_group_norm": 8,
    "batch_norm": 4, "native_batch_norm": 4, "_native_batch_norm_legit_no_training": 4, "norm": 2,
    "max_pool2d": 1, "avg_pool2d": 1, "adaptive_avg_pool2d": 1, "max_pool1d": 1, "avg_pool1d": 1,
}
# FLOPs per output element
TRANSCENDENTAL = {"exp", "log", "tanh", "sigmoid", "gelu", "erf", "rsqrt", "sqrt", "pow", "silu", "softplus", "sin", "cos", "log1p", "expm1", "reciprocal", "div"}


def _numel(value):
    shape = pa.nominal_shape(value)
    if shape is None:
        return 0
    n = 1
    for d in shape:
        n *= max(d, 1)
    return n


def _shape(value):
    return pa.nominal_shape(value) or []


def op_cost(op: "ir.Operation") -> tuple:
    """(flops, bytes_read, bytes_written) of one op."""
    name = op.operation.name
    base = name.split(".")[2] if name.startswith("torch.aten.") else name
    tensors_in = [v for v in op.operands if pa.is_tensor(v)]
    tensors_out = [v for v in op.results if pa.is_tensor(v)]
    read = sum(tensor_bytes(v) for v in tensors_in)
    written = sum(tensor_bytes(v) for v in tensors_out)
    out_n = sum(_numel(v) for v in tensors_out)
    if base in VIEWS:
        return 0, 0, 0
    if base in COPIES:
        return 0, read, written
    if base in GATHERS:
        # The table is not read whole: only the gathered rows (= the result) and the indices.
        idx = sum(tensor_bytes(v) for v in tensors_in if pa.tensor_info(v.type)[1] in ("si64", "si32", "i64", "i32"))
        return 0, idx + written, written
    if base in MATMULS:
        lhs = _shape(tensors_in[1] if base in ("addmm", "baddbmm") else tensors_in[0])
        k = lhs[-1] if lhs else 1
        return 2 * out_n * k, read, written
    if base in CONVS:
        w = _shape(tensors_in[1]) if len(tensors_in) > 1 else []
        per_out = 1
        for d in w[1:]:
            per_out *= d
        return 2 * out_n * per_out, read, written
    if base in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention"):
        q, k = _shape(tensors_in[0]), _shape(tensors_in[1])
        bh = 1
        for d in q[:-2]:
            bh *= d
        L, E, S = q[-2], q[-1], k[-2]
        return 4 * bh * L * S * E + 5 * bh * L * S, read, written
    if base in REDUCTIONS:
        in_n = _numel(tensors_in[0]) if tensors_in else out_n
        return REDUCTIONS[base] * in_n, read, written
    factor = 4 if base in TRANSCENDENTAL else 1
    return factor * out_n, read, written


def launches(op: "ir.Operation") -> int:
    """Dispatches the op is expected to add: elementwise ops and views fuse into a
    neighbour's dispatch in IREE; everything else starts one."""
    name = op.operation.name
    base = name.split(".")[2] if name.startswith("torch.aten.") else name
    if base in VIEWS:
        return 0
    if base in COPIES or base in GATHERS or base in MATMULS or base in CONVS or base in REDUCTIONS or "attention" in base:
        return 1
    return 0


def op_class(op: "ir.Operation") -> str | None:
    """The profile's op_efficiency class of an op ("conv", "matmul"), or None."""
    return class_of(op.operation.name)


def class_of(op_name: str) -> str | None:
    """op_class by op name (as a manifest's op_list records it)."""
    base = op_name.split(".")[2] if op_name.startswith("torch.aten.") else op_name
    return "conv" if base in CONVS else "matmul" if base in MATMULS else None


def op_time(flops: float, nbytes: int, dispatches: int, prof: "DeviceProfile", element_type: str = "f32",
            klass: str | None = None) -> float:
    """Predicted seconds of an op on a device profile: a roofline, max(flops / rate,
    bytes / bandwidth), + launch overhead. For matmuls and convolutions the rate is
    peak x op_efficiency[class] x flops / (flops + half_flops): a small op leaves the
    device partly idle."""
    if flops == 0 and nbytes == 0:
        return 0.0
    rate = prof.peak(element_type, klass)
    if klass and prof.half_flops and flops:
        rate *= flops / (flops + prof.half_flops)
    return max(flops / rate, nbytes / prof.mem_bw) + dispatches * prof.launch_s


def op_seconds(op: "ir.Operation", prof: "DeviceProfile") -> float:
    """op_time of an MLIR op on a profile (costs from polyarch.cost, or computed)."""
    flops, r, w = cost_of(op)
    return op_time(flops, r + w, launches(op), prof, result_element_type(op), op_class(op))


def result_element_type(op: "ir.Operation") -> str:
    for r in op.results:
        info = pa.tensor_info(r.type)
        if info:
            return info[1]
    return "f32"


@dataclass(frozen=True)
class AnnotateCosts(Pass):
    NAME = "annotate-costs"
    devices: tuple = option((), "devices to predict times for (none: costs only)", sep=",")
    profile: tuple = option((), "device profile JSON file or DeviceProfile (repeatable)", repeat=True)
    verdicts: tuple = option((), "measured corrections: JSON file or dict (repeatable)", repeat=True)

    def apply(self, module: "ir.Module") -> None:
        from ..runtime.devices import parse_devices
        from ..targets import profiles as P

        specs = parse_devices(self.devices) if self.devices else []
        resolved = P.resolve(specs, self.profile)
        corrections = {d: v["corrections"] for d, v in load_verdicts(self.verdicts).items()}
        for op in placeable_ops(main_func(module)):
            _annotate(op, resolved, corrections)
        if specs:
            pa.set_profiles(module, {name: p.name for name, p in resolved.items()})


def _annotate(op, resolved, corrections):
    """polyarch.cost, and polyarch.time_us on each resolved device."""
    pa.Cost(*op_cost(op)).put(op)
    if resolved:
        pa.Times({name: round(op_seconds(op, p) * correction(op, corrections.get(name)) * 1e6, 4)
                  for name, p in resolved.items()}).put(op)


def run(module: "ir.Module", **options) -> None:
    """Run the pass with Python option values (see AnnotateCosts)."""
    AnnotateCosts(**options).apply(module)


def correction(op: "ir.Operation", factors: dict | None) -> float:
    """The measured correction of an op's predicted time on a device: factors[class]."""
    if not factors:
        return 1.0
    return float(factors.get(op_class(op) or "other", 1.0))


def cost_of(op: "ir.Operation") -> tuple:
    """`polyarch.cost` as a tuple (flops, bytes_read, bytes_written); computed if absent."""
    c = pa.Cost.of(op)
    return op_cost(op) if c is None else (c.flops, c.bytes_read, c.bytes_written)
