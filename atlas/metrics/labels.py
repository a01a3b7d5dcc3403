"""Neuron labels: the variance of a quantity explained by token features, and token-set activation ratios.

Variance reduction (SPEC "Functional roles") of x by a boolean feature f with share p = n_1 / n and
group means mu_1, mu_0: VR = p (1 - p) (mu_1 - mu_0)^2 / Var(x) (population variance), the fraction
of the variance explained by knowing f. With centred sums D_1 = sum_{f} (x - mean(x)) it is
VR = D_1^2 / (n_1 n_0 Var(x)), and mu_1 = mean + D_1 / n_1, mu_0 = mean - D_1 / n_0: one GEMM
(centred x times the indicator matrix) gives every (neuron, feature) pair, in float64.

Undefined cases: a feature held by no token (n_1 = 0) or by every token (n_0 = 0), or a neuron whose
x is constant (Var = 0), explains nothing: VR = 0 (never NaN, never a division by zero); the mean
of an empty group is NaN (stored as NULL).

Conventions: x is [neurons, tokens] (vocabulary source) or activations [positions, neurons]
(streaming source); features are bool [tokens or positions, n_features]. Accumulators keep their
float64 state on the device they are given; only results cross to the host (numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atlas.metrics._arrays import ArrayLike, Device, accumulator_device, as_float64_tensor, as_tensor, host

# Float64 temporaries per (neuron, token) of a vocabulary chunk: the product and its centred copy, with slack.
_BYTES_PER_CHUNK_ELEMENT = 3 * 8


@dataclass
class FeatureSplit:
    """Per (neuron, feature): score = VR in [0, 1], mean_with / mean_without the group means of x
    (NaN for an empty group); n_with [n_features] the number of tokens or positions with the feature, n the total."""

    score: np.ndarray
    mean_with: np.ndarray
    mean_without: np.ndarray
    n_with: np.ndarray
    n: int


def _split(n: float, n_with: torch.Tensor, centred_sums: torch.Tensor, mean: torch.Tensor,
           var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(VR, mean_with, mean_without) [neurons, features] from D_1 = centred_sums [neurons, features]."""
    n_without = n - n_with
    denominator = n_with[None, :] * n_without[None, :] * var[:, None]
    defined = denominator > 0
    score = torch.where(defined, centred_sums.square() / torch.where(defined, denominator, 1.0), 0.0)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=mean.device)
    mean_with = torch.where(n_with > 0, mean[:, None] + centred_sums / n_with.clamp(min=1), nan)
    mean_without = torch.where(n_without > 0, mean[:, None] - centred_sums / n_without.clamp(min=1), nan)
    return score, mean_with, mean_without


def variance_reduction(x: ArrayLike, features: ArrayLike) -> FeatureSplit:
    """VR of every row of x [neurons, tokens] by every column of features [tokens, n_features] (bool),
    computed in float64 on x's device."""
    device = x.device if isinstance(x, torch.Tensor) else "cpu"
    values = as_float64_tensor(x, device)
    indicators = as_float64_tensor(as_tensor(features, device), device)
    if values.ndim != 2 or indicators.ndim != 2 or values.shape[1] != indicators.shape[0]:
        raise ValueError(f"x {tuple(values.shape)} and features {tuple(indicators.shape)} must be "
                         "[neurons, tokens] and [tokens, n_features]")
    n = values.shape[1]
    mean = values.mean(dim=1)
    centred = values - mean[:, None]
    var = centred.square().mean(dim=1)
    n_with = indicators.sum(dim=0)
    score, mean_with, mean_without = _split(n, n_with, centred @ indicators, mean, var)
    return FeatureSplit(host(score), host(mean_with), host(mean_without), host(n_with).astype(np.int64), n)


def vocab_variance_reduction(w_out: torch.Tensor, W_U: torch.Tensor, features: ArrayLike, *,
                             max_chunk_bytes: int = 256 << 20) -> FeatureSplit:
    """VR of x = W_U . w_out over the vocabulary: w_out [neurons, d_model] and W_U [d_model, vocab]
    (both processed as the caller wants, on one device), features [vocab, n_features]. Chunked over
    neurons so that the float64 products of one chunk stay under max_chunk_bytes."""
    unembed = as_float64_tensor(W_U, W_U.device)
    outputs = as_float64_tensor(w_out, W_U.device)
    indicators = as_tensor(features, W_U.device)
    step = max(1, max_chunk_bytes // (_BYTES_PER_CHUNK_ELEMENT * max(unembed.shape[1], 1)))
    parts = [variance_reduction(outputs[start:start + step] @ unembed, indicators)
             for start in range(0, outputs.shape[0], step)]
    return FeatureSplit(*(np.concatenate([getattr(p, name) for p in parts])
                          for name in ("score", "mean_with", "mean_without")),
                        parts[0].n_with, parts[0].n)


def vocab_token_sets(w_out: torch.Tensor, W_U: torch.Tensor, size: int, *, largest: bool,
                     max_chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Membership bool [vocab, neurons] of each neuron's `size` tokens with the largest (largest=True,
    prediction neurons) or smallest (suppression) W_U . w_out, on W_U's device (chunked over neurons)."""
    unembed = as_float64_tensor(W_U, W_U.device)
    outputs = as_float64_tensor(w_out, W_U.device)
    members = torch.zeros((outputs.shape[0], unembed.shape[1]), dtype=torch.bool, device=unembed.device)
    step = max(1, max_chunk_bytes // (_BYTES_PER_CHUNK_ELEMENT * max(unembed.shape[1], 1)))
    for start in range(0, outputs.shape[0], step):
        product = outputs[start:start + step] @ unembed  # [chunk, vocab]
        ids = torch.topk(product, min(size, product.shape[1]), dim=1, largest=largest).indices
        members[start:start + step].scatter_(1, ids, True)
    return members.T.contiguous()


def top_features(score: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(feature indices, scores) [neurons, min(n, n_features)] of the largest scores per row, largest
    first, ties broken by the feature order (stable sort)."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), axis=1, kind="stable")[:, :n]
    return order, np.take_along_axis(score, order, axis=1)


class StreamingFeatureVariance:
    """VR of activations over dataset positions by the features of a token at each position, streamed.

    update(acts [positions, neurons] any float dtype, features [positions, n_features] bool) adds, in
    float64 on the accumulator's device, F^T y, F^T 1, sum y and sum y^2 with y = acts - shift, the
    shift being the first batch's mean per neuron (SPEC: a fixed estimate of the mean keeps the sums
    exact when |mean| >> std). result() is exact whatever the batching.
    """

    def __init__(self, n_neurons: int, n_features: int, device: Device = "cpu") -> None:
        self.device = accumulator_device(device)
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.cross = zeros(n_features, n_neurons)  # F^T y
        self.n_with = zeros(n_features)
        self.total = zeros(n_neurons)
        self.squares = zeros(n_neurons)

    def update(self, acts: ArrayLike, features: ArrayLike) -> None:
        values = as_float64_tensor(acts, self.device)
        if values.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = values.mean(dim=0)
        shifted = values - self.shift  # a new tensor: the caller's float64 activations stay as they were
        indicators = as_float64_tensor(as_tensor(features, self.device), self.device)
        self.cross += indicators.T @ shifted
        self.n_with += indicators.sum(dim=0)
        self.total += shifted.sum(dim=0)
        self.squares += shifted.square().sum(dim=0)
        self.n += values.shape[0]

    def result(self) -> FeatureSplit:
        """The VR and group means [neurons, features]; all NaN means and VR 0 when nothing was seen."""
        if self.n == 0:
            shape = tuple(self.cross.T.shape)
            nan = np.full(shape, np.nan)
            return FeatureSplit(np.zeros(shape), nan, nan.copy(), host(self.n_with).astype(np.int64), 0)
        mean_shifted = self.total / self.n
        var = (self.squares / self.n - mean_shifted.square()).clamp(min=0.0)
        centred_sums = self.cross.T - mean_shifted[:, None] * self.n_with[None, :]
        score, mean_with, mean_without = _split(self.n, self.n_with, centred_sums, self.shift + mean_shifted, var)
        return FeatureSplit(host(score), host(mean_with), host(mean_without), host(self.n_with).astype(np.int64),
                            self.n)


@dataclass
class TokenSetRatio:
    """Per neuron: positions whose next token is in its set (n_in) or not (n_out), the mean activation
    in each group (NaN when empty) and ratio = mean_in / mean_out (NaN where undefined)."""

    n_in: np.ndarray
    n_out: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray
    ratio: np.ndarray


class StreamingTokenSetRatio:
    """Mean activation of each neuron when the next token is in the neuron's token set, against when not.

    members: bool [vocab, neurons] (vocab_token_sets), kept on the accumulator's device. update(acts
    [positions, neurons], next_tokens [positions]) accumulates float64 sums and counts there.
    """

    def __init__(self, members: torch.Tensor, device: Device = "cpu") -> None:
        self.device = accumulator_device(device)
        self.members = members.to(self.device, dtype=torch.bool)
        n_neurons = self.members.shape[1]
        self.n = 0
        self.sum_in = torch.zeros(n_neurons, dtype=torch.float64, device=self.device)
        self.sum_all = torch.zeros_like(self.sum_in)
        self.n_in = torch.zeros(n_neurons, dtype=torch.int64, device=self.device)

    def update(self, acts: ArrayLike, next_tokens: ArrayLike) -> None:
        values = as_float64_tensor(acts, self.device)
        inside = self.members[as_tensor(next_tokens, self.device).long()]  # [positions, neurons]
        self.sum_in += torch.where(inside, values, 0.0).sum(dim=0)
        self.sum_all += values.sum(dim=0)
        self.n_in += inside.sum(dim=0)
        self.n += values.shape[0]

    def result(self) -> TokenSetRatio:
        n_in = self.n_in.double()
        n_out = self.n - n_in
        mean_in = torch.where(n_in > 0, self.sum_in / n_in.clamp(min=1), torch.nan)
        mean_out = torch.where(n_out > 0, (self.sum_all - self.sum_in) / n_out.clamp(min=1), torch.nan)
        ratio = torch.where(mean_out != 0, mean_in / mean_out, torch.nan)
        return TokenSetRatio(host(self.n_in), host(n_out).astype(np.int64), host(mean_in), host(mean_out),
                             host(ratio))
