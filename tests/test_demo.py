"""The train-seeds job (reuse, determinism, refusals), its CLI, and a miniature demo end to end.

Text: standard-library docstrings (builtin:docstrings' first documents) written to a .jsonl, so the
tests read a small file instead of collecting the 16 MB default corpus.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from atlas.cli import app, parse_seeds
from atlas.devices import resolve_device
from atlas.data.docstrings import collect_docstrings
from atlas.errors import AtlasError
from atlas.registry import register_dataset
from atlas.store import Store
from atlas.store.schema import Base, Dataset, Model, TrainingCurve, TrainingRun
from atlas.training import TrainConfig
from ingest.demo import DemoConfig, analysis_jobs, summary_rows
from ingest.demo import run as run_demo
from ingest.train_seeds import TrainSeedsConfig, heldout_path, seed_dir
from ingest.train_seeds import run as train_seeds

MINI_TRAIN = TrainConfig(layers=2, d_model=32, d_mlp=64, n_heads=2, ctx=32, steps=20, batch_size=8,
                         warmup_steps=4, eval_every=10, heldout_tokens=512, max_seconds=None)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo-text") / "docstrings.jsonl"
    documents = collect_docstrings(max_bytes=250_000, use_cache=False).documents
    path.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    return path


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


def seeds_config(tmp_path: Path, seeds: tuple[int, ...] = (0, 1)) -> TrainSeedsConfig:
    return TrainSeedsConfig(family="mini", dataset="text", seeds=seeds, train=MINI_TRAIN, vocab_size=400,
                            out=str(tmp_path / "models"))


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_train_seeds_registers_stores_and_reuses(store, text_file, tmp_path):
    register_dataset(store, "text", str(text_file), ctx_len=32)
    config = seeds_config(tmp_path)
    first = train_seeds(config, store)
    assert [(o.seed, o.model_name, o.reused) for o in first] == [(0, "mini-seed0", False), (1, "mini-seed1", False)]
    assert heldout_path(config).stat().st_size > 0

    with store.session() as session:
        models = session.scalars(select(Model).order_by(Model.seed)).all()
        runs = session.scalars(select(TrainingRun).order_by(TrainingRun.seed)).all()
        curve_steps = session.scalars(select(TrainingCurve.step).where(TrainingCurve.run_id == runs[0].id)
                                      .order_by(TrainingCurve.step)).all()
    assert [(m.family, m.seed, m.d_mlp, m.n_layers) for m in models] == [("mini", 0, 64, 2), ("mini", 1, 64, 2)]
    assert [r.model_id for r in runs] == [m.id for m in models]
    assert runs[0].steps == 20 and runs[0].tokens_seen == 20 * 8 * 32 and curve_steps == [10, 20]
    assert runs[0].unigram_entropy == runs[1].unigram_entropy > 0  # one bar for the family
    assert runs[0].heldout_loss == pytest.approx(first[0].heldout_loss)
    assert runs[0].config["device"] == str(resolve_device("auto"))  # the resolved device, never "auto"

    seed0, seed1 = weights(seed_dir(config, 0)), weights(seed_dir(config, 1))
    assert any(not torch.equal(seed0[name], seed1[name]) for name in seed0)  # seeds differ

    again = train_seeds(config, store)
    assert [o.reused for o in again] == [True, True]
    assert [o.heldout_loss for o in again] == [r.heldout_loss for r in runs]

    shutil.rmtree(seed_dir(config, 1))  # a lost directory is trained again, to the same weights
    third = train_seeds(replace(config, seeds=(0, 1, 2)), store)
    assert [o.reused for o in third] == [True, False, False]
    retrained = weights(seed_dir(config, 1))
    assert all(torch.equal(retrained[name], seed1[name]) for name in seed1)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(TrainingRun)) == 3
        assert session.scalar(select(func.count()).select_from(Model)) == 3


def test_train_seeds_refuses_to_mix_settings_into_a_family(store, text_file, tmp_path):
    register_dataset(store, "text", str(text_file), ctx_len=32)
    config = seeds_config(tmp_path, seeds=(0,))
    train_seeds(config, store)
    with pytest.raises(AtlasError, match=r"train.steps 20 now 21.*another --family"):
        train_seeds(replace(config, train=replace(MINI_TRAIN, steps=21)), store)
    with pytest.raises(AtlasError, match=r"vocab_size 400 \(not 512\).*another --family"):
        train_seeds(replace(config, seeds=(1,), vocab_size=512), store)
    with pytest.raises(AtlasError, match="seeds repeat"):
        train_seeds(replace(config, seeds=(1, 1)), store)
    with pytest.raises(AtlasError, match="not registered"):
        train_seeds(replace(config, dataset="nope"), store)


def test_the_device_is_recorded_but_no_setting_of_the_family(store, text_file, tmp_path):
    """A seed stored from another device, or from before the device was recorded, is reused as it is."""
    register_dataset(store, "text", str(text_file), ctx_len=32)
    config = replace(seeds_config(tmp_path, seeds=(0,)), device="cpu")
    train_seeds(config, store)
    with store.session() as session:
        stored = session.scalars(select(TrainingRun)).one()
        assert stored.config["device"] == "cpu"
        assert json.loads((seed_dir(config, 0) / "training.json").read_text())["result"]["device"] == "cpu"
    for recorded in ({**stored.config, "device": "cuda:1"}, {k: v for k, v in stored.config.items() if k != "device"}):
        with store.transaction() as session:
            session.get(TrainingRun, stored.id).config = recorded
        assert [o.reused for o in train_seeds(replace(config, device="auto"), store)] == [True]


def test_a_device_this_machine_lacks_fails_before_any_work(store, tmp_path):
    for name in ("gpu0", "cuda:99"):
        with pytest.raises(AtlasError, match=f"^--device '?{name}") as error:
            train_seeds(replace(seeds_config(tmp_path), device=name), store)  # the dataset is not even registered
        assert "\n" not in str(error.value)
        with pytest.raises(AtlasError, match=f"^--device '?{name}"):
            run_demo(replace(MINI_DEMO, device=name, out=str(tmp_path / "models")), store,
                     console=Console(file=io.StringIO()))
    assert not (tmp_path / "models").exists()
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0


def test_the_demo_hands_its_device_to_every_job_that_takes_one():
    jobs = analysis_jobs(replace(MINI_DEMO, device="cpu"))
    assert {name: getattr(job, "device", None) for name, (job, _) in jobs.items()} == {
        name: None if name == "weights" else "cpu" for name in jobs}
    assert all(job.device == "auto" for name, (job, _) in analysis_jobs(MINI_DEMO).items() if name != "weights")


def test_seeds_option_takes_a_list_or_a_comma_list():
    assert parse_seeds("0", ["1", "2"]) == (0, 1, 2)
    assert parse_seeds("0,1, 2", []) == (0, 1, 2)
    with pytest.raises(AtlasError, match="--seeds takes integers"):
        parse_seeds("0", ["--layer", "3"])  # a misspelt option ends up among the extra arguments


def test_train_seeds_command(tmp_path, text_file):
    db = f"sqlite:///{tmp_path / 'atlas.db'}"
    runner = CliRunner()
    added = runner.invoke(app, ["dataset", "add", "text", "--source", str(text_file), "--ctx", "32", "--db", db])
    assert added.exit_code == 0, added.output
    options = ["--family", "cli", "--dataset", "text", "--layers", "1", "--d-model", "32", "--d-mlp", "32",
               "--heads", "2", "--ctx", "32", "--steps", "4", "--batch-size", "4", "--vocab-size", "300",
               "--max-seconds", "0", "--out", str(tmp_path / "models"), "--db", db]
    first = runner.invoke(app, ["train-seeds", "--seeds", "0", "1", *options])
    assert first.exit_code == 0, first.output
    assert "trained cli-seed0" in first.output and "trained cli-seed1" in first.output
    assert "unigram entropy" in first.output
    second = runner.invoke(app, ["train-seeds", "--seeds", "0,1", *options])
    assert second.exit_code == 0 and second.output.count("reused cli-seed") == 2, second.output

    # --device cpu trains exactly what the default trains here (auto is the CPU on a machine without a GPU).
    # Another database: registration would refuse a second model with the same weights.
    cpu_db = f"sqlite:///{tmp_path / 'cpu.db'}"
    on_cpu = [{db: cpu_db, str(tmp_path / "models"): str(tmp_path / "models-cpu")}.get(word, word)
              for word in options]
    assert runner.invoke(app, ["dataset", "add", "text", "--source", str(text_file), "--ctx", "32",
                               "--db", cpu_db]).exit_code == 0
    third = runner.invoke(app, ["train-seeds", "--seeds", "0", *on_cpu, "--device", "cpu"])
    assert third.exit_code == 0 and "trained cli-seed0" in third.output, third.output
    if resolve_device("auto").type == "cpu":
        assert ((tmp_path / "models-cpu" / "cli" / "seed-0" / "model.safetensors").read_bytes()
                == (tmp_path / "models" / "cli" / "seed-0" / "model.safetensors").read_bytes())

    bad = runner.invoke(app, ["train-seeds", "--seeds", "0", *options, "--device", "gpu0"])
    assert isinstance(bad.exception, AtlasError) and str(bad.exception).startswith("--device 'gpu0'")
    bad_demo = runner.invoke(app, ["demo", "--db", db, "--out", str(tmp_path / "demo"), "--device", "cuda:99"])
    assert isinstance(bad_demo.exception, AtlasError) and str(bad_demo.exception).startswith("--device cuda:99")


MINI_DEMO = DemoConfig(family="mini", dataset="text", train=MINI_TRAIN, vocab_size=400,
                       analysis_tokens=1500, layer_tokens=1000, probe_feature="leading_space")


@pytest.mark.slow
def test_miniature_demo_fills_every_table_and_summarises_from_the_database(db_url, text_file, tmp_path):
    """About 30 s on 2 idle cores per database (training 3 seeds, then every ingest job)."""
    config = replace(MINI_DEMO, source=str(text_file), out=str(tmp_path / "models"))
    store = Store(db_url)
    printed = io.StringIO()
    run_demo(config, store, console=Console(file=printed, width=250))
    output = " ".join(printed.getvalue().split())  # rich wraps long lines

    with store.engine.connect() as connection:
        counts = {table.name: connection.scalar(select(func.count()).select_from(table))
                  for table in Base.metadata.sorted_tables}
        jobs = connection.execute(text("SELECT kind, status FROM jobs")).all()
        deletion_kl = dict(connection.execute(text(
            "SELECT m.name, MAX(i.kl) FROM layer_interventions i JOIN models m ON m.id = i.model_id "
            "WHERE i.kind = 'delete' GROUP BY m.name")).all())
        losses = dict(connection.execute(text(
            "SELECT m.name, r.heldout_loss FROM training_runs r JOIN models m ON m.id = r.model_id")).all())
        classed = connection.scalar(text(
            "SELECT COUNT(*) FROM neurons n JOIN models m ON m.id = n.model_id WHERE m.family = :family "
            "AND n.vocab_class IN ('prediction', 'suppression')"), {"family": config.family})
    # Token-set rows exist for every prediction / suppression neuron of the family, and only for them.
    assert counts.pop("neuron_token_sets") == classed
    assert all(n > 0 for n in counts.values()), counts
    assert {kind for kind, _ in jobs} == {"weights", "activations", "correlations", "interventions", "lens", "labels",
                                          "entropy", "attention-roles", "heads", "ensembling"}
    assert {status for _, status in jobs} == {"done"}

    rows = summary_rows(store, config)
    assert [row["model"] for row in rows] == ["mini-seed0", "mini-seed1", "mini-seed2", "mini-untrained"]
    null = rows.pop()
    assert null["n_prediction"] == null["n_suppression"] == 0 and null.get("heldout_loss") is None
    for row in rows:
        assert row["heldout_loss"] == pytest.approx(losses[row["model"]])
        assert row["max_delete_kl"] == pytest.approx(deletion_kl[row["model"]])
        assert row["n_neurons"] == 2 * 64 and row["threshold"] == 0.5
        assert 0 <= row["n_universal"] <= row["n_above_low"] <= row["n_neurons"]
        assert row["mean_max_corr"] is not None and row["mean_baseline_corr"] is not None
    assert "mini-seed2" in output and f"atlas app --db {store.display_url}" in output
    assert "excess > 0.3" in output and "NOT the paper's definition" in output
    assert "mini-untrained (null reference)" in output and "DEMO-NOTES" not in output
    assert f"functional roles of {config.family}" in output and "most deactivating pair" in output

    run_demo(config, store, console=Console(file=io.StringIO(), width=250))  # a rerun reuses everything
    with store.engine.connect() as connection:
        assert connection.scalar(text("SELECT COUNT(*) FROM jobs")) == len(jobs)
        assert connection.scalar(text("SELECT COUNT(*) FROM training_runs")) == 3
    store.dispose()
