"""Database fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ATLAS_TEST_POSTGRES_URL; the session creates a migrated template database, each
test gets a fresh copy (CREATE DATABASE ... TEMPLATE, fast), and every database is dropped at the end.
"""

from __future__ import annotations

import itertools
import os
import uuid

import psycopg
import pytest
from sqlalchemy.engine import make_url

from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from atlas.store import Store
from atlas.store.read_only import create_reader

PG_URL = os.environ.get("ATLAS_TEST_POSTGRES_URL")
_counter = itertools.count()


def _libpq(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _sqlalchemy(url: str, database: str) -> str:
    return make_url(url).set(drivername="postgresql+psycopg", database=database).render_as_string(hide_password=False)


class PostgresServer:
    """Creates and drops throw-away databases on the test server."""

    def __init__(self, url: str):
        self.url = url
        self.prefix = f"atlas_test_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []
        self.admin = psycopg.connect(_libpq(url), autocommit=True)

    def create(self, template: str | None = None) -> str:
        name = f"{self.prefix}_{next(_counter)}"
        self.admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        self.created.append(name)
        return name

    def url_of(self, name: str) -> str:
        return _sqlalchemy(self.url, name)

    def create_atlas(self, template: str) -> str:
        """A fresh migrated atlas (copied from template) with its console role, as `atlas db create-reader`."""
        url = self.url_of(self.create(template=template))
        engine = create_engine(url, poolclass=NullPool)
        create_reader(engine)
        engine.dispose()
        return url

    def drop_all(self) -> None:
        for name in reversed(self.created):
            self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.close()


@pytest.fixture(scope="session")
def pg_server():
    if not PG_URL:
        pytest.skip("ATLAS_TEST_POSTGRES_URL is not set: PostgreSQL tests skipped")
    server = PostgresServer(PG_URL)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def pg_template(pg_server) -> str:
    """A migrated database that fresh test databases are copied from."""
    name = pg_server.create()
    store = Store(pg_server.url_of(name), check=False)
    store.upgrade()
    store.dispose()
    return name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, migrated database URL of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'atlas.db'}"
        Store(url).dispose()
        return url
    server = request.getfixturevalue("pg_server")
    return server.create_atlas(request.getfixturevalue("pg_template"))


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request, tmp_path) -> str:
    """A fresh database URL of each backend with no schema at all."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    server = request.getfixturevalue("pg_server")
    return server.url_of(server.create())


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.dispose()
