"""A small CNN: polyarch compile examples/cnn.py -d cpu -d vulkan"""

import torch


class CNN(torch.nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.head = torch.nn.Linear(32 * 8 * 8, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(x.flatten(1))


def build():
    torch.manual_seed(0)
    m = CNN().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m


def example_inputs():
    return (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


Model = build
