"""Exact streaming moments per feature (neuron), merged with the Chan/Pebay pairwise formulas.

Each batch is reduced to its own central moments with a two-pass computation in float64, then
merged into the running state. Merging central moments (never raw power sums) keeps the result
exact even when |mean| >> std, and makes the result independent of how the data was batched.

Reported moments are population moments: var = M2/n, skew = E[z^3], kurt = E[z^4] (raw, a
Gaussian gives 3). A feature with zero variance (max == min) gets var = 0 and NaN skew and kurt:
its standardised value z is undefined. With n == 0 every statistic is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atlas.metrics._arrays import (ArrayLike, Device, accumulator_device, as_float64_tensor, as_tensor,
                                  chunk_rows, host, reused_buffer)

_STATE_KEYS = ("n", "mean", "m2", "m3", "m4", "max", "min", "n_active")


@dataclass
class _Moments:
    """Count and central moment sums (M_k = sum (x - mean)^k) of one set of rows, per feature."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor
    m3: torch.Tensor
    m4: torch.Tensor


def _batch_moments(x: torch.Tensor) -> _Moments:
    """Two-pass central moments of a float64 batch [n, features]."""
    mean = x.mean(dim=0)
    deviation = x - mean
    squared = deviation * deviation
    m2, m3 = squared.sum(dim=0), (squared * deviation).sum(dim=0)
    return _Moments(n=x.shape[0], mean=mean, m2=m2, m3=m3, m4=squared.square_().sum(dim=0))


def _chunked_batch_moments(raw: torch.Tensor, buffers: dict[str, torch.Tensor]) -> tuple[_Moments, torch.Tensor]:
    """Float64 central moments of a batch raw [n, features] (any float dtype, any strides) and its count of
    positive values per feature, in one pass over a few rows at a time in reused float64 buffers.

    The rows are shifted by an estimate of the batch mean (its mean in the input's precision), their power
    sums taken in float64, and the central moments recovered from them: with the shift within a small
    fraction of a standard deviation of the mean, the corrections cancel no digits that matter (the same
    sums as a two-pass computation to float64 rounding, without a float64 copy of the batch)."""
    n, width = raw.shape
    rows = chunk_rows(raw.device, n, 8 * width)
    deviation = reused_buffer(buffers, "deviation", (rows, width), raw.device, torch.float64)
    power = reused_buffer(buffers, "power", (rows, width), raw.device, torch.float64)
    signs = reused_buffer(buffers, "signs", (rows, width), raw.device, torch.float32)  # 0/1: float32 sums are exact
    shift = raw.mean(dim=0, dtype=torch.float32 if raw.element_size() < 4 else raw.dtype).to(torch.float64)
    s1, s2, s3, s4, positive = (torch.zeros_like(shift) for _ in range(5))
    for start in range(0, n, rows):
        source = raw[start:start + rows]
        d, q = deviation[: source.shape[0]], power[: source.shape[0]]
        positive += torch.gt(source, 0, out=signs[: source.shape[0]]).sum(dim=0)  # while the rows are in cache
        s1 += torch.sub(source, shift, out=d).sum(dim=0)  # widened and shifted in one step
        s2 += torch.mul(d, d, out=q).sum(dim=0)
        s3 += d.mul_(q).sum(dim=0)
        s4 += q.square_().sum(dim=0)
    delta = s1 / n  # the batch mean minus the shift
    m2 = (s2 - n * delta * delta).clamp_(min=0)
    m3 = s3 - 3 * delta * s2 + 2 * n * delta**3
    m4 = (s4 - 4 * delta * s3 + 6 * delta * delta * s2 - 3 * n * delta**4).clamp_(min=0)
    return _Moments(n=n, mean=shift + delta, m2=m2, m3=m3, m4=m4), positive


def _merge(a: _Moments, b: _Moments) -> _Moments:
    """Pebay (2008) pairwise update of central moments up to order four."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    na, nb = float(a.n), float(b.n)
    delta = b.mean - a.mean
    delta_n = delta / n
    mean = a.mean + delta_n * nb
    m2 = a.m2 + b.m2 + delta * delta_n * na * nb
    m3 = (
        a.m3 + b.m3
        + delta * delta_n * delta_n * na * nb * (na - nb)
        + 3.0 * delta_n * (na * b.m2 - nb * a.m2)
    )
    m4 = (
        a.m4 + b.m4
        + delta * delta_n**3 * na * nb * (na * na - na * nb + nb * nb)
        + 6.0 * delta_n * delta_n * (na * na * b.m2 + nb * nb * a.m2)
        + 4.0 * delta_n * (na * b.m3 - nb * a.m3)
    )
    return _Moments(n=n, mean=mean, m2=m2, m3=m3, m4=m4)


def standardised_moments(
    n: int, m2: np.ndarray, m3: np.ndarray, m4: np.ndarray, constant: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(var, skew, kurt) from central moment sums; NaN skew/kurt where `constant` is True."""
    if n == 0:
        nan = np.full(m2.shape, np.nan)
        return nan, nan.copy(), nan.copy()
    var = np.where(constant, 0.0, m2 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(constant, np.nan, (m3 / n) / var**1.5)
        kurt = np.where(constant, np.nan, (m4 / n) / (var * var))
    return var, skew, kurt


class StreamingMoments:
    """Running n, mean, var, skew, kurt, max, min and fraction of positive values per feature."""

    def __init__(self, n_features: int, device: Device = "cpu") -> None:
        self.n_features = n_features
        self.device = accumulator_device(device)  # batches are moved here; only results leave it
        f64 = dict(dtype=torch.float64, device=self.device)
        zeros = torch.zeros(n_features, **f64)
        self._moments = _Moments(0, zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone())
        self._max = torch.full((n_features,), -np.inf, **f64)
        self._min = torch.full((n_features,), np.inf, **f64)
        self._n_active = torch.zeros(n_features, dtype=torch.int64, device=self.device)
        self._buffers: dict[str, torch.Tensor] = {}  # float64 work rows, kept between batches

    @property
    def n(self) -> int:
        return self._moments.n

    def update(self, x: ArrayLike) -> None:
        """Add a batch x [n_positions, n_features] (torch of any float dtype, or numpy)."""
        raw = as_tensor(x, self.device)
        if raw.ndim != 2 or raw.shape[1] != self.n_features:
            raise ValueError(
                f"expected activations [n_positions, {self.n_features}], got {tuple(raw.shape)}"
            )
        if raw.shape[0] == 0:
            return
        # extremes on the raw values: exact in any float dtype (amax and amin apart are faster than aminmax)
        torch.maximum(self._max, raw.amax(dim=0).to(torch.float64), out=self._max)
        torch.minimum(self._min, raw.amin(dim=0).to(torch.float64), out=self._min)
        batch, positive = _chunked_batch_moments(raw, self._buffers)
        self._n_active += positive.to(torch.int64)  # whole counts, exact in float64
        self._moments = _merge(self._moments, batch)

    def merge(self, other: StreamingMoments) -> None:
        """Fold another accumulator (e.g. from another shard of the data) into this one."""
        if other.n_features != self.n_features:
            raise ValueError(f"cannot merge {other.n_features} features into {self.n_features}")
        self._moments = _merge(self._moments, other._moments)
        torch.maximum(self._max, other._max, out=self._max)
        torch.minimum(self._min, other._min, out=self._min)
        self._n_active += other._n_active

    def result(self) -> dict[str, np.ndarray]:
        """n, mean, var, skew, kurt, max, min, frac_active: float64 arrays [n_features] (n int64)."""
        n = self.n
        maximum, minimum = host(self._max), host(self._min)
        var, skew, kurt = standardised_moments(
            n,
            host(self._moments.m2),
            host(self._moments.m3),
            host(self._moments.m4),
            constant=maximum == minimum,
        )
        empty = np.full(self.n_features, np.nan)
        return {
            "n": np.full(self.n_features, n, dtype=np.int64),
            "mean": host(self._moments.mean) if n else empty.copy(),
            "var": var,
            "skew": skew,
            "kurt": kurt,
            "max": maximum if n else empty.copy(),
            "min": minimum if n else empty.copy(),
            "frac_active": host(self._n_active) / n if n else empty.copy(),
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy copies of the whole state, for checkpoints (np.savez-able)."""
        moments = self._moments
        return {
            "n": np.array(moments.n, dtype=np.int64),
            "mean": host(moments.mean),
            "m2": host(moments.m2),
            "m3": host(moments.m3),
            "m4": host(moments.m4),
            "max": host(self._max),
            "min": host(self._min),
            "n_active": host(self._n_active),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], device: Device = "cpu") -> StreamingMoments:
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"moments checkpoint lacks {missing}")
        accumulator = cls(int(np.asarray(state["mean"]).shape[0]), device)

        def tensor(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(np.asarray(state[key]), dtype=dtype, device=accumulator.device)

        accumulator._moments = _Moments(
            n=int(state["n"]),
            mean=tensor("mean", torch.float64),
            m2=tensor("m2", torch.float64),
            m3=tensor("m3", torch.float64),
            m4=tensor("m4", torch.float64),
        )
        accumulator._max = tensor("max", torch.float64)
        accumulator._min = tensor("min", torch.float64)
        accumulator._n_active = tensor("n_active", torch.int64)
        return accumulator


def vocab_moments(values: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean, var, skew, kurt) of each row of values [n_neurons, vocab], float64, two-pass.

    Population variance, skew = E[z^3], kurt = E[z^4] (raw). Rows with zero variance get
    NaN skew and kurt; rows containing NaN give NaN everywhere.
    """
    rows = as_float64_tensor(values)
    if rows.ndim != 2:
        raise ValueError(f"expected values [n_neurons, vocab], got {tuple(rows.shape)}")
    moments = _batch_moments(rows.T)
    row_min, row_max = torch.aminmax(rows, dim=1)
    var, skew, kurt = standardised_moments(
        rows.shape[1],
        moments.m2.numpy(),
        moments.m3.numpy(),
        moments.m4.numpy(),
        constant=(row_max == row_min).numpy(),
    )
    return moments.mean.numpy(), var, skew, kurt
