"""Every query an app page runs reads the big tables through an index condition: on a PostgreSQL atlas large enough
for the planner to prefer a sequential scan wherever no index fits (bench/atlas_scale.py's synthetic rows,
3 seeds x 8,192 neurons: 49k correlation rows, 123k top examples, 74k labels, 92k head scores), no page query's
plan reads neuron_correlations, top_examples, neuron_labels or neuron_head_scores whole (a sequential scan, or a
walk over a whole index). At a million neurons such a scan is seconds per page."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, event

from atlas.store import Store, bulk_insert
from atlas.store.schema import ActivationStat, Neuron, NeuronCorrelation, NeuronHeadScore, NeuronLabel, TopExample
from atlas.store.summaries import refresh_label_counts, refresh_layer_classes, refresh_universality

ROOT = Path(__file__).resolve().parent.parent
BIG_TABLES = ("neuron_correlations", "top_examples", "neuron_labels", "neuron_head_scores")
PAGES = ("overview", "families", "card", "compare", "layers")
SIZE = Namespace(layers=4, d_mlp=2048, seeds=3, examples=5)


def _bench():
    spec = importlib.util.spec_from_file_location("atlas_scale_bench", ROOT / "bench" / "atlas_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic_atlas(pg_server, pg_template) -> str:
    """A PostgreSQL atlas filled with the benchmark's synthetic rows through the atlas's writer, analysed."""
    bench = _bench()
    url = pg_server.create_atlas(pg_template)
    store = Store(url)
    rng = np.random.default_rng(0)
    n = SIZE.layers * SIZE.d_mlp
    universal = rng.random(n) < 0.03
    pool = bench.context_pool(rng, 1024, [f"tok{i}" for i in range(1000)])
    models, dataset = bench.registry(store, SIZE)
    with store.transaction() as session:
        for model in models:
            bulk_insert(session, Neuron, bench.neuron_columns(rng, model, n, universal))
            bulk_insert(session, ActivationStat, bench.activation_columns(rng, model, dataset, n))
            bulk_insert(session, TopExample, bench.example_columns(rng, model, dataset, range(n), SIZE.examples, pool))
            bulk_insert(session, NeuronLabel, bench.label_columns(rng, model, dataset, n))
            bulk_insert(session, NeuronHeadScore, bench.head_score_columns(rng, model, dataset, n))
            for other in models:
                if other.id != model.id:
                    bulk_insert(session, NeuronCorrelation,
                                bench.correlation_columns(rng, model, other, dataset, n, universal))
        refresh_universality(session, [model.id for model in models], dataset.id)
        refresh_layer_classes(session, [model.id for model in models])
        refresh_label_counts(session, [model.id for model in models])
    with store.engine.begin() as connection:  # committed: ANALYZE in a rolled-back transaction keeps no statistics
        connection.exec_driver_sql("ANALYZE")
    store.dispose()
    return url


def page_statements(url: str, monkeypatch) -> list[tuple[str, object]]:
    """(statement, parameters) of every SELECT the app's pages run."""
    from streamlit.testing.v1 import AppTest

    statements: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            statements.append((statement, parameters))

    monkeypatch.setenv("ATLAS_DATABASE_URL", url)
    event.listen(Engine, "before_cursor_execute", record)
    try:
        app = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
        app.run()
        for page in PAGES:
            app.switch_page(f"app_pages/{page}.py").run()
            assert not app.exception, [e.value for e in app.exception]
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    return statements


def sequential_reads(node: dict, bounded: bool = False) -> list[str]:
    """The big tables a plan reads whole: a sequential scan, or a walk over a whole index (an index scan with
    no index condition); unless the scan feeds a LIMIT directly (an existence probe stops at the first row)."""
    found = []
    whole = node["Node Type"] == "Seq Scan" or (node["Node Type"] in ("Index Scan", "Index Only Scan")
                                                and "Index Cond" not in node)
    if node.get("Relation Name") in BIG_TABLES and whole and not bounded:
        found.append(node["Relation Name"])
    for child in node.get("Plans", []):
        found += sequential_reads(child, bounded=node["Node Type"] == "Limit")
    return found


def _plan(url: str, sql: str, params=None) -> dict:
    import psycopg
    from sqlalchemy.engine import make_url

    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn, conn.cursor() as cursor:
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        return cursor.fetchone()[0][0]["Plan"]


def test_page_queries_never_scan_the_big_tables(synthetic_atlas, monkeypatch):
    statements = page_statements(synthetic_atlas, monkeypatch)
    touching = [(sql, params) for sql, params in statements if any(table in sql for table in BIG_TABLES)]
    assert len(touching) >= 5, "the pages ran few queries on the big tables: the test would prove little"
    for sql, params in touching:
        plan = _plan(synthetic_atlas, sql, params)
        assert not sequential_reads(plan), f"a page query scans {sequential_reads(plan)} sequentially:\n{sql}\n{plan}"


def test_the_check_catches_a_full_scan(synthetic_atlas):
    """How the Overview page used to count every table's rows is caught."""
    plan = _plan(synthetic_atlas, "SELECT 'top_examples' AS table_name, COUNT(*) AS n_rows FROM top_examples")
    assert sequential_reads(plan) == ["top_examples"]
