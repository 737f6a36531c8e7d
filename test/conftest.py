import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.fixture(scope="session")
def minilm():
    import minilm as ex

    return ex.build(), ex.example_inputs()


@pytest.fixture(scope="session")
def mlp():
    import mlp as ex

    return ex.build(), ex.example_inputs()


@pytest.fixture(scope="session")
def cnn():
    import cnn as ex

    return ex.build(), ex.example_inputs()


def eager(model, inputs):
    import torch

    with torch.no_grad():
        return model(*inputs).numpy()
