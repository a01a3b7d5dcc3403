"""Per-position measures of layers (logit lens, layer interventions, layer statistics) and their means.

Pure functions on tensors: which positions are scored and against which token, next-token
comparisons of two sets of logits (through divergence.py), attention to the previous tokens,
sub-layer write norms. Everything returns per-position values; MeanAccumulator turns values of
many batches into means that equal the mean over their concatenation.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Mapping

import numpy as np
import torch

from atlas.metrics.divergence import cross_entropy, entropy, kl_divergence, next_token_accuracy, top1_agreement

PREVIOUS_TOKENS_WINDOW = 5


def next_token_positions(
    attention_mask: torch.Tensor, counted: torch.Tensor | None = None, max_positions: int | None = None
) -> torch.Tensor:
    """bool [b, T], T = min(width, max_positions): the positions t whose prediction is scored against token t+1.

    t is scored when it counts (counted[t], default: every real token), token t+1 is real, and t fits
    in the model's context. A row longer than the context keeps its first max_positions tokens as
    input; its last kept position is scored against the first cut token (read as a target, never fed).
    """
    real = attention_mask.bool()
    counted = real if counted is None else counted.bool() & real
    has_next = torch.zeros_like(real)
    has_next[:, :-1] = real[:, 1:]
    positions = counted & has_next
    return positions if max_positions is None else positions[:, :max_positions]


def next_tokens(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """long [n]: token t+1 of every scored position t (input_ids uncut [b, width], positions [b, T <= width])."""
    following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # the last column is never scored
    return following[:, : positions.shape[1]][positions.to(input_ids.device)]


def next_token_metrics(
    logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Per position (float64 [n]): loss (nats), accuracy, entropy (nats) of softmax(logits); with
    reference logits also kl = KL(softmax(reference) || softmax(logits)) and top1_agreement."""
    metrics = {
        "loss": cross_entropy(logits, targets),
        "accuracy": next_token_accuracy(logits, targets).astype(np.float64),
        "entropy": entropy(logits),
    }
    if reference is not None:
        metrics["kl"] = kl_divergence(reference, logits)
        metrics["top1_agreement"] = top1_agreement(reference, logits).astype(np.float64)
    return metrics


def previous_token_attention(probs: torch.Tensor, window: int = PREVIOUS_TOKENS_WINDOW) -> torch.Tensor:
    """float64 [b, q]: mean over heads of sum_{k=1..window} A[q, q-k] (probs [b, heads, q, k]);
    NaN for queries q < window, which have fewer than `window` previous tokens."""
    batch, _, n_queries, _ = probs.shape
    out = torch.full((batch, n_queries), math.nan, dtype=torch.float64, device=probs.device)
    if n_queries <= window:
        return out
    total = torch.zeros(probs.shape[:2] + (n_queries - window,), dtype=torch.float64, device=probs.device)
    for k in range(1, window + 1):
        diagonal = torch.diagonal(probs, offset=-k, dim1=-2, dim2=-1)  # A[q, q-k] for q = k .. n_queries-1
        total += diagonal[..., window - k:].double()
    out[:, window:] = total.mean(dim=1)
    return out


def write_norms(write: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
    """float64 [n]: the L2 norm of a sub-layer's write [b, T, d_model] at each scored position."""
    selected = write[:, : positions.shape[1]][positions.to(write.device)]
    return torch.linalg.vector_norm(selected.double(), dim=-1).cpu().numpy()


class MeanAccumulator:
    """float64 sums and counts of per-position values by (group, name): means over batches equal the
    mean over the concatenated positions. A group with no values has NaN means."""

    def __init__(self) -> None:
        self._sums: dict[tuple, float] = defaultdict(float)
        self._counts: dict[tuple, int] = defaultdict(int)

    def add(self, group: object, values: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        for name, array in values.items():
            array = array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
            self._sums[group, name] += float(np.sum(array, dtype=np.float64))
            self._counts[group, name] += int(array.size)

    def count(self, group: object, name: str) -> int:
        return self._counts.get((group, name), 0)

    def mean(self, group: object, name: str) -> float:
        count = self.count(group, name)
        return self._sums[group, name] / count if count else math.nan

    def state_dict(self) -> dict[str, np.ndarray]:
        """The sums (float64) and counts (int64) as arrays, each (group, name) key as JSON (a tuple written
        as a list, restored as a tuple on load): saved and loaded back, the accumulator is the same."""
        keys = list(self._sums)
        encoded = []
        for key in keys:
            try:
                text = json.dumps(key, default=_json_scalar)
            except TypeError:
                text = "null"
            if _json_key(text) != key:
                raise ValueError(f"MeanAccumulator key {key!r} does not survive JSON: use str, int, float, bool, "
                                 "None and tuples of them")
            encoded.append(text)
        return {"keys": np.array(encoded, dtype=np.str_),
                "sums": np.array([self._sums[key] for key in keys], dtype=np.float64),
                "counts": np.array([self._counts[key] for key in keys], dtype=np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the sums and counts with a state_dict's."""
        self._sums, self._counts = defaultdict(float), defaultdict(int)
        for text, total, count in zip(np.asarray(state["keys"]).tolist(), np.asarray(state["sums"]).tolist(),
                                      np.asarray(state["counts"]).tolist(), strict=True):
            key = _json_key(text)
            self._sums[key], self._counts[key] = float(total), int(count)

    def merge(self, other: MeanAccumulator) -> None:
        """Fold in the sums and counts of other positions (another range of batches): sums and counts add."""
        for key, total in other._sums.items():
            self._sums[key] += total
            self._counts[key] += other._counts[key]


def _json_scalar(value: object) -> object:
    """numpy scalars in a key, as the Python values they equal (and hash like)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_key(text: str) -> object:
    def tupled(value: object) -> object:
        return tuple(tupled(item) for item in value) if isinstance(value, list) else value
    return tupled(json.loads(text))
