"""The read model: every SQL text the app, the Python API (atlas.api) and the exports run, as
functions that return pandas DataFrames.

Nothing here knows Streamlit. One SQL text serves SQLite and PostgreSQL (no dialect branches
except the console's read-only connection, atlas.store.read_only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sqlalchemy import Engine, bindparam, inspect, text

from atlas.store import read_only
from atlas.store.views import REL_DEPTH


def hook_name(layer: int) -> str:
    """The TransformerLens hook of a neuron's activation: neuron_atlas.hook_name (views.HOOK_NAME) in Python."""
    return f"blocks.{int(layer)}.mlp.hook_post"


def _plain(value: Any) -> Any:
    """A parameter as the drivers take it: numpy scalars (a value read from a DataFrame) as Python's."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return [_plain(item) for item in value]
    return value


def _statement(sql: str, expanding: Sequence[str]):
    """The SQL text with the named parameters bound as lists (IN :name)."""
    statement = text(sql)
    if expanding:
        statement = statement.bindparams(*(bindparam(name, expanding=True) for name in expanding))
    return statement


def _frame(engine: Engine, sql: str, expanding: Sequence[str] = (), **params: Any) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql_query(_statement(sql, expanding), conn,
                                 params={name: _plain(value) for name, value in params.items()})


def _where(**conditions: tuple[str, Any]) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    """A WHERE clause over the conditions whose value is not None: name=(SQL column, value).

    A list or tuple value means IN. Returns (clause or "", parameters, the expanding parameters).
    """
    clauses, params, expanding = [], {}, []
    for name, (column, value) in conditions.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, set, np.ndarray, pd.Series)):
            clauses.append(f"{column} IN :{name}")
            expanding.append(name)
            value = list(value)
        else:
            clauses.append(f"{column} = :{name}")
        params[name] = value
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params, tuple(expanding)


def _limit(limit: int | None) -> str:
    return "" if limit is None else f"LIMIT {int(limit)}"


def _scalar_expanding(engine: Engine, sql: str, expanding: Sequence[str] = (), **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(_statement(sql, expanding), {name: _plain(value) for name, value in params.items()}).scalar()


def _scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def json_list(value: Any) -> list | None:
    """JSON columns come back as text on SQLite and as lists on PostgreSQL."""
    if isinstance(value, list):
        return value
    if value is None or (isinstance(value, float) and np.isnan(value)):  # SQL NULL read into a float column
        return None
    return json.loads(value)


# --- overview ------------------------------------------------------------------------------------


def tables_with_rows(engine: Engine, tables: Sequence[str]) -> set[str]:
    """Which of these tables hold at least one row (one row read per table)."""
    union = " UNION ALL ".join(f"SELECT '{name}' AS table_name FROM (SELECT 1 FROM {name} LIMIT 1) AS {name}_any"
                               for name in tables)
    return set(_frame(engine, union)["table_name"])


def rows_by_job_kind(engine: Engine) -> pd.DataFrame:
    """Rows written per job kind by the jobs whose results are current (status done), from the ledger."""
    return _frame(engine, """
        SELECT kind, COUNT(*) AS n_jobs, SUM(n_rows) AS n_rows FROM jobs WHERE status = 'done'
        GROUP BY kind ORDER BY kind""")


def families(engine: Engine) -> pd.DataFrame:
    return _frame(engine, """
        SELECT family, COUNT(*) AS n_seeds, MIN(architecture) AS architecture, MIN(n_layers) AS n_layers,
               MIN(d_model) AS d_model, MIN(d_mlp) AS d_mlp, MIN(vocab_size) AS vocab_size
        FROM models GROUP BY family ORDER BY family""")


def family_names(engine: Engine) -> list[str]:
    return families(engine)["family"].tolist()


def models(engine: Engine, family: str | None = None) -> pd.DataFrame:
    where, params, expanding = _where(family=("family", family))
    return _frame(engine, f"""
        SELECT id AS model_id, name, family, seed, architecture, n_layers, d_model, d_mlp, vocab_size,
               source, revision, resolved_revision, tokenizer_hash, weights_hash, created_at
        FROM models {where} ORDER BY family, seed""", expanding, **params)


def model_info(engine: Engine, name: str) -> dict[str, Any] | None:
    frame = _frame(engine, "SELECT id AS model_id, name, family, seed, architecture, n_layers, d_model, d_mlp, "
                           "vocab_size FROM models WHERE name = :name", name=name)
    return None if frame.empty else frame.iloc[0].to_dict()


def datasets(engine: Engine) -> pd.DataFrame:
    return _frame(engine, """
        SELECT name, source, split, revision, resolved_revision, n_tokens, ctx_len, n_documents, sample_seed,
               content_hash, created_at
        FROM datasets ORDER BY name""")


# What produced a result, as each job recorded it when it claimed its unit.
PROVENANCE_COLUMNS = ("j.model_source, j.model_revision, j.other_model_revision, j.dataset_source, j.dataset_revision, "
                      "j.tokenizer_hash, j.torch_version, j.transformers_version")


def jobs(engine: Engine, limit: int = 500, status: str | None = None, kind: str | None = None) -> pd.DataFrame:
    filters = [f"j.{name} = :{name}" for name, value in (("status", status), ("kind", kind)) if value is not None]
    frame = _frame(engine, f"""
        SELECT j.id, j.kind, m.name AS model, d.name AS dataset, o.name AS other_model, j.shard, j.status,
               j.pid, j.host, j.heartbeat_at, j.started_at, j.finished_at, j.n_rows, j.error, j.atlas_version,
               {PROVENANCE_COLUMNS}
        FROM jobs j
        LEFT JOIN models m ON m.id = j.model_id
        LEFT JOIN datasets d ON d.id = j.dataset_id
        LEFT JOIN models o ON o.id = j.other_model_id
        {"WHERE " + " AND ".join(filters) if filters else ""}
        ORDER BY j.id DESC LIMIT :limit""", limit=limit, status=status, kind=kind)
    started = pd.to_datetime(frame["started_at"], utc=True, format="mixed")
    finished = pd.to_datetime(frame["finished_at"], utc=True, format="mixed")
    frame.insert(frame.columns.get_loc("finished_at") + 1, "duration_s", (finished - started).dt.total_seconds())
    return frame


UNIT_STATUSES = ("done", "running", "failed", "abandoned")


def token_shard_units(engine: Engine) -> pd.DataFrame:
    """Progress of the token-shard units (--token-shards) per job kind, dataset and shard count: how many of
    the units' ledger rows are done, running, failed or abandoned (a unit has one row per target it serves,
    e.g. per seed pair of its pass), newest runs first."""
    frame = _frame(engine, """
        SELECT j.kind, d.name AS dataset, j.shard, j.status, j.id
        FROM jobs j LEFT JOIN datasets d ON d.id = j.dataset_id
        WHERE j.shard LIKE '%t%/%' AND j.status IN ('done', 'running', 'failed', 'abandoned')""")
    columns = ["kind", "dataset", "token_shards", *UNIT_STATUSES, "total", "last_job"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["token_shards"] = frame["shard"].str.extract(r"t\d+/(\d+)$", expand=False).astype(int)
    keys = ["kind", "dataset", "token_shards"]
    counts = frame.pivot_table(index=keys, columns="status", values="id", aggfunc="count", fill_value=0)
    counts = counts.reindex(columns=list(UNIT_STATUSES), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts["last_job"] = frame.groupby(keys)["id"].max()
    return counts.reset_index().sort_values("last_job", ascending=False)[columns].reset_index(drop=True)


def job_status_counts(engine: Engine) -> pd.DataFrame:
    return _frame(engine, "SELECT kind, status, COUNT(*) AS n_jobs FROM jobs GROUP BY kind, status ORDER BY kind, status")


def training_runs(engine: Engine) -> pd.DataFrame:
    return _frame(engine, """
        SELECT family, seed, steps, tokens_seen, train_loss, heldout_loss, unigram_entropy, seconds, out_dir
        FROM training_runs ORDER BY family, seed""")


def training_curves(engine: Engine) -> pd.DataFrame:
    """Long format: one row per (run, step, split) so a chart can dash train against held-out."""
    return _frame(engine, """
        SELECT r.family, r.seed, c.step, 'train' AS split, c.train_loss AS loss
        FROM training_curves c JOIN training_runs r ON r.id = c.run_id
        UNION ALL
        SELECT r.family, r.seed, c.step, 'held-out' AS split, c.heldout_loss AS loss
        FROM training_curves c JOIN training_runs r ON r.id = c.run_id
        WHERE c.heldout_loss IS NOT NULL
        ORDER BY 1, 2, 4, 3""")


# --- neurons and correlations (the Python API) ---------------------------------------------------

def neurons(engine: Engine, family: str | None = None, model: str | None = None, universal: bool | None = None,
            layer: int | Sequence[int] | None = None, vocab_class: str | Sequence[str] | None = None,
            dataset: str | None = None, limit: int | None = None) -> pd.DataFrame:
    """Rows of the neuron_atlas view: one per neuron and activation dataset, with the neuron's hook_name.

    universal: True keeps universal neurons, False measured ones that are not, None every neuron.
    A list for layer or vocab_class means any of them.
    """
    where, params, expanding = _where(
        family=("family", family), model=("model", model), universal=("is_universal", universal),
        layer=("layer", layer), vocab_class=("vocab_class", vocab_class), dataset=("dataset", dataset))
    frame = _frame(engine, f"""
        SELECT * FROM neuron_atlas {where}
        ORDER BY family, seed, model, layer, neuron, dataset {_limit(limit)}""", expanding, **params)
    # SQLite stores booleans as 0/1 and PostgreSQL as booleans: one nullable dtype for both.
    frame["is_universal"] = frame["is_universal"].astype("boolean")
    return frame


def correlations(engine: Engine, model: str | None = None, layer: int | None = None, neuron: int | None = None,
                 dataset: str | None = None, family: str | None = None, limit: int | None = None) -> pd.DataFrame:
    """Each neuron's best-correlated neuron in every other seed, with the rotation baseline and its class."""
    where, params, expanding = _where(model=("m.name", model), family=("m.family", family), layer=("c.layer", layer),
                                      neuron=("c.neuron", neuron), dataset=("d.name", dataset))
    return _frame(engine, f"""
        SELECT m.name AS model, m.seed, c.layer, c.neuron, o.name AS other_model, o.seed AS other_seed,
               d.name AS dataset, c.max_corr, c.baseline_max_corr, c.partner_layer, c.partner_neuron,
               p.vocab_class AS partner_class, c.universal_threshold
        FROM neuron_correlations c
        JOIN models m ON m.id = c.model_id
        JOIN models o ON o.id = c.other_model_id
        JOIN datasets d ON d.id = c.dataset_id
        LEFT JOIN neurons p ON p.model_id = c.other_model_id AND p.layer = c.partner_layer
             AND p.neuron = c.partner_neuron
        {where}
        ORDER BY m.family, m.seed, c.layer, c.neuron, d.name, o.seed {_limit(limit)}""", expanding, **params)


# --- neuron families -----------------------------------------------------------------------------


# Which models and datasets have correlations: one index probe of the universality summary per model
# (its primary key leads with model_id, dataset_id) instead of a DISTINCT over millions of rows. A LIMIT
# subquery rather than EXISTS: PostgreSQL may turn EXISTS into a hash semi-join that reads the whole table.
# The ORDER BY (the rest of the primary key, after the columns the query fixes) keeps PostgreSQL on the index:
# with a bare LIMIT 1 it may expect a match within a few rows of a sequential scan, where a model's rows are
# all in one stretch of the table. Ordering by a fixed column alone does not: the planner drops it.
_HAS_CORRELATIONS = """(SELECT 1 FROM neuron_universality u WHERE u.model_id = m.id AND u.dataset_id = d.id
                        ORDER BY u.layer, u.neuron LIMIT 1) IS NOT NULL"""


def correlation_datasets(engine: Engine, family: str) -> list[str]:
    frame = _frame(engine, f"""
        SELECT d.name FROM datasets d
        WHERE EXISTS (SELECT 1 FROM models m WHERE m.family = :family AND {_HAS_CORRELATIONS})
        ORDER BY d.name""", family=family)
    return frame["name"].tolist()


def stored_universal_threshold(engine: Engine, family: str) -> float | None:
    """The threshold the family's correlations were stored with (one summary row per model is enough:
    every neuron of a model carries the same pairs)."""
    value = _scalar(engine, """
        SELECT MAX(t.threshold) FROM (
            SELECT (SELECT u.universal_threshold FROM neuron_universality u WHERE u.model_id = m.id
                    ORDER BY u.model_id, u.dataset_id, u.layer, u.neuron LIMIT 1) AS threshold
            FROM models m WHERE m.family = :family) t""", family=family)
    return None if value is None else float(value)


@dataclass(frozen=True)
class NeuronFilter:
    """The Families page's choice of neurons: seeds, a layer range, classes, and optionally a correlation
    dataset (with a bar on excess correlation) and a rank-0 label (source, feature)."""

    family: str
    seeds: Sequence[int]
    layers: tuple[int, int]
    classes: Sequence[str]
    dataset: str | None = None
    universal_threshold: float | None = None
    label: tuple[str, str] | None = None

    def sql(self, with_label: bool = True, extra: str = "") -> tuple[str, dict[str, Any]]:
        """FROM ... WHERE ... over neurons n, models m, the summary u (for the dataset) and, with_label, the rank-0
        vocabulary label lv (a count needs no label column); `extra` is ANDed to the conditions."""
        universal = "AND u.excess_corr > :threshold" if self.universal_threshold is not None else ""
        labelled = """AND EXISTS (SELECT 1 FROM neuron_labels f WHERE f.model_id = n.model_id AND f.layer = n.layer
                           AND f.neuron = n.neuron AND f.source = :label_source AND f.feature = :label_feature
                           AND f.rank = 0)""" if self.label is not None else ""
        label_source, label_feature = self.label if self.label is not None else (None, None)
        label_join = """LEFT JOIN neuron_labels lv
                 ON lv.model_id = n.model_id AND lv.layer = n.layer AND lv.neuron = n.neuron
                    AND lv.source = 'vocab' AND lv.rank = 0""" if with_label else ""
        clause = f"""
            FROM neurons n
            JOIN models m ON m.id = n.model_id
            LEFT JOIN neuron_universality u
                 ON u.model_id = n.model_id AND u.layer = n.layer AND u.neuron = n.neuron
                    AND u.dataset_id = (SELECT d.id FROM datasets d WHERE d.name = :dataset)
            {label_join}
            WHERE m.family = :family AND m.seed IN :seeds AND n.layer BETWEEN :lo AND :hi
                  AND n.vocab_class IN :classes {universal} {labelled} {extra}"""
        return clause, dict(family=self.family, seeds=list(self.seeds), lo=self.layers[0], hi=self.layers[1],
                            classes=list(self.classes), dataset=self.dataset, threshold=self.universal_threshold,
                            label_source=label_source, label_feature=label_feature)

    @property
    def only_universality(self) -> bool:
        """Every class and no label, with a bar on excess correlation: the summary alone answers a count."""
        return set(self.classes) >= set(VOCAB_CLASSES) and self.universal_threshold is not None and self.label is None

    @property
    def everything(self) -> bool:
        """Every neuron of the chosen seeds and layers: no class, universality or label condition."""
        return set(self.classes) >= set(VOCAB_CLASSES) and self.universal_threshold is None and self.label is None


_FAMILY_NEURON_COLUMNS = f"""
    m.name AS model, m.seed, n.layer, {REL_DEPTH.format(layer="n.layer")} AS rel_depth, n.neuron,
    n.vocab_class, lv.feature AS vocab_label, n.vocab_skew, n.vocab_kurt, n.vocab_var, n.w_out_norm,
    n.in_out_cos, n.null_frac, u.excess_corr, u.mean_max_corr, u.mean_baseline_corr"""
_FAMILY_EXPANDING = ("seeds", "classes")


def family_neurons(engine: Engine, chosen: NeuronFilter, limit: int = 2000) -> pd.DataFrame:
    """The first `limit` chosen neurons with their vocabulary moments, rank-0 vocabulary label and (for the
    dataset) excess correlation: the most universal first, then those without a correlation.

    Two reads, so that the first walks the summary's (dataset, excess) index from the top and stops at
    `limit` rows instead of sorting every neuron of the family."""
    clause, params = chosen.sql(extra="AND u.excess_corr IS NOT NULL")
    ranked = _frame(engine, f"""
        SELECT {_FAMILY_NEURON_COLUMNS} {clause}
        ORDER BY u.excess_corr DESC, m.seed, n.layer, n.neuron LIMIT :limit""",
        _FAMILY_EXPANDING, **params, limit=limit)
    if len(ranked) >= limit:
        return ranked
    clause, params = chosen.sql(extra="AND u.excess_corr IS NULL")
    rest = _frame(engine, f"""
        SELECT {_FAMILY_NEURON_COLUMNS} {clause}
        ORDER BY m.seed, n.layer, n.neuron LIMIT :limit""", _FAMILY_EXPANDING, **params, limit=limit - len(ranked))
    return pd.concat([ranked, rest], ignore_index=True) if not ranked.empty else rest


def family_neuron_count(engine: Engine, chosen: NeuronFilter) -> int:
    """How many neurons the filter chooses: from the registry when it chooses every neuron of the seeds and
    layers (n_layers x d_mlp is exact and reads no neuron row), else counted."""
    if chosen.everything:
        frame = _frame(engine, """
            SELECT m.n_layers, m.d_mlp FROM models m
            WHERE m.family = :family AND m.seed IN :seeds AND EXISTS (SELECT 1 FROM neurons n WHERE n.model_id = m.id)""",
            ("seeds",), family=chosen.family, seeds=list(chosen.seeds))
        layers = (frame["n_layers"].clip(upper=chosen.layers[1] + 1) - chosen.layers[0]).clip(lower=0)
        return int((layers * frame["d_mlp"]).sum())
    if chosen.only_universality:  # every summary row is a neuron: count them by the (dataset, excess) index alone
        return int(_scalar_expanding(engine, """
            SELECT COUNT(*) FROM neuron_universality u JOIN models m ON m.id = u.model_id
            WHERE u.dataset_id = (SELECT d.id FROM datasets d WHERE d.name = :dataset) AND u.excess_corr > :threshold
                  AND m.family = :family AND m.seed IN :seeds AND u.layer BETWEEN :lo AND :hi""", ("seeds",),
            family=chosen.family, seeds=list(chosen.seeds), lo=chosen.layers[0], hi=chosen.layers[1],
            dataset=chosen.dataset, threshold=chosen.universal_threshold) or 0)
    clause, params = chosen.sql(with_label=False)
    return int(_scalar_expanding(engine, f"SELECT COUNT(*) {clause}", _FAMILY_EXPANDING, **params) or 0)


def family_neuron_sample(engine: Engine, chosen: NeuronFilter, total: int, size: int = 5000) -> pd.DataFrame:
    """At most `size` chosen neurons for a scatter plot: every classed one first (the neurons table's partial
    index on classed neurons), then the neurons of the 'none' class whose index is a multiple of k (index
    probes; the same points on every visit), k chosen so that about `size` are read."""
    clause, params = chosen.sql(extra="AND n.vocab_class <> 'none'")
    classed = _frame(engine, f"""
        SELECT {_FAMILY_NEURON_COLUMNS} {clause}
        ORDER BY m.seed, n.layer, n.neuron LIMIT :size""", _FAMILY_EXPANDING, **params, size=size)
    room = size - len(classed)
    if room <= 0 or "none" not in chosen.classes:
        return classed
    every = max(1, -(-total // room))
    d_mlp = int(_scalar(engine, "SELECT MAX(d_mlp) FROM models WHERE family = :family", family=chosen.family) or 0)
    picked = list(range(0, d_mlp, every)) or [0]
    # The same condition on the summary's side too: the planner then reads the universal neurons by their index
    # and probes those picked, where it would scan every neuron of the family (it derives no IN from the join).
    on_summary = " AND u.neuron IN :picked" if chosen.universal_threshold is not None else ""
    clause, params = chosen.sql(extra=f"AND n.vocab_class = 'none' AND n.neuron IN :picked{on_summary}")
    rest = _frame(engine, f"""
        SELECT {_FAMILY_NEURON_COLUMNS} {clause}
        ORDER BY m.seed, n.layer, n.neuron LIMIT :room""", (*_FAMILY_EXPANDING, "picked"), **params,
        picked=picked, room=room)
    return pd.concat([classed, rest], ignore_index=True) if not classed.empty else rest


# The classes of atlas.metrics.weights.classify, in the order the pages show them.
VOCAB_CLASSES = ("prediction", "suppression", "partition", "none")


def vocab_classes(engine: Engine, family: str) -> list[str]:
    """The vocabulary classes (all of them, without reading the family's neurons)."""
    return list(VOCAB_CLASSES)


def class_counts_by_depth(engine: Engine, family: str) -> pd.DataFrame:
    """Prediction and suppression neurons per layer and seed (the universal-neurons paper's Figure 6), from the
    per-layer class counts the weights job keeps (layer_classes)."""
    return _frame(engine, f"""
        SELECT m.seed, m.name AS model, c.layer, {REL_DEPTH.format(layer="c.layer")} AS rel_depth,
               c.n_neurons, c.n_prediction, c.n_suppression
        FROM layer_classes c JOIN models m ON m.id = c.model_id
        WHERE m.family = :family ORDER BY m.seed, m.name, c.layer""", family=family)


def _layer_grid(models: pd.DataFrame) -> pd.DataFrame:
    """One row per model and layer: model_id, seed, model, layer, rel_depth (as views.REL_DEPTH), n_neurons."""
    rows = [(row.model_id, row.seed, row.model, layer, layer / (row.n_layers - 1) if row.n_layers > 1 else 0.0,
             row.d_mlp) for row in models.itertuples() for layer in range(int(row.n_layers))]
    return pd.DataFrame(rows, columns=["model_id", "seed", "model", "layer", "rel_depth", "n_neurons"])


def universal_fraction_by_layer(engine: Engine, family: str, dataset: str, threshold: float) -> pd.DataFrame:
    """Per model and layer, the neurons whose excess correlation passes `threshold` and their share of the
    layer. Only those neurons are read (the summary's (dataset, excess) index); layers without any are zeros."""
    models = _frame(engine, f"""
        SELECT m.id AS model_id, m.seed, m.name AS model, m.n_layers, m.d_mlp
        FROM models m JOIN datasets d ON d.name = :dataset
        WHERE m.family = :family AND {_HAS_CORRELATIONS} ORDER BY m.seed, m.name""", family=family, dataset=dataset)
    counts = _frame(engine, """
        SELECT u.model_id, u.layer, COUNT(*) AS n_universal
        FROM neuron_universality u JOIN models m ON m.id = u.model_id
        WHERE u.dataset_id = (SELECT d.id FROM datasets d WHERE d.name = :dataset) AND u.excess_corr > :threshold
              AND m.family = :family
        GROUP BY u.model_id, u.layer""", family=family, dataset=dataset, threshold=threshold)
    frame = _layer_grid(models).merge(counts, on=["model_id", "layer"], how="left").fillna({"n_universal": 0})
    frame["n_universal"] = frame["n_universal"].astype(int)
    frame["universal_fraction"] = frame["n_universal"] / frame["n_neurons"]
    return frame[["seed", "model", "layer", "rel_depth", "n_neurons", "n_universal", "universal_fraction"]]


# --- neuron card ---------------------------------------------------------------------------------


def neuron_weights(engine: Engine, model: str, layer: int, neuron: int) -> dict[str, Any] | None:
    frame = _frame(engine, """
        SELECT n.w_in_norm, n.w_gate_norm, n.b_in, n.w_out_norm, n.in_out_cos, n.l2_penalty,
               n.vocab_mean, n.vocab_var, n.vocab_skew, n.vocab_kurt, n.vocab_class, n.null_frac, n.null_frac_random
        FROM neurons n JOIN models m ON m.id = n.model_id
        WHERE m.name = :model AND n.layer = :layer AND n.neuron = :neuron""",
        model=model, layer=layer, neuron=neuron)
    return None if frame.empty else frame.iloc[0].to_dict()


def neuron_vocab(engine: Engine, model: str, layer: int, neuron: int, per_direction: int = 20) -> pd.DataFrame:
    frame = _frame(engine, """
        SELECT v.direction, v.rank, v.token_id, v.token, v.value
        FROM neuron_vocab v JOIN models m ON m.id = v.model_id
        WHERE m.name = :model AND v.layer = :layer AND v.neuron = :neuron
        ORDER BY v.direction DESC, v.rank""", model=model, layer=layer, neuron=neuron)
    return frame.groupby("direction", sort=False).head(per_direction).reset_index(drop=True)


def activation_stats(engine: Engine, model: str, layer: int, neuron: int) -> pd.DataFrame:
    return _frame(engine, """
        SELECT d.name AS dataset, a.n, a.mean, a.var, a.skew, a.kurt, a.max, a.min, a.frac_active
        FROM activation_stats a JOIN models m ON m.id = a.model_id JOIN datasets d ON d.id = a.dataset_id
        WHERE m.name = :model AND a.layer = :layer AND a.neuron = :neuron ORDER BY d.name""",
        model=model, layer=layer, neuron=neuron)


def top_examples(engine: Engine, model: str, layer: int, neuron: int, dataset: str | None = None,
                 limit: int = 20) -> pd.DataFrame:
    """Top-activating contexts; context_tokens / context_activations come back as Python lists."""
    where_dataset = "AND d.name = :dataset" if dataset is not None else ""
    frame = _frame(engine, f"""
        SELECT d.name AS dataset, t.rank, t.doc_index, t.position, t.activation, t.context_tokens,
               t.highlight_index, t.context_activations
        FROM top_examples t JOIN models m ON m.id = t.model_id JOIN datasets d ON d.id = t.dataset_id
        WHERE m.name = :model AND t.layer = :layer AND t.neuron = :neuron {where_dataset}
        ORDER BY d.name, t.rank LIMIT :limit""",
        model=model, layer=layer, neuron=neuron, dataset=dataset, limit=limit)
    for column in ("context_tokens", "context_activations"):
        frame[column] = frame[column].map(json_list).astype(object)
    return frame


def neuron_provenance(engine: Engine, model: str, layer: int, neuron: int) -> pd.DataFrame:
    """The jobs that wrote this neuron's rows (weights, activations, correlations, roles): one row per job."""
    return _frame(engine, f"""
        WITH written AS (
            SELECT 'weights' AS result, n.job_id FROM neurons n JOIN models m ON m.id = n.model_id
            WHERE m.name = :model AND n.layer = :layer AND n.neuron = :neuron
            UNION
            SELECT 'activations', a.job_id FROM activation_stats a JOIN models m ON m.id = a.model_id
            WHERE m.name = :model AND a.layer = :layer AND a.neuron = :neuron
            UNION
            SELECT 'correlations', c.job_id FROM neuron_correlations c JOIN models m ON m.id = c.model_id
            WHERE m.name = :model AND c.layer = :layer AND c.neuron = :neuron
            UNION
            SELECT 'labels', l.job_id FROM neuron_labels l JOIN models m ON m.id = l.model_id
            WHERE m.name = :model AND l.layer = :layer AND l.neuron = :neuron
            UNION
            SELECT 'entropy', e.job_id FROM entropy_interventions e JOIN models m ON m.id = e.model_id
            WHERE m.name = :model AND e.layer = :layer AND e.neuron = :neuron
            UNION
            SELECT 'attention roles', h.job_id FROM neuron_head_scores h JOIN models m ON m.id = h.model_id
            WHERE m.name = :model AND h.layer = :layer AND h.neuron = :neuron
        )
        SELECT w.result, j.id AS job_id, j.kind, d.name AS dataset, o.name AS other_model, j.finished_at,
               j.atlas_version, {PROVENANCE_COLUMNS}
        FROM written w JOIN jobs j ON j.id = w.job_id
        LEFT JOIN datasets d ON d.id = j.dataset_id
        LEFT JOIN models o ON o.id = j.other_model_id
        ORDER BY w.result, j.id""", model=model, layer=layer, neuron=neuron)


def correlation_partners(engine: Engine, model: str, layer: int, neuron: int) -> pd.DataFrame:
    """The best-correlated neuron in every other seed, with its class."""
    frame = correlations(engine, model=model, layer=layer, neuron=neuron)
    return frame.drop(columns=["model", "seed", "layer", "neuron", "universal_threshold"])


def universal_scores(engine: Engine, model: str, layer: int, neuron: int) -> pd.DataFrame:
    return _frame(engine, """
        SELECT dataset, n_other_seeds, mean_max_corr, mean_baseline_corr, excess_corr, universal_threshold
        FROM universal_neurons WHERE model = :model AND layer = :layer AND neuron = :neuron ORDER BY dataset""",
        model=model, layer=layer, neuron=neuron)


# --- compare seeds -------------------------------------------------------------------------------


def families_with_correlations(engine: Engine) -> list[str]:
    frame = _frame(engine, """
        SELECT DISTINCT m.family FROM models m
        WHERE (SELECT 1 FROM neuron_universality u WHERE u.model_id = m.id
               ORDER BY u.dataset_id, u.layer, u.neuron LIMIT 1) IS NOT NULL
        ORDER BY m.family""")
    return frame["family"].tolist()


_BY_STEP_COLUMNS = ["step", "n_seeds", "n_neurons", "universal_fraction_05", "universal_fraction_03",
                    "mean_excess_corr", "mean_max_corr", "mean_baseline_corr", "n_prediction", "n_suppression"]


def universality_by_step(engine: Engine, family: str, dataset: str) -> pd.DataFrame:
    """The universality_by_step view for one family and dataset (empty without checkpoints: then the view is
    not read, since its plan hashes every neuron before it finds no model with a step)."""
    if _scalar(engine, "SELECT 1 FROM models WHERE family = :family AND step IS NOT NULL LIMIT 1",
               family=family) is None:
        return pd.DataFrame(columns=_BY_STEP_COLUMNS)
    return _frame(engine, f"""
        SELECT {", ".join(_BY_STEP_COLUMNS)}
        FROM universality_by_step WHERE family = :family AND dataset = :dataset ORDER BY step""",
        family=family, dataset=dataset)


def correlated_models(engine: Engine, family: str, dataset: str) -> list[str]:
    frame = _frame(engine, f"""
        SELECT m.name FROM models m JOIN datasets d ON d.name = :dataset
        WHERE m.family = :family AND {_HAS_CORRELATIONS} ORDER BY m.seed, m.name""", family=family, dataset=dataset)
    return frame["name"].tolist()


def ranked_by_excess(engine: Engine, model: str, dataset: str, limit: int = 100) -> pd.DataFrame:
    return _frame(engine, """
        SELECT layer, neuron, excess_corr, mean_max_corr, mean_baseline_corr, n_other_seeds
        FROM universal_neurons WHERE model = :model AND dataset = :dataset AND excess_corr IS NOT NULL
        ORDER BY excess_corr DESC, layer, neuron LIMIT :limit""", model=model, dataset=dataset, limit=limit)


def count_above_threshold(engine: Engine, model: str, dataset: str, threshold: float) -> tuple[int, int]:
    frame = _frame(engine, """
        SELECT COUNT(*) AS n_neurons, SUM(CASE WHEN excess_corr > :threshold THEN 1 ELSE 0 END) AS n_above
        FROM universal_neurons WHERE model = :model AND dataset = :dataset""",
        model=model, dataset=dataset, threshold=threshold)
    row = frame.iloc[0]
    return int(row["n_above"] or 0), int(row["n_neurons"] or 0)


def max_corr_histogram(engine: Engine, model: str, dataset: str, bins: int = 50) -> pd.DataFrame:
    """Counts of each neuron's mean max correlation over the other seeds and of its rotation baseline's, over
    the same bins from min(0, the lowest value rounded down to 0.1) to 1 (long format; np.histogram's bins).
    Counted in SQL on the universality summary (one row per neuron, by its primary key): only the bins travel."""
    where = """FROM neuron_universality u
        WHERE u.model_id = (SELECT m.id FROM models m WHERE m.name = :model)
          AND u.dataset_id = (SELECT d.id FROM datasets d WHERE d.name = :dataset)"""
    lows = _frame(engine, f"SELECT MIN(u.mean_max_corr) AS a, MIN(u.mean_baseline_corr) AS b {where}",
                  model=model, dataset=dataset).iloc[0]
    present = [float(v) for v in lows if v is not None and not pd.isna(v)]
    if not present:
        return pd.DataFrame(columns=["series", "bin_start", "bin_end", "count"])
    lowest = min(0.0, float(np.floor(min(present) * 10) / 10))
    edges = np.linspace(lowest, 1.0, bins + 1)
    parts = []
    for series, column in (("max correlation", "u.mean_max_corr"), ("rotation baseline", "u.mean_baseline_corr")):
        index = _floor(engine, f"({column} - :lowest) * :bins / (1.0 - :lowest)")
        counted = _frame(engine, f"""
            SELECT CASE WHEN {index} >= :bins THEN :bins - 1 ELSE {index} END AS bin, COUNT(*) AS n
            {where} AND {column} IS NOT NULL AND {column} <= 1.0 GROUP BY 1""",
            model=model, dataset=dataset, lowest=lowest, bins=bins)
        counts = np.zeros(bins, dtype=np.int64)
        np.add.at(counts, counted["bin"].to_numpy(np.int64), counted["n"].to_numpy(np.int64))
        parts.append(pd.DataFrame({"series": series, "bin_start": edges[:-1], "bin_end": edges[1:], "count": counts}))
    return pd.concat(parts, ignore_index=True)


def _floor(engine: Engine, expression: str) -> str:
    """FLOOR of a non-negative expression as an integer: PostgreSQL's CAST rounds, SQLite's truncates (and
    SQLite has FLOOR only when built with its math functions)."""
    if engine.dialect.name == "postgresql":
        return f"CAST(FLOOR({expression}) AS INTEGER)"
    return f"CAST({expression} AS INTEGER)"


# --- layers --------------------------------------------------------------------------------------


def layer_profile_datasets(engine: Engine, family: str) -> list[str]:
    frame = _frame(engine, "SELECT DISTINCT dataset FROM layer_profile WHERE family = :family ORDER BY dataset",
                   family=family)
    return frame["dataset"].tolist()


def layer_profile(engine: Engine, family_or_model: str, dataset: str | None = None) -> pd.DataFrame:
    """The layer_profile view for every seed of a family (or one model), on one dataset or all."""
    on_dataset = "AND dataset = :dataset" if dataset is not None else ""
    return _frame(engine, f"""
        SELECT * FROM layer_profile WHERE (family = :name OR model = :name) {on_dataset}
        ORDER BY dataset, seed, layer""", name=family_or_model, dataset=dataset)


def families_with_layer_profile(engine: Engine) -> list[str]:
    return _frame(engine, "SELECT DISTINCT family FROM layer_profile ORDER BY family")["family"].tolist()


# --- SQL console ---------------------------------------------------------------------------------

EXAMPLE_QUERIES: dict[str, str] = {
    "Models and their sizes": "SELECT name, family, seed, architecture, n_layers, d_model, d_mlp, vocab_size\n"
                              "FROM models ORDER BY family, seed",
    "Neuron classes per model": "SELECT model, vocab_class, COUNT(*) AS n_neurons\nFROM neuron_atlas\n"
                                "GROUP BY model, vocab_class ORDER BY model, vocab_class",
    "Most universal neurons": "SELECT model, layer, neuron, excess_corr, mean_max_corr, mean_baseline_corr\n"
                              "FROM universal_neurons\nORDER BY excess_corr DESC\nLIMIT 50",
    "Highest vocabulary kurtosis": "SELECT model, layer, neuron, vocab_kurt, vocab_skew, vocab_class\n"
                                   "FROM neuron_atlas\nORDER BY vocab_kurt DESC\nLIMIT 50",
    "Layer profile (Stages of Inference)": "SELECT model, layer, rel_depth, delete_kl, swap_kl, delete_retention,\n"
                                           "       lens_kl, lens_entropy_bits, attn_prev5, mlp_out_norm\n"
                                           "FROM layer_profile ORDER BY model, layer",
    "Jobs ledger": "SELECT id, kind, status, started_at, finished_at, n_rows, error\nFROM jobs ORDER BY id DESC",
    "Top tokens of a neuron": "SELECT m.name, v.direction, v.rank, v.token, v.value\n"
                              "FROM neuron_vocab v JOIN models m ON m.id = v.model_id\n"
                              "WHERE v.layer = 0 AND v.neuron = 0\nORDER BY m.name, v.direction DESC, v.rank",
}


# The console's engine and execution live in the library (atlas.store.read_only): the database,
# not a parser, keeps it read-only; the same path serves every read-only SQL entry point.
ConsoleResult = read_only.ConsoleResult
console_engine = read_only.console_engine
execute_read_only = read_only.execute_read_only
run_console_query = read_only.run_console_query


def schema_columns(engine: Engine) -> pd.DataFrame:
    """Tables and views with their columns, for the schema browser."""
    inspector = inspect(engine)
    records = []
    for kind, names in (("table", inspector.get_table_names()), ("view", inspector.get_view_names())):
        for name in sorted(names):
            for column in inspector.get_columns(name):
                records.append({"object": name, "kind": kind, "column": column["name"],
                                "type": str(column["type"]), "nullable": column.get("nullable")})
    return pd.DataFrame.from_records(records, columns=["object", "kind", "column", "type", "nullable"])


# --- summaries printed by the jobs and the demo --------------------------------------------------


def universal_fractions(engine: Engine, family: str, dataset: str) -> list[dict[str, Any]]:
    """Per model of the family: neurons, universal neurons, other seeds compared and the threshold."""
    return _records(engine, """
        SELECT model, seed, COUNT(*) AS n_neurons,
               SUM(CASE WHEN is_universal THEN 1 ELSE 0 END) AS n_universal,
               MIN(n_other_seeds) AS min_other_seeds, MAX(n_other_seeds) AS max_other_seeds,
               MAX(universal_threshold) AS threshold
        FROM universal_neurons WHERE family = :family AND dataset = :dataset
        GROUP BY model, seed ORDER BY seed""", family=family, dataset=dataset)


def family_summary(engine: Engine, family: str, dataset: str, low: float, null_family: str | None = None
                   ) -> list[dict[str, Any]]:
    """One dict per model of the family (then the null family's models, classes only): training,
    universality (the threshold and a lower bar `low`), vocabulary classes and the worst deletion."""
    params = {"family": family, "dataset": dataset, "low": low, "null_family": null_family}
    rows = {row["model"]: row for row in _records(engine, """
        SELECT m.name AS model, m.seed, r.steps, r.heldout_loss, r.unigram_entropy
        FROM models m LEFT JOIN training_runs r ON r.model_id = m.id
        WHERE m.family = :family ORDER BY m.seed""", **params)}
    for sql in (_UNIVERSALITY_SUMMARY, _DELETION_SUMMARY, _CLASS_SUMMARY):
        for row in _records(engine, sql, **params):
            rows.setdefault(row["model"], {}).update(row)
    for row in _records(engine, """
            SELECT model, layer FROM layer_profile
            WHERE family = :family AND dataset = :dataset AND delete_kl IS NOT NULL
            ORDER BY delete_kl DESC""", **params):
        rows[row["model"]].setdefault("max_delete_layer", row["layer"])
    for row in _records(engine, """
            SELECT model, layer, COUNT(*) AS n FROM universal_neurons
            WHERE family = :family AND dataset = :dataset AND excess_corr > :low
            GROUP BY model, layer ORDER BY model, layer""", **params):
        rows[row["model"]].setdefault("above_low_by_layer", {})[row["layer"]] = row["n"]
    return list(rows.values())


_UNIVERSALITY_SUMMARY = """
    SELECT model, COUNT(*) AS n_neurons,
           SUM(CASE WHEN is_universal THEN 1 ELSE 0 END) AS n_universal,
           MAX(universal_threshold) AS threshold,
           SUM(CASE WHEN excess_corr > :low THEN 1 ELSE 0 END) AS n_above_low,
           AVG(mean_max_corr) AS mean_max_corr, AVG(mean_baseline_corr) AS mean_baseline_corr
    FROM universal_neurons WHERE family = :family AND dataset = :dataset GROUP BY model"""

_DELETION_SUMMARY = """
    SELECT model, MAX(delete_kl) AS max_delete_kl
    FROM layer_profile WHERE family = :family AND dataset = :dataset GROUP BY model"""

_CLASS_SUMMARY = """
    SELECT m.name AS model, MAX(n.vocab_kurt) AS max_kurt,
           SUM(CASE WHEN n.vocab_class = 'prediction' THEN 1 ELSE 0 END) AS n_prediction,
           SUM(CASE WHEN n.vocab_class = 'suppression' THEN 1 ELSE 0 END) AS n_suppression,
           SUM(CASE WHEN n.vocab_class = 'partition' THEN 1 ELSE 0 END) AS n_partition
    FROM neurons n JOIN models m ON m.id = n.model_id
    WHERE m.family = :family OR m.family = :null_family GROUP BY m.name, m.family ORDER BY m.family, m.name"""


def _records(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    """Rows as dicts of the driver's values (None for NULL, ints stay ints), as printed summaries want them."""
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(text(sql), {k: _plain(v) for k, v in params.items()}).mappings()]
