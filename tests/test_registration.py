"""Inputs checked at the door: bad models, datasets and training data are refused in one line with
nothing written; `atlas model remove`; real token counts; checkpoints keyed by the weights' content.

The models are real tiny models saved with save_pretrained, edited on purpose (a NaN weight, the same
weights saved again, another d_mlp, another tokenizer). CLI checks go through atlas.cli.main (exit
code, one stderr line, no traceback), in process; one runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
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
from atlas.store.schema import Base, Dataset, DatasetTokens, Model, NeuronCorrelation
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
        return Checkpoint(activations._checkpoint_key({model.id: weights_hash}, dataset, tokens, 4, config,
                                                     torch.device("cpu"))).key

    assert key(model.weights_hash) != key("0" * 64)
    assert key(model.weights_hash) == key(model.weights_hash)

    # The files change after registration: the job refuses them instead of resuming or filing stale state.
    shutil.copy(tiny_family[1] / "model.safetensors", directory / "model.safetensors")
    with pytest.raises(AtlasError) as changed:
        activations.run(config, store)
    assert "changed since it was registered" in str(changed.value) and "\n" not in str(changed.value)
    assert row_counts(store)["activation_stats"] == 0

    # A row without a hash (before hashes, or cleared by migration 0004) takes the hash of the files now.
    from atlas.modeling import load_model
    from atlas.provenance import local_weight_files, scan_weights
    from atlas.registry import verified_weights_hash

    with store.transaction() as session:
        session.execute(update(Model).where(Model.id == model.id).values(weights_hash=None))
    with store.session() as session:
        old_row = session.get(Model, model.id)
    now = scan_weights(local_weight_files(directory)).weights_hash
    assert verified_weights_hash(store, old_row, load_model(str(directory))) == now != model.weights_hash
    assert registered_hash(store, model.id) == now


def registered_hash(store: Store, model: int) -> str | None:
    with store.session() as session:
        return session.scalar(select(Model.weights_hash).where(Model.id == model))


# -- weights hashed from the files, revisions ----------------------------------------------------

def flip_last_weight_byte(file: Path) -> None:
    """XOR the low mantissa byte of the last float32 in the file (tensor data ends the file): finite still."""
    data = bytearray(file.read_bytes())
    data[-4] ^= 0x01
    file.write_bytes(bytes(data))


def test_the_weights_hash_is_of_the_file_tensors(tiny_family, tmp_path):
    from safetensors.torch import load_file

    from atlas.provenance import local_weight_files, scan_weights

    def hashed(directory: Path) -> str:
        return scan_weights(local_weight_files(directory)).weights_hash

    first, second = (shutil.copytree(tiny_family[0], tmp_path / name) for name in ("a", "b"))
    assert hashed(first) == hashed(second) == hashed(first)
    as_bin = shutil.copytree(tiny_family[0], tmp_path / "bin")  # the same tensors saved by torch.save
    torch.save(load_file(as_bin / "model.safetensors"), as_bin / "pytorch_model.bin")
    (as_bin / "model.safetensors").unlink()
    assert hashed(as_bin) == hashed(first)
    flip_last_weight_byte(second / "model.safetensors")
    assert hashed(second) != hashed(first)


def test_changed_file_bytes_are_refused_and_a_missing_hash_is_filled(store, tiny_family, tmp_path):
    from atlas.modeling import load_model
    from atlas.registry import verified_weights_hash

    directory = shutil.copytree(tiny_family[0], tmp_path / "model")
    model, _ = register_model(store, str(directory), family="tiny", seed=0)
    loaded = load_model(str(directory))
    assert verified_weights_hash(store, model, loaded) == model.weights_hash
    with store.transaction() as session:  # what migration 0004 does to every row
        session.execute(update(Model).values(weights_hash=None))
    with store.session() as session:
        cleared = session.get(Model, model.id)
    assert verified_weights_hash(store, cleared, loaded) == model.weights_hash
    assert registered_hash(store, model.id) == model.weights_hash
    flip_last_weight_byte(directory / "model.safetensors")
    with pytest.raises(AtlasError, match="changed since it was registered") as changed:
        verified_weights_hash(store, model, load_model(str(directory)))
    assert "\n" not in str(changed.value)


def test_non_finite_weights_in_a_pytorch_bin_are_refused(store, tiny_family, tmp_path):
    from safetensors.torch import load_file

    directory = shutil.copytree(tiny_family[0], tmp_path / "inf-bin")
    tensors = load_file(directory / "model.safetensors")
    tensors["transformer.h.2.mlp.c_proj.weight"][3, 1] = float("inf")
    torch.save(tensors, directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    with pytest.raises(AtlasError, match=r"non-finite weights \(NaN or inf in transformer.h.2.mlp.c_proj.weight\)"):
        register_model(store, str(directory), family="tiny", seed=0)
    assert row_counts(store)["models"] == 0


def test_a_local_model_resolves_to_a_hash_of_its_files(store, tiny_family, tmp_path):
    from atlas.registry import remove_model

    directory = shutil.copytree(tiny_family[0], tmp_path / "model")
    first, _ = register_model(store, str(directory), family="tiny", seed=0)
    assert first.resolved_revision.startswith("sha256:") and len(first.resolved_revision) == 71
    with store.session() as session:
        assert session.get(Model, first.id).resolved_revision == first.resolved_revision
    remove_model(store, first.name)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "atlas_note": "edited"}))
    again, _ = register_model(store, str(directory), family="tiny", seed=0)
    assert again.weights_hash == first.weights_hash
    assert again.resolved_revision.startswith("sha256:") and again.resolved_revision != first.resolved_revision


def test_registration_does_not_build_the_model(store, tiny_family, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("registration called from_pretrained")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    model, _ = register_model(store, str(tiny_family[0]), family="tiny", seed=0)
    shapes = (model.architecture, model.n_layers, model.d_model, model.d_mlp, model.vocab_size)
    assert shapes == ("gpt2", 3, 48, 96, 512)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
REGISTER_FROM_HUB_CACHE = """
import json, sys
from atlas.modeling import load_model
from atlas.registry import register_model, verified_weights_hash
from atlas.store import Store

store = Store(sys.argv[1])
model, _ = register_model(store, "atlas-tests/tiny", family="hub", seed=0)
verified = verified_weights_hash(store, model, load_model("atlas-tests/tiny"))
print(json.dumps({"resolved": model.resolved_revision, "hash": model.weights_hash, "verified": verified}))
"""


def test_a_hub_model_offline_is_read_from_the_hub_cache_at_its_commit(tiny_family, tmp_path):
    """The hub code path (huggingface_hub's cache, HF_HUB_OFFLINE=1), on the tiny model's real files laid out
    as the hub cache stores a snapshot: registered at the commit its ref names, with the files' hash."""
    from atlas.provenance import local_weight_files, scan_weights

    repo = tmp_path / "hub" / "models--atlas-tests--tiny"
    shutil.copytree(tiny_family[0], repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REGISTER_FROM_HUB_CACHE, f"sqlite:///{tmp_path / 'hub.db'}"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    registered = json.loads(result.stdout.strip().splitlines()[-1])
    expected = scan_weights(local_weight_files(tiny_family[0])).weights_hash
    assert registered == {"resolved": HUB_COMMIT, "hash": expected, "verified": expected}


# -- dataset revisions ----------------------------------------------------------------------------

def test_a_local_dataset_resolves_to_its_content_hash(store, docs_file):
    dataset, _ = register_dataset(store, "docs", str(docs_file), n_tokens=400, ctx_len=CTX)
    assert dataset.revision is None and dataset.resolved_revision == f"sha256:{dataset.content_hash}"
    with pytest.raises(AtlasError, match="--revision v1 applies to Hugging Face hub datasets only"):
        register_dataset(store, "docs-v1", str(docs_file), n_tokens=400, ctx_len=CTX, revision="v1")


def test_a_hub_dataset_is_read_at_its_revision_and_resolves_to_its_commit(store, monkeypatch):
    """The datasets library and the hub API stand in for the network; the atlas code around them is real."""
    import datasets
    import huggingface_hub

    import atlas.provenance

    asked = {}

    def load_dataset(name, config, *, split, streaming, revision):
        asked.update(name=name, revision=revision)
        return [{"text": f"document number {i} " * 8} for i in range(20)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline, _ = register_dataset(store, "offline", "atlas-tests/texts", n_tokens=400, ctx_len=CTX, revision="v1")
    assert asked == {"name": "atlas-tests/texts", "revision": "v1"}
    assert (offline.revision, offline.resolved_revision) == ("v1", None)
    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(atlas.provenance, "hub_commit", lambda repo, revision, repo_type: commit)
    online, _ = register_dataset(store, "online", "atlas-tests/texts", n_tokens=400, ctx_len=CTX, revision="v1")
    assert online.resolved_revision == commit and online.content_hash == offline.content_hash
    unpinned, _ = register_dataset(store, "main", "atlas-tests/texts", n_tokens=400, ctx_len=CTX)
    assert unpinned.content_hash != online.content_hash  # the revision is part of the fingerprint
    with store.session() as session:
        stored = session.scalars(select(Dataset).where(Dataset.name == "online")).one()
    assert (stored.revision, stored.resolved_revision) == ("v1", commit)
