"""The Streamlit app: the SQL console's guard and read-only execution, and every page through AppTest
on an empty database and on the database the real jobs fill (`filled_db_url`, tests/conftest.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from streamlit.testing.v1 import AppTest

from app import charts
from atlas.errors import AtlasError
from atlas.read import queries, roles
from atlas.store.sql_check import QUERY_KINDS, SqlRefused, check_query
from atlas.store import Store

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
PAGES = {
    "app_pages/overview.py": "Neuron Atlas",
    "app_pages/sql.py": "SQL",
    "app_pages/families.py": "Neuron families",
    "app_pages/card.py": "Neuron card",
    "app_pages/compare.py": "Compare seeds",
    "app_pages/layers.py": "Layers",
    "app_pages/studies.py": "Studies",
}
TIMEOUT_S = 60

REFUSED = [
    "DROP TABLE datasets",
    "DELETE FROM datasets",
    "UPDATE datasets SET name = 'x'",
    "INSERT INTO datasets (name) VALUES ('x')",
    "ALTER TABLE datasets ADD COLUMN x INTEGER",
    "CREATE TABLE x (a INTEGER)",
    "ATTACH DATABASE 'other.db' AS other",
    "DETACH DATABASE other",
    "PRAGMA user_version = 7",
    "PRAGMA foreign_keys=OFF",
    "PRAGMA user_version(7)",
    "PRAGMA optimize",
    "VACUUM",
    "REPLACE INTO datasets (name) VALUES ('x')",
    "SELECT 1; DROP TABLE datasets",
    "SELECT 1; SELECT 2",
    "SELECT 1;\n-- a comment does not hide\nDELETE FROM datasets",
    "WITH doomed AS (SELECT id FROM datasets) DELETE FROM datasets WHERE id IN (SELECT id FROM doomed)",
    "SELECT * INTO copy FROM datasets",
    "",
    "  ;  ",
]
# The parser lets these through; the read-only database refuses them.
REFUSED_BY_THE_DATABASE = [
    "EXPLAIN ANALYZE DELETE FROM datasets",
    "EXPLAIN DELETE FROM datasets",
    "SELECT 'unterminated",
    "SELECT load_extension('anything')",
]

ALLOWED = [
    ("SELECT name FROM datasets;", "SELECT name FROM datasets"),
    ("SELECT 'DROP TABLE x; DELETE' AS words", "SELECT 'DROP TABLE x; DELETE' AS words"),
    ('SELECT "update" FROM (SELECT 1 AS "update")', 'SELECT "update" FROM (SELECT 1 AS "update")'),
    ("WITH t AS (SELECT 1 AS a) SELECT a FROM t", "WITH t AS (SELECT 1 AS a) SELECT a FROM t"),
    ("PRAGMA table_info(neurons)", "PRAGMA table_info(neurons)"),
    ("SELECT replace(name, 'a', 'b') FROM datasets", "SELECT replace(name, 'a', 'b') FROM datasets"),
    ("SELECT * FROM pragma_table_info('models')", "SELECT * FROM pragma_table_info('models')"),
    ("SELECT 1 AS load, 2 AS comment, 3 AS do, 4 AS call, 5 AS release, 6 AS security",
     "SELECT 1 AS load, 2 AS comment, 3 AS do, 4 AS call, 5 AS release, 6 AS security"),
]


@pytest.mark.parametrize("sql", REFUSED)
def test_parser_refuses_writes_and_several_statements(sql: str) -> None:
    with pytest.raises(SqlRefused, match="^refused: "):
        check_query(sql, "sqlite")


@pytest.mark.parametrize(("sql", "statement"), ALLOWED)
def test_parser_accepts_one_read_only_statement(sql: str, statement: str) -> None:
    assert check_query(sql, "sqlite") == statement


def test_example_html_shades_tokens_and_marks_the_firing_one() -> None:
    html = charts.example_html(["a", "<b>", "\n", "c"], 1, [0.5, 2.0, None, -1.0], 2.0)
    spans = html.split("<span ")[1:]
    assert len(spans) == 4 and "&lt;b&gt;" in spans[1] and "<b>" not in html.split("</b>", 1)[1]
    assert "outline:2px solid" in spans[1] and all("outline" not in span for span in spans[:1] + spans[2:])
    assert "rgba(214,39,40,0.850)" in spans[1] and "rgba(214,39,40,0.212)" in spans[0]  # 0.5 / 2.0 of full red
    assert "transparent" in spans[2] and "rgba(31,119,180,0.425)" in spans[3]  # NULL: none; negative: blue
    without_context = charts.example_html(["x", "y"], 0, None, 3.0)
    assert "rgba(214,39,40,0.850)" in without_context.split("<span ")[1]


def test_number_reads_null_as_not_available() -> None:
    assert [charts.number(None), charts.number(float("nan")), charts.number(0.12345)] == ["n/a", "n/a", "0.123"]


# --- the console's execution path on a real SQLite file --------------------------------------------


@pytest.fixture()
def console_db(tmp_path: Path):
    """A migrated SQLite file with one registry row, and the console's read-only engine on it."""
    url = f"sqlite:///{tmp_path / 'atlas.db'}"
    store = Store(url)
    with store.transaction() as session:
        session.execute(text(
            "INSERT INTO datasets (name, source, split, text_field, n_tokens, ctx_len, sample_seed, content_hash) "
            "VALUES ('held-out 100%', 'builtin:docstrings', 'train', 'text', 1000, 64, 0, 'abc')"
        ))
    engine = queries.console_engine(url)
    yield tmp_path / "atlas.db", engine
    engine.dispose()
    store.dispose()


def _snapshot(path: Path) -> tuple:
    with sqlite3.connect(path) as connection:
        schema = connection.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        rows = connection.execute("SELECT * FROM datasets ORDER BY id").fetchall()
        version = connection.execute("SELECT * FROM alembic_version").fetchall()
        user_version = connection.execute("PRAGMA user_version").fetchall()
    return schema, rows, version, user_version


def test_console_refuses_each_write_and_leaves_the_data_unchanged(console_db) -> None:
    path, engine = console_db
    before = _snapshot(path)
    for sql in REFUSED + REFUSED_BY_THE_DATABASE:
        with pytest.raises(AtlasError, match="^(refused|query failed): "):
            queries.run_console_query(engine, sql)
    assert _snapshot(path) == before
    assert len(before[1]) == 1


@pytest.mark.parametrize("statement", [
    "DELETE FROM datasets",
    "DROP TABLE datasets",
    "CREATE TABLE x (a INTEGER)",
    "PRAGMA user_version = 7",
    "ATTACH DATABASE 'file:{folder}/elsewhere.db?mode=rwc' AS other",
])
def test_read_only_connection_refuses_writes_even_without_the_guard(console_db, statement: str) -> None:
    path, engine = console_db
    before = _snapshot(path)
    with pytest.raises(AtlasError, match="^query failed: "):
        queries.execute_read_only(engine, statement.format(folder=path.parent), row_limit=10, timeout_s=5)
    assert _snapshot(path) == before
    assert not (path.parent / "elsewhere.db").exists()


def _table_state(engine) -> tuple:
    with engine.connect() as conn:
        tables = sorted(inspect(engine).get_table_names())
        datasets = conn.execute(text("SELECT id, name FROM datasets ORDER BY id")).all()
    return tables, datasets


def test_console_is_read_only_on_each_backend(db_url: str) -> None:
    """SQLite: a read-only file; PostgreSQL: the reader role, in a READ ONLY transaction with a statement timeout."""
    store = Store(db_url)
    try:
        with store.transaction() as session:
            session.execute(text(
                "INSERT INTO datasets (name, source, split, text_field, n_tokens, ctx_len, sample_seed, content_hash) "
                "VALUES ('held-out', 'builtin:docstrings', 'train', 'text', 1000, 64, 0, 'abc')"))
        engine = queries.console_engine(store.url)
        before = _table_state(store.engine)
        for sql in REFUSED:
            with pytest.raises(AtlasError, match="^(refused|query failed): "):
                queries.run_console_query(engine, sql)
        for statement in ("DELETE FROM datasets", "DROP TABLE neuron_vocab CASCADE", "CREATE TABLE x (a INTEGER)",
                          "UPDATE datasets SET name = 'changed'"):
            with pytest.raises(AtlasError, match="^query failed: "):
                queries.execute_read_only(engine, statement, row_limit=10, timeout_s=5)
        assert _table_state(store.engine) == before and len(before[1]) == 1
        found = queries.run_console_query(engine, "SELECT name FROM datasets WHERE name LIKE 'held%'")
        assert found.frame["name"].tolist() == ["held-out"]
        endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT MAX(i) FROM n"
        with pytest.raises(AtlasError, match="time limit|statement timeout"):
            queries.run_console_query(engine, endless, timeout_s=0.3)
    finally:
        store.dispose()


def test_console_reads_views_with_a_row_limit(console_db) -> None:
    _, engine = console_db
    result = queries.run_console_query(engine, "SELECT name FROM datasets WHERE name LIKE '%100%'")
    assert result.frame["name"].tolist() == ["held-out 100%"] and not result.truncated
    assert queries.run_console_query(engine, "SELECT * FROM neuron_atlas").frame.empty
    limited = queries.run_console_query(
        engine, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) SELECT i FROM n",
        row_limit=10)
    assert limited.frame["i"].tolist() == list(range(1, 11)) and limited.truncated


def test_console_stops_a_query_at_the_time_limit(console_db) -> None:
    _, engine = console_db
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT MAX(i) FROM n"
    with pytest.raises(AtlasError, match="time limit"):
        queries.run_console_query(engine, endless, timeout_s=0.3)


def test_console_reports_a_bad_query_in_one_line(console_db) -> None:
    _, engine = console_db
    with pytest.raises(AtlasError, match="^query failed: no such table: nowhere$"):
        queries.run_console_query(engine, "SELECT * FROM nowhere")


# --- AppTest ---------------------------------------------------------------------------------------


def _app(url: str, monkeypatch: pytest.MonkeyPatch, **query_params: str) -> AppTest:
    monkeypatch.setenv("ATLAS_DATABASE_URL", url)
    app = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT_S)
    app.query_params.update(query_params)
    return app.run()


def _open(app: AppTest, page: str) -> AppTest:
    app.switch_page(page).run()
    assert not app.exception, [exception.value for exception in app.exception]
    assert [title.value for title in app.title] == [PAGES[page]]
    return app


def _guidance(app: AppTest) -> str:
    return "\n".join(code.value for code in app.code)


def test_every_page_on_an_empty_database_says_what_to_run(db_url: str, monkeypatch) -> None:
    app = _app(db_url, monkeypatch)
    for page in PAGES:
        _open(app, page)
        assert not app.error
        assert app.info, f"{page}: no guidance"
        assert "atlas ingest weights" in _guidance(app), page


def test_card_link_on_an_empty_database_shows_guidance(db_url: str, monkeypatch) -> None:
    app = _app(db_url, monkeypatch, model="nowhere", layer="0", neuron="0")
    _open(app, "app_pages/card.py")
    assert "atlas ingest weights" in _guidance(app)


def test_sql_page_refuses_a_write_with_a_message(db_url: str, monkeypatch) -> None:
    app = _open(_app(db_url, monkeypatch), "app_pages/sql.py")
    app.text_area(key="sql_text").set_value("DROP TABLE models")
    app.button[0].click().run()
    assert not app.exception
    assert [error.value for error in app.error] == [f"refused: DROP is not a query; the console is read-only "
                                                    f"({QUERY_KINDS})"]
    app.text_area(key="sql_text").set_value("SELECT 'models' AS name, COUNT(*) AS n_rows FROM models")
    app.button[0].click().run()
    assert not app.error and not app.exception
    results = [frame.value for frame in app.dataframe if list(frame.value.columns) == ["name", "n_rows"]]
    assert [result.values.tolist() for result in results] == [[["models", 0]]]
    assert [button.label for button in app.get("download_button")] == ["Download CSV", "Download Parquet",
                                                                       "Download JSONL"]


def test_unmigrated_database_is_one_message_not_a_trace(empty_db_url: str, monkeypatch) -> None:
    """SQLite upgrades itself and shows guidance; PostgreSQL says which command migrates it."""
    app = _app(empty_db_url, monkeypatch)
    assert not app.exception
    if empty_db_url.startswith("sqlite"):
        assert not app.error and "atlas ingest weights" in _guidance(app)
    else:
        assert len(app.error) == 1 and "is not migrated" in app.error[0].value
        assert "atlas db upgrade" in app.error[0].value


def test_unreachable_database_is_one_message_not_a_trace(monkeypatch) -> None:
    app = _app("postgresql://atlas@127.0.0.1:9/atlas", monkeypatch)
    assert not app.exception
    assert len(app.error) == 1 and app.error[0].value.startswith("cannot connect to the database")


# --- AppTest on the database the real jobs fill (fixture in tests/conftest.py) -----------------------


def test_every_page_on_a_filled_database(filled_db_url: str, monkeypatch) -> None:
    app = _app(filled_db_url, monkeypatch)
    for page in PAGES:
        _open(app, page)
        assert not app.error, (page, [error.value for error in app.error])


def _a_neuron_with_partners(url: str) -> tuple[str, int, int]:
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            row = conn.execute(text(
                "SELECT m.name, c.layer, c.neuron FROM neuron_correlations c JOIN models m ON m.id = c.model_id "
                "WHERE c.partner_layer IS NOT NULL ORDER BY m.name, c.layer DESC, c.neuron DESC LIMIT 1"
            )).one()
    finally:
        store.dispose()
    return row[0], int(row[1]), int(row[2])


def test_card_opens_from_url_query_parameters(filled_db_url: str, monkeypatch) -> None:
    model, layer, neuron = _a_neuron_with_partners(filled_db_url)
    app = _app(filled_db_url, monkeypatch, model=model, layer=str(layer), neuron=str(neuron))
    _open(app, "app_pages/card.py")
    assert app.selectbox(key="card_model").value == model
    assert app.number_input(key="card_layer").value == layer
    assert app.number_input(key="card_neuron").value == neuron
    assert app.query_params == {"model": model, "layer": str(layer), "neuron": str(neuron)}
    assert not app.info, [info.value for info in app.info]  # weights, activations and partners all present
    assert len(app.metric) >= 4
    html = "".join(element.proto.body for element in app.get("html"))
    assert html.count('class="atlas-example"') >= 1 and "outline:2px solid" in html
    partners = queries.correlation_partners(Store(filled_db_url).engine, model, layer, neuron).dropna(
        subset=["partner_layer"])
    expected = {f"model={row.other_model}&layer={int(row.partner_layer)}&neuron={int(row.partner_neuron)}"
                for row in partners.itertuples()}
    links = {link.proto.query_string for link in app.get("page_link") if link.proto.page == "card"}
    assert expected and links == expected

    # Following a partner's link opens its card in the same session; the widgets follow the URL.
    partner = partners.iloc[0]
    app.query_params.clear()
    app.query_params.update(model=partner["other_model"], layer=str(int(partner["partner_layer"])),
                            neuron=str(int(partner["partner_neuron"])))
    app.run()
    assert not app.exception
    assert app.selectbox(key="card_model").value == partner["other_model"]
    assert app.number_input(key="card_neuron").value == int(partner["partner_neuron"])

    # Choosing another neuron with the widgets rewrites the URL, so the page stays linkable.
    other = 0 if neuron != 0 else 1
    app.number_input(key="card_neuron").set_value(other).run()
    assert app.query_params["neuron"] == str(other)


def test_families_list_links_each_neuron_to_its_card(filled_db_url: str, monkeypatch) -> None:
    app = _open(_app(filled_db_url, monkeypatch), "app_pages/families.py")
    neurons = app.dataframe[-1].value
    assert len(neurons) > 0
    assert neurons["card"].str.match(r"^card\?model=.+&layer=\d+&neuron=\d+$").all()


def test_compare_seeds_states_its_threshold(filled_db_url: str, monkeypatch) -> None:
    app = _open(_app(filled_db_url, monkeypatch), "app_pages/compare.py")
    app.slider[0].set_value(0.1).run()
    assert not app.exception
    assert any("excess correlation > **0.1**" in markdown.value for markdown in app.markdown)


def _an_entropy_candidate(url: str) -> tuple[str, int, int]:
    store = Store(url)
    with store.engine.connect() as connection:
        model, layer, neuron = connection.execute(text(
            "SELECT m.name, e.layer, e.neuron FROM entropy_interventions e JOIN models m ON m.id = e.model_id "
            "ORDER BY m.name, e.layer, e.neuron LIMIT 1")).one()
    store.dispose()
    return model, int(layer), int(neuron)


def test_card_shows_the_functional_roles(filled_db_url: str, monkeypatch) -> None:
    model, layer, neuron = _an_entropy_candidate(filled_db_url)
    app = _app(filled_db_url, monkeypatch, model=model, layer=str(layer), neuron=str(neuron))
    app = _open(app, "app_pages/card.py")
    text_shown = " ".join(markdown.value for markdown in app.markdown)
    assert "Labels: the token features" in text_shown and "Entropy intervention" in text_shown
    assert [header.value for header in app.subheader].count("Functional roles") == 1
    store = Store(filled_db_url)
    labels = roles.neuron_labels(store.engine, model, layer, neuron)
    store.dispose()
    assert any(len(frame.value) == len(labels) and "feature" in frame.value for frame in app.dataframe)


def test_families_filter_by_label(filled_db_url: str, monkeypatch) -> None:
    app = _open(_app(filled_db_url, monkeypatch), "app_pages/families.py")
    everything = len(app.dataframe[-1].value)
    label = app.selectbox(key="families_label")
    choice = label.options[1]  # the most frequent rank-0 vocabulary label, "feature (n)"
    feature, count = choice.rsplit(" (", 1)
    label.set_value(choice).run()
    assert not app.exception
    listed = app.dataframe[-1].value
    assert len(listed) == int(count.rstrip(")")) <= everything
    assert set(listed["vocab_label"]) == {feature}
    assert any("by label" in header.value for header in app.subheader)


def test_layers_page_counts_roles_by_depth(filled_db_url: str, monkeypatch) -> None:
    app = _open(_app(filled_db_url, monkeypatch), "app_pages/layers.py")
    assert any("Entropy and attention-deactivating neurons" in header.value for header in app.subheader)
    assert not app.info  # null-space fractions are there: no guidance box
