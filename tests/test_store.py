"""Migrations, the unmigrated-database error, bulk writes and the jobs ledger, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pytest
from sqlalchemy import func, inspect, select, text

from atlas.errors import AtlasError
from atlas.store import Store, bulk_insert
from atlas.store.db import head_revision
from atlas.store.schema import Base, Job, Model, NeuronCorrelation, NeuronVocab, TopExample
from atlas.store.views import VIEWS
from ingest.options import TARGET, Overwrite
from ingest.runner import JobKey, replace_rows, run_unit


def test_migrations_upgrade_downgrade_upgrade(empty_db_url):
    store = Store(empty_db_url, check=False)
    store.upgrade()
    assert store.current_revision() == head_revision()
    names = set(inspect(store.engine).get_table_names())
    assert set(Base.metadata.tables) <= names
    assert set(VIEWS) <= set(inspect(store.engine).get_view_names())
    store.downgrade("base")
    assert store.current_revision() is None
    assert not set(Base.metadata.tables) & set(inspect(store.engine).get_table_names())
    store.upgrade()
    assert set(Base.metadata.tables) <= set(inspect(store.engine).get_table_names())
    store.dispose()


def test_unmigrated_database(empty_db_url):
    if empty_db_url.startswith("sqlite"):
        store = Store(empty_db_url)  # the embedded default upgrades itself on first use
        assert store.current_revision() == head_revision()
    else:
        with pytest.raises(AtlasError, match="atlas db upgrade"):
            Store(empty_db_url)


def test_unreachable_database():
    with pytest.raises(AtlasError, match="cannot connect"):
        Store("postgresql://nobody@127.0.0.1:1/none")


def _add_model(store: Store, name: str = "m", seed: int = 0) -> int:
    with store.transaction() as session:
        model = Model(name=name, family="f", seed=seed, source="/x", architecture="gpt2", n_layers=2, d_model=4,
                      d_mlp=8, vocab_size=10, tokenizer_hash="h")
        session.add(model)
        session.flush()
        return model.id


def test_bulk_insert_nan_as_null_and_json(store):
    model_id = _add_model(store)
    with store.transaction() as session:
        session.execute(text("INSERT INTO datasets (name, source, split, text_field, n_tokens, ctx_len, sample_seed, "
                             "content_hash, created_at) VALUES ('d', 's', 'train', 'text', 1, 1, 0, 'h', '2026-01-01')"))
        dataset_id = session.scalar(text("SELECT id FROM datasets"))
        n = bulk_insert(session, TopExample, {
            "model_id": model_id, "dataset_id": dataset_id, "layer": np.array([0, 0]), "neuron": np.array([1, 1]),
            "rank": np.arange(2), "doc_index": np.array([5, 6]), "position": np.array([3, 4]),
            "activation": np.array([2.5, 1.0]), "context_token_ids": [[1, 2, 3], [4]],
            "context_tokens": [["a", "b'\"\t\\", "c"], ["é"]], "highlight_index": np.array([1, 0]),
            "context_activations": [[0.5, 2.5, 0.0], None],
        })
        bulk_insert(session, NeuronCorrelation, {
            "model_id": model_id, "other_model_id": model_id, "dataset_id": dataset_id, "layer": 0,
            "neuron": np.arange(2), "max_corr": np.array([0.5, np.nan]), "partner_layer": np.array([1, -1]),
            "partner_neuron": 3, "baseline_max_corr": np.array([np.nan, 0.25]), "universal_threshold": 0.5})
        bulk_insert(session, NeuronVocab, {"model_id": model_id, "layer": 0, "neuron": 0, "direction": "top",
                                           "rank": np.arange(2), "token_id": np.arange(2), "token": ["\x00", "ok"],
                                           "value": 1.0})
    assert n == 2
    with store.session() as session:
        rows = session.scalars(select(TopExample).order_by(TopExample.rank)).all()
        corr = session.execute(select(NeuronCorrelation.max_corr, NeuronCorrelation.baseline_max_corr)
                               .order_by(NeuronCorrelation.neuron)).all()
        tokens = session.scalars(select(NeuronVocab.token).order_by(NeuronVocab.rank)).all()
    assert [tuple(r) for r in corr] == [(0.5, None), (None, 0.25)]  # NaN is stored as NULL
    assert tokens == ["\\x00", "ok"]  # PostgreSQL text cannot hold NUL: a visible escape on every backend
    assert rows[0].context_token_ids == [1, 2, 3] and rows[0].context_tokens == ["a", "b'\"\t\\", "c"]
    assert rows[1].context_tokens == ["é"] and rows[1].context_activations is None


@dataclass
class ToyConfig:
    model: Annotated[str | None, TARGET] = None
    overwrite: Overwrite = False
    scale: float = 1.0  # a science option


def _toy_rows(store, model_id):
    with store.session() as session:
        return session.execute(select(NeuronVocab.rank, NeuronVocab.value).where(NeuronVocab.model_id == model_id)
                               .order_by(NeuronVocab.rank)).all()


def test_ledger_skip_overwrite_and_failure(store, monkeypatch):
    model_id = _add_model(store)

    def write_vocab(session, values, job_id, model_id=model_id):
        return replace_rows(session, NeuronVocab, {"model_id": model_id}, {
            "layer": 0, "neuron": 0, "direction": "top", "rank": np.arange(len(values)), "token_id": 1,
            "token": "t", "value": values})

    def run(config, fail=False):
        def write(session, values, job_id):
            n = write_vocab(session, values, job_id)
            if fail:
                raise RuntimeError("disk full")
            return n
        return run_unit(store, JobKey("toy", model_id=model_id), config,
                               lambda: np.arange(4) * config.scale, write, overwrite=config.overwrite)

    assert run(ToyConfig()) == "done"
    assert run(ToyConfig()) == "skipped"
    assert run(ToyConfig(model="other-target-name")) == "skipped"  # targets are not part of the config
    assert run(ToyConfig(overwrite=True)) == "done"
    assert [r.value for r in _toy_rows(store, model_id)] == [0, 1, 2, 3]  # replaced, no duplicates
    with pytest.raises(RuntimeError):
        run(ToyConfig(scale=2.0), fail=True)
    assert [r.value for r in _toy_rows(store, model_id)] == [0, 1, 2, 3]  # the failed write left nothing
    with store.session() as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert [j.status for j in jobs] == ["replaced", "done", "failed"]
        assert jobs[-1].error == "RuntimeError: disk full" and jobs[-1].finished_at is not None
        assert jobs[1].config == {"scale": 1.0} and jobs[1].n_rows == 4
    assert run(ToyConfig(scale=2.0)) == "done"  # a new config recomputes and replaces
    assert [r.value for r in _toy_rows(store, model_id)] == [0, 2, 4, 6]
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.status == "done")) == 1
    assert not math.isnan(sum(r.value for r in _toy_rows(store, model_id)))


def test_migrations_match_the_models_and_views(tmp_path):
    """A schema or view change without a migration is caught here."""
    import importlib.util

    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from atlas.store.db import MIGRATIONS_DIR

    store = Store(f"sqlite:///{tmp_path / 'head.db'}")
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"the models differ from the migrations: {diff}"
    # The newest migration that freezes the views must hold the views as they are now.
    spec = importlib.util.spec_from_file_location("m0007", MIGRATIONS_DIR / "versions" / "0007_stages_case_studies.py")
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert migration.VIEWS == VIEWS
