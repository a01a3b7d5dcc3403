"""The app's database: one cached Store (engine) per URL, shared by every page and session.

The URL comes from `--db URL` after `--` on the streamlit command line (what `atlas app` passes),
else ATLAS_DATABASE_URL, else sqlite:///atlas.db (atlas.store.db.resolve_url).
"""

from __future__ import annotations

import argparse
import sys

import streamlit as st
from sqlalchemy import Engine

from atlas.errors import AtlasError
from atlas.store import Store, read_only, resolve_url


def database_url(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--db", default=None)
    # Streamlit hands the script everything after `--`; under pytest argv is pytest's, so ignore the rest.
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return resolve_url(known.db)


@st.cache_resource(show_spinner=False)
def _open_store(url: str) -> Store:
    return Store(url)


@st.cache_resource(show_spinner=False)
def _open_console_engine(url: str) -> Engine:
    return read_only.console_engine(url)


def store() -> Store:
    """The cached Store; an unreachable or unmigrated database stops the page with a one-line message."""
    try:
        return _open_store(database_url())
    except AtlasError as error:
        st.error(str(error))
        st.stop()
        raise  # st.stop() raises; this line only tells type checkers the function never returns None


def engine() -> Engine:
    return store().engine


def console_engine() -> Engine:
    """The SQL console's engine: the SQLite file opened read-only, or PostgreSQL as the reader role.

    A console that would run as a role able to write stops the page with what to run instead.
    """
    try:
        return _open_console_engine(store().url)
    except AtlasError as error:
        st.error(str(error))
        st.stop()
        raise
