"""A GPT-style decoder block (pre-norm, causal self-attention, GELU MLP):
polyarch plan examples/gpt_block.py -d cpu -d vulkan --explain"""

import torch
import torch.nn.functional as F


class DecoderBlock(torch.nn.Module):
    def __init__(self, d_model=256, heads=4, ff=1024):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.up = torch.nn.Linear(d_model, ff)
        self.down = torch.nn.Linear(ff, d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


def build():
    torch.manual_seed(0)
    return DecoderBlock().eval()


def example_inputs():
    return (torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(1)),)


Model = build
