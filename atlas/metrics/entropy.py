"""Entropy neurons (Gurnee et al. 2024 section 5.3; Stolfo, Wu, Gurnee et al. 2024): pure parts.

A neuron that writes into the effective null space of the unembedding (the bottom singular
directions of the processed W_U) moves no token's logit directly; it changes the final norm's scale,
hence the temperature of the output. Here: the null-space basis and each neuron's share of
||w_out||^2 in it, the candidates, the value grid of the intervention, a streaming min/max/mean of
activations, and the per-position metrics of an intervened pass (entropy, loss, final-norm scale).
Everything is float64; no database, no architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atlas.metrics._arrays import ArrayLike, as_float64_tensor
from atlas.metrics.divergence import cross_entropy, entropy

DEFAULT_NULL_SPACE_FRACTION = 0.02
DEFAULT_GRID_SIZE = 8


def null_space_size(d_model: int, fraction: float = DEFAULT_NULL_SPACE_FRACTION) -> int:
    """k = max(1, round(fraction * d_model)) bottom singular directions."""
    return max(1, round(fraction * d_model))


def null_space_basis(W_U: ArrayLike, fraction: float = DEFAULT_NULL_SPACE_FRACTION, *,
                     centered: bool = False) -> torch.Tensor:
    """U_null float64 [d_model, k]: the left singular vectors of W_U [d_model, vocab] (processed: see
    atlas.metrics.weights.process_unembedding) with the k smallest singular values.

    centered (LayerNorm models): W_U was centred over d_model, so the all-ones direction is an exact zero
    singular direction that no centred w_out can have a component in (and that LayerNorm removes from the
    residual stream anyway). It would take one of the k slots and hide a real null direction; the search
    runs in its orthogonal complement (d_model - 1 dimensions) instead.
    """
    unembed = as_float64_tensor(W_U)
    d_model = unembed.shape[0]
    k = null_space_size(d_model, fraction)
    if not centered:
        U, _, _ = torch.linalg.svd(unembed, full_matrices=False)  # singular values in descending order
        return U[:, d_model - k:].clone()
    complement = _complement_of_ones(d_model)  # [d_model, d_model - 1], orthonormal columns
    U, _, _ = torch.linalg.svd(complement.T @ unembed, full_matrices=False)
    return complement @ U[:, d_model - 1 - k:]


def _complement_of_ones(d_model: int) -> torch.Tensor:
    """An orthonormal basis of the directions orthogonal to (1, ..., 1): the last d - 1 columns of a QR of
    a matrix whose first column is the ones vector."""
    seed = torch.eye(d_model, dtype=torch.float64)
    seed[:, 0] = 1.0
    Q, _ = torch.linalg.qr(seed)
    return Q[:, 1:]


def null_space_dimension(d_model: int, centered: bool) -> int:
    """The dimensions a processed w_out can point in: d_model - 1 when centred over d_model."""
    return d_model - 1 if centered else d_model


def null_frac(w_out: ArrayLike, U_null: ArrayLike) -> np.ndarray:
    """float64 [d_mlp]: ||U_null^T w_out||^2 / ||w_out||^2 per neuron (w_out [d_mlp, d_model]); NaN for a zero w_out.
    A random direction gets null_frac_random on average."""
    outputs, basis = as_float64_tensor(w_out), as_float64_tensor(U_null)
    in_null = (outputs @ basis).square().sum(dim=1)
    total = outputs.square().sum(dim=1)
    return torch.where(total > 0, in_null / total, torch.nan).numpy()


def null_frac_random(d_model: int, fraction: float = DEFAULT_NULL_SPACE_FRACTION, centered: bool = False) -> float:
    """k / d_model, or k / (d_model - 1) for centred (LayerNorm) models, whose w_out is centred too."""
    return null_space_size(d_model, fraction) / null_space_dimension(d_model, centered)


def candidate_scores(w_out: ArrayLike, U_null: ArrayLike) -> np.ndarray:
    """float64 [d_mlp]: null_frac x ||w_out|| (w_out processed): a large write mostly into the null space."""
    norms = torch.linalg.vector_norm(as_float64_tensor(w_out), dim=1).numpy()
    return null_frac(w_out, U_null) * norms


def top_candidates(scores: dict[int, np.ndarray], n: int) -> list[tuple[int, int]]:
    """The n (layer, neuron) with the largest score over the given layers (NaN last), by decreasing score."""
    flat = [(float(score), layer, neuron) for layer, values in scores.items() for neuron, score in enumerate(values)
            if not np.isnan(score)]
    flat.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [(layer, neuron) for _, layer, neuron in flat[:n]]


@dataclass(frozen=True)
class GridValue:
    value: float
    kind: str  # 'zero' | 'mean' | 'grid'


def value_grid(observed_min: float, observed_max: float, mean: float,
               grid_size: int = DEFAULT_GRID_SIZE) -> list[GridValue]:
    """0, the dataset mean, and grid_size evenly spaced values from min(observed min, 0) to 2 x observed max,
    sorted by value (ties: zero, mean, grid)."""
    grid = np.linspace(min(observed_min, 0.0), 2.0 * observed_max, grid_size)
    values = [GridValue(0.0, "zero"), GridValue(float(mean), "mean")] + [GridValue(float(v), "grid") for v in grid]
    order = {"zero": 0, "mean": 1, "grid": 2}
    return sorted(values, key=lambda item: (item.value, order[item.kind]))


class ActivationRange:
    """Streaming float64 min, max, mean of a set of neurons' activations over positions."""

    def __init__(self, n_neurons: int) -> None:
        self.count = 0
        self.sum = np.zeros(n_neurons)
        self.min = np.full(n_neurons, np.inf)
        self.max = np.full(n_neurons, -np.inf)

    def add(self, values: torch.Tensor) -> None:
        """values [n_positions, n_neurons]."""
        if values.shape[0] == 0:
            return
        values = values.double()
        self.count += values.shape[0]
        self.sum += values.sum(dim=0).cpu().numpy()
        self.min = np.minimum(self.min, values.amin(dim=0).cpu().numpy())
        self.max = np.maximum(self.max, values.amax(dim=0).cpu().numpy())

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count if self.count else np.full_like(self.sum, np.nan)


def norm_scale(sigma: ArrayLike) -> np.ndarray:
    """The final norm's scale 1 / sigma per position (float64)."""
    return 1.0 / as_float64_tensor(sigma).cpu().numpy()


def intervention_metrics(logits: torch.Tensor, targets: torch.Tensor, sigma: torch.Tensor) -> dict[str, np.ndarray]:
    """Per position (float64 [n]): entropy (nats) of softmax(logits), loss (cross-entropy to the target), and the
    final norm's scale 1 / sigma of its input."""
    return {"entropy": entropy(logits), "loss": cross_entropy(logits, targets), "norm_scale": norm_scale(sigma)}
