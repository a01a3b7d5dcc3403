"""Scale out: token shards merge exactly into the unsharded results, and the Ray executor gives the local
executor's rows, through a worker killed mid-task and a driver killed midway.

The merges first, on real activations of a tiny model (metrics level), then the jobs through the CLI on a
3-seed tiny family: correlations and activations with --token-shards 4, locally and on a local Ray
(ray.init(num_cpus=2))."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from sqlalchemy import select
from typer.testing import CliRunner

from atlas.cli import app
from atlas.metrics.correlation import ModelColumns, SharedCorrelationAccumulator
from atlas.metrics.moments import StreamingMoments
from atlas.metrics.topk import StreamingTopK
from atlas.registry import register_dataset, register_model
from atlas.store.schema import ActivationStat, Job, NeuronCorrelation, TopExample
from ingest.token_shards import flush_batches, token_ranges
from tests.tiny import docstring_texts

N_TOKENS, CTX, BATCH = 3000, 64, 4
SHARDS = 4


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale-docs") / "docs.jsonl"
    texts = [t.strip() for t in docstring_texts() if t.strip()]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def real_activations(tiny_family) -> torch.Tensor:
    """[n, 3 * 96] MLP activations of the tiny GPT-2 (seed 0) on 16 rows of docstrings, heavy offsets kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atlas.modeling import capture_neuron_activations, load_model

    loaded = load_model(str(tiny_family[0]))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_family[0]))
    text = " ".join(docstring_texts()[:40])
    ids = torch.tensor(tokenizer(text)["input_ids"][: 16 * 32]).reshape(16, 32)
    acts = capture_neuron_activations(loaded, ids, torch.ones_like(ids))
    del AutoModelForCausalLM
    return acts.reshape(16 * 32, -1).float()


# -- planning ----------------------------------------------------------------------------------------

def test_token_ranges_cover_the_stream_at_aligned_starts():
    assert token_ranges(10, 4) == [range(0, 2), range(2, 5), range(5, 8), range(8, 10)]
    assert token_ranges(10, 3, align=4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert token_ranges(3, 8) == [range(0, 1), range(1, 2), range(2, 3)]  # fewer batches than shards
    for n, k, align in [(1000, 7, 16), (65, 64, 1), (5, 2, 2)]:
        ranges = token_ranges(n, k, align)
        assert ranges[0].start == 0 and ranges[-1].stop == n
        assert all(a.stop == b.start and b.start % align == 0 for a, b in zip(ranges, ranges[1:]))
    assert flush_batches(10_000, 2048, 16384) == 8  # a big pass: 16384 positions a group
    assert flush_batches(100, 2048, 16384) == 1     # a small one: enough groups to cut
    with pytest.raises(Exception, match="token-shards"):
        token_ranges(10, 0)


# -- exact merges (metrics) ----------------------------------------------------------------------------

def payload_of(batch: torch.Tensor):
    """The payload a top-k keeps: the entering example's own value, [p, 1]."""
    def payload(rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return batch[rows, features][:, None]
    return payload


def test_moments_and_topk_merge_exactly(real_activations):
    x = real_activations + torch.linspace(0, 50, real_activations.shape[1])  # means far from zero too
    keys = torch.arange(x.shape[0])
    whole_m, whole_t = StreamingMoments(x.shape[1]), StreamingTopK(x.shape[1], 5, 1)
    parts = []
    for chunk in torch.split(torch.arange(x.shape[0]), 48):  # batches; shards of 3 batches
        whole_m.update(x[chunk])
        whole_t.update(x[chunk], keys[chunk], payload_of(x[chunk]))
    for shard in torch.split(torch.arange(x.shape[0]), 144):
        m, t = StreamingMoments(x.shape[1]), StreamingTopK(x.shape[1], 5, 1)
        for chunk in torch.split(shard, 48):
            m.update(x[chunk])
            t.update(x[chunk], keys[chunk], payload_of(x[chunk]))
        parts.append((m, t))
    merged_m, merged_t = parts[0]
    for m, t in parts[1:]:
        merged_m.merge(m)
        merged_t.merge(t)
    expected, got = whole_m.result(), merged_m.result()
    for name in ("mean", "var", "skew", "kurt", "max", "min", "frac_active"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, atol=1e-12, equal_nan=True)
    for mine, theirs in zip(merged_t.result(), whole_t.result()):
        np.testing.assert_array_equal(mine, theirs)


def test_correlation_sums_merge_exactly_with_the_streams_shift(real_activations):
    """Shards primed with the stream's first batch, flushed at the same batch groups, add up to the
    unsharded sums (to float64 rounding), and the correlations agree to 1e-12."""
    x = real_activations
    width = x.shape[1]
    batches = list(torch.split(x, 32))

    def accumulate(batch_range: range) -> tuple[ModelColumns, SharedCorrelationAccumulator]:
        columns = ModelColumns(width)
        pair = SharedCorrelationAccumulator(columns, slice(0, 96), columns, slice(96, width), [96, 96],
                                            b_layers=[1, 2], flush_tokens=None)
        if batch_range.start:
            columns.prime(batches[0])
        for index in batch_range:
            y = columns.update(batches[index])
            pair.update_products(y[:, :96], y[:, 96:])
            if (index + 1) % 2 == 0:
                pair.flush()
        pair.flush()
        return columns, pair

    whole_columns, whole = accumulate(range(len(batches)))
    merged_columns, merged = accumulate(range(0, 6))
    for part in (range(6, 12), range(12, len(batches))):
        columns, pair = accumulate(part)
        merged_columns.merge(columns)
        merged.merge_products(pair)
    np.testing.assert_allclose(merged.correlations(), whole.correlations(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged.cross.numpy(), whole.cross.numpy(), rtol=1e-13)
    assert merged.n == whole.n == x.shape[0]
    unprimed = ModelColumns(width)
    unprimed.update(batches[7])
    with pytest.raises(ValueError, match="different shifts"):
        merged_columns.merge(unprimed)


# -- the jobs ---------------------------------------------------------------------------------------

def setup_family(store, db_url, tiny_family, docs_file, seeds: int = 3) -> None:
    for seed in range(seeds):
        register_model(store, str(tiny_family[seed]), family="tiny", seed=seed)
    register_dataset(store, "docs", str(docs_file), n_tokens=N_TOKENS, ctx_len=CTX, sample_seed=3)


def cli(db_url: str, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--db", db_url])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def correlation_rows(store) -> dict[tuple, tuple]:
    with store.session() as session:
        rows = session.scalars(select(NeuronCorrelation)).all()
    return {(r.model_id, r.other_model_id, r.layer, r.neuron):
            (r.max_corr, r.partner_layer, r.partner_neuron, r.baseline_max_corr) for r in rows}


def activation_rows(store) -> tuple[dict, dict]:
    with store.session() as session:
        stats = {(r.model_id, r.layer, r.neuron): (r.n, r.mean, r.var, r.skew, r.kurt, r.max, r.min, r.frac_active)
                 for r in session.scalars(select(ActivationStat))}
        examples = {(r.model_id, r.layer, r.neuron, r.rank): (r.doc_index, r.position, r.activation,
                                                              tuple(r.context_token_ids), tuple(r.context_activations))
                    for r in session.scalars(select(TopExample))}
    return stats, examples


def assert_same_correlations(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and len(got) in (2 * 3 * 96, 6 * 3 * 96)  # 2 or 3 seeds
    for key, (best, layer, neuron, baseline) in expected.items():
        other = got[key]
        assert (other[1], other[2]) == (layer, neuron), key
        for value, reference in ((other[0], best), (other[3], baseline)):
            assert (value is None) == (reference is None), key
            if value is not None:
                assert abs(value - reference) <= 1e-12, (key, value, reference)


def assert_same_activations(got: tuple, expected: tuple) -> None:
    stats, examples = got
    assert examples == expected[1]  # top-k identical: values, positions, contexts
    assert stats.keys() == expected[0].keys()
    for key, values in expected[0].items():
        np.testing.assert_allclose(np.array(stats[key], dtype=float), np.array(values, dtype=float),
                                   rtol=1e-12, atol=1e-300, equal_nan=True)


def token_shard_jobs(store, kind: str) -> list[Job]:
    with store.session() as session:
        return list(session.scalars(select(Job).where(Job.kind == kind, Job.shard.like("%t%/%"))
                                    .order_by(Job.id)))


def test_local_token_shards_equal_the_unsharded_run(store, db_url, tiny_family, docs_file, isolated_cache,
                                                    monkeypatch):
    setup_family(store, db_url, tiny_family, docs_file)
    common = ["--family", "tiny", "--dataset", "docs", "--batch-size", str(BATCH), "--device", "cpu"]
    cli(db_url, "ingest", "correlations", *common)
    cli(db_url, "ingest", "activations", *common)
    expected_corr, expected_acts = correlation_rows(store), activation_rows(store)

    cli(db_url, "ingest", "correlations", *common, "--token-shards", str(SHARDS), "--overwrite")
    cli(db_url, "ingest", "activations", *common, "--token-shards", str(SHARDS), "--overwrite")
    assert_same_correlations(correlation_rows(store), expected_corr)
    assert_same_activations(activation_rows(store), expected_acts)
    # one ledger row per (pair, token shard) and per (model, token shard), all done; state files dropped
    corr_units = token_shard_jobs(store, "correlations")
    assert sorted(job.shard for job in corr_units) == sorted(f"t{i}/{SHARDS}" for i in range(SHARDS) for _ in range(3))
    assert all(job.status == "done" for job in corr_units) and len(token_shard_jobs(store, "activations")) == 3 * SHARDS
    assert not list((isolated_cache / "shards").rglob("*.npz"))
    shown_in_the_api_and_the_app(db_url, monkeypatch)


def shown_in_the_api_and_the_app(db_url: str, monkeypatch) -> None:
    """The units' progress as the Python API and the Overview page show it."""
    import atlas
    from tests.test_app import _app, _open

    units = atlas.open(db_url).token_shard_units().set_index("kind")
    assert units.loc["correlations", ["token_shards", "done", "running", "total"]].tolist() == [SHARDS, 12, 0, 12]
    assert units.loc["activations", ["token_shards", "done", "total"]].tolist() == [SHARDS, 12, 12]
    app = _open(_app(db_url, monkeypatch), "app_pages/overview.py")
    assert "Token-shard units" in [header.value for header in app.subheader]
    shown = [frame.value for frame in app.dataframe if "token_shards" in frame.value.columns]
    assert len(shown) == 1 and shown[0]["progress"].tolist() == [1.0, 1.0]


# -- on Ray ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray of 2 CPUs for this module. Its workers inherit the kill hook: the first unit to feed its
    third batch SIGKILLs its own worker, once (the marker says it happened)."""
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("ray-hook") / "killed-once"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"ATLAS_TEST_KILL_UNIT_ONCE": str(marker), "OMP_NUM_THREADS": "1"}})
    yield marker
    ray.shutdown()


@pytest.fixture
def sqlite_store(tmp_path):
    from atlas.store import Store

    url = f"sqlite:///{tmp_path / 'atlas.db'}"
    store = Store(url)
    yield url, store
    store.dispose()


def test_ray_equals_local_through_a_killed_worker(local_ray, sqlite_store, tiny_family, docs_file, tmp_path):
    url, store = sqlite_store
    setup_family(store, url, tiny_family, docs_file)
    common = ["--family", "tiny", "--dataset", "docs", "--batch-size", str(BATCH), "--device", "cpu",
              "--checkpoint-every", "1"]
    cli(url, "ingest", "correlations", *common)
    cli(url, "ingest", "activations", *common)
    expected_corr, expected_acts = correlation_rows(store), activation_rows(store)

    ray_options = ["--executor", "ray", "--token-shards", str(SHARDS), "--shard-dir", str(tmp_path / "shards"),
                   "--overwrite"]
    cli(url, "ingest", "correlations", *common, *ray_options)
    assert local_ray.exists(), "no unit was killed: the retry was not exercised"
    cli(url, "ingest", "correlations", *common, *ray_options)  # again over done units: --overwrite replaces them
    cli(url, "ingest", "activations", *common, *ray_options)
    assert_same_correlations(correlation_rows(store), expected_corr)
    assert_same_activations(activation_rows(store), expected_acts)
    units = token_shard_jobs(store, "correlations")
    done = [job for job in units if job.status == "done"]  # the retry left no trace; the rerun replaced its rows
    assert len(done) == 3 * SHARDS and {job.status for job in units if job not in done} == {"replaced"}
    assert not list((tmp_path / "shards").rglob("*.npz"))  # states and checkpoints dropped after the write


def test_rerun_after_a_driver_kill_does_only_the_missing_units(local_ray, sqlite_store, tiny_family, docs_file,
                                                                tmp_path):
    url, store = sqlite_store
    setup_family(store, url, tiny_family, docs_file)
    command = [sys.executable, "-m", "atlas.cli", "ingest", "correlations", "--family", "tiny", "--dataset", "docs",
               "--batch-size", "1", "--device", "cpu", "--executor", "ray", "--ray-address", "auto",
               "--token-shards", "6", "--shard-dir", str(tmp_path / "shards"), "--db", url]
    env = {**os.environ, "ATLAS_CACHE_DIR": str(tmp_path / "cache")}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        done_before = wait_for_done_units(store, driver, at_least=3)  # one unit: 3 pair keys
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    assert 3 <= len(done_before) < 3 * 6, "the driver finished before it could be killed"
    with store.session() as session:
        assert session.query(NeuronCorrelation).count() == 0  # nothing written before all units are in

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    units = token_shard_jobs(store, "correlations")
    done = [job for job in units if job.status == "done"]
    assert len(done) == 3 * 6 and len({(j.model_id, j.other_model_id, j.shard) for j in done}) == 3 * 6
    assert {job.id for job in done} >= done_before  # the units done before the kill were not computed again
    assert {job.status for job in units if job.id not in done_before} <= {"done", "abandoned"}
    assert len(correlation_rows(store)) == 6 * 3 * 96


def wait_for_done_units(store, driver: subprocess.Popen, at_least: int) -> set[int]:
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        done = {job.id for job in token_shard_jobs(store, "correlations") if job.status == "done"}
        if len(done) >= at_least:
            return done
        time.sleep(0.05)
    return {job.id for job in token_shard_jobs(store, "correlations") if job.status == "done"}


def test_token_shards_of_layer_blocks_equal_the_unsharded_blocks(sqlite_store, tiny_family, docs_file, tmp_path):
    """A pair too large for one pass (blocks of layers, --memory-budget) cut into token shards too: the
    blocks' units merge into the same rows as the blocks run whole."""
    from ingest import correlations as job
    from atlas.metrics.correlation import pair_block_bytes
    from atlas.store.schema import Model

    url, store = sqlite_store
    setup_family(store, url, tiny_family, docs_file, seeds=2)
    with store.session() as session:
        model = session.scalars(select(Model)).first()
    width, positions = model.n_layers * model.d_mlp, BATCH * CTX
    budget = (pair_block_bytes(2, model.d_mlp, 2, model.d_mlp) + 2 * job.model_pass_bytes(width, positions)
              + job.forward_bytes(model.d_mlp, positions))
    common = ["--family", "tiny", "--dataset", "docs", "--batch-size", str(BATCH), "--device", "cpu",
              "--memory-budget", str(budget)]
    cli(url, "ingest", "correlations", *common)
    expected = correlation_rows(store)
    cli(url, "ingest", "correlations", *common, "--token-shards", "2", "--overwrite",
        "--shard-dir", str(tmp_path / "shards"))
    assert_same_correlations(correlation_rows(store), expected)
    shards = {job.shard for job in token_shard_jobs(store, "correlations")}
    assert "a0:2/b0:2|t1/2" in shards and len(shards) == 4 * 2  # 4 layer blocks x 2 token ranges
