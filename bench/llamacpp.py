"""llama.cpp on the same weights as a transformers Llama, for bench/generate.py.

The model is written as GGUF with the `gguf` package (llama.cpp's own writer library), f32 or
f16 (2-D weights in 16 bits, norms in f32 as llama.cpp's converter stores them), and run
through `llama-cpp-python` (both pinned in bench/requirements.txt; llama-cpp-python builds
llama.cpp from source, about 5 minutes on 2 cores). The vocabulary is a placeholder of the
model's size (token ids only: the benchmark feeds ids, never text)."""

import time

import numpy as np


def _permute(w, heads):
    """Rows of a q or k projection from transformers' rotate-half order to llama.cpp's
    interleaved pairs (the RoPE layouts differ)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: str, f16: bool = False) -> str:
    import gguf

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 1e4)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(theta))
    w.add_file_type(1 if f16 else 0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([2, 3, 3] + [1] * (cfg.vocab_size - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def put(name, a):
        w.add_tensor(name, a.astype(np.float16 if f16 and a.ndim == 2 else np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads))
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class LlamaCpp:
    """A GGUF model loaded by llama-cpp-python: greedy prefill + decode, timed."""

    def __init__(self, path: str, context: int, prompt: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=context, n_batch=prompt, n_ubatch=prompt, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def _last_logits(self):
        """The logits of the last token evaluated (llama.cpp keeps only those without logits_all)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def run(self, prompt: list, new: int) -> tuple:
        """-> (prefill s, decode s per token, tokens)."""
        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(self._last_logits()))
        prefill = time.perf_counter() - t
        tokens = [tok]
        t = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = int(np.argmax(self._last_logits()))
            tokens.append(tok)
        return prefill, (time.perf_counter() - t) / (new - 1), tokens
