"""The read model of the prediction-ensembling study (`atlas study ensembling`): runs and their probes."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine

from atlas.read.queries import _frame, _where


def probe_runs(engine: Engine, model: str | None = None, feature: str | None = None) -> pd.DataFrame:
    """One row per (model, dataset, feature) run: split sizes, seed and the model's own test accuracy, with the
    best individual probe and the top-k probe on every neuron."""
    clause, params, expanding = _where(model=("m.name", model), feature=("r.feature", feature))
    return _frame(engine, f"""
        SELECT r.id AS run_id, m.name AS model, m.family, m.seed, d.name AS dataset, r.feature, r.n_train, r.n_test,
               r.split_seed, r.min_context, r.model_accuracy,
               (SELECT MAX(p.accuracy) FROM probe_results p WHERE p.run_id = r.id AND p.kind = 'individual')
                   AS best_individual,
               (SELECT p.accuracy FROM probe_results p WHERE p.run_id = r.id AND p.kind = 'topk'
                ORDER BY p.rank DESC LIMIT 1) AS topk_all,
               (SELECT COUNT(*) FROM probe_results p WHERE p.run_id = r.id AND p.kind = 'individual') AS n_neurons
        FROM probe_runs r JOIN models m ON m.id = r.model_id JOIN datasets d ON d.id = r.dataset_id
        {clause} ORDER BY m.family, m.seed, m.name, d.name, r.feature""", expanding, **params)


def probe_results(engine: Engine, run_id: int) -> pd.DataFrame:
    """The probes of one run: kind 'individual' (rank by |score|) and 'topk' (k = rank + 1), test and train
    accuracy, and the neuron (for top-k: the k-th one added)."""
    return _frame(engine, """
        SELECT kind, rank, layer, neuron, vocab_class, score, accuracy, train_accuracy
        FROM probe_results WHERE run_id = :run_id ORDER BY kind, rank""", run_id=int(run_id))
