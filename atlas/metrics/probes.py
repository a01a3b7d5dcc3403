"""Prediction-ensembling probes (SPEC "Stages of inference: case studies"): pure parts.

A token feature f splits the vocabulary. A neuron's score is the mean of W_U . w_out over the
f-tokens minus its mean over the other tokens (processed weights, as the weights job). The probed
neurons are the prediction and suppression neurons of the model's second half with the largest
|score|. Positions: class 1 where the next token has f, class 0 (as many) where it has not, drawn
with a seeded generator; a seeded, stratified train/test split. Probes: scikit-learn logistic
regression (features standardised) on one neuron's activation, and on the top k neurons ordered by
their individual test accuracy. The model's own prediction: class 1 when it puts more than half of
its next-token probability on f-tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atlas.metrics._arrays import ArrayLike, as_float64_tensor

PROBED_CLASSES = ("prediction", "suppression")


def neuron_scores(w_out: ArrayLike, unembed: ArrayLike, feature_mask: np.ndarray) -> np.ndarray:
    """float64 [d_mlp]: mean over f-tokens of W_U[:, t] . w_out[i] minus the mean over the other tokens.

    w_out [d_mlp, d_model] and unembed [d_model, vocab] already processed; feature_mask bool [vocab]
    with at least one token on each side."""
    mask = torch.as_tensor(np.asarray(feature_mask, dtype=bool))
    if not mask.any() or mask.all():
        raise ValueError("the feature must hold for some tokens and not for others")
    product = as_float64_tensor(w_out) @ as_float64_tensor(unembed)  # [d_mlp, vocab]
    return (product[:, mask].mean(dim=1) - product[:, ~mask].mean(dim=1)).numpy()


def choose_neurons(layers: np.ndarray, vocab_classes: np.ndarray, scores: np.ndarray, n_layers: int,
                   n_neurons: int, classes: tuple[str, ...] | None = PROBED_CLASSES) -> np.ndarray:
    """Indices into the candidate arrays: neurons of `classes` (prediction/suppression by default; None: any)
    with layer >= n_layers // 2, the n_neurons largest |score| first (ties: the earlier candidate)."""
    in_class = (np.ones(len(layers), dtype=bool) if classes is None
                else np.isin(np.asarray(vocab_classes, dtype=object), classes))
    eligible = in_class & (np.asarray(layers) >= n_layers // 2)
    candidates = np.flatnonzero(eligible)
    order = np.argsort(-np.abs(np.asarray(scores, dtype=np.float64)[candidates]), kind="stable")
    return candidates[order[:n_neurons]]


def balanced_positions(labels: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """Indices of a balanced set: n = min(#class 1, #class 0, max_per_class) drawn from each class without
    replacement by np.random.default_rng(seed), returned sorted."""
    labels = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    positive, negative = np.flatnonzero(labels), np.flatnonzero(~labels)
    n = min(len(positive), len(negative), max_per_class if max_per_class is not None else len(labels))
    chosen = np.concatenate([rng.choice(positive, n, replace=False), rng.choice(negative, n, replace=False)])
    return np.sort(chosen)


def train_split(labels: np.ndarray, train_fraction: float, seed: int) -> np.ndarray:
    """bool [n]: True for training positions; round(train_fraction * n_c) of each class c, drawn by
    np.random.default_rng(seed), so that both splits stay balanced."""
    labels = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    train = np.zeros(len(labels), dtype=bool)
    for members in (np.flatnonzero(labels), np.flatnonzero(~labels)):
        train[rng.permutation(members)[:int(round(train_fraction * len(members)))]] = True
    return train


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              seed: int) -> tuple[float, float]:
    """(train accuracy, test accuracy) of a standardised logistic regression on the given feature columns."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    probe.fit(x_train, y_train)
    return float(probe.score(x_train, y_train)), float(probe.score(x_test, y_test))


@dataclass
class ProbeAccuracies:
    """individual_*[j]: the probe on neuron j alone; topk_*[k-1]: the probe on order[:k] (order: neurons by
    individual test accuracy, best first, ties by j)."""

    individual_train: np.ndarray
    individual_test: np.ndarray
    order: np.ndarray
    topk_train: np.ndarray
    topk_test: np.ndarray


def probe_accuracies(activations: np.ndarray, labels: np.ndarray, train: np.ndarray, seed: int) -> ProbeAccuracies:
    """activations [n_positions, n_neurons] (float64), labels bool [n_positions], train bool [n_positions]."""
    x, y = np.asarray(activations, dtype=np.float64), np.asarray(labels, dtype=bool).astype(int)
    test = ~train

    def fit(columns) -> tuple[float, float]:
        return fit_probe(x[train][:, columns], y[train], x[test][:, columns], y[test], seed)

    individual = np.array([fit([j]) for j in range(x.shape[1])]).reshape(-1, 2)
    order = np.argsort(-individual[:, 1], kind="stable")
    topk = np.array([fit(order[:k]) for k in range(1, x.shape[1] + 1)]).reshape(-1, 2)
    return ProbeAccuracies(individual[:, 0], individual[:, 1], order, topk[:, 0], topk[:, 1])


def feature_probability(logits: torch.Tensor, feature_mask: torch.Tensor) -> np.ndarray:
    """float64 [n]: the next-token probability on f-tokens, softmax(logits [n, vocab]) in float64
    (columns beyond the mask, a padded vocabulary, count as other tokens)."""
    probs = torch.softmax(logits.double(), dim=-1)
    return probs[:, : feature_mask.shape[0]][:, feature_mask.to(logits.device)].sum(dim=-1).cpu().numpy()


def model_accuracy(f_probability: np.ndarray, labels: np.ndarray) -> float:
    """Share of positions where (P(next token has f) > 1/2) equals the class."""
    return float(np.mean((np.asarray(f_probability) > 0.5) == np.asarray(labels, dtype=bool)))
