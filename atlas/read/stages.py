"""The read model of the Stages-of-Inference case studies (Lad, Gurnee, Tegmark 2024): the four-stage profile
(the stage_profile view, the paper's Figure 1) and the attention heads' statistics (head_stats).

Shared by the Layers page, the Python API (atlas.api) and `atlas report`.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
from sqlalchemy import Engine

from atlas.read.queries import _frame
from atlas.store.views import REL_DEPTH

# The paper's curves, in the order of its Figure 1 (columns of the stage_profile view).
STAGE_CURVES = ("delete_kl", "attn_prev5", "n_prediction", "n_suppression", "lens_kl", "lens_entropy_nats",
                "mlp_out_norm", "attn_out_norm")


def stage_profile(engine: Engine, family_or_model: str, dataset: str | None = None) -> pd.DataFrame:
    """The stage_profile view for every seed of a family (or one model), on one dataset or all: one row per
    model, dataset and layer."""
    on_dataset = "AND dataset = :dataset" if dataset is not None else ""
    return _frame(engine, f"""
        SELECT * FROM stage_profile WHERE (family = :name OR model = :name) {on_dataset}
        ORDER BY dataset, seed, step, layer""", name=family_or_model, dataset=dataset)


def stage_profile_models(engine: Engine, models: Sequence[str], dataset: str) -> pd.DataFrame:
    """The profiles of several models or families on one dataset, for one relative-depth axis. Column `group`
    names the model or family asked for that the row belongs to (a model asked for by itself and with its
    family comes once per name)."""
    if not models:
        return _frame(engine, "SELECT *, '' AS \"group\" FROM stage_profile WHERE 1 = 0")
    frame = _frame(engine, """
        SELECT * FROM stage_profile WHERE (family IN :names OR model IN :names) AND dataset = :dataset
        ORDER BY family, seed, step, layer""", expanding=("names",), names=list(models), dataset=dataset)
    parts = [frame[(frame["family"] == name) | (frame["model"] == name)].assign(group=name) for name in models]
    return pd.concat(parts, ignore_index=True)


def stage_profile_names(engine: Engine, dataset: str) -> list[str]:
    """Families, then models, that have a profile on the dataset (what the overlay can choose from)."""
    frame = _frame(engine, "SELECT DISTINCT family, model FROM stage_profile WHERE dataset = :dataset",
                   dataset=dataset)
    return sorted(set(frame["family"])) + sorted(set(frame["model"]) - set(frame["family"]))


def head_stats(engine: Engine, model_or_family: str, dataset: str | None = None) -> pd.DataFrame:
    """Per attention head: the subjoiner score (with its attention and baseline), attention to the first
    position and to the previous token; one row per model, dataset, layer and head."""
    on_dataset = "AND d.name = :dataset" if dataset is not None else ""
    return _frame(engine, f"""
        SELECT m.family, m.seed, m.step, m.name AS model, h.model_id, d.name AS dataset, h.dataset_id, h.layer,
               {REL_DEPTH.format(layer="h.layer")} AS rel_depth, h.head, h.subjoiner, h.subjoiner_attn,
               h.subjoiner_baseline, h.n_continuations, h.attn_first, h.attn_prev
        FROM head_stats h JOIN models m ON m.id = h.model_id JOIN datasets d ON d.id = h.dataset_id
        WHERE (m.family = :name OR m.name = :name) {on_dataset}
        ORDER BY d.name, m.seed, m.step, h.layer, h.head""", name=model_or_family, dataset=dataset)
