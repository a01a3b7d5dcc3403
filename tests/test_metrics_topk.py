"""StreamingTopK against a brute-force sort by (value descending, key ascending), payloads included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.metrics.topk import StreamingTopK

K, N_FEATURES = 5, 7


def _stream(n_positions: int, seed: int) -> np.ndarray:
    """Values on a coarse grid (many ties, as real activations have), a constant column, and columns whose
    values rise through the stream (every batch beats the kept ones) or fall (no later batch enters)."""
    rng = np.random.default_rng(seed)
    values = np.round(rng.standard_normal((n_positions, N_FEATURES)) * 2) / 2
    values[:, 1] = 0.25
    values[:, 2] = np.arange(n_positions) / 10
    values[:, 3] = -np.arange(n_positions) / 10
    return values.astype(np.float32)


def _payload_of(batch: torch.Tensor, keys: torch.Tensor):
    """Each entering example's payload: its key and its value, so a misplaced payload shows."""
    def payload(rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([keys[rows].float(), batch[rows, features]], dim=1)
    return payload


@pytest.mark.parametrize("split", [[400], [1, 2, 3, 394], [3] * 133 + [1], [60, 1, 200, 139]])
def test_top_k_equals_brute_force_whatever_the_batch_split(split: list[int]) -> None:
    data = _stream(sum(split), seed=len(split))
    keys = torch.arange(data.shape[0]) * 3 + 11  # increasing, not positions
    top = StreamingTopK(N_FEATURES, K, payload_width=2)
    start = 0
    for size in split:
        batch = torch.from_numpy(data[start:start + size])
        top.update(batch, keys[start:start + size], _payload_of(batch, keys[start:start + size]))
        start += size
    values, got_keys, payload = top.result()
    for feature in range(N_FEATURES):
        order = np.lexsort((keys.numpy(), -data[:, feature]))[:K]
        np.testing.assert_array_equal(values[:, feature], data[order, feature])
        np.testing.assert_array_equal(got_keys[:, feature], keys.numpy()[order])
        np.testing.assert_array_equal(payload[:, 0, feature], keys.numpy()[order].astype(np.float32))
        np.testing.assert_array_equal(payload[:, 1, feature], data[order, feature])


def test_fewer_positions_than_k_keep_what_was_seen() -> None:
    top = StreamingTopK(N_FEATURES, K, payload_width=0)
    data = torch.from_numpy(_stream(3, seed=0))
    top.update(data[:2], torch.tensor([0, 1]))
    top.update(data[2:], torch.tensor([2]))
    values, keys, payload = top.result()
    assert values.shape == (3, N_FEATURES) and payload.shape == (3, 0, N_FEATURES)
    for feature in range(N_FEATURES):
        order = np.lexsort((np.arange(3), -data[:, feature].numpy()))
        np.testing.assert_array_equal(keys[:, feature], order)
