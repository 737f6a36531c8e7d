"""The consumer project's model; its layers come from a local module (a build dependency)."""

import torch

from layers import Block


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(Block(64, 128), Block(128, 64))
        self.head = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.head(self.body(x))
