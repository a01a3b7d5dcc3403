"""The per-neuron universality summary (neuron_universality), rebuilt from neuron_correlations.

The correlations job calls refresh_universality in the transaction that writes a pair's rows, so the
summary and the rows never disagree; the universal_neurons view and the pages read the summary instead
of regrouping millions of correlation rows on every query. One SQL text serves SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Iterable

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

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


def refresh_universality(session: Session, model_ids: Iterable[int], dataset_id: int) -> None:
    """Rewrite the summary rows of these models on this dataset from their correlation rows."""
    ids = sorted({int(model_id) for model_id in model_ids})
    if not ids:
        return
    params = {"ids": ids, "dataset_id": int(dataset_id)}
    session.execute(text("DELETE FROM neuron_universality WHERE model_id IN :ids AND dataset_id = :dataset_id")
                    .bindparams(bindparam("ids", expanding=True)), params)
    session.execute(text(f"""
        INSERT INTO neuron_universality ({COLUMNS})
        {SUMMARY_SELECT}
        WHERE c.model_id IN :ids AND c.dataset_id = :dataset_id
        GROUP BY c.model_id, c.dataset_id, c.layer, c.neuron""").bindparams(bindparam("ids", expanding=True)),
        params)

