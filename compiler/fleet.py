"""Fleet prediction for generation (`polyarch plan --generate`): time to first token, time per
output token, tokens/s per user and in total, cost per million tokens and energy per token of
a causal LM on devices described by profiles only (targets/profiles.py), for three kinds of
plan, sweeping the decode batch and the draft length:

    single       prefill and decode on one device set
    split        prefill on one device set, decode on another; the prompt's KV cache is moved
                 once per request over the slower of the two host links
    speculative  a draft model on one device set proposes k tokens a step, the model on another
                 checks k + 1 in one call (runtime/generate.py's scheme and `speculative_gain`)

Each phase call is priced as a roofline over the whole call: max(FLOPs / peak, weight bytes /
the rate the profile's matrix-vector products read weights of that dtype (`weight_bw`, measured
by `polyarch calibrate`; the memory bandwidth where it has none) x the profile's `rows_factor`
for the call's tokens (a batch, a verify call) + cache bytes / memory bandwidth) plus the
per-dispatch and per-call overheads of the profile, where the FLOPs are 2 per weight per token
plus attention (4 x heads x head_dim x context per token and layer), the weight bytes are the
weights read once per call (all but the input embedding, which is gathered) and the cache
bytes the KV cache read and written. A model too large for one device is spread over the fewest
devices of that profile that hold it (weights and cache within 90% of their memory), its
bandwidth, FLOPs, price and power multiplied by their count (ideal tensor parallelism: an upper
bound). Dense decoder models only (no mixture of experts)."""

import math
import textwrap
from dataclasses import dataclass
from typing import Any, Iterable

from .causal_lm import lm_shape, model_int

__all__ = ["LMSpec", "Fleet", "predict", "pareto", "write_pareto_png", "KINDS"]

KINDS = ("single", "split", "speculative")
DISPATCHES_PER_LAYER = 12  # launch overheads a decoder layer costs (norms, projections, attention, MLP)
FIT = 0.9  # share of a device's memory weights and cache may fill


@dataclass(frozen=True)
class LMSpec:
    """What prediction needs of a causal LM: its shape and parameter count (works for a model
    built on torch's "meta" device, whose weights take no memory)."""
    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int
    embedding: int  # parameters of the input embedding (gathered, not read whole)
    bytes_per_param: int
    dtype: str = "f32"  # the weights'

    @classmethod
    def of(cls, model: Any, weights_dtype: str = "f32") -> "LMSpec":
        shape = lm_shape(model)
        heads = model_int(model, "num_attention_heads", "n_head") or shape.kv_heads
        params = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        embedding = sum(p.numel() for p in emb.parameters()) if emb is not None else 0
        tied = emb is not None and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None \
            and model.get_output_embeddings().weight is emb.weight
        return cls(type(model).__name__, shape.layers, heads, shape.kv_heads, shape.head_dim, shape.vocab, params,
                   0 if tied else embedding, {"f32": 4, "f16": 2, "bf16": 2}[weights_dtype], weights_dtype)

    @property
    def weight_bytes(self) -> float:
        return (self.params - self.embedding) * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param

    def call(self, tokens: int, sequences: int, context: float) -> tuple:
        """(FLOPs, bytes) of one call over `tokens` new tokens of `sequences` sequences whose
        keys reach `context` positions on average."""
        flops = tokens * (2 * (self.params - self.embedding) + 4 * self.layers * self.heads * self.head_dim * context)
        nbytes = self.weight_bytes + self.kv_bytes_per_token * (sequences * context + tokens)
        return flops, nbytes


class Fleet:
    """Prices phase calls of LMSpecs on profiles (each profile: one kind of device, used as
    many at once as the model needs)."""

    def __init__(self, dtype: str = "f32"):
        self.dtype = dtype

    def devices_for(self, spec: LMSpec, profile, batch: int, context: float) -> int:
        need = spec.weight_bytes + spec.embedding * spec.bytes_per_param + spec.kv_bytes_per_token * batch * context
        return max(1, math.ceil(need / (FIT * profile.mem_capacity)))

    def call_s(self, spec: LMSpec, profile, tokens: int, sequences: int, context: float, n: int) -> float:
        flops, nbytes = spec.call(tokens, sequences, context)
        peak = profile.peak(self.dtype)
        per_matmul = flops / max(1, spec.layers * 7)  # q, k, v, o and the MLP's three projections
        if profile.half_flops:
            peak *= per_matmul / (per_matmul + profile.half_flops)
        weights = spec.weight_bytes
        memory = weights / profile.stream_bw(spec.dtype) * profile.rows_factor(spec.dtype, tokens) + \
            (nbytes - weights) / profile.mem_bw
        return max(flops / (peak * n), memory / n) + \
            spec.layers * DISPATCHES_PER_LAYER * profile.launch_s + profile.call_s


def _row(kind, devices, batch, k, ttft, tpot, n_devices, profiles):
    price = sum(p.price_per_hour * n for p, n in zip(profiles, n_devices))
    watts = sum(p.watts * n for p, n in zip(profiles, n_devices))
    total = batch / tpot
    return {"kind": kind, "devices": devices, "batch": batch, "k": k, "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3,
            "tokens_per_s_per_user": 1 / tpot, "tokens_per_s": total, "devices_used": sum(n_devices),
            "tokens_per_s_per_device": total / sum(n_devices), "usd_per_m_tokens": price / 3600 / total * 1e6,
            "joules_per_token": watts / total}


def predict(spec: LMSpec, profiles: dict, prompt: int, new: int, batches: Iterable = (1,), draft: LMSpec | None = None,
            draft_lengths: Iterable = (4,), acceptance: float = 0.7, dtype: str = "f32") -> list:
    """Every plan of every kind over `profiles` ({name: DeviceProfile}): single on each, split
    over each ordered pair, speculative (with a draft) for each pair (the same device too),
    each at every batch size (and draft length). -> rows (dicts, see _row)."""
    from ..runtime.generate import CATCH_UP_TOKENS, speculative_gain

    fleet, rows = Fleet(dtype), []
    ctx = prompt + new / 2  # mean keys a decode step attends to
    for b in batches:
        n = {d: fleet.devices_for(spec, p, b, prompt + new) for d, p in profiles.items()}
        pre = {d: fleet.call_s(spec, p, prompt, 1, prompt / 2, n[d]) for d, p in profiles.items()}
        dec = {d: fleet.call_s(spec, p, b, b, ctx, n[d]) for d, p in profiles.items()}
        for d, p in profiles.items():
            rows.append(_row("single", d, b, None, pre[d], dec[d], [n[d]], [p]))
        for a, pa in profiles.items():
            for d, pd in profiles.items():
                if a == d:
                    continue
                move = spec.kv_bytes_per_token * prompt / min(pa.link_bw, pd.link_bw) + pa.link_latency_s + \
                    pd.link_latency_s
                rows.append(_row("split", f"{a} -> {d}", b, None, pre[a] + move, dec[d], [n[a], n[d]], [pa, pd]))
        if draft is None:
            continue
        for t, pt in profiles.items():
            for d, pd in profiles.items():
                nd = fleet.devices_for(draft, pd, b, prompt + new)
                td = fleet.call_s(draft, pd, b, b, ctx, nd)
                catch = max(0.0, fleet.call_s(draft, pd, b * CATCH_UP_TOKENS, b, ctx, nd) - td)  # its 2-token call
                hop = 0.0 if t == d else 2 * (pt.link_latency_s + pd.link_latency_s)  # token ids there and back
                for k in draft_lengths:
                    tv = fleet.call_s(spec, pt, b * (k + 1), b, ctx, n[t]) + hop
                    tpot = 1 / speculative_gain(acceptance, k, td, tv, catch)
                    used = [n[t]] + ([nd] if t != d else [])
                    rows.append(_row("speculative", f"{t} + draft on {d}", b, k, pre[t], tpot, used,
                                     [pt] + ([pd] if t != d else [])))
    return rows


def pareto(rows: list) -> list:
    """The rows no other row of the same kind beats on both tokens/s per user and per device."""
    out = []
    for r in rows:
        if not any(o is not r and o["kind"] == r["kind"] and o["tokens_per_s_per_user"] >= r["tokens_per_s_per_user"]
                   and o["tokens_per_s_per_device"] >= r["tokens_per_s_per_device"]
                   and (o["tokens_per_s_per_user"], o["tokens_per_s_per_device"]) !=
                   (r["tokens_per_s_per_user"], r["tokens_per_s_per_device"]) for o in rows):
            out.append(r)
    return out


def write_pareto_png(path: str, rows: list, title: str) -> None:
    """Tokens/s per device against tokens/s per user: every plan as a dot, each kind's Pareto
    front as a line (the latency / throughput frontier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    front = pareto(rows)
    for kind, color in zip(KINDS, ("tab:blue", "tab:orange", "tab:green")):
        pts = [r for r in rows if r["kind"] == kind]
        if not pts:
            continue
        ax.scatter([r["tokens_per_s_per_user"] for r in pts], [r["tokens_per_s_per_device"] for r in pts], s=10,
                   color=color, alpha=0.35)
        f = sorted((r for r in front if r["kind"] == kind), key=lambda r: r["tokens_per_s_per_user"])
        ax.plot([r["tokens_per_s_per_user"] for r in f], [r["tokens_per_s_per_device"] for r in f], "-o", ms=4,
                color=color, label=f"{kind} (Pareto front)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (interactivity)")
    ax.set_ylabel("tokens/s per device (throughput)")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
