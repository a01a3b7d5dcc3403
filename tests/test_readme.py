"""The README's example SQL runs unchanged, and its Python example runs, on a filled atlas (SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import text

from atlas.store import Store
from tests.fixtures_filled import FILLED_DATASET, FILLED_FAMILY

README = Path(__file__).resolve().parent.parent / "README.md"


# Views that need checkpoints, which the filled atlas has not: tests/test_universality_steps.py runs them.
NEEDS_CHECKPOINTS = "universality_by_step"


def readme_queries(checkpoints: bool = False) -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    queries = [s for s in statements if s and not all(line.startswith("--") for line in s.splitlines())]
    return [q for q in queries if (NEEDS_CHECKPOINTS in q) == checkpoints]


def test_readme_has_example_queries():
    assert len(readme_queries()) >= 4


@pytest.mark.parametrize("query", readme_queries(), ids=lambda q: q.splitlines()[0][:40])
def test_readme_query_runs_and_returns_rows(filled_any_db_url, query):
    store = Store(filled_any_db_url)
    with store.session() as session:
        rows = session.execute(text(query)).all()
    store.dispose()
    assert rows, f"the README query returned nothing on the filled atlas: {query}"


# --- the Python API example ----------------------------------------------------------------------

DEMO_NAMES = '"docs-gpt2", "docs-gpt2-heldout"'  # the example's family and dataset: what `atlas demo` builds


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs(filled_any_db_url):
    """The notebook example, with the filled atlas's URL and names for the demo's."""
    (code,) = readme_python_blocks()
    assert 'atlas.open("sqlite:///atlas.db")' in code and DEMO_NAMES in code
    code = code.replace('"sqlite:///atlas.db"', repr(filled_any_db_url)).replace(
        DEMO_NAMES, f'"{FILLED_FAMILY}", "{FILLED_DATASET}"')
    namespace: dict = {}
    exec(compile(code, "README.md (python)", "exec"), namespace)  # noqa: S102 (our own README)
    try:
        assert len(namespace["neurons"]) > 0 and len(namespace["partners"]) == 2
        assert 'class="atlas-example"' in namespace["card"]._repr_html_()
    finally:
        namespace["a"].close()
