"""Causal language models as two phases over one functional KV cache (`--generate`).

A causal LM (transformers' `*ForCausalLM`, or any nn.Module that follows the cache protocol
below) is compiled as two entry functions over the same weights:

    prefill(ids[1, T], slot[1], k_0, v_0, ..., k_{L-1}, v_{L-1}) -> (logits[1, V], k_0', v_0', ...)
        a prompt of t tokens (1 <= t <= max_context) written at positions 0..t-1 of decode
        slot `slot`; the logits of its last token. T (dynamic) is t rounded up to a multiple
        of PREFILL_MULTIPLE, the runtime filling ids[t:] with -1: IREE 3.13 with data tiling
        miscompiles the attention's written-out softmax (prefill_attention) fused into the
        packing of a dynamic dimension that is not a multiple of its tile of 16
    decode(tokens[B], positions[B], k_0, v_0, ...) -> (logits[B, V], k_0', v_0', ..., next[B])
        one token for each of the B sequences of the batch, each at its own position; next:
        each sequence's greedy token (the argmax of its logits, the first of ties, int64), which
        greedy generation passes to the next decode call on the device, reading it back a
        step behind (runtime/generate.py `Generation._chained`)
    verify(tokens[B, K], positions[B], k_0, v_0, ...) -> (logits[B, K, V], k_0', v_0', ...)
        (with a draft model: speculative decoding) K tokens for each sequence at positions
        positions[b] .. positions[b] + K - 1 (those past the cache are not written), the logits
        of every one: the target checks K - 1 drafted tokens and gives the next in one call

Each cache tensor is [B, kv_heads, rows, head_dim] (rows: max_context rounded up, `cache_rows`), one key and one value tensor per
layer: cache in, cache out (functional), so that the runtime passes the outputs of one call
back as the inputs of the next without the cache leaving its device (runtime/generate.py).
The write is a `torch.where` over the positions (IREE 3.13 refuses `index_copy` into a
function argument; docs/architecture.md), but decode and verify on cpu-only device sets write
with a scatter (`index_put` of each sequence's rows at their positions, which IREE writes in
place: decode's `where` made IREE recompute the key's rotary embedding for every cache
position, 3.4 of a 23.6 ms batch-8 step; verify's one-hot product and `where` rewrote every
cache tensor, 0.7 of a 14.5 ms call; its si64 index needs Int64, which the default Vulkan
target lacks). The positions are then an index input: guard-indices records their range,
checked by the runtime.
Attention sees an explicit additive mask (SDPA's `is_causal` with a dynamic length does not
compile).

The cache protocol, for a model that is not a transformers model: its forward takes
`input_ids`, `position_ids` ([batch, T]), `attention_mask` (a 4-D additive float mask
[batch, 1, T, keys]: 0 where a key may be attended, a large negative number elsewhere),
`past_key_values` (an object with `update(k, v, layer_idx) -> (keys, values)`, k and v
[batch, kv_heads, T, head_dim]) and `use_cache=True`, calls `past_key_values.update` once per
attention layer with that layer's new keys and values, attends to the keys it returns under
the mask, and returns an object with `.logits` [batch, T, vocab] (or that tensor). It
declares its cache shape as attributes `num_hidden_layers`, `num_key_value_heads`,
`head_dim`, `vocab_size` on itself or on `.config` (transformers' names)."""

from typing import TYPE_CHECKING, Any

from ..errors import PolyarchError

if TYPE_CHECKING:
    import torch

__all__ = ["LMShape", "lm_shape", "model_int", "wrap", "prefill_examples", "decode_examples", "verify_examples",
           "cache_names", "PHASE_INPUTS"]

PHASE_INPUTS = {"prefill": ("ids", "slot"), "decode": ("tokens", "positions"), "verify": ("tokens", "positions")}


class LMShape:
    """What the cache of a causal LM looks like: layers, kv heads, head dim, vocab, dtype."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, vocab: int, dtype: "torch.dtype"):
        self.layers, self.kv_heads, self.head_dim, self.vocab, self.dtype = layers, kv_heads, head_dim, vocab, dtype

    def cache_shape(self, batch: int, max_context: int) -> tuple:
        return (batch, self.kv_heads, max_context, self.head_dim)

    def to_json(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "vocab": self.vocab}


def model_int(model: "torch.nn.Module", *names: str) -> int | None:
    """The first of `names` that the model or its .config sets to a whole number, or None."""
    cfg = getattr(model, "config", None)
    for name in names:
        for owner in (model, cfg):
            v = getattr(owner, name, None) if owner is not None else None
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def lm_shape(model: "torch.nn.Module") -> LMShape:
    """The cache shape a causal LM declares (module docstring); a model that declares none is
    refused with what it lacks."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise PolyarchError(f"--generate compiles a causal language model (an nn.Module), not a {type(model).__name__}",
                            fix="pass a transformers *ForCausalLM model or a module following the cache protocol "
                                "(compiler/causal_lm.py)")
    layers = model_int(model, "num_hidden_layers", "n_layer")
    heads = model_int(model, "num_attention_heads", "n_head")
    kv_heads = model_int(model, "num_key_value_heads") or heads
    hidden = model_int(model, "hidden_size", "n_embd")
    head_dim = model_int(model, "head_dim") or (hidden // heads if hidden and heads else None)
    vocab = model_int(model, "vocab_size")
    missing = [n for n, v in (("num_hidden_layers", layers), ("num_key_value_heads", kv_heads), ("head_dim", head_dim),
                              ("vocab_size", vocab)) if not v]
    if missing:
        raise PolyarchError(f"{type(model).__name__} does not say its cache shape: no {', '.join(missing)} on it or its "
                            ".config", fix="compile a transformers *ForCausalLM, or set these attributes on the module "
                                           "(the cache protocol: compiler/causal_lm.py)")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return LMShape(layers, kv_heads, head_dim, vocab, dtype)


def cache_names(layers: int) -> list:
    return [f"{kv}_cache_{i}" for i in range(layers) for kv in ("k", "v")]


class _Cache:
    """The functional cache the model's attention layers call: `update(k, v, layer)` records
    the layer's new cache tensors (where-written, never in place) and returns the keys and
    values attention reads. `write(layer, k, v, old_k, old_v) -> (new_k, new_v, keys, values)`."""

    def __init__(self, tensors, write):
        self.tensors, self.write = list(tensors), write
        self.is_compileable = True
        self.is_sliding = [False] * (len(self.tensors) // 2)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        k, v = self.tensors[2 * layer_idx], self.tensors[2 * layer_idx + 1]
        new_k, new_v, keys, values = self.write(layer_idx, key_states, value_states, k, v)
        self.tensors[2 * layer_idx], self.tensors[2 * layer_idx + 1] = new_k, new_v
        return keys, values

    def get_seq_length(self, layer_idx=0):  # only read when position_ids are missing: they never are
        return 0

    def __len__(self):
        return len(self.tensors) // 2


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def _call(model, ids, positions, mask, cache, last_only=True, last=None):
    """The model's logits: of the last token [batch, V], of the token at index `last` (a
    1-element tensor) [batch, V], or (last_only False) of all [batch, T, V]."""
    kwargs = dict(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache, use_cache=True)
    import inspect

    try:
        keep = last_only and "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        keep = False
    if keep:
        kwargs["logits_to_keep"] = 1 if last is None else last  # transformers: an int or the indices
    logits = _logits(model(**kwargs))
    if last is not None and not keep:
        logits = logits.index_select(1, last)
    return logits[:, -1, :] if last_only else logits


PREFILL_MULTIPLE = 16  # prefill's ids are padded (with -1) to a multiple of this (module docstring)


def _prefill(lm, ids, slot, cache):
    import torch

    t = ids.shape[1]
    real = (ids >= 0).sum()  # the prompt's length: the runtime pads its end with -1
    # the keys' positions, computed from the ids (>= -1, so the factor is 1) rather than from an
    # index alone: otherwise IREE fuses the mask into every layer's scores, flattened, and
    # recomputes it there with integer divisions by T for every score (1.2 ms a layer on Zen 2)
    keys = torch.arange(t, device=ids.device) * (ids[0] >= -1).to(torch.int64)
    ids = ids.clamp(min=0)
    neg = torch.finfo(cache[0].dtype).min
    n, b = cache[0].shape[2], cache[0].shape[0]
    pos = torch.arange(t, device=ids.device).clamp(max=n - 1)  # padding rows past the cache: any position
    mask = torch.where(keys[None, :] <= keys[:, None], 0.0, neg).to(cache[0].dtype)[None, None]  # [1, 1, T, T]
    keep = (torch.arange(b, device=ids.device) == slot)[:, None, None, None] & \
        (torch.arange(n, device=ids.device) < real)[None, None, :, None]

    def to_cache(x):  # the prompt's rows padded (or, past the cache, cut) to N
        return torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3])], 2)[:, :, :n]

    def write(layer, k, v, old_k, old_v):  # attention reads the prompt's own keys
        return torch.where(keep, to_cache(k), old_k), torch.where(keep, to_cache(v), old_v), k, v

    c = _Cache(cache, write)
    logits = _call(lm, ids, pos[None, :], mask, c, last=(real - 1).reshape(1))
    return (logits, *c.tensors)


def _decode(lm, tokens, positions, cache, scatter=False):
    import torch

    n = cache[0].shape[2]
    neg = torch.finfo(cache[0].dtype).min
    keys = torch.arange(n, device=tokens.device)
    mask = torch.where(keys[None, :] <= positions[:, None], 0.0, neg).to(cache[0].dtype)[:, None, None, :]
    if scatter:
        # cache[b, h, positions[b]] = k[b, h, 0] for every sequence b and head h: one scatter of
        # [B x kv_heads] rows of head_dim, its index tensor the same for every layer (IREE builds
        # it once); `scatter` with an index expanded to k's shape wrote element by element and
        # built its index for every cache (5 more dispatches each)
        rows = (torch.arange(cache[0].shape[0], device=tokens.device)[:, None],
                torch.arange(cache[0].shape[1], device=tokens.device)[None, :], positions[:, None])

        def write(layer, k, v, old_k, old_v):
            new_k, new_v = old_k.index_put(rows, k[:, :, 0, :]), old_v.index_put(rows, v[:, :, 0, :])
            return new_k, new_v, new_k, new_v
    else:
        at = (keys[None, :] == positions[:, None])[:, None, :, None]  # [B, 1, N, 1]

        def write(layer, k, v, old_k, old_v):
            new_k, new_v = torch.where(at, k, old_k), torch.where(at, v, old_v)
            return new_k, new_v, new_k, new_v

    c = _Cache(cache, write)
    logits = _call(lm, tokens[:, None], positions[:, None], mask, c)
    return (logits, *c.tensors)


def _decode_scatter(lm, tokens, positions, cache):
    return _decode(lm, tokens, positions, cache, scatter=True)


def _verify(lm, tokens, positions, cache, scatter=False):
    import torch

    n, k = cache[0].shape[2], tokens.shape[1]
    neg = torch.finfo(cache[0].dtype).min
    keys = torch.arange(n, device=tokens.device)
    at = positions[:, None] + torch.arange(k, device=tokens.device)[None, :]  # [B, K]
    mask = torch.where(keys[None, None, :] <= at[:, :, None], 0.0, neg).to(cache[0].dtype)[:, None]  # [B, 1, K, N]
    if scatter:
        # cache[b, h, at[b, j]] = k[b, h, j]: one scatter of [B x kv_heads x K] rows, as decode's.
        # A position past the cache writes the last row instead: only a query there (whose
        # logits are for a token past the context, never used) can read that row in this call,
        # and a later call rewrites it before any query reads it. Clamped to [0, n - 1] (the
        # runtime sends no negative position), the rows are in range by construction: the
        # guard-indices pass puts no check there, which would read a flag back to the host in
        # the middle of the call (the target's verify was split into 18 submissions by 8 checks)
        rows = (torch.arange(cache[0].shape[0], device=tokens.device)[:, None, None],
                torch.arange(cache[0].shape[1], device=tokens.device)[None, :, None],
                torch.clamp(at, 0, n - 1)[:, None, :])

        def write(layer, k_, v_, old_k, old_v):
            new_k, new_v = old_k.index_put(rows, k_), old_v.index_put(rows, v_)
            return new_k, new_v, new_k, new_v
    else:
        # row n of the cache takes token j where n == positions[b] + j: a one-hot [B, N, K] product
        # (exact: one 1 per row) places the K new keys, a where keeps the others
        onehot = (keys[None, :, None] == at[:, None, :]).to(cache[0].dtype)
        written = onehot.sum(-1)[:, None, :, None] > 0  # [B, 1, N, 1]

        def write(layer, k_, v_, old_k, old_v):
            new_k = torch.where(written, torch.einsum("bnk,bhkd->bhnd", onehot, k_), old_k)
            new_v = torch.where(written, torch.einsum("bnk,bhkd->bhnd", onehot, v_), old_v)
            return new_k, new_v, new_k, new_v

    c = _Cache(cache, write)
    logits = _call(lm, tokens, at, mask, c, last_only=False)
    return (logits, *c.tensors)


def _verify_scatter(lm, tokens, positions, cache):
    return _verify(lm, tokens, positions, cache, scatter=True)


def _with_greedy(greedy, out):
    return (*out, greedy(out[0]))


_RUN = {"prefill": _prefill, "decode": _decode, "verify": _verify}
_SCATTER = {"decode": _decode_scatter, "verify": _verify_scatter}  # cpu-only device sets (module docstring)


def wrap(model: "torch.nn.Module", phase: str, scatter: bool = False) -> "torch.nn.Module":
    """The nn.Module whose forward is one phase (module docstring) of `model`, held as `.lm`.
    scatter: decode and verify write their cache with a scatter (for cpu: module docstring), else `where`."""
    import torch

    if phase not in PHASE_INPUTS:
        raise ValueError(phase)

    class Greedy(torch.nn.Module):
        """Decode's greedy tokens: the argmax of each sequence's logits. A module of its own
        (module path `greedy`), so that a pin of the model's head (`lm_head=vulkan`) does not
        take it along: its int64 result needs a device with 64-bit integers."""

        def forward(self, logits):
            # the first index of the maximum, over the logits widened to f32: IREE 3.13 reduced
            # 32000 f16 logits in 92 us (argmax, or a max alone), f32 ones in 6 (the max) + 5
            # (the first index where it is; NaN logits give the last index)
            logits = logits.float()
            top = logits.amax(-1, keepdim=True)
            index = torch.arange(logits.shape[-1], dtype=torch.int32, device=logits.device)
            first = torch.where(logits == top, index, logits.shape[-1] - 1).amin(-1)
            return first.to(torch.int64)

    def __init__(self, lm):
        torch.nn.Module.__init__(self)
        self.lm = lm
        if phase == "decode":
            self.greedy = Greedy()

    # forward with one named parameter per cache tensor: torch.export names the inputs after them
    names = [*PHASE_INPUTS[phase], *cache_names(lm_shape(model).layers)]
    scope = {}
    body = f"_run(self.lm, {names[0]}, {names[1]}, [{', '.join(names[2:])}])"
    if phase == "decode":  # its greedy tokens after the cache (module docstring)
        body = f"_with_greedy(self.greedy, {body})"
    exec(f"def forward(self, {', '.join(names)}):\n    return {body}\n",
         {"_run": _SCATTER.get(phase, _RUN[phase]) if scatter else _RUN[phase], "_with_greedy": _with_greedy}, scope)
    cls = type(f"{phase.capitalize()}Phase", (torch.nn.Module,), {"__init__": __init__, "forward": scope["forward"]})
    return cls(model).eval()


def position_limit(model: "torch.nn.Module") -> int | None:
    """The length of the model's position table (max_position_embeddings, GPT-2's n_positions), or None."""
    return model_int(model, "max_position_embeddings", "n_positions")


CACHE_MULTIPLE = 16  # the cache's rows: max_context rounded up to a multiple of this (cache_rows)


def cache_rows(model: "torch.nn.Module", max_context: int) -> int:
    """The rows of each cache tensor for `max_context` positions: rounded up to a multiple of
    CACHE_MULTIPLE, but not past the model's position table (prefill's padding rows take
    positions up to the last row). The rows past max_context are never attended to (a query
    at a position below max_context masks them). IREE 3.13 multiplies the queries by the keys
    over an odd cache length 2.4x slower: verify's [15 x 64] x [64 x 197] 88-96 us a layer,
    over 208 rows 38 (2-core Zen 4)."""
    rows = -(-max_context // CACHE_MULTIPLE) * CACHE_MULTIPLE
    limit = position_limit(model)
    return max(max_context, min(rows, limit)) if limit else rows


def prefill_length(tokens: int) -> int:
    """The length of prefill's ids for a prompt of `tokens` tokens (module docstring)."""
    return -(-tokens // PREFILL_MULTIPLE) * PREFILL_MULTIPLE


def prefill_examples(shape: LMShape, batch: int, max_context: int, prompt: int = PREFILL_MULTIPLE) -> tuple:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (1, prefill_length(min(prompt, max_context))), generator=g)
    cache = [torch.zeros(shape.cache_shape(batch, max_context), dtype=shape.dtype) for _ in range(2 * shape.layers)]
    return (ids, torch.zeros(1, dtype=torch.int64), *cache)


def decode_examples(shape: LMShape, batch: int, max_context: int) -> tuple:
    import torch

    tokens = torch.zeros(batch, dtype=torch.int64)
    positions = torch.full((batch,), min(8, max_context - 1), dtype=torch.int64)
    cache = [torch.zeros(shape.cache_shape(batch, max_context), dtype=shape.dtype) for _ in range(2 * shape.layers)]
    return (tokens, positions, *cache)


def verify_examples(shape: LMShape, batch: int, max_context: int, k: int) -> tuple:
    import torch

    tokens = torch.zeros(batch, k, dtype=torch.int64)
    positions = torch.full((batch,), min(8, max_context - k), dtype=torch.int64)
    cache = [torch.zeros(shape.cache_shape(batch, max_context), dtype=shape.dtype) for _ in range(2 * shape.layers)]
    return (tokens, positions, *cache)


GROUPED = "polyarch_grouped"  # the attention decode-like phases export with (register_grouped_attention)


def _own_eager(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """The model's own eager attention where the call asks for what ours does not do
    (soft-capping, attention sinks), else None."""
    import sys

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return sys.modules[type(module).__module__].eager_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return None


def _grouped_scores(query, key, attention_mask, scaling):
    """The scaled, masked attention scores [b, h, t, s], the queries of the heads sharing a
    key/value head stacked as rows of one matmul against it. -> (scores, (b, kv, g * t, s): the
    grouped rows' shape)."""
    import torch

    b, h, t, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    g = h // kv
    scores = torch.matmul(query.reshape(b, kv, g * t, d), key.transpose(2, 3)).reshape(b, h, t, s) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    return scores, (b, kv, g * t, s)


def grouped_attention(module: Any, query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor",
                      attention_mask: "torch.Tensor | None", scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' eager attention (explicit matmul, additive mask, softmax in f32) for a
    static query length, grouped-query heads without `repeat_kv`'s copy of the keys and values:
    the queries of the heads sharing a key/value head are stacked as rows of one matmul against
    it. The same sums as eager attention; IREE 3.13 otherwise materialises the copy, two
    dispatches a layer (f16 decode of a 100M Llama: 1.25 ms of 11.6 a token, and 1.9 ms of a
    2-layer draft's 5.2 at a cache of 197 positions). Models with extras this does not do
    (soft-capping, attention sinks) keep their own eager attention."""
    import torch

    own = _own_eager(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if own is not None:
        return own
    scores, grouped = _grouped_scores(query, key, attention_mask, scaling)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.reshape(grouped), value).reshape(*scores.shape[:3], value.shape[-1])
    return out.transpose(1, 2).contiguous(), weights


PREFILL = "polyarch_prefill"  # the attention prefill exports with (register_grouped_attention)


def prefill_attention(module: Any, query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor",
                      attention_mask: "torch.Tensor | None", scaling: float, dropout: float = 0.0, **kwargs):
    """grouped_attention for a dynamic query length (prefill), attending to the prompt's own
    keys, with its softmax written out and normalised after the product with the values:
    exp(scores - max) @ values / sum. IREE 3.13 compiles the softmax of a dynamic dimension
    (linalg.softmax, to which a softmax written out as max, exp, sum, divide is raised back)
    5-8x slower than a static one: 19.5 of 84 ms of a 128-token prefill of a 100M Llama.
    Exponents below -80 are clamped (exp underflows there anyway). The attention weights are
    not returned (None)."""
    import torch

    own = _own_eager(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if own is not None:
        return own
    scores, grouped = _grouped_scores(query, key, attention_mask, scaling)
    scores = scores.to(torch.float32)
    e = torch.exp((scores - scores.amax(dim=-1, keepdim=True)).clamp(min=-80.0))
    out = torch.matmul(e.to(query.dtype).reshape(grouped), value)
    # divided in the grouped layout: the same division after the reshape gives NaN on Vulkan (lavapipe)
    out = (out.to(torch.float32) / e.sum(dim=-1, keepdim=True).reshape(*grouped[:3], 1)).to(query.dtype)
    return out.reshape(*scores.shape[:3], value.shape[-1]).transpose(1, 2).contiguous(), None


def register_grouped_attention() -> bool:
    """Register GROUPED with transformers' AttentionInterface (once). -> False without transformers."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionInterface.register(PREFILL, prefill_attention)
    return True
