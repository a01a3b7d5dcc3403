"""The README's example SQL runs unchanged on a filled atlas, on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import text

from atlas.store import Store

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_queries() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    return [s for s in statements if s and not all(line.startswith("--") for line in s.splitlines())]


def test_readme_has_example_queries():
    assert len(readme_queries()) >= 4


@pytest.mark.parametrize("query", readme_queries(), ids=lambda q: q.splitlines()[0][:40])
def test_readme_query_runs_and_returns_rows(filled_any_db_url, query):
    store = Store(filled_any_db_url)
    with store.session() as session:
        rows = session.execute(text(query)).all()
    store.dispose()
    assert rows, f"the README query returned nothing on the filled atlas: {query}"
