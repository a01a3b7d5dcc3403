"""Attention deactivation (Gurnee et al. 2024, section 5.2): pure float64 computations.

A neuron (l, i) writes w_out into the residual stream; a head h of a later layer m reads it through
its query. The direct effect of one unit of activation on the head's attention logit to position 0:

    score = (W_Q^h diag(gamma) w_out) . k_eff^h / sqrt(d_head)

gamma: the scale of the norm the attention reads through (its division by sigma is ignored, as in
the paper; the query bias is left out: it does not depend on the neuron). w_out is centred over
d_model for LayerNorm models (the norm's output is centred). k_eff^h is the head's (key group's)
key at position 0 averaged over the dataset's sequences; with rotary positions it is
mean_p R(p)^T k_first over the query positions p, since R(p) q . k = q . R(p)^T k: the score averaged
over p in one product (see effective_keys). All neurons x all later heads are one GEMM against the
heads' "deactivation directions" d^h = diag(gamma) W_Q^h^T k_eff^h / sqrt(d_head) (head_directions).

Baseline: the same score for random Gaussian directions of the same norm as (processed) w_out.
The score is linear in the direction, so one seeded set of unit directions (centred like w_out for
LayerNorm models) gives each head's random-score std per unit norm, and a neuron's std is that times
its norm: z = score / (||w_out|| std_r(unit score_r)), population std (ddof 0).
"""

from __future__ import annotations

import math

import torch


def fold_query(w_q: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """W_Q^h diag(gamma) for every head: [heads, d_head, d_model] in float64."""
    return w_q.double() * gamma.double()


def effective_keys(rotated_keys: torch.Tensor) -> torch.Tensor:
    """[..., positions, d_head] -> [..., d_head]: R(p)^T k_first averaged over the query positions p
    (without rotary positions pass k_first with one position)."""
    return rotated_keys.double().mean(dim=-2)


def head_directions(w_q_folded: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[heads, d_model]: diag(gamma) W_Q^h^T k^h / sqrt(d_head), so that score = w_out . direction.

    w_q_folded [heads, d_head, d_model]; keys [heads, d_head] (each head's own key group's key)."""
    d_head = w_q_folded.shape[1]
    return torch.einsum("hed,he->hd", w_q_folded.double(), keys.double()) / math.sqrt(d_head)


def processed_writes(w_out: torch.Tensor, centre: bool) -> torch.Tensor:
    """w_out [neurons, d_model] in float64, centred over d_model for LayerNorm models."""
    w = w_out.double()
    return w - w.mean(dim=-1, keepdim=True) if centre else w


def neuron_head_scores(w_out: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[neurons, heads]: score of every neuron on every head (processed w_out against head_directions)."""
    return w_out.double() @ directions.double().T


def random_unit_directions(n: int, d_model: int, seed: int, centre: bool,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """n seeded Gaussian directions of unit norm [n, d_model] (float64, drawn on the CPU so that every
    device gets the same ones), centred over d_model first when `centre` (as w_out is processed)."""
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d_model, generator=generator, dtype=torch.float64)
    if centre:
        r = r - r.mean(dim=-1, keepdim=True)
    return (r / r.norm(dim=-1, keepdim=True)).to(device)


def random_score_std(unit_directions: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[heads]: population std over the random unit directions of their score on each head."""
    return neuron_head_scores(unit_directions, directions).std(dim=0, correction=0)


def z_scores(scores: torch.Tensor, norms: torch.Tensor, unit_std: torch.Tensor) -> torch.Tensor:
    """[neurons, heads]: score / (||w_out|| * unit random std); a zero-norm neuron gets NaN."""
    return scores / (norms.double()[:, None] * unit_std.double()[None, :])


def top_by_magnitude(z: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[neurons, min(k, valid heads)] column indices of the largest |z| per row, largest first, among the
    `valid` columns (bool [heads]; a head whose random scores are all zero has no z)."""
    valid = torch.ones(z.shape[1], dtype=torch.bool, device=z.device) if valid is None else valid
    magnitude = torch.where(valid[None, :], z.abs(), torch.full_like(z, -1.0))
    return magnitude.topk(min(k, int(valid.sum())), dim=1).indices


def most_negative(z: torch.Tensor, m: int) -> list[tuple[int, int]]:
    """The (row, column) of the m most negative entries (only negative ones, most negative first; NaN never)."""
    flat = torch.nan_to_num(z, nan=0.0).flatten()
    order = torch.argsort(flat)[:m]
    return [divmod(int(i), z.shape[1]) for i in order if flat[i] < 0]


class CorrelationAccumulator:
    """Streaming Pearson correlation of two paired samples, merged per batch in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean_x, self.mean_y, self.m2_x, self.m2_y, self.c_xy = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double().flatten(), y.double().flatten()
        n_b = x.numel()
        if n_b == 0:
            return
        mx, my = float(x.mean()), float(y.mean())
        dx, dy = x - mx, y - my
        m2x, m2y, cxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
        n = self.n + n_b
        delta_x, delta_y = mx - self.mean_x, my - self.mean_y
        self.m2_x += m2x + delta_x**2 * self.n * n_b / n
        self.m2_y += m2y + delta_y**2 * self.n * n_b / n
        self.c_xy += cxy + delta_x * delta_y * self.n * n_b / n
        self.mean_x += delta_x * n_b / n
        self.mean_y += delta_y * n_b / n
        self.n = n

    def correlation(self) -> float | None:
        """Pearson r; None when either side is constant (or there are fewer than two pairs)."""
        if self.n < 2 or self.m2_x <= 0 or self.m2_y <= 0:
            return None
        return self.c_xy / math.sqrt(self.m2_x * self.m2_y)
