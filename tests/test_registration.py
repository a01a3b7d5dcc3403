"""Inputs checked at the door: bad models, datasets and training data are refused in one line with
nothing written; `atlas model remove`; real token counts; checkpoints keyed by the weights' content.

The models are real tiny models saved with save_pretrained, edited on purpose (a NaN weight, the same
weights saved again, another d_mlp, another tokenizer). CLI checks go through atlas.cli.main (exit
code, one stderr line, no traceback), in process; one runs as a real subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select, update
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.cli import main
from atlas.errors import AtlasError
from atlas.registry import register_dataset, register_model
from atlas.store import Store
from atlas.store.schema import Base, DatasetTokens, Model, NeuronCorrelation
from atlas.training import TrainConfig
from ingest import activations
from ingest.activations import ActivationsConfig
from ingest.correlations import CorrelationsConfig
from ingest.correlations import run as run_correlations
from ingest.family_pass import Checkpoint
from ingest.train_seeds import TrainSeedsConfig, family_dir
from ingest.train_seeds import run as train_seeds
from ingest.weights import WeightsConfig
from ingest.weights import run as run_weights
from tests.tiny import build_tiny_model, build_tokenizer, docstring_texts

CTX = 32


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


# -- edited tiny models ---------------------------------------------------------------------------

def _saved(model, tokenizer_from: Path, directory: Path) -> Path:
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def edited(tmp_path_factory, tiny_family, tiny_tokenizer_dir) -> dict[str, Path]:
    """Directories of models a family of tiny_family seeds must refuse, by what is wrong with them."""
    root = tmp_path_factory.mktemp("edited-models")
    seed0 = tiny_family[0]
    nan = AutoModelForCausalLM.from_pretrained(seed0)
    with torch.no_grad():
        nan.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    build_tokenizer(root / "tok300", vocab_size=300)
    return {
        "nan": _saved(nan, seed0, root / "nan-weights"),
        "copy": _saved(AutoModelForCausalLM.from_pretrained(seed0), seed0, root / "seed0-saved-again"),
        "wide": build_tiny_model("gpt2", root / "other-d-mlp", seed=7, tokenizer_dir=tiny_tokenizer_dir, n_inner=64),
        "tokenizer": build_tiny_model("gpt2", root / "other-tokenizer", seed=8, tokenizer_dir=root / "tok300"),
    }


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reg-docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t.strip()}) + "\n" for t in docstring_texts() if t.strip()))
    return path


# -- helpers --------------------------------------------------------------------------------------

def atlas(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`atlas ARGS` through the real entry point, in process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["atlas", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def row_counts(store: Store) -> dict[str, int]:
    with store.session() as session:
        return {table.name: session.scalar(select(func.count()).select_from(table))
                for table in Base.metadata.sorted_tables}


def model_id(store: Store, name: str) -> int:
    with store.session() as session:
        return session.scalars(select(Model.id).where(Model.name == name)).one()


# -- models ---------------------------------------------------------------------------------------

def test_model_add_stores_a_content_hash(store, tiny_family, edited):
    model, _ = register_model(store, str(tiny_family[0]), family="tiny", seed=0)
    assert len(model.weights_hash) == 64
    other, _ = register_model(store, str(tiny_family[1]), family="tiny", seed=1)
    assert other.weights_hash != model.weights_hash


def test_bad_models_are_refused_in_one_line_and_nothing_is_written(db_url, monkeypatch, capsys, tiny_family, edited,
                                                                    tiny_models):
    store = Store(db_url)
    register_model(store, str(tiny_family[0]), family="tiny", seed=0)
    before = row_counts(store)
    refusals = {
        "nan": (["--seed", "1"], "transformer.h.1.mlp.c_fc.weight"),
        "copy": (["--seed", "1"], f"same weights as {tiny_family[0].name}"),
        "wide": (["--seed", "1"], "d_mlp 64 but family 'tiny' has 96"),
        "tokenizer": (["--seed", "1"], "tokenizer_hash"),
    }
    for kind, (options, expected) in refusals.items():
        code, _, err = atlas(monkeypatch, capsys, "model", "add", str(edited[kind]), "--family", "tiny", *options,
                             "--db", db_url)
        assert expected in one_line_error(code, err), kind
    code, _, err = atlas(monkeypatch, capsys, "model", "add", str(tiny_models["neox"]), "--family", "tiny",
                         "--seed", "1", "--db", db_url)
    assert "architecture neox but family 'tiny' has gpt2" in one_line_error(code, err)
    for options in (["--family", "other", "--seed", "0"], ["--family", "tiny", "--seed", "3"]):
        code, _, err = atlas(monkeypatch, capsys, "model", "add", str(tiny_family[0]), *options, "--db", db_url)
        assert "already registered as family 'tiny' seed 0" in one_line_error(code, err)
    assert row_counts(store) == before
    store.dispose()


def test_nan_weights_are_one_line_from_a_real_subprocess(db_url, edited):
    result = subprocess.run([sys.executable, "-m", "atlas.cli", "model", "add", str(edited["nan"]), "--family", "f",
                             "--seed", "0", "--db", db_url], capture_output=True, text=True, timeout=300)
    assert "non-finite" in one_line_error(result.returncode, result.stderr)
    store = Store(db_url)
    assert row_counts(store)["models"] == 0
    store.dispose()


# -- model remove ---------------------------------------------------------------------------------

@pytest.fixture
def filled(store, tiny_family, docs_file):
    """Seeds 0..2 of family "tiny" with weights, activations and correlations (pairs with every seed)."""
    for seed in (0, 1, 2):
        register_model(store, str(tiny_family[seed]), family="tiny", seed=seed)
    register_dataset(store, "docs", str(docs_file), n_tokens=400, ctx_len=CTX)
    run_weights(WeightsConfig(family="tiny"), store)
    activations.run(ActivationsConfig(family="tiny", dataset="docs", top_k=2), store)
    run_correlations(CorrelationsConfig(family="tiny", dataset="docs"), store)
    return store


def rows_about(store: Store, model: int) -> dict[str, int]:
    """Rows naming the model as model_id or other_model_id, per table."""
    counts = {}
    with store.session() as session:
        for table in Base.metadata.sorted_tables:
            columns = [table.c[name] for name in ("model_id", "other_model_id") if name in table.c]
            for column in columns:
                counts[f"{table.name}.{column.name}"] = session.scalar(
                    select(func.count()).select_from(table).where(column == model))
    return counts


def test_model_remove_deletes_everything_about_it_and_nothing_else(filled, db_url, monkeypatch, capsys, tiny_family):
    store = filled
    gone, kept = model_id(store, tiny_family[1].name), model_id(store, tiny_family[0].name)
    about_gone = rows_about(store, gone)
    assert about_gone["neuron_correlations.other_model_id"] > 0 and about_gone["jobs.other_model_id"] > 0
    before, about_kept = row_counts(store), rows_about(store, kept)

    code, out, _ = atlas(monkeypatch, capsys, "model", "remove", tiny_family[1].name, "--yes", "--db", db_url)
    assert code == 0 and f"removed {tiny_family[1].name}" in out
    assert set(rows_about(store, gone).values()) == {0}
    after = row_counts(store)
    assert after["models"] == before["models"] - 1
    assert after["neurons"] == before["neurons"] - about_gone["neurons.model_id"]
    assert after["neuron_correlations"] == before["neuron_correlations"] - (
        about_gone["neuron_correlations.model_id"] + about_gone["neuron_correlations.other_model_id"])
    kept_now = rows_about(store, kept)
    assert kept_now["neurons.model_id"] == about_kept["neurons.model_id"]
    assert kept_now["activation_stats.model_id"] == about_kept["activation_stats.model_id"]
    with store.session() as session:  # seed 0's correlations with seed 2 stay; those with seed 1 went
        partners = set(session.scalars(select(NeuronCorrelation.other_model_id).where(
            NeuronCorrelation.model_id == kept).distinct()))
    assert partners == {model_id(store, tiny_family[2].name)}


def test_model_remove_is_one_transaction(filled, monkeypatch, tiny_family):
    import atlas.registry as registry

    store = filled
    before = row_counts(store)
    real = registry._tables_referencing_models

    def failing_midway():
        yield from real()
        raise RuntimeError("simulated failure after every delete ran")

    monkeypatch.setattr(registry, "_tables_referencing_models", failing_midway)
    with pytest.raises(RuntimeError):
        registry.remove_model(store, tiny_family[1].name)
    assert row_counts(store) == before


def test_model_remove_refusals(db_url, monkeypatch, capsys, tiny_family):
    from typer.testing import CliRunner

    from atlas.cli import app

    code, _, err = atlas(monkeypatch, capsys, "model", "remove", "ghost", "--yes", "--db", db_url)
    assert "'ghost' is not registered" in one_line_error(code, err)
    store = Store(db_url)
    register_model(store, str(tiny_family[0]), family="tiny", seed=0)
    declined = CliRunner().invoke(app, ["model", "remove", tiny_family[0].name, "--db", db_url], input="n\n")
    assert declined.exit_code != 0 and "nothing removed" in declined.output
    assert row_counts(store)["models"] == 1
    store.dispose()


# -- datasets -------------------------------------------------------------------------------------

def test_a_source_shorter_than_one_context_is_refused_at_registration(db_url, monkeypatch, capsys, tmp_path):
    eleven = tmp_path / "eleven.txt"
    eleven.write_text("hello world")
    code, _, err = atlas(monkeypatch, capsys, "dataset", "add", "tiny", "--source", str(eleven), "--tokens", "1000",
                         "--ctx", "64", "--db", db_url)
    assert "at most 12 tokens" in one_line_error(code, err) and "--ctx 64" in err
    store = Store(db_url)
    assert row_counts(store)["datasets"] == 0
    store.dispose()


def test_too_few_real_tokens_are_refused_at_job_time_and_recorded(db_url, monkeypatch, capsys, tmp_path,
                                                                   tiny_family):
    eleven = tmp_path / "eleven.txt"
    eleven.write_text("hello world")
    store = Store(db_url)
    model, _ = register_model(store, str(tiny_family[0]), family="tiny", seed=0)
    register_dataset(store, "eleven", str(eleven), n_tokens=1000, ctx_len=12)  # 11 bytes + BOS might fill 12
    code, _, err = atlas(monkeypatch, capsys, "ingest", "activations", "--model", model.name, "--dataset", "eleven",
                         "--db", db_url)
    message = one_line_error(code, err)
    real = len(AutoTokenizer.from_pretrained(tiny_family[0])("hello world")["input_ids"]) + 1  # + BOS
    assert real < 12 and f"gives only {real} tokens" in message and "fewer than one context of 12" in message
    counts = row_counts(store)
    assert counts["jobs"] == counts["activation_stats"] == counts["top_examples"] == 0
    with store.session() as session:
        recorded = session.scalars(select(DatasetTokens)).one()
    assert (recorded.n_tokens, recorded.n_rows, recorded.source_exhausted) == (real, 1, True)
    assert recorded.tokenizer_hash == model.tokenizer_hash
    code, out, _ = atlas(monkeypatch, capsys, "dataset", "list", "--db", db_url)
    assert f"1,000 requested; {real} with tokenizer {model.tokenizer_hash[:8]}" in out
    store.dispose()


def test_a_job_records_what_a_normal_dataset_really_gives(store, tiny_family, docs_file):
    model, _ = register_model(store, str(tiny_family[0]), family="tiny", seed=0)
    dataset, _ = register_dataset(store, "docs", str(docs_file), n_tokens=400, ctx_len=CTX)
    activations.run(ActivationsConfig(model=model.name, dataset="docs", top_k=2), store)
    from ingest.datasets import tokenize

    tokens = tokenize(dataset, AutoTokenizer.from_pretrained(tiny_family[0]))
    with store.session() as session:
        recorded = session.scalars(select(DatasetTokens)).one()
    assert recorded.dataset_id == dataset.id and recorded.tokenizer_hash == model.tokenizer_hash
    assert (recorded.n_tokens, recorded.n_rows, recorded.n_truncated_tokens, recorded.source_exhausted) == (
        tokens.n_tokens, tokens.n_rows, tokens.n_truncated_tokens, False)
    assert recorded.n_tokens >= 400
    activations.run(ActivationsConfig(model=model.name, dataset="docs", top_k=2), store)  # skipped: upsert, no clash
    assert row_counts(store)["dataset_tokens"] == 1


# -- training -------------------------------------------------------------------------------------

def small_texts(n: int) -> list[str]:
    return [f"the quick brown fox number {i} jumps" for i in range(n)]


def test_train_seeds_refuses_a_dataset_too_small_for_one_batch_before_training(store, tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_texts(400)))
    register_dataset(store, "small", str(path), ctx_len=16)
    train = TrainConfig(layers=1, d_model=16, d_mlp=32, n_heads=2, ctx=64, batch_size=64, steps=5, max_seconds=None)
    config = TrainSeedsConfig(family="small", dataset="small", seeds=(0,), train=train, vocab_size=400,
                              out=str(tmp_path / "models"))
    before = row_counts(store)
    started = time.perf_counter()
    with pytest.raises(AtlasError) as too_few_bytes:  # 14,690 bytes: under 256 x 64 even one token a byte
        train_seeds(replace(config, train=replace(train, batch_size=256)), store)
    assert "at most 14,690 tokens" in str(too_few_bytes.value)
    assert "fewer than one batch of --batch-size 256 x --ctx 64 = 16,384 tokens" in str(too_few_bytes.value)
    with pytest.raises(AtlasError) as too_few_rows:  # bytes enough for 64 x 64; BPE merges leave 51 rows
        train_seeds(config, store)
    message = str(too_few_rows.value)
    assert "\n" not in message and "51 training rows of --ctx 64" in message and "--batch-size 64" in message
    assert time.perf_counter() - started < 60
    assert row_counts(store) == before
    assert not family_dir(config).exists() or not any(family_dir(config).iterdir())  # no tokenizer, no family.json


# -- checkpoints ----------------------------------------------------------------------------------

def test_checkpoint_key_follows_the_weights_content(store, tiny_family, docs_file, tmp_path):
    directory = shutil.copytree(tiny_family[0], tmp_path / "model")
    model, _ = register_model(store, str(directory), family="tiny", seed=0)
    dataset, _ = register_dataset(store, "docs", str(docs_file), n_tokens=400, ctx_len=CTX)
    config = ActivationsConfig(model=model.name, dataset="docs", checkpoint_every=1)
    from ingest.datasets import tokenize

    tokens = tokenize(dataset, AutoTokenizer.from_pretrained(directory))

    def key(weights_hash: str) -> str:
        return Checkpoint(activations._checkpoint_key({model.id: weights_hash}, dataset, tokens, 4, config)).key

    assert key(model.weights_hash) != key("0" * 64)
    assert key(model.weights_hash) == key(model.weights_hash)

    # The files change after registration: the job refuses them instead of resuming or filing stale state.
    shutil.copy(tiny_family[1] / "model.safetensors", directory / "model.safetensors")
    with pytest.raises(AtlasError) as changed:
        activations.run(config, store)
    assert "changed since it was registered" in str(changed.value) and "\n" not in str(changed.value)
    assert row_counts(store)["activation_stats"] == 0

    # A row from before weights hashes: the key falls back to the hash of the weights loaded now.
    from atlas.modeling import load_model, weights_hash
    from atlas.registry import verified_weights_hash

    with store.transaction() as session:
        session.execute(update(Model).where(Model.id == model.id).values(weights_hash=None))
    with store.session() as session:
        old_row = session.get(Model, model.id)
    loaded = load_model(str(directory))
    assert verified_weights_hash(old_row, loaded) == weights_hash(loaded.model) != model.weights_hash
