"""CorrelationAccumulator and the rotation baseline against float64 two-pass numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.errors import AtlasError
from atlas.metrics.correlation import (
    CorrelationAccumulator,
    ModelColumns,
    SharedCorrelationAccumulator,
    TransposedView,
    combine_maxima,
    layer_grid,
    max_correlations,
    pair_block_bytes,
    random_orthogonal,
    rotated_baseline_max,
)

N_TOKENS, N_A, LAYER_SIZES_B = 3000, 24, [8, 12, 8]
N_B = sum(LAYER_SIZES_B)


@pytest.fixture(scope="module")
def activations() -> tuple[np.ndarray, np.ndarray]:
    """float32 activations of two 'models' on the same positions, with correlated neurons,
    neurons whose |mean| is 1000 * std, a GELU-like sparse one and constant (dead) ones."""
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((N_TOKENS, 10))
    xa = shared @ rng.standard_normal((10, N_A)) + 0.5 * rng.standard_normal((N_TOKENS, N_A))
    xb = shared @ rng.standard_normal((10, N_B)) + 0.5 * rng.standard_normal((N_TOKENS, N_B))
    xa[:, 0] = 1000.0 * xa[:, 0].std() + xa[:, 0]  # |mean| = 1000 * std
    xb[:, 1] = -1000.0 * xb[:, 1].std() + xb[:, 1]
    xa[:, 2] = np.maximum(xa[:, 2] - 2.0, 0.0)  # mostly zero
    xa[:, 5] = 0.37  # dead A neuron
    xb[:, 9] = -1.25  # dead B neuron (layer 1)
    xb[:, 4] = xa[:, 3]  # an exact copy: rho == 1
    return xa.astype(np.float32), xb.astype(np.float32)


def _reference_rho(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        full = np.corrcoef(xa.astype(np.float64), xb.astype(np.float64), rowvar=False)
    return full[: xa.shape[1], xa.shape[1] :]


def _accumulate(xa, xb, batch: int, **options) -> CorrelationAccumulator:
    accumulator = CorrelationAccumulator(xa.shape[1], options.pop("layer_sizes_b", LAYER_SIZES_B), **options)
    for start in range(0, xa.shape[0], batch):
        accumulator.update(torch.from_numpy(xa[start : start + batch]), torch.from_numpy(xb[start : start + batch]))
    return accumulator


@pytest.mark.parametrize("batch,flush_tokens", [(64, 1), (257, 16384), (3000, 16384)])
def test_rho_equals_float64_corrcoef(activations, batch, flush_tokens) -> None:
    xa, xb = activations
    rho = _accumulate(xa, xb, batch, flush_tokens=flush_tokens).correlations()
    expected = _reference_rho(xa, xb)
    assert rho.dtype == np.float64 and rho.shape == (N_A, N_B)
    assert np.array_equal(np.isnan(rho), np.isnan(expected))
    np.testing.assert_allclose(rho, expected, atol=1e-5, rtol=0)
    assert abs(rho[3, 4] - 1.0) < 1e-6


def test_flush_adds_the_float32_products_a_few_rows_at_a_time(activations, monkeypatch) -> None:
    """The float32 partial products enter the float64 sums in chunks of rows (no widened copy of the
    whole matrix): with 5-row chunks and a ragged last one, the sums equal one widened add, bit for bit."""
    from atlas.metrics import _arrays

    xa, xb = activations
    whole = _accumulate(xa, xb, 257, flush_tokens=1)
    monkeypatch.setitem(_arrays._CHUNK_BYTES, "cpu", 8 * N_B * 5)  # 24 rows of A: 5, 5, 5, 5, 4
    chunked = _accumulate(xa, xb, 257, flush_tokens=1)
    assert torch.equal(chunked.cross, whole.cross)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(chunked.grams, whole.grams))
    total, part = torch.zeros(7, 3, dtype=torch.float64), torch.randn(7, 3)
    _arrays.add_widened(total, part)
    assert torch.equal(total, part.double())


def test_shift_is_what_makes_large_means_exact(activations) -> None:
    """Without the shift (shift = 0) the |mean| = 1000 * std neurons lose digits in float32."""
    xa, xb = activations
    zero_shift = _accumulate(xa, xb, 257, shift_a=np.zeros(N_A), shift_b=np.zeros(N_B)).correlations()
    error = np.nanmax(np.abs(zero_shift - _reference_rho(xa, xb))[0])
    assert error > 1e-3


def test_zero_variance_gives_nan_never_zero(activations) -> None:
    xa, xb = activations
    accumulator = _accumulate(xa, xb, 500)
    rho = accumulator.correlations()
    assert np.isnan(rho[5]).all() and np.isnan(rho[:, 9]).all()
    assert np.isfinite(np.delete(np.delete(rho, 5, axis=0), 9, axis=1)).all()
    assert accumulator.variances_a()[5] == 0.0 and accumulator.variances_b()[9] == 0.0
    best, partner = max_correlations(accumulator)
    assert np.isnan(best[5]) and partner[5] == -1
    assert (partner != 9).all()


def test_max_correlations_equal_numpy_and_locate_partners(activations) -> None:
    xa, xb = activations
    accumulator = _accumulate(xa, xb, 400)
    expected = _reference_rho(xa, xb)
    live = np.arange(N_A) != 5
    best, partner = max_correlations(accumulator, chunk_rows=5)
    np.testing.assert_allclose(best[live], np.nanmax(expected[live], axis=1), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(partner[live], np.nanargmax(expected[live], axis=1))
    np.testing.assert_array_equal(max_correlations(expected)[1][live], partner[live])
    layers, neurons = accumulator.locate(np.array([0, 7, 8, 19, 20, 27, -1]))
    assert layers.tolist() == [0, 0, 1, 1, 2, 2, -1] and neurons.tolist() == [0, 7, 0, 11, 0, 7, -1]


def test_means_and_variances_equal_numpy(activations) -> None:
    xa, xb = activations
    accumulator = _accumulate(xa, xb, 700)
    # the float32 shifted values round by ~6e-8 of |x - shift|: means are exact to 1e-6 std
    xa64 = xa.astype(np.float64)
    assert (np.abs(accumulator.means_a() - xa64.mean(axis=0)) <= 1e-6 * xa64.std(axis=0) + 1e-12).all()
    np.testing.assert_allclose(accumulator.variances_b(), xb.astype(np.float64).var(axis=0), rtol=1e-6)


def test_random_orthogonal_is_orthogonal_and_reproducible() -> None:
    rotation = random_orthogonal(50, seed=3)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(50), atol=1e-12)
    np.testing.assert_array_equal(rotation, random_orthogonal(50, seed=3))
    assert not np.allclose(rotation, random_orthogonal(50, seed=4))
    assert not np.allclose(random_orthogonal(50, (3, 1)), random_orthogonal(50, (3, 2)))


def test_random_orthogonal_is_haar_not_sign_biased() -> None:
    """Plain QR of a Gaussian has diag(R) > 0 only by LAPACK convention; with the sign fix the
    diagonal of Q is symmetric around 0 (its mean over many draws is ~0, not negative)."""
    diagonals = np.array([np.diag(random_orthogonal(4, seed)) for seed in range(2000)])
    assert abs(diagonals.mean()) < 0.03


def test_rotated_baseline_equals_explicit_rotation(activations) -> None:
    xa, xb = activations
    accumulator = _accumulate(xa, xb, 300)
    rotations = [random_orthogonal(d, (11, layer)) for layer, d in enumerate(LAYER_SIZES_B)]
    starts = np.cumsum([0, *LAYER_SIZES_B])
    xb64 = xb.astype(np.float64)
    rotated = np.concatenate(
        [xb64[:, starts[i] : starts[i + 1]] @ rotations[i] for i in range(len(LAYER_SIZES_B))], axis=1
    )
    expected = _reference_rho(xa, rotated)
    best, partner = rotated_baseline_max(accumulator, seed=11)
    live = np.arange(N_A) != 5
    np.testing.assert_allclose(best[live], np.max(expected[live], axis=1), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(partner[live], np.argmax(expected[live], axis=1))
    assert np.isnan(best[5]) and partner[5] == -1
    explicit_best, _ = rotated_baseline_max(accumulator, rotations=rotations)
    np.testing.assert_array_equal(explicit_best, best)


def test_baseline_with_covariances_from_a_gram_only_accumulator(activations) -> None:
    """Layer covariances measured once per model (n_a = 0) replace per-pair Gram matrices."""
    xa, xb = activations
    with_gram = _accumulate(xa, xb, 300)
    without_gram = _accumulate(xa, xb, 300, track_gram=False)
    gram_only = _accumulate(xa[:, :0], xb, 1000)
    covariances = [gram_only.layer_covariance(i) for i in range(len(LAYER_SIZES_B))]
    with pytest.raises(ValueError, match="track_gram=False"):
        rotated_baseline_max(without_gram, seed=2)
    np.testing.assert_allclose(
        rotated_baseline_max(without_gram, seed=2, layer_covariances=covariances)[0],
        rotated_baseline_max(with_gram, seed=2)[0], atol=1e-5, rtol=0,
    )


def test_blocked_equals_unblocked(activations) -> None:
    xa, xb = activations
    whole = _accumulate(xa, xb, 500)
    blocks = [(a_slice, layers) for layers in (range(0, 2), range(2, 3)) for a_slice in (slice(0, 10), slice(10, N_A))]
    starts = np.cumsum([0, *LAYER_SIZES_B])
    covered = np.zeros((N_A, N_B), dtype=int)
    rho = np.full((N_A, N_B), np.inf)
    maxima, baselines = {}, {}
    for a_slice, layers in blocks:
        columns = slice(starts[layers.start], starts[layers.stop])
        block = _accumulate(
            xa[:, a_slice], xb[:, columns], 500,
            layer_sizes_b=[LAYER_SIZES_B[l] for l in layers], b_layers=list(layers),
        )
        covered[a_slice, columns] += 1
        rho[a_slice, columns] = block.correlations()
        best, partner = max_correlations(block)
        layer, neuron = block.locate(partner)
        maxima.setdefault(a_slice.start, []).append((best, layer, neuron))
        baselines.setdefault(a_slice.start, []).append(rotated_baseline_max(block, seed=5)[0])
    assert (covered == 1).all()
    # equal up to the float32 GEMM's rounding, which depends on the matrix shapes (~1e-6)
    np.testing.assert_allclose(rho, whole.correlations(), atol=1e-5, rtol=0)

    combined = [combine_maxima(*map(list, zip(*parts))) for _, parts in sorted(maxima.items())]
    best = np.concatenate([c[0] for c in combined])
    whole_best, whole_partner = max_correlations(whole)
    whole_layer, whole_neuron = whole.locate(whole_partner)
    np.testing.assert_allclose(best, whole_best, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in combined]), whole_layer)
    np.testing.assert_array_equal(np.concatenate([c[2] for c in combined]), whole_neuron)

    baseline = np.concatenate([combine_maxima(parts)[0] for _, parts in sorted(baselines.items())])
    np.testing.assert_allclose(baseline, rotated_baseline_max(whole, seed=5)[0], atol=1e-5, rtol=0)


def test_layer_grid_keeps_layers_whole_on_both_sides_and_refuses_tiny_budgets() -> None:
    assert layer_grid(12, 3072, 12, 3072, 10**13) == [(range(0, 12), range(0, 12))]
    blocks = layer_grid(12, 3072, 12, 3072, 4 << 30)
    assert len(blocks) == 9 and all(pair_block_bytes(len(a), 3072, len(b), 3072) <= 4 << 30 for a, b in blocks)
    assert pair_block_bytes(6, 3072, 6, 3072) > 4 << 30  # the fewest groups that fit: 3 of 4 layers a side
    assert sorted({l for a, _ in blocks for l in a}) == sorted({l for _, b in blocks for l in b}) == list(range(12))
    with pytest.raises(AtlasError, match="raise the budget"):
        layer_grid(12, 3072, 12, 3072, 1 << 20)


def _ordered_results(accumulator, layer_covariances, seed: int) -> dict[str, np.ndarray]:
    best, column = max_correlations(accumulator)
    layer, neuron = accumulator.locate(column)
    baseline, _ = rotated_baseline_max(accumulator, seed, layer_covariances=layer_covariances)
    return {"max": best, "layer": layer, "neuron": neuron, "baseline": baseline}


def test_one_unordered_accumulator_equals_both_ordered_ones(activations) -> None:
    """X_A^T X_B gives B's maxima over A and B's baseline (A's layers rotated) as an accumulator of (B, A)
    would: the float32 GEMM of the transposed product holds the same sums, so the results agree to 1e-12."""
    xa, xb = activations
    sizes_a = [8, 16]  # A's 24 columns as two layers
    forward = _accumulate(xa, xb, 500, track_gram=False)
    backward = _accumulate(xb, xa, 500, layer_sizes_b=sizes_a, track_gram=False)
    covariances_a = [_accumulate(xa[:, :0], xa[:, s:s + d], 500, layer_sizes_b=[d]).layer_covariance(0)
                     for s, d in zip(np.cumsum([0, *sizes_a[:-1]]), sizes_a)]
    covariances_b = [_accumulate(xb[:, :0], xb, 500).layer_covariance(i) for i in range(len(LAYER_SIZES_B))]
    view = TransposedView(forward, sizes_a, a_layers=[0, 1])
    unordered, ordered = _ordered_results(view, covariances_a, 7), _ordered_results(backward, covariances_a, 7)
    assert np.isnan(unordered["max"][9]) and unordered["layer"][9] == -1  # the dead B neuron
    for name in ("max", "baseline"):
        np.testing.assert_allclose(unordered[name], ordered[name], atol=1e-12, rtol=0, equal_nan=True)
    for name in ("layer", "neuron"):
        np.testing.assert_array_equal(unordered[name], ordered[name])
    np.testing.assert_allclose(view.correlations(), _reference_rho(xb, xa), atol=1e-5, rtol=0)
    # and the forward direction is the accumulator itself
    np.testing.assert_allclose(_ordered_results(forward, covariances_b, 7)["max"],
                               max_correlations(_reference_rho(xa, xb))[0], atol=1e-5, rtol=0, equal_nan=True)


def test_state_round_trip_continues_identically(activations, tmp_path) -> None:
    xa, xb = activations
    accumulator = CorrelationAccumulator(N_A, LAYER_SIZES_B, b_layers=[3, 4, 5])
    accumulator.update(xa[:1000], xb[:1000])
    np.savez(tmp_path / "shard.npz", **accumulator.state_dict())
    restored = CorrelationAccumulator.from_state_dict(dict(np.load(tmp_path / "shard.npz")))
    assert restored.b_layers == [3, 4, 5]
    for accumulated in (accumulator, restored):
        accumulated.update(xa[1000:], xb[1000:])
    np.testing.assert_array_equal(restored.correlations(), accumulator.correlations())
    np.testing.assert_array_equal(rotated_baseline_max(restored)[0], rotated_baseline_max(accumulator)[0])
    np.testing.assert_allclose(restored.correlations(), _reference_rho(xa, xb), atol=1e-5, rtol=0)


def test_bfloat16_inputs_and_shape_errors(activations) -> None:
    xa, xb = activations
    accumulator = CorrelationAccumulator(N_A, LAYER_SIZES_B)
    xa16, xb16 = torch.from_numpy(xa).bfloat16(), torch.from_numpy(xb).bfloat16()
    accumulator.update(xa16, xb16)
    np.testing.assert_allclose(
        accumulator.correlations(), _reference_rho(xa16.float().numpy(), xb16.float().numpy()), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="equal n"):
        accumulator.update(xa[:5], xb[:6])
    with pytest.raises(ValueError, match="B columns"):
        accumulator.update(xa[:5], xb[:5, :-1])


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float64"])
def test_shared_model_columns_give_the_standalone_accumulators_numbers(activations, precision) -> None:
    """Each model's shift, sums and extremes computed once per batch (ModelColumns) and shared by its
    accumulators give what a standalone CorrelationAccumulator of the block gives."""
    xa, xb = activations
    model_a, model_b = ModelColumns(N_A, precision=precision), ModelColumns(N_B, precision=precision)
    a_columns, b_columns = slice(4, 20), slice(8, N_B)  # a block: part of A against B's last two layers
    shared = SharedCorrelationAccumulator(model_a, a_columns, model_b, b_columns, LAYER_SIZES_B[1:], b_layers=[1, 2],
                                          track_gram=True)
    standalone = CorrelationAccumulator(16, LAYER_SIZES_B[1:], b_layers=[1, 2], precision=precision)
    for start in range(0, N_TOKENS, 700):
        ya, yb = model_a.update(torch.from_numpy(xa[start:start + 700])), model_b.update(torch.from_numpy(xb[start:start + 700]))
        shared.update_products(ya[:, a_columns], yb[:, b_columns])
        standalone.update(torch.from_numpy(xa[start:start + 700, a_columns]), torch.from_numpy(xb[start:start + 700, b_columns]))
    tolerance = 1e-12 if precision == "float64" else 1e-6  # float32 sums over a wider tensor may round apart
    np.testing.assert_allclose(shared.correlations(), standalone.correlations(), atol=tolerance, rtol=0, equal_nan=True)
    for index in range(2):
        np.testing.assert_allclose(shared.layer_covariance(index), standalone.layer_covariance(index),
                                   atol=tolerance * 10, rtol=tolerance)
    np.testing.assert_allclose(shared.means_a(), standalone.means_a(), rtol=1e-12)
    np.testing.assert_array_equal(shared.variances_b() == 0, standalone.variances_b() == 0)  # the dead B neuron
    restored = ModelColumns.from_state_dict(model_a.state_dict())
    assert restored.n == model_a.n and torch.equal(restored.sum, model_a.sum)
    with pytest.raises(TypeError, match="update_products"):
        shared.update(xa[:10, a_columns], xb[:10, b_columns])
