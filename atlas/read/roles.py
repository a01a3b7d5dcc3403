"""The read model of the functional roles (labels, entropy neurons, attention deactivation): the SQL the
neuron card, the Families and Layers pages, the Python API and the README share.
"""

from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine

from atlas.read.queries import _frame, _limit, _where
from atlas.store.summaries import DEACTIVATION_Z, ENTROPY_NULL_RATIO, deactivating_where
from atlas.store.views import REL_DEPTH

LABEL_SOURCES = ("vocab", "current_token", "next_token")
# The role thresholds are defined beside the summaries that count them; the pages read them from here.
__all__ = ["DEACTIVATION_Z", "ENTROPY_NULL_RATIO", "LABEL_SOURCES", "neuron_labels", "neuron_token_sets",
           "entropy_curve", "neuron_heads", "label_features", "label_counts_by_seed", "role_counts_by_layer",
           "labels", "entropy_interventions", "head_scores", "roles_summary"]


def neuron_labels(engine: Engine, model: str, layer: int, neuron: int) -> pd.DataFrame:
    """The neuron's top features per source (vocab: its vocabulary effect; current_token / next_token: its
    activation on a dataset), with the variance reduction (score) and the group means."""
    return _frame(engine, """
        SELECT l.source, d.name AS dataset, l.rank, l.feature, l.score, l.mean_with, l.mean_without
        FROM neuron_labels l JOIN models m ON m.id = l.model_id LEFT JOIN datasets d ON d.id = l.dataset_id
        WHERE m.name = :model AND l.layer = :layer AND l.neuron = :neuron
        ORDER BY CASE l.source WHEN 'vocab' THEN 0 WHEN 'current_token' THEN 1 ELSE 2 END, d.name, l.rank""",
        model=model, layer=layer, neuron=neuron)


def neuron_token_sets(engine: Engine, model: str, layer: int, neuron: int) -> pd.DataFrame:
    """Prediction / suppression neurons: mean activation when the next token is in their vocabulary set or not."""
    return _frame(engine, """
        SELECT d.name AS dataset, s.vocab_class, s.set_size, s.n_in_set, s.n_out_set, s.mean_in_set,
               s.mean_out_set, s.ratio
        FROM neuron_token_sets s JOIN models m ON m.id = s.model_id JOIN datasets d ON d.id = s.dataset_id
        WHERE m.name = :model AND s.layer = :layer AND s.neuron = :neuron ORDER BY d.name""",
        model=model, layer=layer, neuron=neuron)


def entropy_curve(engine: Engine, model: str, layer: int, neuron: int) -> pd.DataFrame:
    """The neuron's activation fixed to each value of its grid: entropy, loss and final-norm scale, and their
    change from the untouched model (one row per dataset and value)."""
    return _frame(engine, """
        SELECT d.name AS dataset, e.step, e.value, e.value_kind, e.n_positions, e.entropy, e.loss, e.norm_scale,
               e.d_entropy, e.d_loss, e.d_norm_scale
        FROM entropy_interventions e JOIN models m ON m.id = e.model_id JOIN datasets d ON d.id = e.dataset_id
        WHERE m.name = :model AND e.layer = :layer AND e.neuron = :neuron ORDER BY d.name, e.step""",
        model=model, layer=layer, neuron=neuron)


def neuron_heads(engine: Engine, model: str, layer: int, neuron: int) -> pd.DataFrame:
    """The later heads whose attention to the first position the neuron moves most (by |z|), with the
    path-ablation result where the pair was ablated."""
    return _frame(engine, """
        SELECT d.name AS dataset, s.rank, s.head_layer, s.head, s.score, s.z,
               h.attn_first_orig, h.attn_first_ablated, h.z_norm_orig, h.z_norm_ablated, h.act_attn_corr
        FROM neuron_head_scores s JOIN models m ON m.id = s.model_id JOIN datasets d ON d.id = s.dataset_id
        LEFT JOIN head_deactivation h
             ON h.model_id = s.model_id AND h.dataset_id = s.dataset_id AND h.layer = s.layer
                AND h.neuron = s.neuron AND h.head_layer = s.head_layer AND h.head = s.head
        WHERE m.name = :model AND s.layer = :layer AND s.neuron = :neuron ORDER BY d.name, s.rank""",
        model=model, layer=layer, neuron=neuron)


def label_features(engine: Engine, family: str, source: str) -> pd.DataFrame:
    """Features that label some neuron of the family from `source` (rank 0), most frequent first (from the
    label_counts summary the labels job keeps)."""
    return _frame(engine, """
        SELECT c.feature, SUM(c.n_neurons) AS n_neurons
        FROM label_counts c JOIN models m ON m.id = c.model_id
        WHERE m.family = :family AND c.source = :source
        GROUP BY c.feature ORDER BY n_neurons DESC, c.feature""", family=family, source=source)


def label_counts_by_seed(engine: Engine, family: str, source: str, top: int | None = 15) -> pd.DataFrame:
    """Neurons per rank-0 label and seed for the `top` most frequent labels of the family (one bar per seed;
    every label with top=None)."""
    frame = _frame(engine, """
        SELECT m.seed, c.feature, SUM(c.n_neurons) AS n_neurons
        FROM label_counts c JOIN models m ON m.id = c.model_id
        WHERE m.family = :family AND c.source = :source
        GROUP BY m.seed, c.feature""", family=family, source=source)
    if frame.empty:
        return frame
    totals = frame.groupby("feature")["n_neurons"].sum()
    leading = totals.index if top is None else totals.nlargest(top).index
    return frame[frame["feature"].isin(leading)].sort_values(["feature", "seed"]).reset_index(drop=True)


def role_counts_by_layer(engine: Engine, family_or_model: str) -> pd.DataFrame:
    """Per model and layer: entropy neurons (null_frac >= ENTROPY_NULL_RATIO x the random share; the weights
    job's layer_classes summary) and deactivating neurons (some later head with z <= DEACTIVATION_Z; the
    partial index of such rows), for a family or one model."""
    return _frame(engine, f"""
        WITH chosen AS (
            SELECT m.id, m.name, m.seed, m.n_layers FROM models m WHERE m.family = :name OR m.name = :name
        ), deactivating AS (
            SELECT s.model_id, s.layer, COUNT(DISTINCT s.neuron) AS n_deactivating
            FROM neuron_head_scores s JOIN chosen m ON m.id = s.model_id
            WHERE {deactivating_where("s")}
            GROUP BY s.model_id, s.layer
        )
        SELECT m.name AS model, m.seed, c.layer, {REL_DEPTH.format(layer="c.layer")} AS rel_depth,
               c.n_entropy, COALESCE(x.n_deactivating, 0) AS n_deactivating, c.max_null_frac, c.null_frac_random
        FROM layer_classes c JOIN chosen m ON m.id = c.model_id
        LEFT JOIN deactivating x ON x.model_id = c.model_id AND x.layer = c.layer
        WHERE c.n_entropy IS NOT NULL
        ORDER BY m.seed, c.layer""", name=family_or_model)


def labels(engine: Engine, family: str | None = None, model: str | None = None, source: str | None = None,
           feature: str | None = None, layer: int | None = None, max_rank: int | None = None,
           limit: int | None = None) -> pd.DataFrame:
    """Rows of neuron_labels with the model's name, family and seed (dataset NULL for the vocab source)."""
    where, params, expanding = _where(
        family=("m.family", family), model=("m.name", model), source=("l.source", source),
        feature=("l.feature", feature), layer=("l.layer", layer))
    if max_rank is not None:
        where = f"{where} {'AND' if where else 'WHERE'} l.rank <= :max_rank"
        params["max_rank"] = int(max_rank)
    return _frame(engine, f"""
        SELECT m.family, m.seed, m.name AS model, l.layer, l.neuron, l.source, d.name AS dataset, l.rank,
               l.feature, l.score, l.mean_with, l.mean_without
        FROM neuron_labels l JOIN models m ON m.id = l.model_id LEFT JOIN datasets d ON d.id = l.dataset_id
        {where}
        ORDER BY m.family, m.seed, l.layer, l.neuron, l.source, d.name, l.rank {_limit(limit)}""",
        expanding, **params)


def entropy_interventions(engine: Engine, family: str | None = None, model: str | None = None) -> pd.DataFrame:
    """Rows of entropy_interventions with each neuron's null-space fraction beside them."""
    where, params, expanding = _where(family=("m.family", family), model=("m.name", model))
    return _frame(engine, f"""
        SELECT m.family, m.seed, m.name AS model, d.name AS dataset, e.layer, e.neuron, n.null_frac,
               n.null_frac_random, e.step, e.value, e.value_kind, e.n_positions, e.entropy, e.loss,
               e.norm_scale, e.d_entropy, e.d_loss, e.d_norm_scale
        FROM entropy_interventions e JOIN models m ON m.id = e.model_id JOIN datasets d ON d.id = e.dataset_id
        LEFT JOIN neurons n ON n.model_id = e.model_id AND n.layer = e.layer AND n.neuron = e.neuron
        {where}
        ORDER BY m.family, m.seed, d.name, e.layer, e.neuron, e.step""", expanding, **params)


def head_scores(engine: Engine, family: str | None = None, model: str | None = None,
                max_z: float | None = None, limit: int | None = None) -> pd.DataFrame:
    """Rows of neuron_head_scores (with the path ablation where it ran); max_z keeps z <= max_z (e.g. -3)."""
    where, params, expanding = _where(family=("m.family", family), model=("m.name", model))
    if max_z is not None:
        where = f"{where} {'AND' if where else 'WHERE'} s.z <= :max_z"
        params["max_z"] = float(max_z)
    return _frame(engine, f"""
        SELECT m.family, m.seed, m.name AS model, d.name AS dataset, s.layer, s.neuron, s.rank, s.head_layer,
               s.head, s.score, s.z, h.attn_first_orig, h.attn_first_ablated, h.z_norm_orig, h.z_norm_ablated,
               h.act_attn_corr
        FROM neuron_head_scores s JOIN models m ON m.id = s.model_id JOIN datasets d ON d.id = s.dataset_id
        LEFT JOIN head_deactivation h
             ON h.model_id = s.model_id AND h.dataset_id = s.dataset_id AND h.layer = s.layer
                AND h.neuron = s.neuron AND h.head_layer = s.head_layer AND h.head = s.head
        {where}
        ORDER BY s.z, m.family, m.seed, s.layer, s.neuron {_limit(limit)}""", expanding, **params)


def roles_summary(engine: Engine, family: str) -> list[dict]:
    """Per model of the family: its most frequent vocabulary and current-token labels, its entropy neurons
    and strongest entropy intervention, and its most deactivating (neuron, head) pair with the ablation."""
    rows = []
    for model in _frame(engine, "SELECT name FROM models WHERE family = :family ORDER BY seed, name",
                        family=family)["name"]:
        row: dict = {"model": model}
        for source in ("vocab", "current_token"):
            top = _frame(engine, """
                SELECT l.feature, COUNT(*) AS n FROM neuron_labels l JOIN models m ON m.id = l.model_id
                WHERE m.name = :model AND l.source = :source AND l.rank = 0
                GROUP BY l.feature ORDER BY n DESC, l.feature LIMIT 3""", model=model, source=source)
            row[f"{source}_labels"] = list(zip(top["feature"], top["n"].astype(int)))
        counts = role_counts_by_layer(engine, model)
        row["n_entropy"] = int(counts["n_entropy"].sum()) if not counts.empty else None
        row["n_deactivating"] = int(counts["n_deactivating"].sum()) if not counts.empty else None
        entropy = _frame(engine, """
            SELECT e.layer, e.neuron, n.null_frac, n.null_frac_random, e.value, e.d_entropy, e.d_loss
            FROM entropy_interventions e JOIN models m ON m.id = e.model_id
            JOIN neurons n ON n.model_id = e.model_id AND n.layer = e.layer AND n.neuron = e.neuron
            WHERE m.name = :model AND e.step = (SELECT MAX(x.step) FROM entropy_interventions x
                                                WHERE x.model_id = e.model_id AND x.dataset_id = e.dataset_id
                                                  AND x.layer = e.layer AND x.neuron = e.neuron)
            ORDER BY n.null_frac DESC LIMIT 1""", model=model)
        row["entropy"] = entropy.iloc[0].to_dict() if not entropy.empty else None
        pair = _frame(engine, """
            SELECT h.layer, h.neuron, h.head_layer, h.head, h.z, h.attn_first_orig, h.attn_first_ablated
            FROM head_deactivation h JOIN models m ON m.id = h.model_id
            WHERE m.name = :model ORDER BY h.z LIMIT 1""", model=model)
        row["deactivation"] = pair.iloc[0].to_dict() if not pair.empty else None
        rows.append(row)
    return rows
