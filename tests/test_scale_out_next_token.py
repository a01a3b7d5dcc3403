"""Scale out of the next-token jobs (interventions, lens): token shards merge into the unsharded rows.

First the merge itself (MeanAccumulator: a saved state loads back bit for bit, shards' sums and counts add
up to the whole stream's), then both jobs through the CLI on two seeds of the tiny family: --token-shards 3
gives the rows of an unsharded run. The Ray executor runs the same units (tests/test_scale_out.py covers it).
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from atlas.metrics.layers import MeanAccumulator
from atlas.registry import register_dataset, register_model
from atlas.store.schema import Job, LayerIntervention, LayerStat, LogitLens, Model
from tests import test_scale_out
from tests.test_scale_out import cli, token_shard_jobs

# its fixtures: the docstring corpus, and a cache of each test's own (autouse)
docs_file, isolated_cache = test_scale_out.docs_file, test_scale_out.isolated_cache

N_TOKENS, CTX, TOKENS, BATCH, SHARDS = 2000, 64, 1000, 2, 3


# -- the merge (metrics) -----------------------------------------------------------------------------

def batch_values(rng: np.random.Generator, index: int) -> dict[tuple, dict[str, np.ndarray]]:
    """Per-position values of one batch by group; ('rare', 1) only in some batches, one name sometimes empty."""
    n = int(rng.integers(0, 40))
    values = {("none", None): {"loss": rng.gamma(2.0, 3.0, n), "accuracy": (rng.random(n) < 0.3).astype(float)},
              ("delete", 2): {"kl": rng.exponential(1e-3, n) + 1e6 * (index % 2), "loss": rng.normal(5, 1, n)},
              ("lens", np.int64(0)): {"attn_prev5": rng.random(int(rng.integers(0, 3)))}}
    if index % 3 == 0:
        values["rare", 1] = {"entropy": rng.random(n)}
    return values


def accumulate(batches: list[dict[tuple, dict[str, np.ndarray]]]) -> MeanAccumulator:
    sums = MeanAccumulator()
    for batch in batches:
        for group, values in batch.items():
            sums.add(group, values)
    return sums


def through_npz(state: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
    np.savez(path, **state)
    with np.load(path) as saved:  # allow_pickle=False: the keys are plain strings
        return {name: saved[name] for name in saved.files}


def test_mean_accumulator_state_round_trips_and_merges(tmp_path):
    rng = np.random.default_rng(7)
    batches = [batch_values(rng, index) for index in range(10)]
    whole = accumulate(batches)
    names = sorted(whole._sums, key=repr)
    assert len(names) == 6 and whole.count(("rare", 1), "entropy") > 0

    restored = MeanAccumulator()
    restored.load_state_dict(through_npz(whole.state_dict(), tmp_path / "whole.npz"))
    assert restored._sums == whole._sums and restored._counts == whole._counts  # exact, keys as tuples again
    assert all(type(group) is tuple for group, _ in restored._sums)
    assert restored.mean(("lens", 0), "attn_prev5") == whole.mean(("lens", np.int64(0)), "attn_prev5")

    merged = None
    for index, shard in enumerate((batches[:4], batches[4:5], batches[5:])):  # ('rare', 1) not in the second
        part = MeanAccumulator()
        part.load_state_dict(through_npz(accumulate(shard).state_dict(), tmp_path / f"part{index}.npz"))
        if merged is None:
            merged = part
        else:
            merged.merge(part)
    assert merged._counts == whole._counts
    for group, name in names:
        assert merged.count(group, name) == whole.count(group, name)
        np.testing.assert_allclose(merged.mean(group, name), whole.mean(group, name), rtol=1e-14, equal_nan=True)
        np.testing.assert_allclose(merged._sums[group, name], whole._sums[group, name], rtol=1e-14)
    assert merged.state_dict()["sums"].dtype == np.float64 and merged.state_dict()["counts"].dtype == np.int64

    empty = MeanAccumulator()
    empty.load_state_dict(through_npz(MeanAccumulator().state_dict(), tmp_path / "empty.npz"))
    assert empty.count(("none", None), "loss") == 0 and np.isnan(empty.mean(("none", None), "loss"))

    for group in (frozenset({1}), ("a", float("nan"))):  # keys that JSON would not give back equal
        odd = MeanAccumulator()
        odd.add(group, {"x": np.ones(2)})
        with pytest.raises(ValueError, match="does not survive JSON"):
            odd.state_dict()


# -- the jobs ---------------------------------------------------------------------------------------

def intervention_rows(store) -> dict[tuple, tuple]:
    with store.session() as session:
        return {(r.model_id, r.kind, r.layer): (r.n_positions, r.kl, r.top1_agreement, r.accuracy,
                                                r.accuracy_retention, r.loss, r.loss_delta, r.entropy)
                for r in session.scalars(select(LayerIntervention))}


def lens_rows(store) -> dict[tuple, tuple]:
    with store.session() as session:
        lens = {("lens", r.model_id, r.layer): (r.kl_to_final, r.entropy_nats, r.entropy_bits, r.top1_agreement,
                                                r.accuracy) for r in session.scalars(select(LogitLens))}
        stats = {("stats", r.model_id, r.layer): (r.attn_prev5, r.attn_out_norm, r.mlp_out_norm)
                 for r in session.scalars(select(LayerStat))}
    return {**lens, **stats}


def assert_same_rows(got: dict, expected: dict, n_rows: int, differences: dict[int, int] | None = None) -> None:
    """Counts identical, the rest to rtol 1e-12; a column that is a difference of two means (column -> the
    column of one of them) to 1e-12 of that mean, the rounding of the means it subtracts."""
    assert got.keys() == expected.keys() and len(got) == n_rows
    differences = differences or {}
    for key, values in expected.items():
        for column, (value, reference) in enumerate(zip(got[key], values, strict=True)):
            assert (value is None) == (reference is None), (key, column)
            if isinstance(reference, int):  # counts
                assert value == reference, (key, column)
            elif reference is not None:
                atol = 1e-12 * abs(values[differences[column]]) if column in differences else 0.0
                np.testing.assert_allclose(value, reference, rtol=1e-12, atol=atol, err_msg=str((key, column)))


def model_jobs(store, kind: str) -> list[Job]:
    with store.session() as session:
        return list(session.scalars(select(Job).where(Job.kind == kind, Job.shard.is_(None)).order_by(Job.id)))


@pytest.mark.parametrize("kind, read, n_rows, differences", [
    # per model: none, 3 deletions, 2 swaps; loss_delta (column 6) is loss (column 5) minus the base loss
    ("interventions", intervention_rows, 2 * (1 + 2 * 3 - 1), {6: 5}),
    ("lens", lens_rows, 2 * ((3 + 1) + 3), {}),  # per model: 4 residual states, 3 layers
])
def test_token_shards_equal_the_unsharded_run(store, db_url, tiny_family, docs_file, isolated_cache,
                                              kind, read, n_rows, differences):
    for seed in range(2):
        register_model(store, str(tiny_family[seed]), family="tiny", seed=seed)
    register_dataset(store, "docs", str(docs_file), n_tokens=N_TOKENS, ctx_len=CTX, sample_seed=3)
    common = ["--family", "tiny", "--dataset", "docs", "--tokens", str(TOKENS), "--batch-size", str(BATCH),
              "--device", "cpu"]
    cli(db_url, "ingest", kind, *common)
    expected = read(store)

    cli(db_url, "ingest", kind, *common, "--token-shards", str(SHARDS), "--overwrite")
    assert_same_rows(read(store), expected, n_rows, differences)
    # one ledger row per (model, token shard), all done; per model the unsharded job replaced by the merged one
    units = token_shard_jobs(store, kind)
    with store.session() as session:
        model_ids = session.scalars(select(Model.id)).all()
    assert sorted((job.model_id, job.shard) for job in units) == sorted(
        (model_id, f"t{i}/{SHARDS}") for model_id in model_ids for i in range(SHARDS))
    assert all(job.status == "done" for job in units)
    assert [job.status for job in model_jobs(store, kind)] == ["replaced"] * 2 + ["done"] * 2
    assert not list((isolated_cache / "shards").rglob("*.npz"))  # the states are dropped once the rows are in

    cli(db_url, "ingest", kind, *common, "--token-shards", str(SHARDS))  # done already: nothing reruns
    assert len(token_shard_jobs(store, kind)) == 2 * SHARDS and len(model_jobs(store, kind)) == 4
