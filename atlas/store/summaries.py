"""Summary tables rebuilt from the rows they sum, in the transaction that writes those rows, so a summary
and its rows never disagree; views and pages read the summaries instead of regrouping millions of rows on
every query. One SQL text serves SQLite and PostgreSQL.

- neuron_universality: per neuron and dataset, its correlations with every other seed (the correlations
  job; the universal_neurons view).
- layer_classes: per model and layer, how many neurons of each vocabulary class and how many entropy neurons
  (the weights job; the layer_profile view, Figure 6 and the Layers page's role counts).
- label_counts: per model, source and feature, how many neurons have it as their rank-0 label (the labels
  job; the Families page's label choices and chart).
"""

from __future__ import annotations

from typing import Iterable

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

# An entropy neuron writes mostly into the unembedding's effective null space: at least this many times the
# share a random direction gets (k / d_model; 2% of d_model by default, so a null_frac of 0.2 and more).
ENTROPY_NULL_RATIO = 10.0
# A deactivating neuron lowers a later head's attention to the first position this many random-direction
# standard deviations below zero (z <= -3). The SQL text is shared by neuron_head_scores' partial index and the
# queries that count such neurons, so that SQLite's planner, which matches the two texts, uses the index.
DEACTIVATION_Z = -3.0
DEACTIVATING_WHERE = f"z <= {DEACTIVATION_Z} AND score < 0"


def deactivating_where(alias: str) -> str:
    """DEACTIVATING_WHERE on a table alias (`s.z <= -3.0 AND s.score < 0`)."""
    return f"{alias}.z <= {DEACTIVATION_Z} AND {alias}.score < 0"

# Over the other seeds: mean max correlation, mean rotation-baseline max correlation, their difference
# (the excess), and whether the excess passes the threshold stored with the job (0.5 by default).
SUMMARY_SELECT = """
SELECT c.model_id, c.dataset_id, c.layer, c.neuron,
       COUNT(c.max_corr) AS n_other_seeds,
       AVG(c.max_corr) AS mean_max_corr,
       AVG(c.baseline_max_corr) AS mean_baseline_corr,
       AVG(c.max_corr) - AVG(c.baseline_max_corr) AS excess_corr,
       (AVG(c.max_corr) - AVG(c.baseline_max_corr) > MAX(c.universal_threshold)) AS is_universal,
       MAX(c.universal_threshold) AS universal_threshold
FROM neuron_correlations c
"""
COLUMNS = ("model_id, dataset_id, layer, neuron, n_other_seeds, mean_max_corr, mean_baseline_corr, excess_corr, "
           "is_universal, universal_threshold")


def _rewrite(session: Session, table: str, where: str, columns: str, select: str, source_where: str,
             group_by: str, model_ids: Iterable[int], **params: int) -> None:
    """Delete the summary rows of these models (`where`) and insert them again from `select` (`source_where`)."""
    ids = sorted({int(model_id) for model_id in model_ids})
    if not ids:
        return
    params = {"ids": ids, **params}
    ids_list = bindparam("ids", expanding=True)
    session.execute(text(f"DELETE FROM {table} WHERE {where}").bindparams(ids_list), params)
    session.execute(text(f"INSERT INTO {table} ({columns}) {select} WHERE {source_where} GROUP BY {group_by}")
                    .bindparams(ids_list), params)


def refresh_universality(session: Session, model_ids: Iterable[int], dataset_id: int) -> None:
    """Rewrite the summary rows of these models on this dataset from their correlation rows."""
    _rewrite(session, "neuron_universality", "model_id IN :ids AND dataset_id = :dataset_id", COLUMNS,
             SUMMARY_SELECT, "c.model_id IN :ids AND c.dataset_id = :dataset_id",
             "c.model_id, c.dataset_id, c.layer, c.neuron", model_ids, dataset_id=int(dataset_id))



# n_entropy, max_null_frac and null_frac_random are NULL for a layer without null-space fractions (before 0005).
LAYER_CLASSES_SELECT = f"""
SELECT n.model_id, n.layer, COUNT(*) AS n_neurons,
       SUM(CASE WHEN n.vocab_class = 'prediction' THEN 1 ELSE 0 END) AS n_prediction,
       SUM(CASE WHEN n.vocab_class = 'suppression' THEN 1 ELSE 0 END) AS n_suppression,
       SUM(CASE WHEN n.vocab_class = 'partition' THEN 1 ELSE 0 END) AS n_partition,
       CASE WHEN COUNT(n.null_frac) > 0
            THEN SUM(CASE WHEN n.null_frac >= {ENTROPY_NULL_RATIO!r} * n.null_frac_random THEN 1 ELSE 0 END)
       END AS n_entropy,
       MAX(n.null_frac) AS max_null_frac, MAX(n.null_frac_random) AS null_frac_random
FROM neurons n
"""
LAYER_CLASSES_COLUMNS = ("model_id, layer, n_neurons, n_prediction, n_suppression, n_partition, n_entropy, "
                         "max_null_frac, null_frac_random")


def refresh_layer_classes(session: Session, model_ids: Iterable[int]) -> None:
    """Rewrite the per-layer class counts of these models from their neurons rows."""
    _rewrite(session, "layer_classes", "model_id IN :ids", LAYER_CLASSES_COLUMNS, LAYER_CLASSES_SELECT,
             "n.model_id IN :ids", "n.model_id, n.layer", model_ids)


LABEL_COUNTS_SELECT = """
SELECT l.model_id, l.source, l.feature, COUNT(*) AS n_neurons
FROM neuron_labels l
"""
LABEL_COUNTS_COLUMNS = "model_id, source, feature, n_neurons"


def refresh_label_counts(session: Session, model_ids: Iterable[int]) -> None:
    """Rewrite the rank-0 label counts of these models from their neuron_labels rows (every source and dataset)."""
    _rewrite(session, "label_counts", "model_id IN :ids", LABEL_COUNTS_COLUMNS, LABEL_COUNTS_SELECT,
             "l.model_id IN :ids AND l.rank = 0", "l.model_id, l.source, l.feature", model_ids)
