"""Universality over training: train-seeds saves checkpoints as models with a step, the correlations
job pairs seeds at the same step only, and the universality_by_step view summarises each step."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from atlas.cli import app
from atlas.errors import AtlasError
from atlas.registry import register_dataset, register_model, step_of_revision
from atlas.store.schema import Model
from ingest.correlations import CorrelationsConfig
from ingest.correlations import run as run_correlations
from ingest.train_seeds import TrainSeedsConfig, checkpoint_steps, heldout_path
from ingest.train_seeds import run as train_seeds
from ingest.weights import WeightsConfig
from ingest.weights import run as run_weights
from tests.test_demo import MINI_TRAIN, private_cache, text_file  # noqa: F401 (fixtures)
from tests.test_readme import readme_queries

STEPS = 12
CHECKPOINTS = (4, 8)


def test_checkpoint_fractions_become_steps():
    assert checkpoint_steps("0.1,0.25,0.5", 6000) == (600, 1500, 3000)
    assert checkpoint_steps("0.01 0.5", 10) == (1, 5)
    for bad in ("0", "1.0", "half", "0.5,2"):
        with pytest.raises(AtlasError, match="--checkpoints"):
            checkpoint_steps(bad, 100)
    assert step_of_revision("step1000") == 1000 and step_of_revision("main") is None
    assert step_of_revision(None) is None


@pytest.mark.slow
def test_seeds_at_each_step_are_compared_and_summarised(store, text_file, tmp_path):
    """About 20 s: two tiny seeds with checkpoints at steps 4 and 8 of 12, weights and correlations."""
    register_dataset(store, "text", str(text_file), ctx_len=MINI_TRAIN.ctx)
    config = TrainSeedsConfig(family="steps", dataset="text", seeds=(0, 1), vocab_size=400,
                              train=replace(MINI_TRAIN, steps=STEPS, checkpoints=CHECKPOINTS),
                              out=str(tmp_path / "models"))
    train_seeds(config, store)
    with store.session() as session:
        models = session.scalars(select(Model).where(Model.family == "steps")).all()
    assert sorted((m.seed, m.step) for m in models) == [(s, t) for s in (0, 1) for t in (*CHECKPOINTS, STEPS)]
    assert {m.name for m in models} >= {"steps-seed0-step4", "steps-seed1-step8", "steps-seed0"}
    assert len({m.weights_hash for m in models}) == len(models)  # every checkpoint is its own weights

    train_seeds(config, store)  # a rerun reuses the seeds and their checkpoints
    register_dataset(store, "heldout", str(heldout_path(config)), n_tokens=1500, ctx_len=MINI_TRAIN.ctx)
    run_weights(WeightsConfig(family="steps"), store)
    run_correlations(CorrelationsConfig(family="steps", dataset="heldout"), store)

    with store.engine.connect() as connection:
        steps_of_pairs = connection.execute(text("""
            SELECT DISTINCT m.step, o.step FROM neuron_correlations c
            JOIN models m ON m.id = c.model_id JOIN models o ON o.id = c.other_model_id""")).all()
        by_step = connection.execute(text(
            "SELECT * FROM universality_by_step WHERE family = 'steps' ORDER BY step")).mappings().all()
        expected = connection.execute(text("""
            SELECT u.step, COUNT(*) AS n, AVG(CASE WHEN u.excess_corr > 0.3 THEN 1.0 ELSE 0.0 END) AS f03,
                   AVG(u.excess_corr) AS mean_excess
            FROM universal_neurons u WHERE u.family = 'steps' GROUP BY u.step ORDER BY u.step""")).mappings().all()
        jobs = connection.execute(text("SELECT COUNT(*) FROM jobs WHERE kind = 'correlations'")).scalar()
    assert sorted(steps_of_pairs) == [(t, t) for t in (*CHECKPOINTS, STEPS)]  # never across steps
    assert jobs == 3  # one pair of seeds (both directions) at each of three steps
    neurons_per_step = 2 * MINI_TRAIN.layers * MINI_TRAIN.d_mlp
    assert [row["step"] for row in by_step] == [*CHECKPOINTS, STEPS]
    for row, check in zip(by_step, expected):
        assert row["n_seeds"] == 2 and row["n_neurons"] == check["n"] == neurons_per_step
        assert row["universal_fraction_03"] == pytest.approx(check["f03"])
        assert row["mean_excess_corr"] == pytest.approx(check["mean_excess"])
        assert 0 <= row["universal_fraction_05"] <= row["universal_fraction_03"] <= 1
        assert row["n_prediction"] is not None and row["n_suppression"] is not None
    # The demo prints the same rows (its --preset long has checkpoints).
    import io

    from rich.console import Console

    from ingest.demo import print_by_step

    printed = io.StringIO()
    print_by_step(store, "steps", "heldout", Console(file=printed, width=250))
    lines = printed.getvalue().splitlines()
    assert "universality over training: steps on heldout" in " ".join(lines)
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if "│" in line]
    rows = [row for row in cells if row and row[0] in {str(step) for step in (*CHECKPOINTS, STEPS)}]
    assert len(rows) == len(by_step), printed.getvalue()
    assert [row[0] for row in rows] == [str(step) for step in (*CHECKPOINTS, STEPS)]
    assert rows[0][3] == f"{100 * by_step[0]['universal_fraction_03']:.2f}%"
    readme = readme_queries(checkpoints=True)
    assert readme
    with store.engine.connect() as connection:
        for query in readme:
            assert connection.execute(text(query)).all(), query


def test_model_add_takes_the_step_of_a_revision_or_an_option(store, tiny_family, tmp_path):
    db = store.url
    runner = CliRunner()
    added = runner.invoke(app, ["model", "add", str(tiny_family[0]), "--family", "ckpt", "--seed", "0",
                                "--step", "100", "--db", db])
    assert added.exit_code == 0 and "step 100" in added.output, added.output
    # the same seed at another step is another model of the family; at the same step it is refused
    model, _ = register_model(store, str(tiny_family[1]), family="ckpt", seed=0, step=200, name="ckpt-200")
    assert model.step == 200
    with pytest.raises(AtlasError, match="already has seed 0 at step 200"):
        register_model(store, str(tiny_family[2]), family="ckpt", seed=0, step=200, name="ckpt-200b")


@pytest.mark.slow
def test_compare_page_draws_universality_over_training(db_url, text_file, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from atlas.store import Store
    from tests.test_app import MAIN

    store = Store(db_url)
    register_dataset(store, "text", str(text_file), ctx_len=MINI_TRAIN.ctx)
    config = TrainSeedsConfig(family="steps", dataset="text", seeds=(0, 1), vocab_size=400,
                              train=replace(MINI_TRAIN, steps=8, checkpoints=(4,)), out=str(tmp_path / "models"))
    train_seeds(config, store)
    register_dataset(store, "heldout", str(heldout_path(config)), n_tokens=1000, ctx_len=MINI_TRAIN.ctx)
    run_correlations(CorrelationsConfig(family="steps", dataset="heldout"), store)
    store.dispose()
    monkeypatch.setenv("ATLAS_DATABASE_URL", db_url)
    app = AppTest.from_file(str(MAIN), default_timeout=60).run()
    app.switch_page("app_pages/compare.py").run()
    assert not app.exception, [exception.value for exception in app.exception]
    assert "Universality over training" in [header.value for header in app.subheader]
