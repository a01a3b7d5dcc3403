"""StreamingMoments and vocab_moments against scipy/numpy float64 on the concatenated data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from atlas.metrics.moments import StreamingMoments, vocab_moments

N_FEATURES = 6

# scipy warns about the deliberately constant feature; the atlas reports it as NaN itself.
pytestmark = pytest.mark.filterwarnings("ignore:Precision loss occurred")


def _activations(n_positions: int, seed: int = 0) -> np.ndarray:
    """float32 activations with GELU-like, shifted, heavy-tailed, huge-mean and constant features."""
    rng = np.random.default_rng(seed)
    gaussian = rng.standard_normal((n_positions, N_FEATURES))
    columns = [
        gaussian[:, 0] * 0.8 * (1 + np.tanh(0.8 * gaussian[:, 0])) / 2,  # GELU-ish, skewed
        gaussian[:, 1] * 0.01 + 0.3,
        rng.standard_t(3, n_positions),  # heavy tails
        1000.0 + 1.0 * gaussian[:, 3],  # |mean| = 1000 * std
        np.full(n_positions, 0.1),  # constant: zero variance
        -5e3 + 5.0 * rng.exponential(size=n_positions),  # |mean| = 1000 * std, skewed
    ]
    return np.stack(columns, axis=1).astype(np.float32)


def _reference(data: np.ndarray) -> dict[str, np.ndarray]:
    x = data.astype(np.float64)
    return {
        "n": np.full(x.shape[1], x.shape[0]),
        "mean": x.mean(axis=0),
        "var": x.var(axis=0),
        "skew": stats.skew(x, axis=0, bias=True),
        "kurt": stats.kurtosis(x, axis=0, fisher=False, bias=True),
        "max": x.max(axis=0),
        "min": x.min(axis=0),
        "frac_active": (x > 0).mean(axis=0),
    }


def _assert_matches_reference(result: dict[str, np.ndarray], data: np.ndarray) -> None:
    reference = _reference(data)
    varying = np.ones(N_FEATURES, dtype=bool)
    varying[4] = False
    for key, expected in reference.items():
        got = result[key]
        assert got.shape == (N_FEATURES,), key
        if key in ("skew", "kurt"):
            np.testing.assert_allclose(got[varying], expected[varying], rtol=1e-6, err_msg=key)
        elif key == "var":
            np.testing.assert_allclose(got[varying], expected[varying], rtol=1e-6, err_msg=key)
            assert got[4] == 0.0
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0, err_msg=key)
    assert np.isnan(result["skew"][4]) and np.isnan(result["kurt"][4])


@pytest.mark.parametrize("split", [[3000], [1, 2999], [7, 500, 1, 1492, 1000], [1000] * 3])
def test_streaming_equals_scipy_whatever_the_batch_split(split: list[int]) -> None:
    data = _activations(sum(split))
    moments = StreamingMoments(N_FEATURES)
    start = 0
    for size in split:
        moments.update(torch.from_numpy(data[start : start + size]))
        start += size
    _assert_matches_reference(moments.result(), data)


def test_rows_taken_a_few_at_a_time_give_the_same_moments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float64 work runs over chunks of rows (cache-sized on a CPU): with 7-row chunks, a ragged last
    chunk and a strided view of a wider batch, the result still equals scipy."""
    from atlas.metrics import _arrays

    monkeypatch.setitem(_arrays._CHUNK_BYTES, "cpu", 8 * N_FEATURES * 7)
    data = _activations(1000)
    wide = np.concatenate([data, data[:, ::-1] * 2], axis=1)  # features of one "layer" are a strided view
    accumulator = StreamingMoments(N_FEATURES)
    for start in (0, 333, 999):
        stop = {0: 333, 333: 999, 999: 1000}[start]
        accumulator.update(torch.from_numpy(wide)[start:stop, :N_FEATURES])
    _assert_matches_reference(accumulator.result(), data)


def test_merge_of_shards_equals_one_pass() -> None:
    data = _activations(2500, seed=1)
    left, right = StreamingMoments(N_FEATURES), StreamingMoments(N_FEATURES)
    left.update(data[:900])
    right.update(data[900:1700])
    right.update(data[1700:])
    left.merge(right)
    _assert_matches_reference(left.result(), data)


def test_merge_with_empty_accumulator_is_identity() -> None:
    data = _activations(300, seed=2)
    filled, empty = StreamingMoments(N_FEATURES), StreamingMoments(N_FEATURES)
    filled.update(data)
    empty.merge(filled)
    _assert_matches_reference(empty.result(), data)


def test_bfloat16_input_is_widened_exactly() -> None:
    data = torch.from_numpy(_activations(400, seed=3)[:, :3]).to(torch.bfloat16)
    moments = StreamingMoments(3)
    moments.update(data[:123])
    moments.update(data[123:])
    expected = data.double().numpy()
    result = moments.result()
    np.testing.assert_allclose(result["mean"], expected.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(result["kurt"], stats.kurtosis(expected, axis=0, fisher=False), rtol=1e-6)


def test_state_dict_round_trip_continues_identically(tmp_path) -> None:
    data = _activations(1200, seed=4)
    moments = StreamingMoments(N_FEATURES)
    moments.update(data[:500])
    path = tmp_path / "moments.npz"
    np.savez(path, **moments.state_dict())
    restored = StreamingMoments.from_state_dict(dict(np.load(path)))
    restored.update(data[500:])
    _assert_matches_reference(restored.result(), data)


def test_empty_accumulator_reports_nan() -> None:
    result = StreamingMoments(3).result()
    assert (result["n"] == 0).all()
    for key in ("mean", "var", "skew", "kurt", "max", "min", "frac_active"):
        assert np.isnan(result[key]).all(), key


def test_wrong_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="n_positions, 4"):
        StreamingMoments(4).update(np.zeros((3, 5), dtype=np.float32))


def test_vocab_moments_equals_scipy() -> None:
    rng = np.random.default_rng(5)
    values = rng.standard_normal((7, 5000)) * 0.05
    values[1] = values[1] ** 3  # heavy tails
    values[2] += 1000 * values[2].std()
    values[3] = 0.25  # constant row
    mean, var, skew, kurt = vocab_moments(torch.from_numpy(values).float())
    as_float32 = values.astype(np.float32).astype(np.float64)
    varying = np.arange(7) != 3
    np.testing.assert_allclose(mean, as_float32.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(var[varying], as_float32.var(axis=1)[varying], rtol=1e-9)
    np.testing.assert_allclose(skew[varying], stats.skew(as_float32, axis=1)[varying], rtol=1e-8)
    np.testing.assert_allclose(
        kurt[varying], stats.kurtosis(as_float32, axis=1, fisher=False)[varying], rtol=1e-8
    )
    assert var[3] == 0 and np.isnan(skew[3]) and np.isnan(kurt[3])
    assert all(array.dtype == np.float64 for array in (mean, var, skew, kurt))
