"""Connections, migrations and transactions. One code path for SQLite and PostgreSQL above `bulk`."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from atlas.errors import AtlasError, first_line

DEFAULT_URL = "sqlite:///atlas.db"


def _migrations_dir() -> Path:
    """The folder of the `migrations` package (installed beside atlas), found without importing it:
    its env.py imports the schema, so the store must not import the migrations back."""
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError("the atlas migrations are not installed: reinstall the atlas (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


MIGRATIONS_DIR = _migrations_dir()
SQLITE_BUSY_TIMEOUT_S = 60.0


def resolve_url(url: str | None = None) -> str:
    """--db URL, else ATLAS_DATABASE_URL, else the embedded SQLite file in the current directory."""
    url = url or os.environ.get("ATLAS_DATABASE_URL") or DEFAULT_URL
    # psycopg 3 is the PostgreSQL driver; accept the plain scheme users paste from psql.
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url[len(plain):]
    try:
        make_url(url)
    except ArgumentError:
        raise AtlasError(f"invalid database URL {url!r}: use sqlite:///path.db or postgresql://user@host/db") from None
    return url


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config(DEFAULT_URL)).get_current_head()


def _enable_sqlite_foreign_keys(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # noqa: ANN001
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def make_engine(url: str) -> Engine:
    # Concurrent jobs write briefly (claims, heartbeats): a SQLite writer waits for the lock, not fails.
    sqlite = make_url(url).get_backend_name() == "sqlite"
    engine = create_engine(url, pool_pre_ping=True, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S} if sqlite else {})
    if sqlite:
        _enable_sqlite_foreign_keys(engine)
    return engine


class Store:
    """The atlas database: `with store.transaction() as session:` is one unit of work."""

    def __init__(self, url: str | None = None, *, auto_upgrade: bool | None = None, check: bool = True):
        self.url = resolve_url(url)
        self.engine = make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if check:
            # The embedded SQLite default upgrades itself; a server database is upgraded on purpose.
            upgrade_automatically = self.is_sqlite if auto_upgrade is None else auto_upgrade
            if upgrade_automatically and self.current_revision() != head_revision():
                self.upgrade()
            self.require_head()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except OperationalError as exc:
            reason = first_line(exc.orig or exc)
            raise AtlasError(f"cannot connect to the database {self.display_url}: {reason}") from None

    def require_head(self) -> None:
        current, head = self.current_revision(), head_revision()
        if current != head:
            raise AtlasError(
                f"database {self.display_url} is not migrated (at {current or 'an empty schema'}, "
                f"the atlas needs {head}): run `atlas db upgrade --db {self.display_url}`"
            )

    def upgrade(self, revision: str = "head") -> None:
        with self.engine.begin() as conn:
            cfg = _alembic_config(self.url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            if conn.dialect.name == "postgresql":
                from atlas.store.read_only import grant_reader_select

                grant_reader_select(conn)  # new or recreated tables and views stay readable by the console

    def downgrade(self, revision: str = "base") -> None:
        with self.engine.begin() as conn:
            cfg = _alembic_config(self.url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """Commit on success, roll back everything on any error: no half-written unit of work."""
        with self._sessions() as session, session.begin():
            yield session

    def session(self) -> Session:
        """A plain session for reads."""
        return self._sessions()

    def dispose(self) -> None:
        self.engine.dispose()
