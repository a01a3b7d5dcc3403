"""Conversions shared by the metrics: accept torch tensors (any float dtype) or numpy arrays."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def as_float64_tensor(x: ArrayLike) -> torch.Tensor:
    """A float64 CPU tensor with the values of x (always a copy when x is not float64 already)."""
    tensor = torch.as_tensor(x) if isinstance(x, np.ndarray) else x.detach()
    return tensor.to(device="cpu", dtype=torch.float64)


def as_float32_tensor(x: ArrayLike) -> torch.Tensor:
    """A float32 CPU tensor (bfloat16/float16 are widened exactly; float64 is rounded)."""
    tensor = torch.as_tensor(x) if isinstance(x, np.ndarray) else x.detach()
    return tensor.to(device="cpu", dtype=torch.float32)


def as_float64_numpy(x: ArrayLike) -> np.ndarray:
    return as_float64_tensor(x).numpy()
