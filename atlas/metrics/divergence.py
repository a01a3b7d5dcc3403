"""Per-position comparisons of next-token distributions given as logits [n, vocab].

Everything is computed from float64 log-softmax, a chunk of rows at a time so that a large
vocabulary (50k-150k) never needs an [n, vocab] float64 copy of all positions at once. Results
are per position (float64 or bool numpy arrays [n]); callers take means over the positions
they keep, so that means over several batches stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from atlas.metrics._arrays import ArrayLike

DEFAULT_CHUNK_ROWS = 256


def _as_logits(logits: ArrayLike) -> torch.Tensor:
    tensor = torch.as_tensor(logits) if isinstance(logits, np.ndarray) else logits.detach()
    if tensor.ndim != 2:
        raise ValueError(f"expected logits [n_positions, vocab], got {tuple(tensor.shape)}")
    return tensor.cpu()


def _row_chunks(n_rows: int, chunk_rows: int) -> Iterator[slice]:
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, start + chunk_rows)


def log_softmax(logits: ArrayLike) -> torch.Tensor:
    """float64 log-probabilities [n, vocab] (a float64 copy: for small inputs)."""
    return torch.log_softmax(_as_logits(logits).double(), dim=-1)


def _per_row(
    reduce: Callable[..., torch.Tensor], *logit_sets: torch.Tensor, chunk_rows: int
) -> np.ndarray:
    """Apply reduce(log_probs, ...) to float64 log-softmax chunks of matching rows."""
    n_rows = logit_sets[0].shape[0]
    out = np.empty(n_rows, dtype=np.float64)
    for rows in _row_chunks(n_rows, chunk_rows):
        chunks = [torch.log_softmax(logits[rows].double(), dim=-1) for logits in logit_sets]
        out[rows] = reduce(*chunks).numpy()
    return out


def _xlogy_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), with 0 where p == 0 (also when log q is -inf there)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0)


def kl_divergence(logits_p: ArrayLike, logits_q: ArrayLike, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """KL(p || q) in nats per position, p = softmax(logits_p), q = softmax(logits_q)."""
    p, q = _as_logits(logits_p), _as_logits(logits_q)
    if p.shape != q.shape:
        raise ValueError(f"logits shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    return _per_row(lambda lp, lq: _xlogy_terms(lp, lq).sum(dim=-1), p, q, chunk_rows=chunk_rows)


def entropy(logits: ArrayLike, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Shannon entropy of softmax(logits) in nats per position (divide by ln 2 for bits)."""
    return _per_row(
        lambda lp: torch.where(lp > -torch.inf, -lp.exp() * lp, 0.0).sum(dim=-1),
        _as_logits(logits), chunk_rows=chunk_rows,
    )


def _check_targets(logits: torch.Tensor, targets: ArrayLike) -> torch.Tensor:
    target_ids = torch.as_tensor(targets).reshape(-1).long().cpu()
    if target_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"{target_ids.shape[0]} targets for {logits.shape[0]} positions")
    if target_ids.numel() and (target_ids.min() < 0 or target_ids.max() >= logits.shape[1]):
        raise ValueError(f"targets must be token ids in [0, {logits.shape[1]}); drop ignored positions first")
    return target_ids


def cross_entropy(logits: ArrayLike, targets: ArrayLike, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """-log softmax(logits)[target] in nats per position (targets [n]: the next token ids)."""
    tensor = _as_logits(logits)
    target_ids = _check_targets(tensor, targets)
    out = np.empty(tensor.shape[0], dtype=np.float64)
    for rows in _row_chunks(tensor.shape[0], chunk_rows):
        log_probs = torch.log_softmax(tensor[rows].double(), dim=-1)
        out[rows] = -log_probs.gather(1, target_ids[rows, None])[:, 0].numpy()
    return out


def top1_agreement(logits_a: ArrayLike, logits_b: ArrayLike) -> np.ndarray:
    """Per position: do both distributions have the same most likely token (bool [n])?"""
    a, b = _as_logits(logits_a), _as_logits(logits_b)
    if a.shape != b.shape:
        raise ValueError(f"logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.argmax(dim=-1) == b.argmax(dim=-1)).numpy()


def next_token_accuracy(logits: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """Per position: is the most likely token the actual next token (bool [n])?"""
    tensor = _as_logits(logits)
    return (tensor.argmax(dim=-1) == _check_targets(tensor, targets)).numpy()
