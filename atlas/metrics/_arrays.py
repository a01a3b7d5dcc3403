"""Conversions shared by the metrics: accept torch tensors (any float dtype) or numpy arrays.

Streaming accumulators keep their state on one device (the job's: cuda when the model runs there)
and convert each batch onto it; the same code runs on the CPU in CI.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


Device = torch.device | str


def as_float64_tensor(x: ArrayLike, device: Device = "cpu") -> torch.Tensor:
    """A float64 tensor on `device` with the values of x (a copy unless x is float64 there already)."""
    tensor = torch.as_tensor(x) if isinstance(x, np.ndarray) else x.detach()
    return tensor.to(device=device, dtype=torch.float64)


def as_float32_tensor(x: ArrayLike, device: Device = "cpu") -> torch.Tensor:
    """A float32 tensor on `device` (bfloat16/float16 are widened exactly; float64 is rounded)."""
    tensor = torch.as_tensor(x) if isinstance(x, np.ndarray) else x.detach()
    return tensor.to(device=device, dtype=torch.float32)


def accumulator_device(device: Device) -> torch.device:
    """Where float64 accumulators live for a job on `device`: there, except on Apple's mps, which
    has no float64 (its accumulators stay on the CPU)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def host(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy of a tensor on any device: results and checkpoints cross to the host here."""
    return tensor.detach().cpu().numpy().copy()


def as_float64_numpy(x: ArrayLike) -> np.ndarray:
    return as_float64_tensor(x).numpy()
