"""A small Llama-style causal language model with random weights (transformers' architecture,
built from a config: no hub access needed), for `polyarch compile --generate`:

    polyarch compile examples/tiny_llama.py --generate --max-context 128 -o tiny_llama.pab
    polyarch generate tiny_llama.pab --ids 1,2,3 -n 32
"""

import torch
import transformers


def build(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 256):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval()
