"""The Neuron Atlas app: `streamlit run app/main.py -- --db URL` (what `atlas app` runs).

One cached database engine (app.connection) serves every page; each page is a module in app/pages.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root that holds the packages.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from app import connection  # noqa: E402

# Not "pages/": a folder of that name next to the entry script switches Streamlit to its old
# multipage mode, which runs page files directly and ignores st.navigation.
PAGES_DIR = Path(__file__).parent / "app_pages"

PAGES = [
    st.Page(PAGES_DIR / "overview.py", title="Overview", icon=":material/dashboard:", url_path="overview", default=True),
    st.Page(PAGES_DIR / "sql.py", title="SQL", icon=":material/terminal:", url_path="sql"),
    st.Page(PAGES_DIR / "families.py", title="Neuron families", icon=":material/scatter_plot:", url_path="families"),
    st.Page(PAGES_DIR / "card.py", title="Neuron card", icon=":material/badge:", url_path="card"),
    st.Page(PAGES_DIR / "compare.py", title="Compare seeds", icon=":material/compare:", url_path="compare"),
    st.Page(PAGES_DIR / "layers.py", title="Layers", icon=":material/stacked_line_chart:", url_path="layers"),
    st.Page(PAGES_DIR / "studies.py", title="Studies", icon=":material/science:", url_path="studies"),
]


def main() -> None:
    st.set_page_config(page_title="Neuron Atlas", page_icon=":material/neurology:", layout="wide")
    page = st.navigation(PAGES)
    store = connection.store()  # opens (and caches) the database once, or stops with its message
    st.sidebar.caption(f"Database: `{store.display_url}`")
    page.run()


main()
