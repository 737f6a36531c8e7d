"""A tiny random-init Llama-style causal LM for the consumer's GENERATE bundle."""

import torch
import transformers


def build():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()
