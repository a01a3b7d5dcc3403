"""SQL console: read-only in the database itself (see atlas.store.read_only), friendly refusals from a parser."""

from __future__ import annotations

import streamlit as st

from app import connection, guidance
from atlas.errors import AtlasError
from atlas.read import export, queries

ROW_LIMITS = [100, 1000, 10_000, 100_000]
TIMEOUT_S = 15.0
DOWNLOADS = [("Download CSV", "csv", "text/csv"), ("Download Parquet", "parquet", "application/vnd.apache.parquet"),
             ("Download JSONL", "jsonl", "application/jsonl")]


def render() -> None:
    st.title("SQL")
    st.caption(
        "One read-only statement at a time (SELECT, WITH, VALUES, TABLE, EXPLAIN, SHOW, read-only PRAGMA). "
        "SQLite opens the file read-only; PostgreSQL connects as the atlas_reader role, which can only SELECT "
        f"the atlas's tables and views; {TIMEOUT_S:g} s time limit."
    )
    if queries.families(connection.engine()).empty:
        guidance.show_empty_database()
    engine = connection.console_engine()
    editor, browser = st.columns([3, 1])
    with browser:
        _schema_browser(engine)
    with editor:
        example = st.selectbox("Example queries", list(queries.EXAMPLE_QUERIES), index=None,
                               placeholder="Pick an example to load it into the editor")
        if example is not None and st.session_state.get("sql_example") != example:
            st.session_state["sql_example"] = example
            st.session_state["sql_text"] = queries.EXAMPLE_QUERIES[example]
        st.session_state.setdefault("sql_text", queries.EXAMPLE_QUERIES["Models and their sizes"])
        sql = st.text_area("Query", key="sql_text", height=180)
        row_limit = st.selectbox("Row limit", ROW_LIMITS, index=1)
        if st.button("Run", type="primary"):
            st.session_state["sql_result"] = _run(engine, sql, row_limit)
        result = st.session_state.get("sql_result")
        if result is not None:
            _show_result(result)


def _run(engine, sql: str, row_limit: int) -> queries.ConsoleResult | str:
    try:
        return queries.run_console_query(engine, sql, row_limit=row_limit, timeout_s=TIMEOUT_S)
    except AtlasError as error:
        return str(error)


def _show_result(result: queries.ConsoleResult | str) -> None:
    if isinstance(result, str):
        st.error(result)
        return
    frame = result.frame
    note = f" (stopped at the row limit of {len(frame)})" if result.truncated else ""
    st.caption(f"{len(frame)} rows{note} in {result.seconds:.3f} s")
    st.dataframe(frame, hide_index=True)
    if frame.empty:
        return
    for column, (label, fmt, mime) in zip(st.columns(len(DOWNLOADS)), DOWNLOADS):
        # The same writers as `atlas export` (a column of mixed types becomes text in Parquet).
        column.download_button(label, export.frame_bytes(frame, fmt), f"atlas_query.{fmt}", mime)


def _schema_browser(engine) -> None:
    st.subheader("Schema")
    schema = queries.schema_columns(engine)
    for kind in ("view", "table"):
        objects = schema[schema["kind"] == kind]
        st.caption(f"{kind.title()}s")
        for name, columns in objects.groupby("object", sort=True):
            with st.expander(name):
                st.dataframe(columns[["column", "type"]], hide_index=True)


render()
