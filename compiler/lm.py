"""Compile a causal language model for generation (`--generate`): its prefill and decode
phases (compiler/causal_lm.py) imported, partitioned per device set by the same passes (each
phase for its own latency: time to first token, time per output token), compiled into one
bundle sharing the weights (build.build_phases_bundle), then verified: the bundle's greedy
tokens against the same phases run eagerly by PyTorch, with the logits compared at every step."""

import json
import os
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..files import temp_dir
from ..errors import PolyarchError
from ..runtime.generate import CATCH_UP_TOKENS
from ..runtime.generate import DRAFT as DRAFT_PREFIX  # the draft's phases: draft_prefill, draft_decode, draft_verify
from . import causal_lm
from .build import build_phases_bundle, rewrite_bundle
from .iree import PHASE_FLAGS, PHASE_KERNELS  # iree-compile flags, hand-written matmuls of decode-like phases
from .planning import import_module, partition, price_devices

if TYPE_CHECKING:
    from .options import CompileOptions

__all__ = ["ImportedLM", "PlannedLM", "eager_greedy", "verify_lm", "VERIFY_STEPS", "LOGITS_TOL"]

VERIFY_STEPS = 8  # greedy tokens compared at compile time (the tests compare 64)
LOGITS_TOL = {"float32": 2e-3, "float16": 5e-2, "bfloat16": 1e-1}  # max |bundle - eager| / max |eager| per step


def _pins(pins):
    """Pins name the user's model; its phases wrap it as `lm`: module paths get that prefix
    (op names such as torch.aten.mm stay as they are)."""
    out = []
    for p in pins:
        pattern, sep, dev = p.rpartition("=")
        out.append(p if not sep or pattern.startswith(("torch.", "lm.")) or pattern == "lm" else f"lm.{pattern}={dev}")
    return out


def _phase_pins(o, phase):
    """The pins of one phase: the model's (or the draft's), then the phase's own (they win)."""
    # the draft's 2-token verify runs between its decode calls on their cache: it takes their pins
    same = (phase, DRAFT_PREFIX + "decode") if phase == DRAFT_PREFIX + "verify" else (phase,)
    own = [pin.partition(":")[2] for pin in o.phase_pins if pin.partition(":")[0] in same]
    return _pins([*(o.draft_pins if phase.startswith(DRAFT_PREFIX) else o.pins), *own])


class ImportedLM:
    """Stage 1 of a --generate compile: both phases imported (`phases`: {phase: (module,
    signature)}), as driver.Imported is for one forward."""

    def __init__(self, model: Any, options: "CompileOptions", progress: Callable[[str], None]):
        model = _in_dtype(model, options.weights_dtype)
        self.model, self.options, self.progress, self.started = model, options, progress, time.time()
        self.shape = shape = causal_lm.lm_shape(model)
        n, b = options.max_context, options.batch
        _check_context(model, n, "")
        rows = causal_lm.cache_rows(model, n)
        progress(f"generate: {type(model).__name__} as prefill (1 prompt of 1..{n} tokens into one of {b} slot(s)) "
                 f"and decode ({b} token(s) a step), a KV cache of {shape.layers} layers x {shape.kv_heads} kv heads x "
                 f"{rows} positions x {shape.head_dim} ({_cache_mb(shape, b, rows):.1f} MB)")
        self.phases = {}
        self.draft = self.draft_shape = None
        k = options.speculate + 1
        if options.draft is not None:
            self.draft, self.draft_shape = _draft(options.draft, options.draft_dtype or options.weights_dtype, shape, n)
            progress(f"generate: draft {type(self.draft).__name__} ({self.draft_shape.layers} layers, "
                     f"{_params_m(self.draft):.1f}M parameters against {_params_m(model):.1f}M) as its own prefill, "
                     f"decode and {CATCH_UP_TOKENS}-token verify (its catch-up); the model checks up to "
                     f"{options.speculate} drafted tokens a step in one verify call ({k} tokens)")
        self.cpu_only = _cpu_only(options)
        for phase in ("prefill", "decode") + (("verify",) if self.draft is not None else ()):
            with _attention(model, phase):
                self.phases[phase] = _import_phase(model, phase, shape, b, n, rows, k, progress, self.cpu_only)
        if self.draft is not None:
            # the draft's verify takes 2 tokens (CATCH_UP_TOKENS): after a step whose drafts were all
            # accepted it feeds the last drafted token with the model's next in one call
            draft_rows = causal_lm.cache_rows(self.draft, n)
            for phase in ("prefill", "decode", "verify"):
                with _attention(self.draft, phase):
                    self.phases[DRAFT_PREFIX + phase] = _import_phase(self.draft, phase, self.draft_shape, b, n,
                                                                      draft_rows,
                                                                      CATCH_UP_TOKENS if phase == "verify" else k,
                                                                      progress, self.cpu_only)

    def plan(self, options: "CompileOptions | None" = None) -> "PlannedLM":
        """Stage 2: the devices priced, each phase partitioned per device set."""
        o = options or self.options
        if (o.max_context, o.batch, o.weights_dtype, _cpu_only(o)) != (
                self.options.max_context, self.options.batch, self.options.weights_dtype, self.cpu_only):
            raise PolyarchError("max_context, batch, weights_dtype or whether every device is a cpu differ from the "
                                "import's: they fix the phases' shapes, types and how decode writes its cache",
                                fix="import the model again with these options")
        priced = price_devices(o.device_specs, o.profiles, o.calibrate, self.progress)
        plans = {p: partition(base, o.device_specs, _phase_pins(o, p), self.progress, o.objective, o.solver, priced)
                 for p, (base, _) in self.phases.items()}
        return PlannedLM(self, o, plans)


class PlannedLM:
    """Stage 2 of a --generate compile: `plans` {phase: [(plan name, module)]}."""

    def __init__(self, imported: ImportedLM, options: "CompileOptions", plans: dict):
        self.imported, self.options, self.plans = imported, options, plans

    def as_text(self, plan: int = 0, phase: str = "decode") -> str:
        from .modules import plan_text

        return plan_text(self.plans[phase][plan][1])

    def write(self, output: str) -> str:
        """Stage 3: compile both phases into one bundle, verify it (options.verify), write it."""
        imp, o, progress = self.imported, self.options, self.imported.progress
        shape = imp.shape
        extra = {"generate": {"max_context": o.max_context, "batch": o.batch,
                              "prefill_multiple": causal_lm.PREFILL_MULTIPLE,
                              "dtype": str(shape.dtype).replace("torch.", ""), **shape.to_json(),
                              "model": type(imp.model).__name__, "eos_token_ids": _eos_ids(imp.model)}}
        members = {}
        if imp.draft is not None:
            d = imp.draft_shape
            extra["generate"]["draft"] = {"model": type(imp.draft).__name__, **d.to_json(), "speculate": o.speculate,
                                          "dtype": str(d.dtype).replace("torch.", "")}
        chat = None
        if o.tokenizer is not None:
            members[TOKENIZER_MEMBER] = _tokenizer_file(o.tokenizer, shape.vocab, progress)
            extra["generate"]["tokenizer"] = TOKENIZER_MEMBER
            chat = chat_template(members[TOKENIZER_MEMBER], progress)
        with temp_dir(prefix="polyarch-lm-") as tmp:
            if chat is not None:  # beside the tokenizer: the OpenAI chat endpoint renders it (server/)
                members[CHAT_MEMBER] = os.path.join(tmp, CHAT_MEMBER)
                with open(members[CHAT_MEMBER], "w") as f:
                    json.dump(chat, f)
                extra["generate"]["chat_template"] = CHAT_MEMBER
            path = os.path.join(tmp, "unverified.pab")
            manifest = build_phases_bundle(self.plans, {p: sig for p, (_, sig) in imp.phases.items()}, path, extra,
                                           jobs=o.jobs, progress=progress, extra_flags=o.iree_flags, tune=o.tune,
                                           phase_flags=_phase_flags(o, imp.phases),
                                           phase_kernels=_phase_kernels(imp.phases),
                                           extra_members=members,
                                           verification={"status": "not verified (verify=False / --no-verify)"})
            if o.verify:
                record = verify_lm(path, imp.model, shape, progress, draft=imp.draft, draft_shape=imp.draft_shape)
                for plan in manifest["plans"]:
                    plan["verification"] = record[plan["name"]]
            rewrite_bundle(path, output, manifest)
        progress(f"wrote {output} ({os.path.getsize(output) / 1e6:.1f} MB, {len(manifest['plans'])} plan(s), phases "
                 f"{', '.join(imp.phases)}) in {time.time() - imp.started:.1f}s")
        return output


TOKENIZER_MEMBER = "tokenizer.json"
CHAT_MEMBER = "chat_template.json"


def _phase_flags(o, phases):
    """{phase: iree-compile flags} by the phase's weights dtype (the draft's may differ)."""
    out = {}
    for p in phases:
        draft = p.startswith(DRAFT_PREFIX)
        dtype = (o.draft_dtype or o.weights_dtype) if draft else o.weights_dtype
        out[p] = PHASE_FLAGS.get(dtype, {}).get(p[len(DRAFT_PREFIX):] if draft else p, [])
    return out


def _phase_kernels(phases):
    """The phases whose cpu segments use the hand-written few-rows matmul (PHASE_KERNELS; the
    draft's decode as the target's)."""
    return [p for p in phases if (p[len(DRAFT_PREFIX):] if p.startswith(DRAFT_PREFIX) else p) in PHASE_KERNELS]


def _cpu_only(o) -> bool:
    """Every device of the compile a cpu: decode then writes its cache with `scatter`
    (causal_lm.wrap), which the default Vulkan target cannot run (si64)."""
    return all(d.kind == "cpu" for ds in o.device_specs for d in ds)


def _import_phase(model, phase, shape, b, n, rows, k, progress, cpu_only=False):
    """One phase imported, for prompts of up to n tokens and a cache of `rows` rows (causal_lm.cache_rows)."""
    if phase == "prefill":
        examples, dyn = causal_lm.prefill_examples(shape, b, rows, min(n, causal_lm.PREFILL_MULTIPLE)), \
            [f"ids:1:{causal_lm.prefill_length(n)}"]
    elif phase == "decode":
        examples, dyn = causal_lm.decode_examples(shape, b, rows), []
    else:
        examples, dyn = causal_lm.verify_examples(shape, b, rows, k), []
    return import_module(causal_lm.wrap(model, phase, scatter=cpu_only), examples, dyn, progress)


def _params_m(model):
    return sum(p.numel() for p in model.parameters()) / 1e6


def _draft(draft, weights_dtype, shape, n):
    """The draft model, checked against the model it drafts for. -> (draft in weights_dtype, its LMShape)."""
    if isinstance(draft, str):
        raise PolyarchError(f"draft {draft!r} is a path: the command line loads model files",
                            fix="from Python, pass the draft model itself: compile(..., draft=module)")
    draft = _in_dtype(draft, weights_dtype)
    d = causal_lm.lm_shape(draft)
    if d.vocab != shape.vocab:
        raise PolyarchError(f"the draft's vocabulary has {d.vocab} tokens, the model's {shape.vocab}: the draft must "
                            "propose the model's tokens", fix="give a draft trained with the same tokenizer")
    _check_context(draft, n, "the draft ")
    return draft, d


def _check_context(model, n, who):
    """max_context past the model's position table would index out of it: refused."""
    limit = causal_lm.position_limit(model)
    if limit and n > limit:
        raise PolyarchError(f"max_context {n} is more than the {limit} positions {who}{type(model).__name__} was built "
                            "for (max_position_embeddings)", fix=f"compile with --max-context {limit} or less")


def _eos_ids(model):
    """The token ids that end a sequence, as the model's config says (generate stops there by default)."""
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if cfg is None:
        cfg = getattr(getattr(model, "config", None), "eos_token_id", None)
    ids = cfg if isinstance(cfg, (list, tuple)) else [cfg] if cfg is not None else []
    return [int(i) for i in ids if isinstance(i, int)]


def _tokenizer_file(path, vocab, progress):
    """The tokenizer.json to carry (a folder: its tokenizer.json), checked: it loads with the
    `tokenizers` package and its ids fit the model's vocabulary. -> its path."""
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_MEMBER)
    if not os.path.isfile(path):
        raise PolyarchError(f"no tokenizer file {path}", fix="give a tokenizer.json (the `tokenizers` format) or its folder")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PolyarchError("carrying a tokenizer needs the `tokenizers` package", fix="pip install tokenizers") from None
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise PolyarchError(f"{path} is not a tokenizer the `tokenizers` package reads: {str(e).splitlines()[0]}",
                            fix="give the tokenizer.json saved with the model (tokenizer.save_pretrained)") from None
    if tok.get_vocab_size() > vocab:
        raise PolyarchError(f"the tokenizer {path} has {tok.get_vocab_size()} tokens, the model only {vocab}",
                            fix="give the tokenizer the model was trained with")
    progress(f"tokenizer: {path} ({tok.get_vocab_size()} tokens) carried in the bundle")
    return path


def chat_template(tokenizer_json: str, progress=lambda line: None) -> "dict | None":
    """The chat template saved beside a tokenizer.json (transformers' `save_pretrained`: the file
    chat_template.jinja, or `chat_template` in tokenizer_config.json; a named list: its
    "default"), with the bos/eos token texts it may use, checked to parse as Jinja. -> {"template",
    "bos_token", "eos_token"} or None when there is none."""
    folder = os.path.dirname(os.path.abspath(tokenizer_json))
    cfg = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise PolyarchError(f"{cfg_path} is not JSON: {e}", fix="give the tokenizer_config.json saved with the "
                                "model, or remove it") from None
    template = cfg.get("chat_template")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template:
        return None
    if not isinstance(template, str):
        raise PolyarchError(f"the chat template beside {tokenizer_json} is not text", fix="fix or remove it")

    def token_text(v):
        return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

    try:
        import jinja2.sandbox

        jinja2.sandbox.ImmutableSandboxedEnvironment().parse(template)
    except ImportError:
        pass
    except Exception as e:
        raise PolyarchError(f"the chat template beside {tokenizer_json} does not parse as Jinja: {e}",
                            fix="fix the template, or remove it (the chat endpoint is then off)") from None
    progress(f"chat template: carried in the bundle ({len(template)} characters)")
    return {"template": template, "bos_token": token_text(cfg.get("bos_token")),
            "eos_token": token_text(cfg.get("eos_token"))}


def _in_dtype(model, name):
    """The model with its floating-point weights in `name` (a copy: the user's model is left as it is)."""
    import copy

    import torch

    dtype = {"f32": None, "f16": torch.float16, "bf16": torch.bfloat16}[name]
    if dtype is None:
        return model
    return copy.deepcopy(model).to(dtype)


def _cache_mb(shape, b, n):
    return 2 * shape.layers * b * shape.kv_heads * n * shape.head_dim * shape.dtype.itemsize / 1e6


class _attention:
    """transformers models export prefill with their eager attention (explicit matmul + softmax
    under the additive mask: SDPA with a dynamic query length does not compile in IREE 3.13),
    and the phases with a static query length (decode, verify) with causal_lm.grouped_attention
    (the same sums without repeat_kv's copy of the cache); restored after."""

    def __init__(self, model, phase):
        self.model = model
        self.old = getattr(getattr(model, "config", None), "_attn_implementation", None)
        self.impl = "eager"
        if getattr(model, "_can_set_attn_implementation", lambda: False)() and causal_lm.register_grouped_attention():
            self.impl = causal_lm.PREFILL if phase == "prefill" else causal_lm.GROUPED

    def __enter__(self):
        if self.old not in (None, self.impl) and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(self.impl)

    def __exit__(self, *exc):
        if self.old not in (None, self.impl) and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(self.old)


def eager_greedy(model: Any, shape: "causal_lm.LMShape", batch: int, max_context: int, prompt: list,
                 steps: int) -> tuple:
    """Greedy tokens and each step's logits from the phases run by PyTorch (slot 0).
    -> (tokens, [logits per step])."""
    import torch

    pre, dec = causal_lm.wrap(model, "prefill"), causal_lm.wrap(model, "decode")
    cache = [torch.zeros(shape.cache_shape(batch, max_context), dtype=shape.dtype) for _ in range(2 * shape.layers)]
    with torch.no_grad():
        out = pre(torch.tensor([prompt]), torch.zeros(1, dtype=torch.int64), *cache)
        logits, cache = [out[0][0].float().numpy()], list(out[1:])
        tokens = [int(np.argmax(logits[-1]))]
        for i in range(steps - 1):
            tok = torch.zeros(batch, dtype=torch.int64)
            tok[0] = tokens[-1]
            pos = torch.zeros(batch, dtype=torch.int64)
            pos[0] = len(prompt) + i
            out = dec(tok, pos, *cache)
            cache = list(out[1:1 + 2 * shape.layers])  # decode's last output: its greedy tokens
            logits.append(out[0][0].float().numpy())
            tokens.append(int(np.argmax(logits[-1])))
    return tokens, logits


def verify_lm(path: str, model: Any, shape: "causal_lm.LMShape", progress: Callable[[str], None],
              draft: Any = None, draft_shape: "causal_lm.LMShape | None" = None) -> dict:
    """Every plan this host can run generates VERIFY_STEPS greedy tokens from a fixed prompt;
    tokens must equal the eager phases' and logits agree within LOGITS_TOL; so must the draft
    model's phases, and the verify phase's logits for the greedy tokens. A plan found wrong is
    an error (no wrong bundle is written). -> {plan name: verification record}."""
    from ..errors import DeviceError
    from ..runtime import load
    from ..runtime.generate import Generator

    with load(path) as first:
        cfg, plans = first.manifest["generate"], first.plans
    n, b = cfg["max_context"], cfg["batch"]
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, shape.vocab, min(5, n - VERIFY_STEPS))]
    ref = eager_greedy(model, shape, b, n, prompt, VERIFY_STEPS)
    ref_draft = eager_greedy(draft, draft_shape, b, n, prompt, VERIFY_STEPS) if draft is not None else None
    tol = LOGITS_TOL.get(cfg["dtype"], 1e-1)
    draft_tol = LOGITS_TOL.get(cfg.get("draft", {}).get("dtype", cfg["dtype"]), 1e-1)
    out = {}
    for name in plans:
        try:
            bundle = load(path, plan=name, strict=True)
        except DeviceError as e:
            out[name] = {"status": f"not verified: {e.what}"}
            continue
        with bundle:
            g = Generator(bundle)
            errs = _check_greedy(g, name, "", prompt, *ref, tol)
            if ref_draft is not None:
                _check_greedy(g.draft, name, "the draft's ", prompt, *ref_draft, draft_tol)
                errs += _check_verify(g, name, "", prompt, *ref, tol)
                if g.draft.verify_tokens:
                    _check_verify(g.draft, name, "the draft's ", prompt, *ref_draft, draft_tol)
        out[name] = {"status": "verified", "greedy_tokens": VERIFY_STEPS, "max_rel_logits_error": max(errs),
                     "tolerance": tol}
        progress(f"verified plan {name}: {VERIFY_STEPS} greedy tokens equal to PyTorch's"
                 f"{' (the draft too, and verify)' if ref_draft is not None else ''}, logits within "
                 f"{max(errs):.1e} of their range (tolerance {tol:.0e})")
    return out


def _rel(got, want):
    return float(np.max(np.abs(got - want)) / max(1e-6, np.max(np.abs(want))))


def _disagree(name, phase, i, got, want, err, tol):
    return PolyarchError(f"plan {name}: the compiled {phase} phase disagrees with PyTorch at generated token {i} (token "
                         f"{got} vs {want}, logits off by {err:.2e} of their range, tolerance {tol:.0e})",
                         fix="compile for other devices (-d cpu), or report the model with `polyarch plan --ops`")


def _check_greedy(g, name, who, prompt, ref_tokens, ref_logits, tol):
    """Prefill then decode on slot 0, each step's logits against eager's. -> the relative errors."""
    errs, b = [], g.batch
    g.cache = None
    logits = g.prefill(prompt, 0)
    for i in range(VERIFY_STEPS):
        errs.append(_rel(logits, ref_logits[i]))
        got = int(np.argmax(logits))
        want = ref_logits[i]
        tie = (want.max() - want[got]) <= tol * max(1e-6, np.max(np.abs(want)))  # a near tie in eager too
        if (got != ref_tokens[i] and not tie) or errs[-1] > tol:
            raise _disagree(name, who + ("prefill" if i == 0 else "decode"), i, got, ref_tokens[i], errs[-1], tol)
        if i + 1 < VERIFY_STEPS:
            tok, pos = [0] * b, [0] * b
            tok[0], pos[0] = ref_tokens[i], len(prompt) + i
            logits, greedy = g.decode(tok, pos, greedy=True)
            logits = logits[0]
            # decode's own greedy token (the one chained greedy steps pass on): a maximum of its logits
            if logits[int(greedy[0])] != logits.max():
                raise PolyarchError(f"plan {name}: the compiled {who}decode phase's greedy token {int(greedy[0])} at "
                                    f"generated token {i + 1} is not the maximum of its logits (token "
                                    f"{int(np.argmax(logits))})", fix="compile for other devices (-d cpu), or report "
                                    "the model with `polyarch plan --ops`")
    return errs


def _check_verify(g, name, who, prompt, ref_tokens, ref_logits, tol):
    """After a prefill, one verify call of eager's greedy tokens on slot 0: its rows must be
    eager's logits of the steps that follow. -> the relative errors."""
    k = g.verify_tokens
    g.cache = None
    g.prefill(prompt, 0)
    tokens = np.zeros((g.batch, k), np.int64)
    rows = min(k, VERIFY_STEPS - 1)
    tokens[0, :rows] = ref_tokens[:rows]
    got = g.verify(tokens, [len(prompt)] + [0] * (g.batch - 1))[0]
    errs = [_rel(got[j], ref_logits[j + 1]) for j in range(rows)]
    bad = next((j for j, e in enumerate(errs) if e > tol), None)
    if bad is not None:
        raise _disagree(name, who + "verify", bad + 1, int(np.argmax(got[bad])), ref_tokens[bad + 1], errs[bad], tol)
    return errs
