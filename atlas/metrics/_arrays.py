"""Conversions shared by the metrics: accept torch tensors (any float dtype) or numpy arrays.

Streaming accumulators keep their state on one device (the job's: cuda when the model runs there)
and convert each batch onto it; the same code runs on the CPU in CI.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


Device = torch.device | str


def as_tensor(x: ArrayLike, device: Device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """x as a tensor on `device`, in `dtype` (default: its own); a copy only where either changes."""
    tensor = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return tensor.to(device=device, dtype=dtype or tensor.dtype)


def as_float64_tensor(x: ArrayLike, device: Device = "cpu") -> torch.Tensor:
    """A float64 tensor on `device` with the values of x (a copy unless x is float64 there already)."""
    return as_tensor(x, device, torch.float64)


def as_float32_tensor(x: ArrayLike, device: Device = "cpu") -> torch.Tensor:
    """A float32 tensor on `device` (bfloat16/float16 are widened exactly; float64 is rounded)."""
    return as_tensor(x, device, torch.float32)


def accumulator_device(device: Device) -> torch.device:
    """Where float64 accumulators live for a job on `device`: there, except on Apple's mps, which
    has no float64 (its accumulators stay on the CPU)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def reused_buffer(buffers: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], device: Device,
                  dtype: torch.dtype) -> torch.Tensor:
    """A work tensor of `shape` over flat storage kept between batches in `buffers`, grown (never shrunk) when
    a batch needs more: batches of varying length reuse one allocation. Fresh allocations of batch size
    cost page faults comparable to the vector work itself, and a new one beside the old raises the peak.
    Its contents are the previous batch's: the caller overwrites them."""
    numel = math.prod(shape)
    storage = buffers.get(name)
    if storage is None or storage.numel() < numel or storage.dtype != dtype or storage.device != torch.device(device):
        buffers.pop(name, None)
        del storage  # released before the larger one is allocated
        storage = buffers[name] = torch.empty(numel, device=device, dtype=dtype)
    return storage[:numel].view(shape)


# Bytes of float64 work rows per step: on a CPU a chunk that stays in cache makes float64 passes over a
# batch about 2x faster than whole-batch passes (and allocates no batch-sized temporary); on an
# accelerator one big step is fastest.
_CHUNK_BYTES = {"cpu": 1 << 20}
_ACCELERATOR_CHUNK_BYTES = 1 << 28


def chunk_rows(device: Device, n_rows: int, row_bytes: int) -> int:
    """How many rows of `row_bytes` each a step over a tensor on `device` takes (at least 1, at most n_rows)."""
    budget = _CHUNK_BYTES.get(torch.device(device).type, _ACCELERATOR_CHUNK_BYTES)
    return max(1, min(n_rows, budget // max(1, row_bytes)))


def add_widened(total: torch.Tensor, part: torch.Tensor) -> None:
    """total += part for a float64 total and a lower-precision part of the same shape, a chunk of rows at a
    time: a whole-matrix `+=` first widens all of part into a float64 temporary of total's size (32 MiB for
    2,048 x 2,048), which raises the peak and costs 4x the time on a CPU."""
    if total.ndim < 2:
        total += part
        return
    rows = chunk_rows(total.device, total.shape[0], math.prod(total.shape[1:]) * total.element_size())
    for start in range(0, total.shape[0], rows):
        total[start:start + rows] += part[start:start + rows]


def host(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy of a tensor on any device: results and checkpoints cross to the host here."""
    return tensor.detach().cpu().numpy().copy()


def as_float64_numpy(x: ArrayLike) -> np.ndarray:
    return as_float64_tensor(x).numpy()
