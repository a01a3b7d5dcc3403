"""Benchmark: the atlas at paper scale, in PostgreSQL.

Builds a synthetic atlas through the atlas's own schema (migrations) and bulk writer, then times, from
the server's side of the app: every app page (Streamlit's AppTest: the page's whole script, queries and
charts included), a neuron card, every example query of the README, and each writer's rows/s against a
raw binary COPY of the same rows into a copy of the same table (its indexes and foreign keys too: the
server's share of every write). One table, with the goal beside each.

The default size is GPT-2 medium x 10 seeds: 24 layers x 4,096 neurons x 10 models (983,040 neurons,
8.8M neuron_correlations rows, 20 top examples a neuron, 3 labels and 5 head scores a neuron). Distributions: vocabulary kurtosis
heavy-tailed (a few % prediction / suppression neurons), a few % of neurons universal (the same
neurons in every seed), the rest with max_corr well under the threshold; null-space fractions around a
random direction's share with a few entropy neurons in the last layers. Each model also gets its layer
measurements (a deletion per layer, swaps, the logit lens, attention and output norms, d_model / 64 heads),
shaped like the Stages of Inference curves, so the Layers page is timed on its charts.

The first model writes one table at a time (the writer's rows/s and the raw COPYs come from it); later
models write their correlations and labels on a second connection beside the top examples (--one-writer:
one at a time throughout). The build's time is a goal too, with a line of where it went.

    python bench/atlas_scale.py                                   # the default size (allow ~20 min here)
    python bench/atlas_scale.py --layers 2 --d-mlp 256 --seeds 3 --examples 5   # a quick look
    python bench/atlas_scale.py --keep                            # keep the database for `atlas app`

--admin-url names a server and a role that may create databases; the benchmark creates (and, without
--keep, drops) the database --name there.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGE_GOAL_S, CARD_GOAL_S, QUERY_GOAL_S, WRITER_GOAL, BUILD_GOAL_S = 1.0, 0.3, 0.5, 0.5, 1200.0
CONTEXT = 29  # tokens in a top example's window (24 before, 4 after)
CONTEXT_POOL = 32_768  # distinct context windows the top examples pick from (see ContextPool)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL URL whose role may create databases")
    parser.add_argument("--name", default="atlas_scale", help="the database to create (dropped first if it exists)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-mlp", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--examples", type=int, default=20, help="top examples per neuron")
    parser.add_argument("--universal", type=float, default=0.03, help="share of universal neurons")
    parser.add_argument("--one-writer", action="store_true",
                        help="write every table one after the other on one connection, for every model (by default "
                             "the correlations and labels of the second model on go in on a second connection "
                             "beside the top examples)")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--time-only", action="store_true",
                        help="time the pages, card and queries of an atlas kept by an earlier --keep run (same "
                             "--name and sizes), without filling it again (no writer figures)")
    return parser.parse_args()


@dataclass
class Report:
    rows: list[tuple[str, str, float, str, bool]] = field(default_factory=list)  # section, item, value, goal, met

    def add(self, section: str, item: str, value: float, goal: float, higher_is_better: bool = False,
            unit: str = "s", met_override: bool | None = None) -> None:
        met = value >= goal if higher_is_better else value < goal
        if met_override is not None:
            met = met_override
        self.rows.append((section, item, value, f"{'>=' if higher_is_better else '<'} {goal:g} {unit}", met))

    def print(self) -> None:
        width = max(len(item) for _, item, *_ in self.rows)
        print(f"\n{'section':<8} {'item':<{width}} {'measured':>10} {'goal':>12}  met")
        for section, item, value, goal, met in self.rows:
            print(f"{section:<8} {item:<{width}} {value:>10.3f} {goal:>12}  {'yes' if met else 'NO'}")
        print(f"{sum(met for *_, met in self.rows)}/{len(self.rows)} goals met")


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    elapsed: list[float] = []
    yield lambda: elapsed[0] if elapsed else time.perf_counter() - start
    elapsed.append(time.perf_counter() - start)


# -- the database ---------------------------------------------------------------------------------

def fresh_database(admin_url: str, name: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise SystemExit(f"--name {name!r}: use lower-case letters, digits and _")
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def kept_database(admin_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def kept_models(store) -> list:
    from sqlalchemy import select

    from atlas.store.schema import Model

    with store.session() as session:
        models = session.scalars(select(Model).order_by(Model.seed)).all()
        session.expunge_all()
    if not models:
        raise SystemExit(f"{store.display_url} holds no atlas: run without --time-only first (with --keep)")
    return list(models)


def drop_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    engine.dispose()


# -- synthetic rows -------------------------------------------------------------------------------

def registry(store, args: argparse.Namespace) -> tuple[list, object]:
    """The family's models, the dataset and a done job for each result the tables will hold."""
    from atlas.store.schema import Dataset, Model

    with store.transaction() as session:
        models = [Model(name=f"scale-seed{seed}", family="scale", seed=seed, source=f"synthetic/seed{seed}",
                        architecture="gpt2", n_layers=args.layers, d_model=args.d_mlp // 4, d_mlp=args.d_mlp,
                        vocab_size=50257, tokenizer_hash="0" * 64, weights_hash=f"{seed:064x}",
                        resolved_revision=f"sha256:{seed:064x}") for seed in range(args.seeds)]
        dataset = Dataset(name="scale-data", source="synthetic", n_tokens=100_000_000, ctx_len=1024,
                          content_hash="0" * 64, resolved_revision="sha256:" + "0" * 64)
        session.add_all([*models, dataset])
        session.flush()
        session.expunge_all()
    return models, dataset


def job_row(store, kind: str, model, dataset=None, other=None) -> int:
    from atlas import __version__
    from atlas.store.schema import Job

    with store.transaction() as session:
        job = Job(kind=kind, model_id=model.id, dataset_id=None if dataset is None else dataset.id,
                  other_model_id=None if other is None else other.id, config={"synthetic": True},
                  config_hash="0" * 64, status="done", atlas_version=__version__, n_rows=0)
        session.add(job)
        session.flush()
        return job.id


def neuron_columns(rng: np.random.Generator, model, n: int, universal: np.ndarray) -> dict:
    from atlas.metrics.entropy import null_space_dimension, null_space_size  # imported (torch) before the build

    kurt = 3.0 + rng.lognormal(0.0, 1.0, n)  # heavy-tailed: a few % above 10
    skew = rng.normal(0.0, 1.0, n) * np.sqrt(kurt - 2.5)
    var = rng.lognormal(np.log(1.0 / model.d_model), 0.5, n)
    vocab_class = np.where(kurt > 10, np.where(skew > 0, "prediction", "suppression"),
                           np.where(var > 5.12 / model.d_model, "partition", "none"))
    layer = np.arange(n) // model.d_mlp
    # The weights job's null-space fractions (GPT-2: LayerNorm, centred): around a random direction's share,
    # with ~0.1% entropy neurons (well over 10x that share) in the last two layers.
    null_random = null_space_size(model.d_model) / null_space_dimension(model.d_model, centered=True)
    null_frac = null_random * rng.gamma(4.0, 0.25, n)
    entropy = (layer >= model.n_layers - 2) & (rng.random(n) < 0.001)
    null_frac[entropy] = rng.uniform(0.3, 0.9, int(entropy.sum()))
    return {"model_id": model.id, "layer": layer, "neuron": np.arange(n) % model.d_mlp,
            "w_in_norm": rng.lognormal(0, 0.2, n), "w_out_norm": rng.lognormal(0, 0.2, n),
            "in_out_cos": rng.normal(0, 0.1, n), "l2_penalty": rng.lognormal(0, 0.3, n), "b_in": rng.normal(0, 0.1, n),
            "vocab_mean": rng.normal(0, 0.01, n), "vocab_var": var, "vocab_skew": skew, "vocab_kurt": kurt,
            "vocab_class": vocab_class, "w_gate_norm": np.full(n, np.nan), "null_frac": null_frac,
            "null_frac_random": null_random}


def activation_columns(rng: np.random.Generator, model, dataset, n: int) -> dict:
    mean = rng.normal(-0.05, 0.05, n)
    return {"model_id": model.id, "dataset_id": dataset.id, "layer": np.arange(n) // model.d_mlp,
            "neuron": np.arange(n) % model.d_mlp, "n": np.full(n, 100_000_000), "mean": mean,
            "var": rng.lognormal(-3, 0.5, n), "skew": rng.normal(2, 1, n), "kurt": 3 + rng.lognormal(1, 1, n),
            "max": mean + rng.lognormal(1, 0.5, n), "min": mean - rng.lognormal(-2, 0.3, n),
            "frac_active": rng.uniform(0.01, 0.5, n)}


@dataclass
class ContextPool:
    """Context windows drawn once (token ids, their strings, the neuron's activation on each token) as the
    Python lists the activations job hands the writer. Each top example takes one: the writer encodes every
    row's lists as it would fresh ones (each row is its own COPY value and its own stored value), and the
    bench does not draw and convert 57M Python values per model (30 s of a model's build, measured)."""

    ids: list[list[int]]
    tokens: list[list[str]]
    values: list[list[float]]


def context_pool(rng: np.random.Generator, size: int, vocab: list[str]) -> ContextPool:
    ids = rng.integers(0, len(vocab), (size, CONTEXT))
    return ContextPool(ids.tolist(), np.asarray(vocab, dtype=object)[ids].tolist(),
                       rng.normal(0, 0.5, (size, CONTEXT)).round(4).tolist())


def example_columns(rng: np.random.Generator, model, dataset, features: range, k: int, pool: ContextPool) -> dict:
    """k top examples of each of the model's features (layer * d_mlp + neuron) in the range."""
    n = len(features)
    rows = n * k
    neuron = np.repeat(np.arange(features.start, features.stop), k)
    activation = np.sort(rng.lognormal(1, 0.4, (n, k)), axis=1)[:, ::-1].reshape(-1)
    # Consecutive windows from a random start: a neuron's k examples differ, and the writer reads the lists in
    # memory order, as it reads lists the job has just built (random picks read ~30% slower: cache misses).
    pick = ((int(rng.integers(0, len(pool.ids))) + np.arange(rows)) % len(pool.ids)).tolist()
    return {"model_id": model.id, "dataset_id": dataset.id, "layer": neuron // model.d_mlp,
            "neuron": neuron % model.d_mlp, "rank": np.tile(np.arange(k), n),
            "doc_index": rng.integers(0, 1_000_000, rows), "position": rng.integers(0, 1024, rows),
            "activation": activation, "context_token_ids": [pool.ids[i] for i in pick],
            "context_tokens": [pool.tokens[i] for i in pick], "highlight_index": np.full(rows, 24),
            "context_activations": [pool.values[i] for i in pick]}


def correlation_columns(rng: np.random.Generator, model, other, dataset, n: int, universal: np.ndarray) -> dict:
    baseline = rng.uniform(0.15, 0.35, n)
    max_corr = np.where(universal, rng.uniform(0.85, 0.98, n), baseline + rng.uniform(0.02, 0.3, n))
    return {"model_id": model.id, "other_model_id": other.id, "dataset_id": dataset.id,
            "layer": np.arange(n) // model.d_mlp, "neuron": np.arange(n) % model.d_mlp, "max_corr": max_corr,
            "partner_layer": rng.integers(0, model.n_layers, n), "partner_neuron": rng.integers(0, model.d_mlp, n),
            "baseline_max_corr": baseline, "universal_threshold": 0.5}


LABEL_FEATURES = ("leading_space", "capitalized", "digits", "year", "period", "comma", "newline", "ends_with_ing",
                  "ends_with_s", "stopword", "pronoun_third", "month", "code_like", "open_bracket", "quote")


def label_columns(rng: np.random.Generator, model, dataset, n: int) -> dict:
    """The top 3 labels of every neuron for the current-token source (a Zipf-like choice of features)."""
    weights = 1.0 / np.arange(1, len(LABEL_FEATURES) + 1)
    features = rng.choice(len(LABEL_FEATURES), size=(n, 3), p=weights / weights.sum())
    scores = np.sort(rng.beta(1, 8, (n, 3)), axis=1)[:, ::-1]
    return {"model_id": model.id, "dataset_id": dataset.id, "layer": np.repeat(np.arange(n) // model.d_mlp, 3),
            "neuron": np.repeat(np.arange(n) % model.d_mlp, 3), "source": "current_token",
            "rank": np.tile(np.arange(3), n), "feature": np.asarray(LABEL_FEATURES, dtype=object)[features.reshape(-1)],
            "score": scores.reshape(-1), "mean_with": rng.normal(0.5, 0.2, 3 * n),
            "mean_without": rng.normal(0.0, 0.1, 3 * n)}


def head_score_columns(rng: np.random.Generator, model, dataset, n: int, top_heads: int = 5) -> dict:
    """The attention-roles job's scores: for every neuron before the last layer, its top 5 later heads by |z|
    (z Student-t with 8 degrees of freedom: a few % of the neurons deactivate some head, z <= -3, score < 0)."""
    n_layers, n_heads = n // model.d_mlp, max(1, model.d_model // 64)
    kept = np.arange(n)[np.arange(n) // model.d_mlp < n_layers - 1]  # the last layer has no later head
    layer, neuron = np.repeat(kept // model.d_mlp, top_heads), np.repeat(kept % model.d_mlp, top_heads)
    head_layer = layer + 1 + (rng.random(layer.size) * (n_layers - 1 - layer)).astype(int)
    magnitude = np.sort(np.abs(rng.standard_t(8, (kept.size, top_heads))), axis=1)[:, ::-1].reshape(-1)
    z = np.where(rng.random(layer.size) < 0.6, -magnitude, magnitude)
    return {"model_id": model.id, "dataset_id": dataset.id, "layer": layer, "neuron": neuron,
            "rank": np.tile(np.arange(top_heads), kept.size), "head_layer": head_layer,
            "head": rng.integers(0, n_heads, layer.size), "score": z * rng.lognormal(-3.0, 0.5, z.size), "z": z}


def layer_tables(rng: np.random.Generator, model, dataset) -> dict[str, dict]:
    """The layer measurements of one model, shaped like the Stages of Inference curves of GPT-2 (Lad et al.,
    2024, Figure 1): the interventions job (a 'none' row, a deletion per layer, a swap per adjacent pair),
    the lens job (the logit lens per residual state 0..n_layers, attention and output norms per layer) and
    the heads job (per head: subjoiner score, attention to the first position and the previous token)."""
    n_layers, n_heads = model.n_layers, max(1, model.d_model // 64)
    depth = np.arange(n_layers) / max(1, n_layers - 1)

    def noise(size: int, scale: float = 0.15) -> np.ndarray:  # the spread from seed to seed
        return rng.lognormal(0.0, scale, size)

    base = {"accuracy": 0.42 * noise(1, 0.02)[0], "loss": 2.95 * noise(1, 0.02)[0], "entropy": 2.7 * noise(1, 0.03)[0]}
    n_positions = 100_000

    delete_kl = (0.04 + 0.5 * np.exp(-8 * depth) + 0.6 * depth ** 8) * noise(n_layers)
    delete_kl[0] = 6.0 * noise(1)[0]  # the first block: removing it breaks the model (stage 1, detokenization)
    swap_kl = (0.03 + 0.4 * np.exp(-8 * depth[:-1]) + 0.4 * depth[:-1] ** 8) * noise(n_layers - 1)
    kl = np.concatenate([[np.nan], delete_kl, swap_kl])  # the 'none' row first: no comparison (NaN -> NULL)
    retention = np.exp(-0.8 * kl)
    interventions = {
        "kind": ["none"] + ["delete"] * n_layers + ["swap"] * (n_layers - 1),
        "layer": [None, *range(n_layers), *range(n_layers - 1)], "n_positions": n_positions, "kl": kl,
        "top1_agreement": 1.0 - 0.7 * (1.0 - np.exp(-kl)),
        "accuracy": base["accuracy"] * np.nan_to_num(retention, nan=1.0), "accuracy_retention": retention,
        "loss": base["loss"] + 0.9 * np.nan_to_num(kl), "loss_delta": 0.9 * kl,
        "entropy": base["entropy"] + 0.3 * np.nan_to_num(kl) * noise(len(kl))}
    states = np.arange(n_layers + 1) / n_layers  # residual state s: after block s - 1
    lens_kl = 9.0 * (1.0 - states) ** 1.5 * noise(n_layers + 1)  # 0 at the final state: the model's own output
    entropy = 2.8 + 4.7 * (1.0 - states) ** 2 * noise(n_layers + 1, 0.05)
    agreement = np.exp(-lens_kl / 2)
    lens = {"layer": np.arange(n_layers + 1), "kl_to_final": lens_kl, "entropy_nats": entropy,
            "entropy_bits": entropy / np.log(2), "top1_agreement": agreement, "accuracy": base["accuracy"] * agreement}
    mlp_out = (8.0 + 30.0 * depth ** 2) * noise(n_layers)
    mlp_out[-1] *= 3.0  # the last MLP writes the largest updates
    stats = {"layer": np.arange(n_layers), "attn_prev5": np.clip((0.55 - 0.25 * depth) * noise(n_layers), 0, 1),
             "attn_out_norm": (5.0 + 20.0 * depth) * noise(n_layers), "mlp_out_norm": mlp_out}
    head_layer = np.repeat(np.arange(n_layers), n_heads)
    subjoiner = rng.normal(0.02, 0.05, n_layers * n_heads)
    early = (head_layer > 0) & (head_layer < n_layers // 2)
    subjoiners = early & (rng.random(n_layers * n_heads) < 0.05)  # a few subjoiner heads in the early middle
    subjoiner[subjoiners] = rng.uniform(0.3, 0.6, int(subjoiners.sum()))
    baseline = rng.uniform(0.05, 0.2, n_layers * n_heads)
    attn_first = np.where(head_layer < 2, rng.uniform(0.1, 0.3, n_layers * n_heads),
                          rng.uniform(0.5, 0.9, n_layers * n_heads))  # the attention sink after the first blocks
    heads = {"layer": head_layer, "head": np.tile(np.arange(n_heads), n_layers), "subjoiner": subjoiner,
             "subjoiner_attn": baseline + subjoiner, "subjoiner_baseline": baseline,
             "n_continuations": int(rng.integers(20_000, 40_000)), "attn_first": attn_first,
             "attn_prev": rng.beta(2, 8, n_layers * n_heads)}
    where = {"model_id": model.id, "dataset_id": dataset.id}
    return {"interventions": {**where, **interventions}, "lens": {**where, **lens}, "layer_stats": {**where, **stats},
            "heads": {**where, **heads}}


def write_layers(store, rng: np.random.Generator, model, dataset) -> None:
    """The layer measurements through the writer, each job's rows in its transaction (a few hundred rows a
    model: no writer comparison)."""
    from atlas.store.bulk import bulk_insert
    from atlas.store.schema import HeadStat, LayerIntervention, LayerStat, LogitLens

    tables = layer_tables(rng, model, dataset)
    for kind, writes in (("interventions", [(LayerIntervention, tables["interventions"])]),
                         ("lens", [(LayerStat, tables["layer_stats"]), (LogitLens, tables["lens"])]),
                         ("heads", [(HeadStat, tables["heads"])])):
        job_id = job_row(store, kind, model, dataset)
        with store.transaction() as session:
            for table_model, columns in writes:
                bulk_insert(session, table_model, {**columns, "job_id": job_id})


# -- writing, against a raw binary COPY -----------------------------------------------------------

@dataclass
class WriterTimes:
    rows: int = 0
    seconds: float = 0.0
    alone_rows: int = 0  # written with no other write beside them: the rows/s compared with the raw COPY
    alone_seconds: float = 0.0
    raw_rows: int = 0
    raw_seconds: float = 0.0
    bare_seconds: float = 0.0
    compare_seconds: float = 0.0  # the comparisons in all: rows made ready, tables created, both copies


def write(store, table_model, columns: dict, job_id: int, times: WriterTimes, compare_raw: bool,
          alone: bool = True) -> None:
    """The atlas's writer (bulk_insert: COPY through psycopg) in one transaction; for the first batch of a
    table, a raw binary COPY of the same rows into a copy of the table as well (the whole batch: a COPY's
    rows/s depends on the batch's size, a smaller sample flatters the raw side). alone: no other write runs
    beside this one (only those count in the writer's rows/s)."""
    import json

    from sqlalchemy import JSON

    from atlas.store.bulk import bulk_insert, rows_from_columns

    columns = {**columns, "job_id": job_id} if "job_id" in table_model.__table__.c else columns
    with timed() as elapsed, store.transaction() as session:
        rows = bulk_insert(session, table_model, columns)
    times.rows += rows
    times.seconds += elapsed()
    if alone:
        times.alone_rows += rows
        times.alone_seconds += elapsed()
    if compare_raw:
        compare_start = time.perf_counter()
        names, rows = rows_from_columns(columns)  # not timed: the raw side gets its rows ready-made
        json_columns = {i for i, name in enumerate(names) if isinstance(table_model.__table__.c[name].type, JSON)}
        rows = [tuple(json.dumps(v) if i in json_columns and v is not None else v for i, v in enumerate(row))
                for row in rows]
        times.raw_seconds += raw_copy(store, table_model.__table__, names, rows)
        times.bare_seconds += bare_copy(store, table_model.__table__, names, rows)
        times.raw_rows += len(rows)
        times.compare_seconds += time.perf_counter() - compare_start


def raw_copy(store, table, names: list[str], rows: list[tuple]) -> float:
    """Seconds for psycopg's binary COPY of the rows, and its commit, into an empty copy of the table with
    the table's indexes and foreign keys: the work the server does for the writer too (a bare copy would
    time the COPY without the checks that every atlas write pays; `bare_copy` times that)."""
    connection = store.engine.raw_connection()
    try:
        driver = connection.driver_connection
        with driver.cursor() as cursor:
            cursor.execute(f'CREATE TABLE raw_copy (LIKE "{table.name}" INCLUDING ALL)')
            cursor.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass "
                           "AND contype = 'f'", (f'"{table.name}"',))
            for (foreign_key,) in cursor.fetchall():
                cursor.execute(f"ALTER TABLE raw_copy ADD {foreign_key}")
            driver.commit()
            start = time.perf_counter()
            _binary_copy(cursor, "raw_copy", table, names, rows)
            driver.commit()
            seconds = time.perf_counter() - start
            cursor.execute("DROP TABLE raw_copy")
        driver.commit()
    finally:
        connection.close()
    return seconds


def bare_copy(store, table, names: list[str], rows: list[tuple]) -> float:
    """Seconds for the same binary COPY into a temporary copy of the table without indexes or constraints."""
    connection = store.engine.raw_connection()
    try:
        driver = connection.driver_connection
        with driver.cursor() as cursor:
            cursor.execute(f'CREATE TEMP TABLE bare_copy (LIKE "{table.name}" INCLUDING DEFAULTS)')
            start = time.perf_counter()
            _binary_copy(cursor, "bare_copy", table, names, rows)
            seconds = time.perf_counter() - start
            cursor.execute("DROP TABLE bare_copy")
        driver.commit()
    finally:
        connection.close()
    return seconds


def _binary_copy(cursor, target: str, table, names: list[str], rows: list[tuple]) -> None:
    """psycopg's binary COPY of ready-made rows: JSON values arrive serialised and go as text (json's binary
    input form is its text; psycopg's json dumper would encode a str once more, as a JSON string)."""
    column_list = ", ".join(f'"{name}"' for name in names)
    with cursor.copy(f"COPY {target} ({column_list}) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types([_pg_type(table.c[name]) for name in names])
        for row in rows:
            copy.write_row(row)


def _pg_type(column) -> str:
    from sqlalchemy import JSON, DateTime, Float, Integer, String, Text

    kind = column.type
    if isinstance(kind, JSON):
        return "text"  # serialised already
    if isinstance(kind, Float):
        return "float8"
    if isinstance(kind, Integer):
        return "int8" if kind.__class__.__name__ == "BigInteger" else "int4"
    if isinstance(kind, (String, Text)):
        return "text"
    if isinstance(kind, DateTime):
        return "timestamptz"
    raise TypeError(f"no binary COPY type for {column.name}: {kind}")


def fill(store, args: argparse.Namespace, report: Report) -> tuple[list, object]:
    """Each model as its jobs write it: weights (and the layer classes), activations and top examples,
    correlations with every other seed, labels, the layer measurements, then the universality summary.

    The first model writes one table at a time: its writes give the writer's rows/s, beside raw COPYs of
    the same batches. From the second model on (unless --one-writer), its correlations and labels, which
    keep the server busy and Python idle, go in on a second connection while the top examples are encoded,
    as a correlations job may run beside an activations job: the build uses both cores."""
    import importlib

    from atlas.store.schema import (ActivationStat, Neuron, NeuronCorrelation, NeuronHeadScore, NeuronLabel,
                                    TopExample)
    from atlas.store.summaries import refresh_label_counts, refresh_layer_classes, refresh_universality

    importlib.import_module("atlas.metrics.entropy")  # neuron_columns's null-space size: torch loads here, untimed
    rng = np.random.default_rng(0)
    n = args.layers * args.d_mlp
    universal = rng.random(n) < args.universal
    models, dataset = registry(store, args)
    writers = {name: WriterTimes() for name in ("neurons", "activation_stats", "top_examples", "neuron_correlations",
                                                "neuron_labels", "neuron_head_scores")}
    summaries = {"universality": 0.0, "layer classes": 0.0, "label counts": 0.0}
    start = time.perf_counter()
    pool = context_pool(rng, CONTEXT_POOL, [f"tok{i}" for i in range(5000)])
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="second-writer") as second:
        for index, model in enumerate(models):
            first = index == 0  # the first write of each table, on the first model, is compared with a raw COPY
            beside = not first and not args.one_writer
            write(store, Neuron, neuron_columns(rng, model, n, universal), job_row(store, "weights", model),
                  writers["neurons"], first)
            with timed() as elapsed, store.transaction() as session:  # what the weights job does with its rows
                refresh_layer_classes(session, [model.id])
            summaries["layer classes"] += elapsed()
            activations_job = job_row(store, "activations", model, dataset)
            write(store, ActivationStat, activation_columns(rng, model, dataset, n), activations_job,
                  writers["activation_stats"], first)
            # The correlation and label rows, made here: the generator serves one thread.
            later = [(NeuronCorrelation, correlation_columns(rng, model, other, dataset, n, universal),
                      job_row(store, "correlations", model, dataset, other), writers["neuron_correlations"],
                      first and other.id == models[1].id) for other in models if other.id != model.id]
            later.append((NeuronLabel, label_columns(rng, model, dataset, n), job_row(store, "labels", model, dataset),
                          writers["neuron_labels"], first))
            later.append((NeuronHeadScore, head_score_columns(rng, model, dataset, n),
                          job_row(store, "attention-roles", model, dataset), writers["neuron_head_scores"], first))
            pending = second.submit(lambda later=later: [write(store, *w, alone=False) for w in later]) \
                if beside else None
            for chunk in range(0, n, 8192):  # top examples in slices: their Python rows are large
                columns = example_columns(rng, model, dataset, range(chunk, min(n, chunk + 8192)), args.examples,
                                          pool)
                write(store, TopExample, columns, activations_job, writers["top_examples"], first and chunk == 0,
                      alone=not beside)
            if pending is None:
                for w in later:
                    write(store, *w)
            else:
                pending.result()
            write_layers(store, rng, model, dataset)
            with timed() as elapsed, store.transaction() as session:  # what the correlations job does per pass
                refresh_universality(session, [model.id], dataset.id)
            summaries["universality"] += elapsed()
            with timed() as elapsed, store.transaction() as session:  # what the labels job does with its rows
                refresh_label_counts(session, [model.id])
            summaries["label counts"] += elapsed()
            print(f"filled {model.name}: {time.perf_counter() - start:,.0f} s so far", flush=True)
    with store.engine.begin() as connection:  # committed: statistics written in a rolled-back transaction are lost
        connection.exec_driver_sql("ANALYZE")
    seconds = time.perf_counter() - start
    print(f"atlas filled in {seconds:,.0f} s: {args.seeds} models x {n:,} neurons; the universality summary of a "
          f"model rebuilt in {summaries['universality'] / len(models):.1f} s on average")
    compared = sum(times.compare_seconds for times in writers.values())
    print("build: the writer " + ", ".join(f"{name} {times.seconds:,.0f} s" for name, times in writers.items())
          + f"{' (the correlations and labels beside the top examples)' if not args.one_writer else ''}; the raw "
          f"and bare COPY comparisons {compared:,.0f} s; summaries "
          + ", ".join(f"{name} {value:,.0f} s" for name, value in summaries.items()))
    for name, times in writers.items():
        alone = times.alone_rows / times.alone_seconds
        ratio = alone / (times.raw_rows / times.raw_seconds)
        print(f"writer {name}: {alone:,.0f} rows/s written alone ({times.alone_rows:,} rows), "
              f"{times.rows / times.seconds:,.0f} over the build; raw binary COPY "
              f"{times.raw_rows / times.raw_seconds:,.0f} rows/s into a copy with the table's indexes and foreign "
              f"keys, {times.raw_rows / times.bare_seconds:,.0f} rows/s into a bare temporary copy "
              f"({times.raw_rows:,} rows)")
        report.add("writer", f"{name} rows/s vs raw COPY", ratio, WRITER_GOAL, higher_is_better=True, unit="x")
    report.add("build", "building the atlas", seconds, BUILD_GOAL_S)
    return models, dataset


# -- reading --------------------------------------------------------------------------------------

def readme_queries() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    return [s for s in statements if s and not all(line.startswith("--") for line in s.splitlines())]


def time_queries(store, report: Report) -> None:
    from sqlalchemy import text

    for query in readme_queries():
        label = next((line[3:] for line in query.splitlines() if line.startswith("-- ")), query.splitlines()[0])
        with store.engine.connect() as connection, timed() as elapsed:
            connection.execute(text(query)).fetchall()
        report.add("query", f"README: {label[:60]}", elapsed(), QUERY_GOAL_S)


def time_card(store, models, args: argparse.Namespace, report: Report) -> None:
    from atlas.read import queries
    from atlas.read.card import load_card

    info = queries.model_info(store.engine, models[0].name)
    load_card(store.engine, info, 0, 0)  # the connection pool's first connection is not the card's cost
    with timed() as elapsed:
        load_card(store.engine, info, args.layers // 2, args.d_mlp // 3)
    report.add("card", "neuron card (every query of it)", elapsed(), CARD_GOAL_S)


def time_pages(url: str, report: Report) -> None:
    from streamlit.testing.v1 import AppTest

    os.environ["ATLAS_DATABASE_URL"] = url
    app = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=600)
    app.run()
    for page in ("overview", "families", "card", "compare", "layers", "sql", "studies"):
        with timed() as elapsed:
            app.switch_page(f"app_pages/{page}.py").run()
        _report_page(app, report, page, elapsed())
        for state, change in WIDGET_STATES.get(page, []):
            with timed() as elapsed:
                change(app).run()
            _report_page(app, report, f"{page}: {state}", elapsed())


def _report_page(app, report: Report, item: str, seconds: float) -> None:
    # A page that stopped with an error message (st.error + st.stop) rendered nothing: a failure too. A
    # guidance box (what is missing, and the command that fills it) is named: that part was not timed on content.
    failed = [element.value for element in [*app.exception, *app.error]] or ([] if app.title else ["no title"])
    guidance = [info.value for info in app.info if info.icon == ":material/terminal:"]
    note = f" (FAILED: {failed[0][:40]})" if failed else f" (guidance: {guidance[0][:40]})" if guidance else ""
    report.add("page", f"{item}{note}", seconds, PAGE_GOAL_S, met_override=False if failed else None)


# The main widget states of each page, in the order a visitor would try them (each from the state before).
WIDGET_STATES: dict[str, list[tuple[str, Callable]]] = {
    "families": [
        ("universal only", lambda app: app.checkbox[0].check()),
        ("classes prediction + suppression", lambda app: app.multiselect[1].set_value(["prediction", "suppression"])),
        ("layers 12-23", lambda app: app.slider[0].set_value((12, 23))),
        ("label source current_token", lambda app: app.selectbox(key="families_label_source").set_value("current_token")),
        ("a rank-0 label", lambda app: app.selectbox(key="families_label").set_value(
            app.selectbox(key="families_label").options[1])),
    ],
    "card": [
        ("another neuron", lambda app: app.number_input(key="card_neuron").set_value(1234)),
        ("another layer", lambda app: app.number_input(key="card_layer").set_value(20)),
    ],
    "layers": [
        ("overlay the family", lambda app: app.multiselect[0].set_value(app.multiselect[0].options[:1])),
    ],
    "compare": [
        ("threshold 0.3", lambda app: app.slider[0].set_value(0.3)),
        ("the 10th neuron", lambda app: app.selectbox[-1].set_value(9)),
        ("another reference seed", lambda app: app.selectbox[2].set_value(app.selectbox[2].options[-1])),
    ],
}


def main() -> None:
    args = parse_args()
    from atlas.store import Store
    from atlas.store.read_only import create_reader

    report = Report()
    if args.time_only:
        url = kept_database(args.admin_url, args.name)
        args.keep = True
    else:
        url = fresh_database(args.admin_url, args.name)
    try:
        store = Store(url, check=False)
        store.upgrade()
        create_reader(store.engine)  # the SQL page's role (`atlas db create-reader`), as in production
        models = kept_models(store) if args.time_only else fill(store, args, report)[0]
        time_queries(store, report)
        time_card(store, models, args, report)
        time_pages(url, report)
        store.dispose()
        report.print()
    finally:
        if not args.keep:
            drop_database(args.admin_url, args.name)
        else:
            print(f"kept: atlas app --db {url}")


if __name__ == "__main__":
    main()
