"""Streaming Pearson correlations between the neurons of two models on the same token positions.

For a block of A's neurons (columns of xa) and a range of B's whole layers (columns of xb), the
accumulator keeps, in float64: n, sums and sums of squares of both sides, the cross-product
matrix X^T Y and (for the rotation baseline) the Gram matrix Y_l^T Y_l of every B layer.

Exactness when |mean| >> std: every neuron is shifted by a fixed estimate of its mean (the
first batch's, unless given) before anything is accumulated, so the sums hold small numbers and
rho = (Sxy/n - mx my) / sqrt(var_x var_y) loses nothing to cancellation (the shift cancels
exactly in covariances).

Speed: the hot path is one float32 GEMM per batch (torch.addmm into a float32 buffer), the same
work as a plain torch.matmul of the batch. The float32 buffer is added into the float64
accumulator only every `flush_tokens` tokens, because the float64 add of an [n_a, n_b] matrix
costs as much memory traffic as a short GEMM. Why that keeps rho within 1e-5 of a float64
two-pass computation: the shifted data have |mean| of order std, so each float32 addition into
the buffer rounds with a relative error of 6e-8 of a partial sum bounded (Cauchy-Schwarz) by
sqrt(Sxx Syy); with the GEMM accumulating K-blocks of >= 64 tokens, flush_tokens = 16384 means at
most a few hundred such roundings, whose random-walk sum stays near 1e-6 of sqrt(Sxx Syy).

Precision of the per-batch product (accumulation is float64 whatever it is): float64 (the reference:
the whole update in float64), float32 (the default), tf32 (float32 with CUDA's TensorFloat-32 matmul; on
a CPU it is float32) or bfloat16 (the shifted activations rounded to bfloat16, multiplied with float32
accumulation, as tensor cores do; on a CPU the rounded values are multiplied in float32, which gives
the same products). bench/precision.py measures what each costs in max_corr against float64.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Union

import numpy as np
import torch

from atlas.errors import AtlasError
from atlas.metrics._arrays import (ArrayLike, Device, accumulator_device, add_widened, as_float32_tensor,
                                   as_tensor, host, reused_buffer)

DEFAULT_FLUSH_TOKENS = 16384
PRECISIONS = ("float64", "float32", "tf32", "bfloat16")
# Rotations kept per process: one per (baseline seed, layer) of the widest family a job compares
# (GPT-2 medium: 24 layers of 4096, 3.2 GB; smaller models far less).
ROTATION_CACHE_SIZE = 48


class CorrelationAccumulator:
    """Sufficient statistics for rho between n_a neurons of A and the given whole layers of B.

    layer_sizes_b: the width of each B layer in this block (xb's columns are these layers, in
    order); b_layers: their global layer indices (default 0..), used to name partners and to
    seed each layer's rotation so that blocked and unblocked runs give the same baseline.
    shift_a / shift_b: per-neuron shifts (mean estimates); default: the first batch's means.
    track_gram: keep the per-layer Gram matrices of B (needed by rotated_baseline_max only).
    flush_tokens: add the float32 partial products into float64 every this many tokens; None: only when
    the caller calls flush() (a caller that must group batches identically however the stream is cut,
    e.g. into token shards that merge exactly, flushes at fixed batch indices).
    device: where the state lives and each batch is multiplied (the job's device); results and
    checkpoints are copied to the host, nothing else crosses.
    """

    def __init__(
        self,
        n_a: int,
        layer_sizes_b: Sequence[int],
        shift_a: ArrayLike | None = None,
        shift_b: ArrayLike | None = None,
        *,
        b_layers: Sequence[int] | None = None,
        track_gram: bool = True,
        flush_tokens: int | None = DEFAULT_FLUSH_TOKENS,
        device: Device = "cpu",
        precision: str = "float32",
    ) -> None:
        self.precision, self.work_dtype = precision, work_dtype(precision)
        self.device = accumulator_device(device)
        self.n_a = n_a
        self.layer_sizes_b = [int(size) for size in layer_sizes_b]
        self.n_b = sum(self.layer_sizes_b)
        self.b_layers = list(range(len(self.layer_sizes_b))) if b_layers is None else [int(l) for l in b_layers]
        if len(self.b_layers) != len(self.layer_sizes_b):
            raise ValueError("b_layers and layer_sizes_b must have one entry per B layer")
        self.track_gram = track_gram
        self.flush_tokens = flush_tokens
        self.n = 0
        self.shift_a = None if shift_a is None else self._shift(shift_a, n_a, "shift_a", self.device)
        self.shift_b = None if shift_b is None else self._shift(shift_b, self.n_b, "shift_b", self.device)
        f64, f32 = dict(dtype=torch.float64, device=self.device), dict(dtype=self.work_dtype, device=self.device)
        self.sum_a, self.sumsq_a = torch.zeros(n_a, **f64), torch.zeros(n_a, **f64)
        self.sum_b, self.sumsq_b = torch.zeros(self.n_b, **f64), torch.zeros(self.n_b, **f64)
        self.max_a, self.min_a = torch.full((n_a,), -np.inf, **f32), torch.full((n_a,), np.inf, **f32)
        self.max_b, self.min_b = torch.full((self.n_b,), -np.inf, **f32), torch.full((self.n_b,), np.inf, **f32)
        self.cross = torch.zeros(n_a, self.n_b, **f64)
        self.grams = [torch.zeros(d, d, **f64) for d in self.layer_sizes_b] if track_gram else []
        # float32 partial sums of the products since the last flush (allocated on first use)
        self._pending_cross: torch.Tensor | None = None
        self._pending_grams: list[torch.Tensor] = []
        self._pending_tokens = 0
        self._buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def _shift(values: ArrayLike, size: int, name: str, device: Device = "cpu") -> torch.Tensor:
        shift = as_float32_tensor(values, device).reshape(-1)
        if shift.shape[0] != size:
            raise ValueError(f"{name} has {shift.shape[0]} values for {size} neurons")
        return shift.clone()

    @staticmethod
    def estimate_bytes(n_a: int, layer_sizes_b: Sequence[int], track_gram: bool = True,
                       precision: str = "float32") -> int:
        """Memory held by an accumulator: float64 sums + pending buffers of the product's precision
        (12 bytes an entry; 16 for float64).

        Not included: the per-batch work buffers, about 4 * batch * (n_a + 2 * n_b) bytes, which
        scale with the caller's batch of activations."""
        n_b = sum(layer_sizes_b)
        matrices = n_a * n_b + (sum(d * d for d in layer_sizes_b) if track_gram else 0)
        return (16 if precision == "float64" else 12) * matrices + 40 * (n_a + n_b)

    # -- accumulation ----------------------------------------------------------------------
    def update(self, xa: ArrayLike, xb: ArrayLike) -> None:
        """Add one batch: xa [n, n_a] and xb [n, n_b] activations of the SAME n token positions."""
        xa32, xb32 = as_tensor(xa, self.device, self.work_dtype), as_tensor(xb, self.device, self.work_dtype)
        if xa32.ndim != 2 or xb32.ndim != 2 or xa32.shape[0] != xb32.shape[0]:
            raise ValueError(f"xa {tuple(xa32.shape)} and xb {tuple(xb32.shape)} must be [n, features] with equal n")
        if xa32.shape[1] != self.n_a or xb32.shape[1] != self.n_b:
            raise ValueError(f"expected {self.n_a} A and {self.n_b} B columns, got {xa32.shape[1]} and {xb32.shape[1]}")
        if xa32.shape[0] == 0:
            return
        if self.shift_a is None:
            self.shift_a = xa32.mean(dim=0, dtype=torch.float64).float()
        if self.shift_b is None:
            self.shift_b = xb32.mean(dim=0, dtype=torch.float64).float()
        # shifted copies in reused buffers: the inputs stay untouched
        shift_a, shift_b = self.shift_a.to(self.work_dtype), self.shift_b.to(self.work_dtype)
        ya = torch.sub(xa32, shift_a, out=self._scratch("ya", xa32.shape))
        yb = torch.sub(xb32, shift_b, out=self._scratch("yb", xb32.shape))
        squares = self._scratch("squares", (xa32.shape[0], max(self.n_a, self.n_b)))
        self._update_vectors(xa32, ya, squares, self.sum_a, self.sumsq_a, self.max_a, self.min_a)
        self._update_vectors(xb32, yb, squares, self.sum_b, self.sumsq_b, self.max_b, self.min_b)
        self._accumulate_products(ya, yb)
        self.n += xa32.shape[0]

    def _scratch(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return reused_buffer(self._buffers, name, tuple(shape), self.device, self.work_dtype)

    @staticmethod
    def _update_vectors(raw, shifted, squares, total, total_sq, maximum, minimum) -> None:
        # float32 batch sums of the shifted values (|mean| ~ std, cascade summation: error ~1e-7
        # of std), added into float64; sum(dtype=float64) and aminmax are 10x slower on CPU.
        total += shifted.sum(dim=0)
        total_sq += torch.mul(shifted, shifted, out=squares[:, : shifted.shape[1]]).sum(dim=0)
        torch.maximum(maximum, raw.amax(dim=0), out=maximum)  # raw values: exact constancy test
        torch.minimum(minimum, raw.amin(dim=0), out=minimum)

    def _product_inputs(self, ya: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shifted activations as the product sees them: rounded to bfloat16 for that precision
        (and widened back, exactly, so the products accumulate in float32 as on tensor cores)."""
        if self.precision != "bfloat16":
            return ya, yb
        rounded_a = self._scratch("rounded_a", tuple(ya.shape)).copy_(ya.to(torch.bfloat16))
        rounded_b = self._scratch("rounded_b", tuple(yb.shape)).copy_(yb.to(torch.bfloat16))
        return rounded_a, rounded_b

    def _accumulate_products(self, ya: torch.Tensor, yb: torch.Tensor) -> None:
        ya, yb = self._product_inputs(ya, yb)
        layers = self._layer_columns(yb)
        if self._pending_cross is None:
            self._pending_cross = torch.empty(self.n_a, self.n_b, device=self.device, dtype=self.work_dtype)
            self._pending_grams = ([torch.empty(d, d, device=self.device, dtype=self.work_dtype)
                                    for d in self.layer_sizes_b] if self.track_gram else [])
        with _tf32_matmul(self.precision == "tf32"):
            if self._pending_tokens == 0:  # overwrite the stale buffer instead of zeroing it
                torch.mm(ya.T, yb, out=self._pending_cross)
                for pending, layer in zip(self._pending_grams, layers):
                    torch.mm(layer.T, layer, out=pending)
            else:
                self._pending_cross.addmm_(ya.T, yb)
                for pending, layer in zip(self._pending_grams, layers):
                    pending.addmm_(layer.T, layer)
        self._pending_tokens += ya.shape[0]
        if self.flush_tokens is not None and self._pending_tokens >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        """Add the float32 partial products into the float64 accumulators."""
        if self._pending_tokens == 0:
            return
        add_widened(self.cross, self._pending_cross)
        for gram, pending in zip(self.grams, self._pending_grams):
            add_widened(gram, pending)
        self._pending_tokens = 0

    def _layer_columns(self, columns: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(columns, self.layer_sizes_b, dim=-1))

    # -- statistics ------------------------------------------------------------------------
    def _require_data(self) -> None:
        if self.n == 0:
            raise ValueError("no data accumulated yet")

    def means_a(self) -> np.ndarray:
        self._require_data()
        return (self.sum_a / self.n + self.shift_a.double()).cpu().numpy()

    def means_b(self) -> np.ndarray:
        self._require_data()
        return (self.sum_b / self.n + self.shift_b.double()).cpu().numpy()

    def _variances(self, total, total_sq, maximum, minimum) -> torch.Tensor:
        """Population variances, exactly 0 where the raw values never changed."""
        mean = total / self.n
        variance = (total_sq / self.n - mean * mean).clamp_min(0.0)
        return torch.where(maximum == minimum, 0.0, variance).cpu()

    def variances_a(self) -> np.ndarray:
        self._require_data()
        return self._variances(self.sum_a, self.sumsq_a, self.max_a, self.min_a).numpy()

    def variances_b(self) -> np.ndarray:
        self._require_data()
        return self._variances(self.sum_b, self.sumsq_b, self.max_b, self.min_b).numpy()

    def cross_covariance(self, rows: slice = slice(None), columns: slice = slice(None)) -> np.ndarray:
        """Population covariance cov(A_i, B_j) for the given rows (A) and columns (B), float64."""
        self._require_data()
        self.flush()
        mean_a, mean_b = self.sum_a[rows] / self.n, self.sum_b[columns] / self.n
        covariance = self.cross[rows, columns] / self.n
        covariance -= mean_a[:, None] * mean_b[None, :]
        return covariance.cpu().numpy()

    def layer_covariance(self, index: int) -> np.ndarray:
        """Population covariance [d_l, d_l] of the block's B layer `index` (0-based within the block)."""
        self._require_data()
        if not self.track_gram:
            raise ValueError("this accumulator was built with track_gram=False: no layer covariances")
        self.flush()
        start = sum(self.layer_sizes_b[:index])
        mean = self.sum_b[start : start + self.layer_sizes_b[index]] / self.n
        return (self.grams[index] / self.n - mean[:, None] * mean[None, :]).cpu().numpy()

    def correlations(self, rows: slice = slice(None)) -> np.ndarray:
        """rho [rows, n_b] float64; NaN where either neuron has zero variance."""
        covariance = self.cross_covariance(rows)
        scale = np.sqrt(np.outer(self.variances_a()[rows], self.variances_b()))
        return _safe_ratio(covariance, scale)

    def locate(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global B layer, neuron within layer) of block columns; (-1, -1) for column -1."""
        columns = np.asarray(columns)
        starts = np.cumsum([0, *self.layer_sizes_b])
        position = np.clip(np.searchsorted(starts, columns, side="right") - 1, 0, len(self.b_layers) - 1)
        layers = np.asarray(self.b_layers)[position]
        neurons = columns - starts[position]
        missing = columns < 0
        return np.where(missing, -1, layers), np.where(missing, -1, neurons)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole state as numpy arrays (np.savez-able). The big ones share memory with the
        accumulator: write them out before the next update."""
        self.flush()
        empty = np.zeros(0, dtype=np.float32)

        def shared(tensor: torch.Tensor) -> np.ndarray:  # shares memory on the CPU, copies from a device
            return tensor.cpu().numpy()

        return {
            "n": np.array(self.n, dtype=np.int64),
            "layer_sizes_b": np.array(self.layer_sizes_b, dtype=np.int64),
            "b_layers": np.array(self.b_layers, dtype=np.int64),
            "track_gram": np.array(self.track_gram),
            "flush_tokens": np.array(-1 if self.flush_tokens is None else self.flush_tokens, dtype=np.int64),
            "precision": np.array(self.precision),
            "shift_a": empty if self.shift_a is None else shared(self.shift_a),
            "shift_b": empty if self.shift_b is None else shared(self.shift_b),
            "sum_a": shared(self.sum_a), "sumsq_a": shared(self.sumsq_a),
            "sum_b": shared(self.sum_b), "sumsq_b": shared(self.sumsq_b),
            "max_a": shared(self.max_a), "min_a": shared(self.min_a),
            "max_b": shared(self.max_b), "min_b": shared(self.min_b),
            **self._products_state(),
        }

    def _products_state(self) -> dict[str, np.ndarray]:
        """cross and the Gram matrices (flattened end to end), as numpy; shared memory on the CPU."""
        grams = [g.cpu().numpy().reshape(-1) for g in self.grams]
        return {"cross": self.cross.cpu().numpy(),
                "grams": np.concatenate(grams) if grams else np.zeros(0, dtype=np.float64)}

    def _load_products(self, state: dict[str, np.ndarray]) -> None:
        self.cross = _state_tensor(state, "cross", self.device)
        if self.track_gram:
            sizes, flat = self.layer_sizes_b, _state_tensor(state, "grams", self.device)
            self.grams = [g.reshape(d, d) for g, d in zip(torch.split(flat, [d * d for d in sizes]), sizes)]

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], device: Device = "cpu") -> CorrelationAccumulator:
        layer_sizes = [int(d) for d in state["layer_sizes_b"]]
        shift_a, shift_b = np.asarray(state["shift_a"]), np.asarray(state["shift_b"])
        accumulator = cls(
            int(np.asarray(state["cross"]).shape[0]), layer_sizes,
            shift_a if shift_a.size else None, shift_b if shift_b.size else None,
            b_layers=[int(l) for l in state["b_layers"]],
            track_gram=bool(state["track_gram"]),
            flush_tokens=None if int(state["flush_tokens"]) < 0 else int(state["flush_tokens"]), device=device,
            precision=str(state["precision"]) if "precision" in state else "float32",
        )
        accumulator.n = int(state["n"])
        for key in ("sum_a", "sumsq_a", "sum_b", "sumsq_b", "max_a", "min_a", "max_b", "min_b"):
            setattr(accumulator, key, _state_tensor(state, key, accumulator.device))
        accumulator._load_products(state)
        return accumulator


def work_dtype(precision: str) -> torch.dtype:
    """The dtype a precision shifts and multiplies in: float64 for float64, else float32 (tf32 and
    bfloat16 are float32 tensors with a rounded product)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return torch.float64 if precision == "float64" else torch.float32


def _state_tensor(state: dict[str, np.ndarray], key: str, device: torch.device) -> torch.Tensor:
    """A checkpoint array as a tensor on the device (copied first if numpy holds it read-only)."""
    array = np.asarray(state[key])
    return torch.from_numpy(array if array.flags.writeable else array.copy()).to(device)


class ModelColumns:
    """One model's per-neuron statistics over a pass, computed ONCE per batch and shared by every
    accumulator the model takes part in (its pairs and its layer covariances): the shift (the first
    batch's mean, as a CorrelationAccumulator takes it), shifted sums and squares, max and min.

    update(x) returns the shifted batch, already in the form the products take (rounded for bfloat16),
    in a buffer reused by the next update: consume it before then.
    """

    def __init__(self, n_features: int, device: Device = "cpu", precision: str = "float32") -> None:
        self.n_features, self.precision, self.work_dtype = n_features, precision, work_dtype(precision)
        self.device = accumulator_device(device)
        work, f64 = dict(dtype=self.work_dtype, device=self.device), dict(dtype=torch.float64, device=self.device)
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum, self.sumsq = torch.zeros(n_features, **f64), torch.zeros(n_features, **f64)
        self.max, self.min = torch.full((n_features,), -np.inf, **work), torch.full((n_features,), np.inf, **work)
        self._buffers: dict[str, torch.Tensor] = {}

    def update(self, x: ArrayLike) -> torch.Tensor:
        raw = as_tensor(x, self.device, self.work_dtype)
        if raw.ndim != 2 or raw.shape[1] != self.n_features:
            raise ValueError(f"expected activations [n, {self.n_features}], got {tuple(raw.shape)}")
        if self.shift is None and raw.shape[0]:
            self.shift = raw.mean(dim=0, dtype=torch.float64).float()
        if raw.shape[0] == 0:
            return raw
        shifted = torch.sub(raw, self.shift.to(self.work_dtype), out=self._buffer("shifted", raw.shape))
        CorrelationAccumulator._update_vectors(raw, shifted, self._buffer("squares", raw.shape), self.sum,
                                               self.sumsq, self.max, self.min)
        self.n += raw.shape[0]
        if self.precision == "bfloat16":  # rounded once here, not once per pair
            return self._buffer("rounded", raw.shape).copy_(shifted.to(torch.bfloat16))
        return shifted

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return reused_buffer(self._buffers, name, tuple(shape), self.device, self.work_dtype)

    def prime(self, x: ArrayLike) -> bool:
        """Take the shift from x (the stream's first non-empty batch) without counting it, as update would;
        a token shard that starts later primes with the stream's first batch so that every shard shares
        the shift and their sums merge by addition. Returns whether the shift is set."""
        raw = as_tensor(x, self.device, self.work_dtype)
        if self.shift is None and raw.shape[0]:
            self.shift = raw.mean(dim=0, dtype=torch.float64).float()
        return self.shift is not None

    def merge(self, other: ModelColumns) -> None:
        """Fold in the columns of another part of the stream (a token shard): sums add, extremes combine.
        Both parts must have shifted by the same values (the stream's first batch)."""
        if other.n == 0:
            return
        if self.shift is not None and not torch.equal(self.shift, other.shift.to(self.device)):
            raise ValueError("cannot merge statistics taken with different shifts: prime every shard with the "
                             "stream's first batch")
        if self.shift is None:
            self.shift = other.shift.to(self.device).clone()
        self.n += other.n
        self.sum += other.sum.to(self.device)
        self.sumsq += other.sumsq.to(self.device)
        torch.maximum(self.max, other.max.to(self.device), out=self.max)
        torch.minimum(self.min, other.min.to(self.device), out=self.min)

    @staticmethod
    def estimate_bytes(n_features: int, batch_positions: int, precision: str = "float32") -> int:
        """The vectors, and the per-batch buffers (shifted, squares, rounded) of batch_positions rows."""
        per_value = 8 if precision == "float64" else 4
        buffers = 3 if precision == "bfloat16" else 2
        return 40 * n_features + buffers * per_value * batch_positions * n_features

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"n": np.array(self.n, dtype=np.int64), "precision": np.array(self.precision),
                "shift": np.zeros(0, dtype=np.float32) if self.shift is None else host(self.shift),
                "sum": host(self.sum), "sumsq": host(self.sumsq), "max": host(self.max), "min": host(self.min)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore in place: the accumulators that share these columns keep seeing them."""
        self.n = int(state["n"])
        self.shift = _state_tensor(state, "shift", self.device) if np.asarray(state["shift"]).size else None
        for name in ("sum", "sumsq", "max", "min"):
            setattr(self, name, _state_tensor(state, name, self.device))

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], device: Device = "cpu") -> ModelColumns:
        columns = cls(int(np.asarray(state["sum"]).shape[0]), device, str(state["precision"]))
        columns.load_state_dict(state)
        return columns


class SharedCorrelationAccumulator(CorrelationAccumulator):
    """A CorrelationAccumulator whose per-neuron vectors live in the two models' ModelColumns (columns_a
    and columns_b of them): it only accumulates the products, fed by update_products with the shifted
    batches ModelColumns.update returned. The numbers equal a CorrelationAccumulator's on the same data
    (the same shift: each model's first-batch mean)."""

    def __init__(self, model_a: ModelColumns, columns_a: slice, model_b: ModelColumns, columns_b: slice,
                 layer_sizes_b: Sequence[int], *, b_layers: Sequence[int] | None = None, track_gram: bool = True,
                 flush_tokens: int | None = DEFAULT_FLUSH_TOKENS) -> None:
        self.model_a, self.columns_a, self.model_b, self.columns_b = model_a, columns_a, model_b, columns_b
        super().__init__(columns_a.stop - columns_a.start, layer_sizes_b, b_layers=b_layers, track_gram=track_gram,
                         flush_tokens=flush_tokens, device=model_a.device, precision=model_a.precision)
        if self.n_b != columns_b.stop - columns_b.start:
            raise ValueError(f"B's layers {list(layer_sizes_b)} do not cover columns {columns_b}")

    # The vectors are views of the models' (assignments by the base constructor are ignored).
    def _view(self, side: str, name: str) -> torch.Tensor | None:
        model, columns = (self.model_a, self.columns_a) if side == "a" else (self.model_b, self.columns_b)
        value = getattr(model, name)
        return None if value is None else value[columns]

    sum_a = property(lambda self: self._view("a", "sum"), lambda self, value: None)
    sumsq_a = property(lambda self: self._view("a", "sumsq"), lambda self, value: None)
    max_a = property(lambda self: self._view("a", "max"), lambda self, value: None)
    min_a = property(lambda self: self._view("a", "min"), lambda self, value: None)
    shift_a = property(lambda self: self._view("a", "shift"), lambda self, value: None)
    sum_b = property(lambda self: self._view("b", "sum"), lambda self, value: None)
    sumsq_b = property(lambda self: self._view("b", "sumsq"), lambda self, value: None)
    max_b = property(lambda self: self._view("b", "max"), lambda self, value: None)
    min_b = property(lambda self: self._view("b", "min"), lambda self, value: None)
    shift_b = property(lambda self: self._view("b", "shift"), lambda self, value: None)

    def update(self, xa: ArrayLike, xb: ArrayLike) -> None:
        raise TypeError("a shared accumulator takes shifted batches: update the ModelColumns, then update_products")

    def update_products(self, ya: torch.Tensor, yb: torch.Tensor) -> None:
        """Add one batch of shifted activations (ModelColumns.update's, sliced to this block's columns)."""
        if ya.shape[0] == 0:
            return
        self._accumulate_products(ya, yb)  # rounding for bfloat16 was done once, in ModelColumns
        self.n += ya.shape[0]

    def _product_inputs(self, ya: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ya, yb

    def state_dict(self) -> dict[str, np.ndarray]:
        """The products only (the vectors are saved with the models' columns)."""
        self.flush()
        return {"n": np.array(self.n, dtype=np.int64), **self._products_state()}

    def load_products(self, state: dict[str, np.ndarray]) -> None:
        self.n = int(state["n"])
        self._load_products(state)

    def merge_products(self, other: SharedCorrelationAccumulator) -> None:
        """Add another token shard's products (its models' columns are merged by their owner)."""
        self.flush()
        other.flush()
        add_widened(self.cross, other.cross.to(self.device))
        for gram, other_gram in zip(self.grams, other.grams, strict=True):
            add_widened(gram, other_gram.to(self.device))
        self.n += other.n


@contextlib.contextmanager
def _tf32_matmul(enabled: bool) -> Iterator[None]:
    """CUDA's TensorFloat-32 matmul for the products of one update (a process-wide flag, restored after)."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator clipped to [-1, 1]; NaN where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(denominator > 0, numerator / denominator, np.nan)
    return np.clip(ratio, -1.0, 1.0, out=ratio)


class TransposedView:
    """The other direction of an unordered pair's accumulator: B's neurons as rows against A's layers.

    One accumulator of X_A^T X_B holds both directions (rho is symmetric). This view answers what an
    accumulator of the ordered pair (B, A) would: the same float64 numbers transposed (the float32 GEMM
    of the transposed product is the same sums, bit for bit on the CPU), so max_correlations and
    rotated_baseline_max give B's maxima over A and B's baseline with A's layers rotated.
    layer_sizes_a / a_layers: the accumulator's A columns as whole layers (their global indices).
    """

    def __init__(self, accumulator: CorrelationAccumulator, layer_sizes_a: Sequence[int],
                 a_layers: Sequence[int]) -> None:
        if sum(layer_sizes_a) != accumulator.n_a or len(layer_sizes_a) != len(a_layers):
            raise ValueError(f"A's layers {list(layer_sizes_a)} do not cover the accumulator's {accumulator.n_a} rows")
        self.source = accumulator
        self.n_a, self.n_b, self.n = accumulator.n_b, accumulator.n_a, accumulator.n
        self.layer_sizes_b, self.b_layers = [int(d) for d in layer_sizes_a], [int(l) for l in a_layers]
        self.track_gram = False

    def variances_a(self) -> np.ndarray:
        return self.source.variances_b()

    def variances_b(self) -> np.ndarray:
        return self.source.variances_a()

    def cross_covariance(self, rows: slice = slice(None), columns: slice = slice(None)) -> np.ndarray:
        return self.source.cross_covariance(columns, rows).T

    # The accumulator's own formulas, on the transposed statistics (they use only the methods above and
    # the layer fields).
    correlations = CorrelationAccumulator.correlations
    locate = CorrelationAccumulator.locate

    def layer_covariance(self, index: int) -> np.ndarray:
        raise ValueError("the transposed view has no Gram matrices of A: pass layer_covariances")


# -- maxima ----------------------------------------------------------------------------------
def _row_maxima(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row max ignoring NaN columns; a row with no finite value gives (NaN, -1)."""
    filled = np.where(np.isnan(rho), -np.inf, rho)
    partner = np.argmax(filled, axis=1) if rho.shape[1] else np.zeros(rho.shape[0], dtype=np.int64)
    best = filled[np.arange(rho.shape[0]), partner] if rho.shape[1] else np.full(rho.shape[0], -np.inf)
    missing = np.isneginf(best)
    return np.where(missing, np.nan, best), np.where(missing, -1, partner).astype(np.int64)


# The maxima read rho a chunk of rows at a time; a chunk of about 16 MiB of float64 keeps the few
# temporaries of a chunk small beside the accumulators at any width (1,024 rows of GPT-2 small's 36,864
# columns would be 288 MiB each).
RESULT_CHUNK_BYTES = 1 << 24


def _result_rows(n_columns: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, RESULT_CHUNK_BYTES // (8 * max(1, n_columns)))


def max_correlations(
    source: Union[np.ndarray, CorrelationAccumulator, TransposedView], chunk_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(max_corr [n_a], partner column [n_a]) over B's neurons; computed in row chunks (chunk_rows, or
    about RESULT_CHUNK_BYTES of float64).

    NaN columns (zero-variance B neurons) are ignored; a zero-variance A neuron gets NaN (never
    0) and partner -1.
    """
    statistics = not isinstance(source, np.ndarray)
    n_rows = source.n_a if statistics else source.shape[0]
    chunk_rows = _result_rows(source.n_b if statistics else source.shape[1], chunk_rows)
    parts = []
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)
        block = source.correlations(rows) if statistics else np.asarray(source[rows], dtype=np.float64)
        parts.append(_row_maxima(block))
    if not parts:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def combine_maxima(values: Sequence[np.ndarray], *payloads: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Element-wise best over blocks covering different B layers for the same A neurons.

    values[k] are the maxima of block k (NaN = no value); payloads (e.g. partner layer and
    neuron per block) are taken from the winning block. Returns (values, *payloads).
    """
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    filled = np.where(np.isnan(stacked), -np.inf, stacked)
    winner = np.argmax(filled, axis=0)
    columns = np.arange(stacked.shape[1])
    best = filled[winner, columns]
    chosen = [np.stack([np.asarray(p) for p in payload])[winner, columns] for payload in payloads]
    return (np.where(np.isneginf(best), np.nan, best), *chosen)


# -- rotation baseline -----------------------------------------------------------------------
def random_orthogonal(d: int, seed: int | Sequence[int]) -> np.ndarray:
    """A Haar-distributed orthogonal [d, d] matrix, reproducible from seed (int or int tuple).

    QR of a seeded Gaussian matrix, with the columns' signs fixed by sign(diag(R)) so that the
    distribution is exactly Haar (plain QR is biased by LAPACK's sign convention). Cached: every
    pair of a family rotates B's layer l by the same matrix, built once per process.
    """
    key = (int(seed),) if isinstance(seed, (int, np.integer)) else tuple(int(part) for part in seed)
    return _cached_orthogonal(int(d), key)


@functools.lru_cache(maxsize=ROTATION_CACHE_SIZE)
def _cached_orthogonal(d: int, seed: tuple[int, ...]) -> np.ndarray:
    gaussian = np.random.default_rng(seed).standard_normal((d, d))
    q, r = torch.linalg.qr(torch.from_numpy(gaussian))  # twice numpy's speed on the CPU, and runs on a GPU
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    rotation = (q * signs[None, :]).numpy()
    rotation.flags.writeable = False  # shared by every caller of the cache
    return rotation


def layer_rotations(accumulator: CorrelationAccumulator, seed: int) -> list[np.ndarray]:
    """The rotation of each of the block's B layers, seeded by (seed, global layer index)."""
    return [random_orthogonal(d, (seed, layer)) for d, layer in zip(accumulator.layer_sizes_b, accumulator.b_layers)]


def rotated_baseline_max(
    accumulator: CorrelationAccumulator,
    seed: int = 0,
    *,
    rotations: Sequence[np.ndarray] | None = None,
    layer_covariances: Sequence[np.ndarray] | None = None,
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(max_corr, rotated column) of each A neuron against B with every layer rotated by R_l.

    No second pass over the data: with C_l the cross-covariance block and S_l the covariance of
    layer l, the rotated B neurons Y_l R_l have cov(A, Y_l R_l) = C_l R_l and variances
    diag(R_l^T S_l R_l), so rho_rot = C_l R_l / sqrt(var_A * diag(R_l^T S_l R_l)).
    layer_covariances: S_l of the block's B layers measured elsewhere on the same positions
    (e.g. once per model instead of once per pair), for an accumulator with track_gram=False.
    """
    rotations = layer_rotations(accumulator, seed) if rotations is None else list(rotations)
    if len(rotations) != len(accumulator.layer_sizes_b):
        raise ValueError("need one rotation per B layer of the block")
    if layer_covariances is None:
        layer_covariances = [accumulator.layer_covariance(index) for index in range(len(rotations))]
    rotated_variances = [
        np.einsum("ij,ij->j", covariance @ rotation, rotation)
        for covariance, rotation in zip(layer_covariances, rotations, strict=True)
    ]
    rotated_variances_all = np.concatenate(rotated_variances)
    variances_a = accumulator.variances_a()
    starts = np.cumsum([0, *accumulator.layer_sizes_b])
    chunk_rows = _result_rows(accumulator.n_b, chunk_rows)
    parts = []
    for row_start in range(0, accumulator.n_a, chunk_rows):
        rows = slice(row_start, row_start + chunk_rows)
        covariance = np.concatenate([
            accumulator.cross_covariance(rows, slice(starts[i], starts[i + 1])) @ rotation
            for i, rotation in enumerate(rotations)
        ], axis=1)
        scale = np.sqrt(np.outer(variances_a[rows], rotated_variances_all.clip(min=0.0)))
        parts.append(_row_maxima(_safe_ratio(covariance, scale)))
    if not parts:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# -- sharding --------------------------------------------------------------------------------
def pair_block_bytes(n_a_layers: int, d_a: int, n_b_layers: int, d_b: int, precision: str = "float32") -> int:
    """What one block of an unordered pair holds: the accumulator of A's layers x B's layers (no Gram
    matrices) and the covariance accumulators of both layer groups (the baselines of both directions)."""
    estimate = functools.partial(CorrelationAccumulator.estimate_bytes, precision=precision)
    return (estimate(n_a_layers * d_a, [d_b] * n_b_layers, track_gram=False)
            + estimate(0, [d_a] * n_a_layers) + estimate(0, [d_b] * n_b_layers))


def layer_grid(n_layers_a: int, d_a: int, n_layers_b: int, d_b: int, budget_bytes: int,
               precision: str = "float32") -> list[tuple[range, range]]:
    """Split an unordered pair (A's layers x B's layers) into blocks of whole layers on both sides that fit
    budget_bytes with their covariances: the fewest groups of equal size (both directions' baselines
    rotate whole layers). Listed A group by A group, B groups inside."""
    smallest = pair_block_bytes(1, d_a, 1, d_b, precision)
    if smallest > budget_bytes:
        raise AtlasError(
            f"memory budget of {budget_bytes} bytes cannot hold one layer ({d_a} neurons) against one layer "
            f"({d_b}); raise the budget to at least {smallest} bytes"
        )
    widest = max(n_layers_a, n_layers_b)
    per_group = max(g for g in range(1, widest + 1)
                    if pair_block_bytes(min(g, n_layers_a), d_a, min(g, n_layers_b), d_b, precision) <= budget_bytes)
    groups_a = _equal_ranges(n_layers_a, per_group)
    groups_b = _equal_ranges(n_layers_b, per_group)
    return [(group_a, group_b) for group_a in groups_a for group_b in groups_b]


def _equal_ranges(total: int, max_size: int) -> list[range]:
    count = max(1, -(-total // max(max_size, 1)))
    bounds = np.linspace(0, total, count + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
