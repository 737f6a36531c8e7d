"""A small MLP: polyarch compile examples/mlp.py -d cpu -d vulkan"""

import torch


class MLP(torch.nn.Module):
    def __init__(self, d_in=256, hidden=1024, d_out=64):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build():
    torch.manual_seed(0)
    return MLP().eval()


def example_inputs():
    return (torch.randn(32, 256, generator=torch.Generator().manual_seed(1)),)


Model = build
