"""The correlations job against float64 numpy on activations captured independently with torch hooks, on
SQLite and PostgreSQL: max corr, partners, rotated baseline, NULL for a dead neuron, a neuron whose mean
is ~1000 std, the universal_neurons and neuron_atlas views, incremental seeds, shards and their resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, text
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from atlas.data import TokenizedDataset
from atlas.errors import AtlasError
from atlas.metrics.correlation import pair_block_bytes, random_orthogonal
from atlas.registry import register_dataset, register_model
from atlas.store.schema import Dataset, Job, Model, NeuronCorrelation
from ingest import correlations as job
from ingest.datasets import tokenize
from ingest.correlations import CorrelationsConfig, parse_bytes, run
from tests.tiny import build_tiny_model, build_tokenizer, docstring_texts

N_TOKENS, CTX, BATCH = 3000, 64, 8
DEAD = (1, 5)          # (layer, neuron) of seed 0 made constant: rho must be NULL
OFFSET = (0, 7)        # (layer, neuron) of seed 0 with mean ~1000 x std


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def docs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corr-docs") / "docs.jsonl"
    texts = [t.strip() for t in docstring_texts() if t.strip()]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="session")
def seed_dirs(tmp_path_factory, tiny_family) -> list:
    """The tiny GPT-2 seeds 0..3, seed 0 edited (real weights, saved with save_pretrained): neuron DEAD
    has a -1000 input bias (dead: always 0), neuron OFFSET a +2000 bias and 12x input weights."""
    edited = tmp_path_factory.mktemp("corr-family") / "tiny-gpt2-seed0-edited"
    shutil.copytree(tiny_family[0], edited)
    model = AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32)
    with torch.no_grad():
        dead = model.transformer.h[DEAD[0]].mlp.c_fc  # Conv1D: weight [d_model, d_mlp]
        dead.bias[DEAD[1]] = -1000.0  # GELU of about -1000: exactly 0 in float32
        offset = model.transformer.h[OFFSET[0]].mlp.c_fc
        offset.weight[:, OFFSET[1]] *= 12.0
        offset.bias[OFFSET[1]] = 2000.0
    model.save_pretrained(edited)
    return [edited, *tiny_family[1:]]


def register_family(store, seed_dirs, docs_file, seeds=(0, 1, 2)) -> list[Model]:
    for seed in seeds:
        register_model(store, str(seed_dirs[seed]), family="tiny", seed=seed)
    register_dataset(store, "docs", str(docs_file), n_tokens=N_TOKENS, ctx_len=CTX, sample_seed=3)
    with store.session() as session:
        return list(session.scalars(select(Model).order_by(Model.seed)))


def config(**overrides) -> CorrelationsConfig:
    return CorrelationsConfig(**{"family": "tiny", "dataset": "docs", "batch_size": BATCH, **overrides})


def tokens_of(store, model: Model) -> TokenizedDataset:
    with store.session() as session:
        dataset = session.scalars(select(Dataset)).one()
    return tokenize(dataset, AutoTokenizer.from_pretrained(model.source))


def hooked_activations(model: Model, tokens: TokenizedDataset) -> np.ndarray:
    """Forward pre-hooks on each block's c_proj (raw GPT-2 modules, not the adapters), in the job's
    batches, at the non-special positions: [n, n_layers * d_mlp] float64."""
    hf = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()
    special = torch.tensor(AutoTokenizer.from_pretrained(model.source).all_special_ids)
    captured: dict[int, torch.Tensor] = {}
    for layer, block in enumerate(hf.transformer.h):
        block.mlp.c_proj.register_forward_pre_hook(lambda _m, args, layer=layer: captured.__setitem__(layer, args[0]))
    chunks = []
    for start in range(0, tokens.n_rows, BATCH):
        rows = np.arange(start, min(start + BATCH, tokens.n_rows))
        lengths = torch.from_numpy(tokens.lengths[rows].astype(np.int64))
        ids = torch.from_numpy(np.asarray(tokens.ids[rows, : int(lengths.max())], dtype=np.int64))
        real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=real.long())
        mask = real & ~torch.isin(ids, special)
        chunks.append(torch.cat([captured[layer][mask] for layer in range(len(hf.transformer.h))], dim=1).double())
    return torch.cat(chunks).numpy()


def rho(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(xa, xb, rowvar=False)[: xa.shape[1], xa.shape[1]:]


def row_max(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max ignoring NaN, its column, the gap to the runner-up) per row; NaN / -1 for all-NaN rows."""
    filled = np.where(np.isnan(matrix), -np.inf, matrix)
    order = np.sort(filled, axis=1)
    best, column = order[:, -1], np.argmax(filled, axis=1)
    empty = np.isneginf(best)
    with np.errstate(invalid="ignore"):
        gap = order[:, -1] - order[:, -2]
    return np.where(empty, np.nan, best), np.where(empty, -1, column), gap


def reference_pair(xa: np.ndarray, xb: np.ndarray, d_mlp: int, seed: int) -> dict[str, np.ndarray]:
    """Float64 numpy: max corr and partner, and the max against B with layer l rotated by R(seed, l)."""
    best, column, gap = row_max(rho(xa, xb))
    n_layers = xb.shape[1] // d_mlp
    rotated = np.concatenate([xb[:, l * d_mlp:(l + 1) * d_mlp] @ random_orthogonal(d_mlp, (seed, l))
                              for l in range(n_layers)], axis=1)
    baseline, _, _ = row_max(rho(xa, rotated))
    return {"max_corr": best, "column": column, "gap": gap, "baseline_max_corr": baseline}


def stored_pair(store, a: Model, b: Model) -> dict[str, np.ndarray]:
    with store.session() as session:
        rows = session.scalars(select(NeuronCorrelation).where(
            NeuronCorrelation.model_id == a.id, NeuronCorrelation.other_model_id == b.id)
            .order_by(NeuronCorrelation.layer, NeuronCorrelation.neuron)).all()
    assert [(r.layer, r.neuron) for r in rows] == [(l, i) for l in range(a.n_layers) for i in range(a.d_mlp)]
    as_float = lambda values: np.array([np.nan if v is None else v for v in values], dtype=float)  # noqa: E731
    return {
        "max_corr": as_float([r.max_corr for r in rows]),
        "baseline_max_corr": as_float([r.baseline_max_corr for r in rows]),
        "partner": [(r.partner_layer, r.partner_neuron) for r in rows],
        "raw": [(r.max_corr, r.partner_layer, r.partner_neuron, r.baseline_max_corr) for r in rows],
        "job_created": {(r.job_id, r.created_at) for r in rows},
    }


def done_pair_jobs(store) -> dict[tuple[int, int], int]:
    with store.session() as session:
        jobs = session.scalars(select(Job).where(Job.kind == "correlations", Job.status == "done",
                                                 Job.shard.is_(None))).all()
    return {(j.model_id, j.other_model_id): j.id for j in jobs}


# -- numbers against float64 numpy ------------------------------------------------------------------

def test_job_equals_float64_numpy_and_views_answer(store, seed_dirs, docs_file, capsys):
    models = register_family(store, seed_dirs, docs_file)
    run(config(baseline_seed=11), store)
    tokens = tokens_of(store, models[0])
    acts = {m.id: hooked_activations(m, tokens) for m in models}
    d_mlp = models[0].d_mlp
    offset = acts[models[0].id][:, OFFSET[0] * d_mlp + OFFSET[1]]
    assert abs(offset.mean()) > 800 * offset.std() > 0  # the exactness case the shift exists for
    dead_feature = DEAD[0] * d_mlp + DEAD[1]
    assert np.ptp(acts[models[0].id][:, dead_feature]) == 0
    assert sorted(done_pair_jobs(store)) == [(a.id, b.id) for a in models for b in models if a.id < b.id]
    maxima: dict[int, list[dict[str, np.ndarray]]] = {m.id: [] for m in models}
    for a in models:
        for b in models:
            if a.id == b.id:
                continue
            expected, got = reference_pair(acts[a.id], acts[b.id], d_mlp, seed=11), stored_pair(store, a, b)
            for name in ("max_corr", "baseline_max_corr"):
                assert np.array_equal(np.isnan(got[name]), np.isnan(expected[name])), name
                np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=0, err_msg=name)
            clear = expected["gap"] > 1e-5  # partners compared where the max is not a near-tie
            assert [got["partner"][i] for i in np.flatnonzero(clear)] == \
                [divmod(int(c), d_mlp) for c in expected["column"][clear]]
            maxima[a.id].append(expected)
    seed0_rows = stored_pair(store, models[0], models[1])["raw"]
    assert seed0_rows[dead_feature] == (None, None, None, None)  # NULL, never 0
    assert np.isnan(maxima[models[0].id][0]["max_corr"][dead_feature])
    assert all(v is not None for v in seed0_rows[OFFSET[0] * d_mlp + OFFSET[1]])

    with store.session() as session:
        view = session.execute(text("SELECT model_id, layer, neuron, n_other_seeds, excess_corr, is_universal, "
                                    "universal_threshold FROM universal_neurons ORDER BY model_id, layer, neuron")).all()
    assert len(view) == sum(m.n_layers * m.d_mlp for m in models)
    for model in models:
        rows = [r for r in view if r.model_id == model.id]
        excess = (np.mean([e["max_corr"] for e in maxima[model.id]], axis=0)
                  - np.mean([e["baseline_max_corr"] for e in maxima[model.id]], axis=0))
        got_excess = np.array([np.nan if r.excess_corr is None else r.excess_corr for r in rows])
        np.testing.assert_allclose(got_excess, excess, atol=1e-5, rtol=0)
        finite = ~np.isnan(excess) & (np.abs(excess - 0.5) > 1e-5)
        assert [bool(r.is_universal) for r, keep in zip(rows, finite) if keep] == list(excess[finite] > 0.5)
        assert {r.universal_threshold for r in rows} == {0.5}
        assert {r.n_other_seeds for r in rows} == ({0, 2} if model.id == models[0].id else {2})
    printed = capsys.readouterr().out
    for model in models:
        n_universal = sum(bool(r.is_universal) for r in view if r.model_id == model.id)
        assert f"universal {model.name}: {n_universal}/{model.n_layers * d_mlp} neurons" in printed
    assert "excess_corr > 0.5 against 2 other seed(s)" in printed

    from ingest.weights import WeightsConfig, run as run_weights
    run_weights(WeightsConfig(family="tiny"), store)
    with store.session() as session:
        atlas = session.execute(text("SELECT model_id, layer, neuron, excess_corr, is_universal FROM neuron_atlas "
                                     "WHERE dataset IS NULL OR dataset = 'docs'")).all()
    by_key = {(r.model_id, r.layer, r.neuron): r for r in view}
    assert len(atlas) == len(view)
    assert all(r.excess_corr == by_key[r.model_id, r.layer, r.neuron].excess_corr for r in atlas)


# Each precision's documented bound on |max_corr - float64| (README, "Precision of the correlations");
# tf32 is float32 on a CPU.
PRECISION_BOUNDS = {"float64": 1e-9, "float32": 1e-5, "tf32": 1e-5, "bfloat16": 5e-3}


@pytest.mark.parametrize("precision", list(PRECISION_BOUNDS))
def test_every_precision_is_within_its_bound_of_float64(store, seed_dirs, docs_file, precision):
    models = register_family(store, seed_dirs, docs_file)
    run(config(baseline_seed=11, precision=precision), store)
    with store.session() as session:
        recorded = session.scalars(select(Job.config).where(Job.kind == "correlations")).all()
    # at the default the option is left out of the hash, so results stored before it existed stay done
    assert all(("precision" in c) == (precision != "float32") for c in recorded)
    tokens = tokens_of(store, models[0])
    acts = {m.id: hooked_activations(m, tokens) for m in models}
    bound = PRECISION_BOUNDS[precision]
    for a, b in [(a, b) for a in models for b in models if a.id != b.id]:
        expected, got = reference_pair(acts[a.id], acts[b.id], a.d_mlp, seed=11), stored_pair(store, a, b)
        for name in ("max_corr", "baseline_max_corr"):
            assert np.array_equal(np.isnan(got[name]), np.isnan(expected[name])), name
            np.testing.assert_allclose(got[name], expected[name], atol=bound, rtol=0, err_msg=name)


def test_rotation_is_orthogonal_and_reproducible():
    rotation = random_orthogonal(96, (11, 2))
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(96), atol=1e-12)
    assert np.array_equal(rotation, random_orthogonal(96, (11, 2)))
    assert not np.allclose(rotation, random_orthogonal(96, (11, 1)))


# -- incremental seeds (the acceptance scenario, through the CLI) ------------------------------------

def test_new_seed_computes_only_its_pairs_and_leaves_old_rows_untouched(store, db_url, seed_dirs, docs_file,
                                                                       monkeypatch):
    from atlas.cli import app

    models = register_family(store, seed_dirs, docs_file)
    computed: list[tuple[int, int]] = []
    real_compute_pass = job.compute_pass

    def recording(blocks, context):
        computed.extend((b.a_id, b.b_id) for b in blocks)
        return real_compute_pass(blocks, context)

    monkeypatch.setattr(job, "compute_pass", recording)
    runner = CliRunner()
    command = ["ingest", "correlations", "--family", "tiny", "--dataset", "docs", "--tokens", "2000", "--db", db_url]
    first = runner.invoke(app, command)
    assert first.exit_code == 0, first.output
    assert "universal" in first.output
    old_jobs = done_pair_jobs(store)
    assert sorted(old_jobs) == sorted((a.id, b.id) for a in models for b in models if a.id < b.id)  # unordered
    both_directions = list(old_jobs) + [(b, a) for a, b in old_jobs]
    old_rows = {pair: stored_pair(store, *[m for i in pair for m in models if m.id == i]) for pair in both_directions}

    (new,) = [m for m in register_family(store, seed_dirs, docs_file, seeds=(3,)) if m.seed == 3]
    computed.clear()
    second = runner.invoke(app, command)
    assert second.exit_code == 0, second.output
    assert sorted(computed) == sorted((m.id, new.id) for m in models)  # the 4th seed: exactly 3 new accumulators
    jobs = done_pair_jobs(store)
    assert len(jobs) == 6 and all(jobs[pair] == job_id for pair, job_id in old_jobs.items())
    for pair, rows in old_rows.items():
        again = stored_pair(store, *[m for i in pair for m in models if m.id == i])
        assert again["raw"] == rows["raw"] and again["job_created"] == rows["job_created"]  # same job_id, created_at
    with store.session() as session:
        seeds = session.execute(text("SELECT model_id, MAX(n_other_seeds) FROM universal_neurons GROUP BY model_id")).all()
    assert {n for _, n in seeds} == {3}

    computed.clear()
    third = runner.invoke(app, command)
    assert third.exit_code == 0 and computed == [] and "skipped 6 of 6" in third.output


# -- shards ----------------------------------------------------------------------------------------

def test_shards_resume_and_equal_the_unsharded_run(store, seed_dirs, docs_file, monkeypatch, isolated_cache):
    models = register_family(store, seed_dirs, docs_file, seeds=(0, 1))
    d_mlp, width, positions = models[0].d_mlp, models[0].n_layers * models[0].d_mlp, BATCH * CTX
    # 2 of 3 layers on each side, beside both models' statistics and batch buffers
    budget = (pair_block_bytes(2, d_mlp, 2, d_mlp) + 2 * job.model_pass_bytes(width, positions)
              + job.forward_bytes(d_mlp, positions))
    blocks = job.pair_blocks(models[0], models[1], 1, budget, batch_positions=positions)
    assert [b.key.shard for b in blocks] == ["a0:2/b0:2", "a0:2/b2:3", "a2:3/b0:2", "a2:3/b2:3"]
    n_passes = len(job.pack_passes(blocks, budget, positions))
    assert n_passes >= 3

    calls = {"n": 0}
    real_compute_pass = job.compute_pass

    def crash_on_third_pass(units, context):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kill")
        return real_compute_pass(units, context)

    monkeypatch.setattr(job, "compute_pass", crash_on_third_pass)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(config(memory_budget=str(budget)), store)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(NeuronCorrelation)) == 0  # no pair complete yet
        done_shards = session.scalars(select(Job.shard).where(Job.status == "done", Job.shard.is_not(None))).all()
    assert len(done_shards) == len({*done_shards}) >= 2
    assert len(list((isolated_cache / "correlation-shards").glob("*.npz"))) == len(done_shards)

    resumed: list[str] = []
    monkeypatch.setattr(job, "compute_pass", lambda units, context: resumed.extend(u.key.shard for u in units)
                        or real_compute_pass(units, context))
    run(config(memory_budget=str(budget)), store)
    assert sorted(resumed + done_shards) == sorted(b.key.shard for b in blocks)  # finished shards not computed again
    assert not list((isolated_cache / "correlation-shards").glob("*.npz"))  # dropped once the pairs are written
    assert len(done_pair_jobs(store)) == 1
    sharded = {(a.id, b.id): stored_pair(store, a, b) for a, b in [models, models[::-1]]}

    run(config(overwrite=True), store)  # one unit per pair
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.shard.is_(None), Job.status == "done")) == 1
    for (a, b) in [models, models[::-1]]:
        whole = stored_pair(store, a, b)
        for name in ("max_corr", "baseline_max_corr"):  # the float32 GEMM rounds by block shape (~1e-7)
            np.testing.assert_allclose(sharded[a.id, b.id][name], whole[name], atol=1e-6, rtol=0)
        assert sharded[a.id, b.id]["partner"] == whole["partner"]


def test_interrupted_pass_resumes_from_its_checkpoint(store, seed_dirs, docs_file, monkeypatch, isolated_cache):
    models = register_family(store, seed_dirs, docs_file, seeds=(0, 1))
    run(config(tokens=1500, checkpoint_every=1), store)
    uninterrupted = {(a.id, b.id): stored_pair(store, a, b)["raw"] for a, b in [models, models[::-1]]}
    real_consume = job.CorrelationConsumer.consume
    calls = {"n": 0, "resumed": 0}

    def crash_after_three(self, step):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated kill")
        real_consume(self, step)

    monkeypatch.setattr(job.CorrelationConsumer, "consume", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(config(tokens=1500, checkpoint_every=1, overwrite=True), store)
    assert len(list((isolated_cache / "checkpoints").glob("*.npz"))) == 1

    def counting(self, step):
        calls["resumed"] += 1
        real_consume(self, step)

    monkeypatch.setattr(job.CorrelationConsumer, "consume", counting)
    run(config(tokens=1500, checkpoint_every=1, overwrite=True), store)
    n_batches = -(-tokens_of(store, models[0]).rows_for_tokens(1500) // BATCH)
    assert calls["resumed"] == n_batches - 3
    assert {(a.id, b.id): stored_pair(store, a, b)["raw"] for a, b in [models, models[::-1]]} == uninterrupted
    assert not list((isolated_cache / "checkpoints").glob("*.npz"))


def test_pack_passes_respects_the_budget():
    shapes = dict(n_layers=3, d_mlp=96)
    a, b, c = Model(id=1, **shapes), Model(id=2, **shapes), Model(id=3, **shapes)
    positions, model_bytes = 64, job.model_pass_bytes(288, 64)
    budget = 3 * pair_block_bytes(3, 96, 3, 96) + 3 * model_bytes + job.forward_bytes(96, positions)
    blocks = [blk for x, y in [(a, b), (a, c), (b, c)] for blk in job.pair_blocks(x, y, 1, budget, batch_positions=positions)]
    assert [blk.sharded for blk in blocks] == [False, False, False]
    # every pair in one pass: each model runs once per batch, its statistics and batch counted once
    assert len(job.pack_passes(blocks, budget, positions)) == 1
    small = pair_block_bytes(1, 96, 1, 96) + 2 * model_bytes + job.forward_bytes(96, positions)
    blocks = job.pair_blocks(a, b, 1, small, batch_positions=positions)
    assert len(blocks) == 9 and all(blk.sharded for blk in blocks)
    for units in job.pack_passes(blocks, small, positions):
        grams = {key: job.gram_bytes(sizes) for blk in units for key, sizes in blk.gram_sizes().items()}
        models = {m for blk in units for m in (blk.a_id, blk.b_id)}
        assert (sum(blk.accumulator_bytes() for blk in units) + sum(grams.values()) + len(models) * model_bytes
                + job.forward_bytes(96, positions) <= small)
    with pytest.raises(AtlasError, match="lower --batch-size"):
        job.pair_blocks(a, b, 1, small, batch_positions=100 * positions)


# -- bad input: one-line errors, nothing written --------------------------------------------------

def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_bad_inputs(store, seed_dirs, docs_file, tmp_path):
    register_family(store, seed_dirs, docs_file, seeds=(0,))
    with pytest.raises(AtlasError) as error:
        run(config(), store)
    assert "one model" in one_line(error)
    build_tokenizer(tmp_path / "tok300", vocab_size=300)
    odd = build_tiny_model("gpt2", tmp_path / "odd-tokenizer", seed=5, tokenizer_dir=tmp_path / "tok300")
    odd_model, _ = register_model(store, str(odd), family="odd", seed=5)  # registration refuses it in "tiny"
    with store.transaction() as session:  # as a row from before registration checked tokenizers
        session.get(Model, odd_model.id).family = "tiny"
    with pytest.raises(AtlasError) as error:
        run(config(), store)
    assert "different tokenizers" in one_line(error)
    with pytest.raises(AtlasError) as error:
        run(config(family=None), store)
    assert "--family" in one_line(error)
    for bad in ("4 gigs", "-1GiB", "GiB"):
        with pytest.raises(AtlasError) as error:
            run(config(memory_budget=bad), store)
        assert "--memory-budget" in one_line(error)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(NeuronCorrelation)) == 0


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1024") == 1024 and parse_bytes("1.5 kib") == 1536
