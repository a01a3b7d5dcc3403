"""The activations job against activations captured independently with plain torch hooks, on SQLite and
PostgreSQL: exact moments (scipy, float64), top-k (brute-force sort), contexts, determinism, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from atlas.data import TokenizedDataset
from atlas.errors import AtlasError
from ingest.datasets import tokenize
from atlas.registry import register_dataset, register_model
from atlas.store.schema import ActivationStat, Dataset, Job, Model, TopExample
from ingest import activations as job
from ingest.activations import ActivationsConfig, run
from tests.tiny import build_tiny_model, build_tokenizer, docstring_texts

N_TOKENS, CTX, TOP_K = 3000, 64, 20


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return [text.strip() for text in docstring_texts() if text.strip()]


@pytest.fixture(scope="session")
def docs_file(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    return path


@pytest.fixture
def family(store, tiny_family, docs_file):
    """Two seeds of the tiny GPT-2 as family "tiny", and dataset "docs" (sampled, truncated to CTX)."""
    for seed in (0, 1):
        register_model(store, str(tiny_family[seed]), family="tiny", seed=seed)
    register_dataset(store, "docs", str(docs_file), n_tokens=N_TOKENS, ctx_len=CTX, sample_seed=3)
    with store.session() as session:
        return list(session.scalars(select(Model).order_by(Model.seed)))


def tokens_of(store, model: Model) -> TokenizedDataset:
    with store.session() as session:
        dataset = session.scalars(select(Dataset)).one()
    return tokenize(dataset, AutoTokenizer.from_pretrained(model.source))


def reference_activations(model: Model, tokens: TokenizedDataset, batch_size: int):
    """Plain forward pre-hooks on each block's c_proj (raw GPT-2 module names, not the adapters), on the
    job's batches. Returns activations [n, n_layers * d_mlp] float64 and the key (row * ctx + position)."""
    hf = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.source)
    special = torch.tensor(tokenizer.all_special_ids)
    captured: dict[int, torch.Tensor] = {}
    for layer, block in enumerate(hf.transformer.h):
        block.mlp.c_proj.register_forward_pre_hook(lambda module, args, layer=layer: captured.__setitem__(layer, args[0]))
    chunks, keys = [], []
    for start in range(0, tokens.n_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, tokens.n_rows))
        lengths = torch.from_numpy(tokens.lengths[rows].astype(np.int64))
        ids = torch.from_numpy(np.asarray(tokens.ids[rows, : int(lengths.max())], dtype=np.int64))
        real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=real.long())
        mask = real & ~torch.isin(ids, special)
        chunks.append(torch.cat([captured[layer][mask] for layer in range(len(hf.transformer.h))], dim=1).double())
        row, position = mask.nonzero(as_tuple=True)
        keys.append(torch.from_numpy(rows)[row] * tokens.ctx_len + position)
    return torch.cat(chunks).numpy(), torch.cat(keys).numpy()


def stored_stats(store, model: Model) -> dict[str, np.ndarray]:
    with store.session() as session:
        rows = session.execute(select(ActivationStat).where(ActivationStat.model_id == model.id)
                               .order_by(ActivationStat.layer, ActivationStat.neuron)).scalars().all()
    columns = ("layer", "neuron", "n", "mean", "var", "skew", "kurt", "max", "min", "frac_active")
    return {c: np.array([getattr(r, c) for r in rows], dtype=float) for c in columns}


def stored_examples(store, model: Model) -> list[TopExample]:
    with store.session() as session:
        return session.execute(select(TopExample).where(TopExample.model_id == model.id)
                               .order_by(TopExample.layer, TopExample.neuron, TopExample.rank)).scalars().all()


def table_dump(store) -> list[tuple]:
    with store.session() as session:
        stats_rows = [tuple(getattr(r, c.name) for c in ActivationStat.__table__.columns if c.name != "job_id")
                      for r in session.scalars(select(ActivationStat).order_by(
                          ActivationStat.model_id, ActivationStat.layer, ActivationStat.neuron))]
        example_rows = [tuple(getattr(r, c.name) for c in TopExample.__table__.columns)
                        for r in session.scalars(select(TopExample).order_by(
                            TopExample.model_id, TopExample.layer, TopExample.neuron, TopExample.rank))]
    return stats_rows + example_rows


def config(**overrides) -> ActivationsConfig:
    return ActivationsConfig(**{"family": "tiny", "dataset": "docs", "top_k": TOP_K, **overrides})


# -- statistics and top examples ------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_moments_equal_scipy_on_concatenated_activations(store, family, batch_size):
    run(config(batch_size=batch_size), store)
    tokens = tokens_of(store, family[0])
    for model in family:
        acts, _ = reference_activations(model, tokens, batch_size)
        got = stored_stats(store, model)
        assert len(got["mean"]) == model.n_layers * model.d_mlp  # one row per neuron
        expected = {
            "n": np.full(acts.shape[1], acts.shape[0]), "mean": acts.mean(axis=0), "var": acts.var(axis=0),
            "skew": stats.skew(acts, axis=0), "kurt": stats.kurtosis(acts, axis=0, fisher=False),
            "max": acts.max(axis=0), "min": acts.min(axis=0), "frac_active": (acts > 0).mean(axis=0),
        }
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-300, err_msg=name)
    assert acts.shape[0] == tokens.n_stat_positions  # BOS (the only special token here) left out
    with store.session() as session:
        recorded = session.scalars(select(Job.config).where(Job.kind == "activations")).all()
    assert all(c["exclude_special_tokens"] is True for c in recorded) and len(recorded) == 2


def test_dtype_runs_the_model_in_bfloat16_and_is_recorded(store, family):
    """--dtype bfloat16: the model's weights and forward pass in bfloat16 (statistics still float64): the
    means move by bfloat16's rounding, not more, and the config says so."""
    run(config(batch_size=7, dtype="bfloat16"), store)
    tokens = tokens_of(store, family[0])
    acts, _ = reference_activations(family[0], tokens, 7)
    got = stored_stats(store, family[0])
    scale = np.abs(acts).mean(axis=0) + acts.std(axis=0)
    error = np.abs(got["mean"] - acts.mean(axis=0)) / scale
    assert 1e-6 < error.max() < 5e-2  # bfloat16 really ran (float32 agrees to 1e-7), within its rounding
    with store.session() as session:
        recorded = session.scalars(select(Job.config).where(Job.kind == "activations")).all()
    assert {c.get("dtype") for c in recorded} == {"bfloat16"}


def test_top_examples_equal_brute_force_sort_with_contexts(store, family, documents, tiny_tokenizer_dir):
    batch_size = 7
    run(config(batch_size=batch_size), store)
    tokens = tokens_of(store, family[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    for model in family:
        acts, keys = reference_activations(model, tokens, batch_size)
        examples = stored_examples(store, model)
        assert len(examples) == model.n_layers * model.d_mlp * TOP_K
        by_neuron = {}
        for example in examples:
            by_neuron.setdefault(example.layer * model.d_mlp + example.neuron, []).append(example)
        for feature, stored in by_neuron.items():
            order = np.lexsort((keys, -acts[:, feature]))[:TOP_K]  # value descending, ties: earlier position
            assert [e.rank for e in stored] == list(range(TOP_K))
            rows = [int(np.flatnonzero(tokens.doc_indices == e.doc_index)[0]) for e in stored]
            assert [r * CTX + e.position for r, e in zip(rows, stored)] == keys[order].tolist()
            assert [e.activation for e in stored] == acts[order, feature].tolist()
        for example in examples[:: 37]:
            check_context(example, tokens, tokenizer, documents, acts, keys, model.d_mlp)


def check_context(example, tokens, tokenizer, documents, acts, keys, d_mlp):
    row = int(np.flatnonzero(tokens.doc_indices == example.doc_index)[0])
    ids = tokens.row(row)
    first = max(0, example.position - 24)
    assert example.context_token_ids == ids[first: example.position + 5].tolist()
    assert example.highlight_index == example.position - first
    assert example.context_token_ids[example.highlight_index] == ids[example.position]
    assert example.context_tokens == [tokenizer.decode([i]) for i in example.context_token_ids]
    text = tokenizer.decode(example.context_token_ids, skip_special_tokens=True)
    assert text.strip() and text.strip() in documents[example.doc_index]  # the text around the firing token
    assert example.context_activations[example.highlight_index] == example.activation
    feature = example.layer * d_mlp + example.neuron
    for offset, value in enumerate(example.context_activations):
        position_key = row * CTX + first + offset
        if position_key in set(keys.tolist()):  # non-special positions: the reference has them
            assert value == acts[np.flatnonzero(keys == position_key)[0], feature]


def test_two_runs_are_identical(store, family):
    run(config(batch_size=5), store)
    first = table_dump(store)
    run(config(batch_size=5, overwrite=True), store)
    assert table_dump(store) == first
    with store.session() as session:
        statuses = sorted(session.scalars(select(Job.status).where(Job.kind == "activations")))
    assert statuses == ["done", "done", "replaced", "replaced"]


def test_done_models_are_skipped(store, family, monkeypatch):
    run(config(model=family[0].name, family=None, batch_size=16), store)
    seen: list[list[int]] = []
    real_compute = job.compute
    monkeypatch.setattr(job, "compute", lambda models, *a: seen.append([m.id for m in models]) or real_compute(models, *a))
    run(config(batch_size=16), store)
    assert seen == [[family[1].id]]  # the pass ran for the model that was not done only


def test_interrupted_run_resumes_to_the_uninterrupted_result(store, family, monkeypatch, isolated_cache):
    run(config(batch_size=4, checkpoint_every=1), store)
    uninterrupted = table_dump(store)
    n_batches = -(-tokens_of(store, family[0]).n_rows // 4)
    real_consume = job.ActivationStatsConsumer.consume
    calls = {"n": 0}

    def crash_after_three(self, step):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated kill")
        real_consume(self, step)

    monkeypatch.setattr(job.ActivationStatsConsumer, "consume", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(config(batch_size=4, checkpoint_every=1, overwrite=True), store)
    assert len(list((isolated_cache / "checkpoints").glob("*.npz"))) == 1
    assert table_dump(store) == uninterrupted  # nothing half-written

    def counting(self, step):
        calls["resumed"] = calls.get("resumed", 0) + 1
        real_consume(self, step)

    monkeypatch.setattr(job.ActivationStatsConsumer, "consume", counting)
    run(config(batch_size=4, checkpoint_every=1, overwrite=True), store)
    assert calls["resumed"] == n_batches - 3  # resumed after the third batch
    assert table_dump(store) == uninterrupted
    assert not list((isolated_cache / "checkpoints").glob("*.npz"))  # deleted once the results are written


# -- bad input: one-line errors, nothing written ---------------------------------------------------

def nothing_written(store) -> bool:
    with store.session() as session:
        return all(session.scalar(select(func.count()).select_from(t)) == 0 for t in (ActivationStat, TopExample, Job))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_bad_dataset_sources(store, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AtlasError) as error:
        register_dataset(store, "empty", str(empty))
    assert "no documents" in one_line(error)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"body": "some text"}) + "\n")
    with pytest.raises(AtlasError) as error:
        register_dataset(store, "nofield", str(records), text_field="text")
    assert "no text field 'text'" in one_line(error)
    with pytest.raises(AtlasError) as error:
        register_dataset(store, "missing", str(tmp_path / "nope.txt"))
    assert "no such file" in one_line(error)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0


def test_dataset_registration_is_idempotent_and_conflicts_are_errors(store, docs_file):
    first, created = register_dataset(store, "docs", str(docs_file), n_tokens=100, ctx_len=32)
    again, created_again = register_dataset(store, "docs", str(docs_file), n_tokens=100, ctx_len=32)
    assert created and not created_again and again.id == first.id
    with pytest.raises(AtlasError) as error:
        register_dataset(store, "docs", str(docs_file), n_tokens=200, ctx_len=32)
    assert "n_tokens 100" in one_line(error)


def test_bad_job_inputs(store, family, tmp_path, tiny_family):
    with pytest.raises(AtlasError) as error:
        run(config(family=None, model="not-a-model"), store)
    assert "not registered" in one_line(error)
    with pytest.raises(AtlasError) as error:
        run(config(dataset="not-a-dataset"), store)
    assert "not registered" in one_line(error)
    with pytest.raises(AtlasError) as error:
        run(config(tokens=N_TOKENS * 10), store)
    assert "exceeds" in one_line(error)
    other_tokenizer = build_tokenizer(tmp_path / "tok300", vocab_size=300)
    odd = build_tiny_model("gpt2", tmp_path / "odd-tokenizer", seed=5, tokenizer_dir=tmp_path / "tok300")
    assert len(other_tokenizer) == 300
    odd_model, _ = register_model(store, str(odd), family="odd", seed=5)  # registration refuses it in "tiny"
    with store.transaction() as session:  # as a row from before registration checked tokenizers
        session.get(Model, odd_model.id).family = "tiny"
    with pytest.raises(AtlasError) as error:
        run(config(), store)
    assert "different tokenizers" in one_line(error)
    assert nothing_written(store)


def test_cli_dataset_add_and_list(db_url, docs_file):
    from atlas.cli import app

    runner = CliRunner()
    added = runner.invoke(app, ["dataset", "add", "docs", "--source", str(docs_file), "--tokens", "500",
                                "--ctx", "32", "--db", db_url])
    assert added.exit_code == 0, added.output
    assert "registered dataset docs" in added.output
    again = runner.invoke(app, ["dataset", "add", "docs", "--source", str(docs_file), "--tokens", "500",
                                "--ctx", "32", "--db", db_url])
    assert "already registered" in again.output
    conflict = runner.invoke(app, ["dataset", "add", "docs", "--source", str(docs_file), "--db", db_url])
    assert isinstance(conflict.exception, AtlasError)
    listed = runner.invoke(app, ["dataset", "list", "--db", db_url])
    assert "docs" in listed.output and "500" in listed.output
