"""Weight statistics and vocabulary effects of MLP neurons (no data needed).

Conventions: w_in, w_out [d_mlp, d_model] (one row per neuron), W_U [d_model, vocab] with padded
vocabulary columns already sliced off by the caller, gamma [d_model] the final norm's scale.
Inputs are never mutated: every processing step works on float64 copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atlas.metrics._arrays import ArrayLike, as_float64_tensor
from atlas.metrics.moments import vocab_moments

# Float64 temporaries held per (neuron, token) of a chunk: the product, the cosines and the
# two-pass moment temporaries (deviation, its square, one power) with some slack.
_BYTES_PER_CHUNK_ELEMENT = 6 * 8


def _cosine_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """cos between matching rows of a and b; NaN where either row is zero."""
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    cosine = (a * b).sum(dim=1) / norms
    return torch.where(norms > 0, cosine, torch.nan).numpy()


def weight_stats(
    w_in: ArrayLike, w_out: ArrayLike, b_in: ArrayLike | None = None
) -> dict[str, np.ndarray | None]:
    """w_in_norm, b_in (None without a bias), w_out_norm, in_out_cos, l2_penalty; float64 [d_mlp]."""
    w_in64, w_out64 = as_float64_tensor(w_in), as_float64_tensor(w_out)
    if w_in64.shape != w_out64.shape:
        raise ValueError(f"w_in {tuple(w_in64.shape)} and w_out {tuple(w_out64.shape)} must both be [d_mlp, d_model]")
    in_norm = torch.linalg.vector_norm(w_in64, dim=1)
    out_norm = torch.linalg.vector_norm(w_out64, dim=1)
    return {
        "w_in_norm": in_norm.numpy(),
        "b_in": None if b_in is None else as_float64_tensor(b_in).numpy().copy(),
        "w_out_norm": out_norm.numpy(),
        "in_out_cos": _cosine_rows(w_in64, w_out64),
        "l2_penalty": (in_norm * in_norm + out_norm * out_norm).numpy(),
    }


@dataclass
class VocabEffects:
    """Moments over the vocabulary of v = cos(W_U[:, t], w_out), and top/bottom tokens per neuron.

    mean, var, skew, kurt: float64 [d_mlp] (population variance, raw kurtosis; NaN for a zero
    w_out). top_*/bottom_*: [d_mlp, k], sorted from the most extreme, by the product W_U . w_out
    of the processed weights; ids are vocabulary indices (int64), values float64.
    """

    mean: np.ndarray
    var: np.ndarray
    skew: np.ndarray
    kurt: np.ndarray
    top_ids: np.ndarray
    top_values: np.ndarray
    bottom_ids: np.ndarray
    bottom_values: np.ndarray


def process_unembedding(W_U: ArrayLike, gamma: ArrayLike | None, *, center: bool) -> torch.Tensor:
    """Paper-compatible W_U (TransformerLens fold_ln + center_unembed): diag(gamma) W_U; for LayerNorm
    models (center=True) each column centred over d_model (the norm's output is centred, so only that
    part is read) and the mean column subtracted (softmax ignores a constant over the vocabulary)."""
    processed = as_float64_tensor(W_U)
    if gamma is not None:
        processed = as_float64_tensor(gamma)[:, None] * processed  # a new tensor, W_U untouched
    if center:
        processed = processed - processed.mean(dim=0, keepdim=True)
        processed = processed - processed.mean(dim=1, keepdim=True)
    return processed


def process_reading_weights(w: ArrayLike, gamma: ArrayLike | None, *, center: bool) -> torch.Tensor:
    """Weights that read the residual stream through a norm (w_in, w_gate), rows [d_mlp, d_model]:
    gamma folded in (TransformerLens fold_ln), then, for LayerNorm (center=True), each row centred
    over d_model."""
    processed = as_float64_tensor(w)
    if gamma is not None:
        processed = processed * as_float64_tensor(gamma)[None, :]
    if center:
        processed = processed - processed.mean(dim=1, keepdim=True)
    return processed


def fold_norm_bias(b: ArrayLike | None, w: ArrayLike, beta: ArrayLike | None) -> np.ndarray | None:
    """The bias after folding the norm's beta: b + w . beta (w the raw reading weights [d_mlp, d_model])."""
    if beta is None:
        return None if b is None else as_float64_tensor(b).numpy().copy()
    folded = as_float64_tensor(w) @ as_float64_tensor(beta)
    return (folded if b is None else as_float64_tensor(b) + folded).numpy()


def process_w_out(w_out: ArrayLike, *, center: bool) -> torch.Tensor:
    """Paper-compatible w_out: (LayerNorm models) centred across d_model, as a new float64 tensor."""
    processed = as_float64_tensor(w_out)
    if center:
        processed = processed - processed.mean(dim=1, keepdim=True)
    return processed


def neurons_per_chunk(vocab_size: int, max_chunk_bytes: int) -> int:
    return max(1, max_chunk_bytes // (_BYTES_PER_CHUNK_ELEMENT * max(vocab_size, 1)))


def vocab_effects(
    w_out: ArrayLike,
    W_U: ArrayLike,
    gamma: ArrayLike | None,
    *,
    center: bool,
    top_k: int = 20,
    max_chunk_bytes: int = 256 << 20,
) -> VocabEffects:
    """Vocabulary effects of every neuron, one float64 GEMM per chunk of neurons.

    Processing (SPEC, paper-compatible): gamma folded into W_U; with center=True (LayerNorm
    models) W_U centred across the vocabulary and w_out centred across d_model. Then
    v[i, t] = cos(W_U[:, t], w_out[i]) and the top/bottom tokens rank W_U[:, t] . w_out[i] of the
    same processed weights. max_chunk_bytes bounds the temporaries of one chunk.
    """
    unembed = process_unembedding(W_U, gamma, center=center)
    outputs = process_w_out(w_out, center=center)
    if outputs.ndim != 2 or outputs.shape[1] != unembed.shape[0]:
        raise ValueError(f"w_out {tuple(outputs.shape)} does not match W_U {tuple(unembed.shape)} ([d_mlp, d_model] x [d_model, vocab])")
    vocab_size = unembed.shape[1]
    k = min(top_k, vocab_size)
    token_norms = torch.linalg.vector_norm(unembed, dim=0)
    chunk = neurons_per_chunk(vocab_size, max_chunk_bytes)
    parts = [
        _chunk_effects(outputs[start : start + chunk], unembed, token_norms, k)
        for start in range(0, outputs.shape[0], chunk)
    ]
    return VocabEffects(*(np.concatenate(column) for column in zip(*parts)))


def _chunk_effects(
    outputs: torch.Tensor, unembed: torch.Tensor, token_norms: torch.Tensor, k: int
) -> tuple[np.ndarray, ...]:
    product = outputs @ unembed  # [chunk, vocab]: W_U . w_out
    norms = torch.linalg.vector_norm(outputs, dim=1, keepdim=True) * token_norms
    cosines = product / norms  # 0/0 -> NaN for a zero w_out (or a zero token column)
    mean, var, skew, kurt = vocab_moments(cosines)
    del cosines
    top = torch.topk(product, k, dim=1, largest=True, sorted=True)
    bottom = torch.topk(product, k, dim=1, largest=False, sorted=True)
    return (
        mean, var, skew, kurt,
        top.indices.numpy(), top.values.numpy(),
        bottom.indices.numpy(), bottom.values.numpy(),
    )


# A random direction has a cosine variance of about 1/d_model against the vocabulary; the paper's
# 0.005 was set for GPT-2 medium (d_model 1024), so the partition threshold is 5.12 / d_model.
PARTITION_VARIANCE_SCALE = 5.12


def partition_threshold(d_model: int, scale: float = PARTITION_VARIANCE_SCALE) -> float:
    return scale / d_model


def classify(
    kurt: np.ndarray,
    skew: np.ndarray,
    var: np.ndarray,
    kurt_threshold: float = 10.0,
    var_threshold: float = 0.005,
) -> np.ndarray:
    """'prediction' (kurt > t, skew > 0), 'suppression' (kurt > t, skew < 0), 'partition'
    (var > v, not the former), else 'none'. NaN statistics compare false (-> 'none').
    The job passes var_threshold = partition_threshold(d_model)."""
    kurt, skew, var = (np.asarray(a, dtype=np.float64) for a in (kurt, skew, var))
    heavy_tailed = kurt > kurt_threshold
    return np.select(
        [heavy_tailed & (skew > 0), heavy_tailed & (skew < 0), var > var_threshold],
        ["prediction", "suppression", "partition"],
        default="none",
    )
