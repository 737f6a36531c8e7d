"""polyarch: split one PyTorch model across heterogeneous devices, ahead of time.

    import polyarch
    polyarch.compile(model, (x,), devices=["cpu", "vulkan"], output="m.pab")
    run = polyarch.runtime.load("m.pab")
    y = run(x)

`polyarch.runtime` needs only iree-base-runtime and numpy; the compiler (torch,
torch-mlir, iree-base-compiler) is imported the first time `compile` is called.
"""

from typing import Any, Iterable

from .compiler.options import CompileOptions
from .errors import PolyarchError
from .version import __version__


def compile(model: Any, example_inputs: tuple = (), devices: Iterable = ("cpu",), output: str | None = None,
            **options) -> str:
    """Compile `model` (an nn.Module or ExportedProgram) into a `.pab` bundle.

    See `polyarch.compiler.driver.compile` for the options (or pass options=CompileOptions(...));
    `polyarch.compiler.driver.import_model` for the stages (import, plan, write)."""
    from .compiler.driver import compile as _compile

    return _compile(model, example_inputs, devices=devices, output=output, **options)


def __getattr__(name):
    # `polyarch.runtime` on first use, so that `import polyarch` stays cheap.
    if name == "runtime":
        import importlib

        return importlib.import_module(".runtime", __name__)
    raise AttributeError(name)


__all__ = ["compile", "CompileOptions", "PolyarchError", "runtime"]
