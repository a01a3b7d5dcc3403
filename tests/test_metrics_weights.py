"""weight_stats, vocab_effects and classify against independent float64 numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from atlas.metrics.weights import (classify, fold_norm_bias, partition_threshold, process_reading_weights,
                                   vocab_effects, weight_stats)

D_MODEL, D_MLP, VOCAB = 16, 40, 300  # d_mlp deliberately not 4 * d_model


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    w_out = torch.randn(D_MLP, D_MODEL, generator=generator) * 0.1
    w_out[3] = 0.0  # a dead neuron: no direction, NaN cosines
    w_out[5] = 2.0 * torch.randn(D_MODEL, generator=generator)  # large norm
    W_U = torch.randn(D_MODEL, VOCAB, generator=generator) + 0.3  # a non-zero mean column
    W_U[:, 7] += 20.0 * w_out[0] / w_out[0].norm()  # token 7 strongly predicted by neuron 0
    return {
        "w_in": torch.randn(D_MLP, D_MODEL, generator=generator) * 0.1,
        "w_out": w_out,
        "b_in": torch.randn(D_MLP, generator=generator),
        "W_U": W_U,
        "gamma": 1.0 + 0.5 * torch.rand(D_MODEL, generator=generator),
    }


def test_weight_stats_equal_numpy(weights) -> None:
    w_in, w_out = weights["w_in"].double().numpy(), weights["w_out"].double().numpy()
    result = weight_stats(weights["w_in"], weights["w_out"], weights["b_in"])
    in_norm, out_norm = np.linalg.norm(w_in, axis=1), np.linalg.norm(w_out, axis=1)
    np.testing.assert_allclose(result["w_in_norm"], in_norm, rtol=1e-12)
    np.testing.assert_allclose(result["w_out_norm"], out_norm, rtol=1e-12)
    np.testing.assert_allclose(result["l2_penalty"], in_norm**2 + out_norm**2, rtol=1e-12)
    np.testing.assert_allclose(result["b_in"], weights["b_in"].double().numpy(), rtol=0)
    alive = out_norm > 0
    expected_cos = (w_in * w_out).sum(axis=1)[alive] / (in_norm * out_norm)[alive]
    np.testing.assert_allclose(result["in_out_cos"][alive], expected_cos, rtol=1e-12)
    assert np.isnan(result["in_out_cos"][3])
    assert weight_stats(weights["w_in"], weights["w_out"])["b_in"] is None


def _reference_effects(w_out, W_U, gamma, center: bool, k: int):
    """The SPEC's processing, written out in numpy float64."""
    unembed = W_U.astype(np.float64)
    if gamma is not None:
        unembed = np.diag(gamma.astype(np.float64)) @ unembed
    out = w_out.astype(np.float64)
    if center:
        unembed = unembed - unembed.mean(axis=0, keepdims=True)  # each token's column over d_model
        unembed = unembed - unembed.mean(axis=1, keepdims=True)  # the mean column over the vocabulary
        out = out - out.mean(axis=1, keepdims=True)
    product = out @ unembed
    with np.errstate(invalid="ignore", divide="ignore"):
        v = product / np.outer(np.linalg.norm(out, axis=1), np.linalg.norm(unembed, axis=0))
    order = np.argsort(-product, axis=1, kind="stable")
    return {
        "mean": v.mean(axis=1),
        "var": v.var(axis=1),
        "skew": stats.skew(v, axis=1),
        "kurt": stats.kurtosis(v, axis=1, fisher=False),
        "top_ids": order[:, :k],
        "top_values": np.take_along_axis(product, order[:, :k], axis=1),
        "bottom_ids": order[:, ::-1][:, :k],
        "bottom_values": np.take_along_axis(product, order[:, ::-1][:, :k], axis=1),
    }


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("use_gamma", [True, False])
@pytest.mark.parametrize("max_chunk_bytes", [1, 50_000, 1 << 30])  # 1 neuron, a few, all at once
def test_vocab_effects_equal_numpy(weights, center, use_gamma, max_chunk_bytes) -> None:
    gamma = weights["gamma"] if use_gamma else None
    originals = {name: tensor.clone() for name, tensor in weights.items()}
    effects = vocab_effects(
        weights["w_out"], weights["W_U"], gamma, center=center, top_k=5, max_chunk_bytes=max_chunk_bytes
    )
    for name, tensor in weights.items():  # the anchor divided the model's weights in place
        assert torch.equal(tensor, originals[name]), f"{name} was mutated"
    expected = _reference_effects(
        weights["w_out"].numpy(), weights["W_U"].numpy(),
        None if gamma is None else gamma.numpy(), center, k=5,
    )
    alive = np.arange(D_MLP) != 3
    for key in ("mean", "var", "skew", "kurt"):
        np.testing.assert_allclose(getattr(effects, key)[alive], expected[key][alive], rtol=1e-9, atol=1e-14, err_msg=key)
        assert np.isnan(getattr(effects, key)[3]), key
    for key in ("top_ids", "top_values", "bottom_ids", "bottom_values"):
        got = getattr(effects, key)
        assert got.shape == (D_MLP, 5), key
        np.testing.assert_allclose(got[alive], expected[key][alive], rtol=1e-10, atol=1e-14, err_msg=key)
    assert effects.top_ids[0, 0] == 7


def test_centering_changes_the_effects(weights) -> None:
    """Guards the test above against a center flag that does nothing."""
    centred = vocab_effects(weights["w_out"], weights["W_U"], None, center=True)
    raw = vocab_effects(weights["w_out"], weights["W_U"], None, center=False)
    assert not np.allclose(centred.mean, raw.mean, equal_nan=True)


def test_vocab_effects_accepts_numpy_and_bfloat16(weights) -> None:
    w_out = weights["w_out"].to(torch.bfloat16)
    from_bf16 = vocab_effects(w_out, weights["W_U"].numpy(), weights["gamma"], center=True, top_k=3)
    expected = _reference_effects(w_out.double().numpy(), weights["W_U"].numpy(), weights["gamma"].numpy(), True, 3)
    np.testing.assert_allclose(from_bf16.kurt[:3], expected["kurt"][:3], rtol=1e-9)


def test_classify_follows_the_spec_thresholds() -> None:
    kurt = np.array([12.0, 12.0, 3.0, 3.0, np.nan, 11.0, 12.0])
    skew = np.array([0.5, -0.5, 0.1, 0.1, np.nan, 0.0, 0.5])
    var = np.array([0.001, 0.001, 0.006, 0.004, np.nan, 0.01, 0.01])
    labels = classify(kurt, skew, var)
    assert labels.tolist() == ["prediction", "suppression", "partition", "none", "none", "partition", "prediction"]
    assert classify(kurt, skew, var, kurt_threshold=20, var_threshold=0.0)[0] == "partition"


def test_processing_of_reading_weights_equals_numpy(weights) -> None:
    """fold_ln for w_in / w_gate: gamma folded, beta folded into the bias, LayerNorm rows centred over d_model."""
    generator = torch.Generator().manual_seed(3)
    w_in, beta = weights["w_out"].clone(), torch.randn(D_MODEL, generator=generator)
    b_in = torch.randn(w_in.shape[0], generator=generator)
    gamma = weights["gamma"].numpy().astype(np.float64)
    folded = w_in.double().numpy() * gamma[None, :]
    for center, expected in ((False, folded), (True, folded - folded.mean(axis=1, keepdims=True))):
        np.testing.assert_allclose(process_reading_weights(w_in, weights["gamma"], center=center).numpy(), expected,
                                   rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fold_norm_bias(b_in, w_in, beta),
                               b_in.double().numpy() + w_in.double().numpy() @ beta.double().numpy(), rtol=1e-12)
    assert fold_norm_bias(None, w_in, None) is None
    np.testing.assert_array_equal(fold_norm_bias(b_in, w_in, None), b_in.double().numpy())
    assert w_in.dtype == torch.float32 and torch.equal(w_in, weights["w_out"])  # inputs untouched


def test_partition_threshold_scales_with_the_width() -> None:
    assert partition_threshold(1024) == pytest.approx(0.005)
    assert partition_threshold(128) == pytest.approx(0.04)
    assert partition_threshold(64, scale=1.0) == pytest.approx(1 / 64)
