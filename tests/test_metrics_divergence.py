"""KL, entropy, cross-entropy, top-1 agreement and accuracy against numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from atlas.metrics.divergence import (
    cross_entropy,
    entropy,
    kl_divergence,
    log_softmax,
    next_token_accuracy,
    top1_agreement,
)

N, VOCAB = 37, 1000


@pytest.fixture(scope="module")
def logits() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    p = 3.0 * torch.randn(N, VOCAB, generator=generator)
    p[0, 17] += 60.0  # nearly one-hot: most probabilities underflow
    p[1] += 1e4  # a huge offset: only a stable log-softmax survives it
    q = p + 1.5 * torch.randn(N, VOCAB, generator=generator)
    targets = torch.randint(0, VOCAB, (N,), generator=generator)
    targets[:10] = p[:10].argmax(dim=-1)  # some correct predictions
    return {"p": p, "q": q, "targets": targets}


def _log_softmax64(x: torch.Tensor) -> np.ndarray:
    values = x.double().numpy()
    return values - logsumexp(values, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk_rows", [1, 5, 256])
def test_kl_and_entropy_equal_numpy(logits, chunk_rows) -> None:
    log_p, log_q = _log_softmax64(logits["p"]), _log_softmax64(logits["q"])
    p = np.exp(log_p)
    expected_kl = np.sum(p * (log_p - log_q), axis=1)
    expected_entropy = -np.sum(p * log_p, axis=1)
    np.testing.assert_allclose(kl_divergence(logits["p"], logits["q"], chunk_rows), expected_kl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(entropy(logits["p"], chunk_rows), expected_entropy, rtol=1e-10, atol=1e-12)
    assert (kl_divergence(logits["p"], logits["p"]) == 0).all()
    assert np.all(np.isfinite(expected_kl))


def test_entropy_of_uniform_and_masked_logits() -> None:
    masked = torch.zeros(2, 8)
    masked[1, 4:] = -torch.inf  # masked tokens: probability exactly 0
    np.testing.assert_allclose(entropy(masked), [np.log(8), np.log(4)], rtol=1e-14)
    np.testing.assert_allclose(kl_divergence(masked, torch.zeros(2, 8)), [0.0, np.log(2)], atol=1e-14)
    assert kl_divergence(torch.zeros(1, 8), masked[1:]).tolist() == [np.inf]


def test_bfloat16_logits_are_widened(logits) -> None:
    p16, q16 = logits["p"].bfloat16(), logits["q"].bfloat16()
    log_p, log_q = _log_softmax64(p16), _log_softmax64(q16)
    np.testing.assert_allclose(kl_divergence(p16, q16), np.sum(np.exp(log_p) * (log_p - log_q), axis=1), rtol=1e-10)


def test_cross_entropy_and_accuracy_equal_numpy(logits) -> None:
    log_p = _log_softmax64(logits["p"])
    targets = logits["targets"].numpy()
    expected = -log_p[np.arange(N), targets]
    np.testing.assert_allclose(cross_entropy(logits["p"], logits["targets"], chunk_rows=4), expected, rtol=1e-12)
    accuracy = next_token_accuracy(logits["p"], targets)
    np.testing.assert_array_equal(accuracy, log_p.argmax(axis=1) == targets)
    assert accuracy[:10].all() and accuracy.dtype == bool
    np.testing.assert_allclose(log_softmax(logits["p"]).numpy(), log_p, rtol=1e-12, atol=1e-12)


def test_top1_agreement_equals_numpy(logits) -> None:
    agreement = top1_agreement(logits["p"], logits["q"])
    expected = logits["p"].numpy().argmax(axis=1) == logits["q"].numpy().argmax(axis=1)
    np.testing.assert_array_equal(agreement, expected)
    assert 0 < agreement.sum() < N  # the fixture exercises both outcomes
    assert top1_agreement(logits["p"], logits["p"]).all()


def test_bad_targets_and_shapes_are_rejected(logits) -> None:
    with pytest.raises(ValueError, match="token ids"):
        cross_entropy(logits["p"], torch.full((N,), -100))
    with pytest.raises(ValueError, match="targets for"):
        next_token_accuracy(logits["p"], logits["targets"][:-1])
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(logits["p"], logits["q"][:-1])
