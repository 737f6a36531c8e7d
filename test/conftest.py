import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from conftest import ...`


def cli(*args, cwd=None):
    """Run the installed `polyarch` console script, as a user would."""
    import subprocess

    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "polyarch"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=900)


def example(name):
    """Load examples/<name>.py by path, under a unique module name (no sys.path games)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"polyarch_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def minilm():
    ex = example("minilm")

    return ex.build(), ex.example_inputs()


@pytest.fixture(scope="session")
def mlp():
    ex = example("mlp")

    return ex.build(), ex.example_inputs()


@pytest.fixture(scope="session")
def cnn():
    ex = example("cnn")

    return ex.build(), ex.example_inputs()


def eager(model, inputs):
    import torch

    with torch.no_grad():
        return model(*inputs).numpy()
