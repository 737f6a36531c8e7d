"""Element types between torch, numpy and IREE, 16-bit floats included.

numpy has no bfloat16 of its own: it is `ml_dtypes.bfloat16` (a dependency of
iree-base-runtime, so present wherever the runtime is), and torch's `.numpy()` and DLPack
refuse it, so bf16 tensors cross as their 16-bit patterns."""

from typing import Any

import numpy as np

__all__ = ["np_dtype", "to_numpy", "to_torch"]


def np_dtype(name: Any) -> np.dtype:
    """np.dtype(name), also for "bfloat16"."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as a host array of the same element type (shares memory where torch can)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.numpy()


def to_torch(a: np.ndarray) -> Any:
    """A host array as a torch tensor sharing its memory (through DLPack; bf16 as its bits)."""
    import torch

    if a.dtype == np_dtype("bfloat16"):
        return torch.from_dlpack(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)
