"""Read-only SQL for people (the app's SQL console, and any read-only entry point): the database is the guard.

PostgreSQL: the console connects as a role that can only SELECT the atlas's tables and views
(`atlas_reader`, made by `atlas db create-reader`): no superuser, no CREATE or TEMP, no EXECUTE on
server-file, large-object, signalling, config or advisory-lock functions, read-only by default. A
console refuses to run as a role that could write. Each query is ONE statement that the server
parses alone (a server-side cursor: the extended protocol rejects a second statement, DECLARE
rejects anything but a query), in a transaction with its own statement_timeout that is always
rolled back, on a connection that is closed afterwards (never reused, so nothing a query leaves
on a session survives). Rows stream from the cursor and stop at the row limit.

SQLite: the file opened read-only (mode=ro, query_only) with an authorizer that allows reads only,
a progress-handler time limit and a length limit (one statement per execute is sqlite3's rule).

The parser in sql_check.py only makes friendlier refusals; nothing here relies on it.
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pandas as pd
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from atlas.errors import AtlasError, first_line

READER_ROLE = "atlas_reader"
READER_URL_ENV = "ATLAS_READER_URL"
READER_PASSWORD_ENV = "ATLAS_READER_PASSWORD"
SQLITE_MAX_LENGTH = 50_000_000  # bytes of one string or blob (randomblob(1e9) fails at once)
CONSOLE_CURSOR = "atlas_console"

# SQLite pragmas that only read. The paren form PRAGMA name(x) SETS a value for most pragmas, so it
# is allowed only where the argument names a table or an index.
SQLITE_PRAGMAS_WITH_ARGUMENT = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check",
})
SQLITE_PRAGMAS_WITHOUT_ARGUMENT = SQLITE_PRAGMAS_WITH_ARGUMENT | frozenset({
    "database_list", "collation_list", "function_list", "module_list", "pragma_list", "compile_options",
    "encoding", "page_count", "page_size", "freelist_count", "user_version", "schema_version", "application_id",
})

# PostgreSQL functions that PUBLIC may execute by default (or that a careless grant could open) and
# a reader must not: server files, large objects, signals to other sessions, configuration, advisory
# locks (held past the query), notifications, SQL-executing helpers (a second statement in disguise).
DENIED_FUNCTIONS = (
    "pg_read_file", "pg_read_binary_file", "pg_stat_file", "pg_ls_dir", "pg_ls_logdir", "pg_ls_waldir",
    "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir", "pg_ls_replslotdir",
    "lo_import", "lo_export", "lo_create", "lo_creat", "lo_unlink", "lo_open", "lo_close", "lo_put", "lo_get",
    "lo_from_bytea", "lo_truncate", "lo_truncate64", "lo_lseek", "lo_lseek64", "lo_tell", "lo_tell64",
    "loread", "lowrite",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
    "pg_log_backend_memory_contexts", "set_config", "pg_notify",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all",
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema",
)
DENIED_FUNCTION_PREFIXES = ("dblink",)  # the dblink extension, if installed: a connection to anywhere


@dataclass(frozen=True)
class ConsoleResult:
    frame: pd.DataFrame
    truncated: bool  # more rows than the row limit existed
    seconds: float
    statement: str


# --- PostgreSQL: the reader role -----------------------------------------------------------------


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def _denied_functions(conn: Connection) -> list[str]:
    """Signatures (regprocedure) of the denied functions present in this database."""
    patterns = [prefix + "%" for prefix in DENIED_FUNCTION_PREFIXES]
    rows = conn.execute(text(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "WHERE p.proname = ANY(:names) OR p.proname LIKE ANY(:patterns) ORDER BY 1"),
        {"names": list(DENIED_FUNCTIONS), "patterns": patterns})
    return [row[0] for row in rows]


def atlas_relations() -> list[str]:
    """The tables and views a reader may SELECT: the atlas's own, nothing else in the database."""
    from atlas.store.schema import Base
    from atlas.store.views import VIEWS

    return [table.name for table in Base.metadata.sorted_tables] + list(VIEWS)


def grant_reader_select(conn: Connection, role: str = READER_ROLE) -> bool:
    """SELECT on every atlas table and view that exists (after migrations add or recreate some).

    Returns False (and does nothing) when the role does not exist yet.
    """
    if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}).first() is None:
        return False
    existing = {row[0] for row in conn.execute(text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'v', 'm', 'p')"))}
    for name in atlas_relations():
        if name in existing:
            conn.execute(text(f"GRANT SELECT ON {_quote(conn, name)} TO {_quote(conn, role)}"))
    return True


def create_reader(engine: Engine, role: str = READER_ROLE, password: str | None = None,
                  timeout_s: int = 60) -> list[str]:
    """Create or update the reader role on the atlas database of `engine` (an admin connection).

    Idempotent. Returns what it did, one line each.
    """
    if engine.dialect.name != "postgresql":
        raise AtlasError("create-reader is for PostgreSQL: on SQLite the console opens the file read-only")
    for attempt in range(5):
        try:
            return _create_reader(engine, role, password, timeout_s)
        except DBAPIError as error:
            # Roles are shared by every database of the server: two atlases updating the role at
            # once get "tuple concurrently updated"; the later one simply goes again.
            if "concurrently" not in str(error.orig) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _create_reader(engine: Engine, role: str, password: str | None, timeout_s: int) -> list[str]:
    with engine.begin() as conn:
        superuser = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
        if not superuser:
            raise AtlasError("create-reader needs a superuser URL (it revokes server functions from PUBLIC): "
                             "run it with --db postgresql://postgres@HOST/DB")
        database = conn.execute(text("SELECT current_database()")).scalar()
        r, db, schema = _quote(conn, role), _quote(conn, database), conn.execute(text("SELECT current_schema()")).scalar()
        done = []
        if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}).first() is None:
            conn.execute(text(f"CREATE ROLE {r} LOGIN"))
            done.append(f"created role {role}")
        attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        conn.execute(text(f"ALTER ROLE {r} WITH {attributes}"))
        if password is not None:
            literal = "'" + password.replace("'", "''") + "'"
            conn.exec_driver_sql(f"ALTER ROLE {r} WITH PASSWORD {literal}".replace("%", "%%"))
        for setting, value in (("default_transaction_read_only", "on"), ("statement_timeout", f"{timeout_s}s"),
                               ("idle_in_transaction_session_timeout", f"{timeout_s}s"),
                               ("temp_file_limit", "1GB")):
            conn.execute(text(f"ALTER ROLE {r} SET {setting} = '{value}'"))
        for granted in conn.execute(text(
                "SELECT g.rolname FROM pg_auth_members a JOIN pg_roles g ON g.oid = a.roleid "
                "JOIN pg_roles m ON m.oid = a.member WHERE m.rolname = :role"), {"role": role}).scalars():
            conn.execute(text(f"REVOKE {_quote(conn, granted)} FROM {r}"))
            done.append(f"revoked membership in {granted}")
        # Temporary tables and new objects: PUBLIC has TEMP on a database (and CREATE on public before
        # PostgreSQL 15); take both away, then give the reader exactly CONNECT and USAGE.
        conn.execute(text(f"REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC"))
        conn.execute(text(f"REVOKE CREATE, TEMPORARY ON DATABASE {db} FROM {r}"))
        conn.execute(text(f"GRANT CONNECT ON DATABASE {db} TO {r}"))
        conn.execute(text(f"REVOKE CREATE ON SCHEMA {_quote(conn, schema)} FROM PUBLIC"))
        conn.execute(text(f"REVOKE ALL ON SCHEMA {_quote(conn, schema)} FROM {r}"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA {_quote(conn, schema)} TO {r}"))
        conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA {_quote(conn, schema)} FROM {r}"))
        conn.execute(text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {_quote(conn, schema)} FROM {r}"))
        grant_reader_select(conn, role)
        owner = conn.execute(text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :d"),
                             {"d": database}).scalar()
        functions = _denied_functions(conn)
        for signature in functions:
            conn.execute(text(f"REVOKE EXECUTE ON FUNCTION {signature} FROM PUBLIC, {r}"))
            if owner != role:  # the atlas's own role keeps what PUBLIC had
                conn.execute(text(f"GRANT EXECUTE ON FUNCTION {signature} TO {_quote(conn, owner)}"))
        done += [f"role {role}: {attributes}, read-only transactions, {timeout_s} s statement timeout",
                 f"SELECT on the {len(atlas_relations())} atlas tables and views of {database}, nothing else",
                 f"no TEMP or CREATE on {database}; no EXECUTE on {len(functions)} server functions "
                 "(files, large objects, signals, config, advisory locks, SQL-executing helpers)"]
    return done


def reader_url(url: str, role: str = READER_ROLE) -> str:
    """The console's URL: $ATLAS_READER_URL, else the atlas URL with the reader's name and password."""
    explicit = os.environ.get(READER_URL_ENV)
    if explicit:
        from atlas.store.db import resolve_url

        return resolve_url(explicit)
    parsed = make_url(url).set(username=role, password=os.environ.get(READER_PASSWORD_ENV))
    return parsed.render_as_string(hide_password=False)


def _check_reader_role(engine: Engine) -> None:
    """Refuse to serve a console as a role that could write or reach the server."""
    try:
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls, r.rolreplication, "
                "has_database_privilege(current_database(), 'CREATE') AS create_db, "
                "has_database_privilege(current_database(), 'TEMPORARY') AS temp_db, "
                "has_schema_privilege(current_schema(), 'CREATE') AS create_schema, "
                "EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "        WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm') "
                "        AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER')) AS writes, "
                "EXISTS (SELECT 1 FROM pg_proc p WHERE p.proname = ANY(:names) "
                "        AND has_function_privilege(p.oid, 'EXECUTE')) AS functions "
                "FROM pg_roles r WHERE r.rolname = current_user"), {"names": list(DENIED_FUNCTIONS)}).mappings().one()
    except DBAPIError as error:
        raise AtlasError(f"the SQL console cannot connect as its read-only role: {first_line(error.orig or error)}; "
                         f"run `atlas db create-reader --db ADMIN_URL` (or set {READER_URL_ENV})") from None
    problems = [label for label, key in (
        ("is a superuser", "rolsuper"), ("can create roles", "rolcreaterole"), ("can create databases", "rolcreatedb"),
        ("bypasses row security", "rolbypassrls"), ("has replication", "rolreplication"),
        ("can CREATE in the database", "create_db"), ("can create temporary tables", "temp_db"),
        ("can CREATE in the schema", "create_schema"), ("can write to atlas tables", "writes"),
        ("can execute server-file, signal, config or advisory-lock functions", "functions"),
    ) if row[key]]
    if problems:
        raise AtlasError(f"refusing to run the SQL console as role {row['rolname']!r}: it {', '.join(problems)}; "
                         f"run `atlas db create-reader --db ADMIN_URL` and connect as {READER_ROLE} "
                         f"(or set {READER_URL_ENV})")


# --- engines -------------------------------------------------------------------------------------


def console_engine(url: str) -> Engine:
    """A read-only engine for people's SQL on the atlas at `url` (checked before it is returned)."""
    from atlas.store.db import resolve_url

    url = resolve_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_console_engine(url)
    engine = create_engine(reader_url(url), poolclass=NullPool)  # a connection is never reused
    _check_reader_role(engine)
    return engine


def _sqlite_console_engine(url: str) -> Engine:
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        raise AtlasError("the SQL console needs an SQLite database file: use --db sqlite:///path/to/atlas.db")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
        connection.execute("PRAGMA query_only = ON")
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SQLITE_MAX_LENGTH)
        connection.set_authorizer(_sqlite_read_only_authorizer)  # also refuses ATTACH of a writable file
        return connection

    return create_engine("sqlite://", creator=connect, poolclass=NullPool)


_SQLITE_READ_ACTIONS = frozenset({
    sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE,
    sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT,
})


def _sqlite_read_only_authorizer(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    """SQLite's own check, statement by statement: reads pass, anything else is denied."""
    if action in _SQLITE_READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
        # SQLite asks this while planning a WHERE over a table-valued pragma; IGNORE turns any
        # such update into a no-op (and the file is read-only besides).
        return sqlite3.SQLITE_IGNORE
    if action == sqlite3.SQLITE_PRAGMA and arg1 is not None:
        name = arg1.lower()
        readable = SQLITE_PRAGMAS_WITHOUT_ARGUMENT | {"read_uncommitted"}  # SQLAlchemy reads it on connect
        if name in SQLITE_PRAGMAS_WITH_ARGUMENT or (arg2 is None and name in readable):
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


# --- execution -----------------------------------------------------------------------------------


Fetch = Callable[[int], list[tuple]]


@contextmanager
def read_only_rows(engine: Engine, statement: str, timeout_s: float,
                   batch_rows: int = 2000) -> Iterator[tuple[list[str], Fetch]]:
    """Run ONE statement on a console engine: (columns, fetch) where fetch(n) returns up to n more
    rows ([] at the end). PostgreSQL streams them from a server-side cursor batch_rows at a time.

    On leaving, the transaction is rolled back and the connection closed. No parser here: this is
    the database-level protection, tested on its own; errors are AtlasError("query failed: ...").
    """
    raw = engine.raw_connection()
    try:
        run = _sqlite_rows if engine.dialect.name == "sqlite" else _postgresql_rows
        with run(raw.driver_connection, statement, timeout_s, batch_rows) as stream:
            yield stream
    finally:
        raw.invalidate()  # closed, never back in a pool


def execute_read_only(engine: Engine, statement: str, row_limit: int, timeout_s: float) -> ConsoleResult:
    """Run ONE statement on a console engine with a time limit, keeping at most row_limit rows."""
    started = time.perf_counter()
    with read_only_rows(engine, statement, timeout_s, batch_rows=min(row_limit + 1, 2000)) as (columns, fetch):
        rows = fetch(row_limit + 1)  # one more than the limit tells whether the result was cut
    frame = pd.DataFrame.from_records(rows[:row_limit], columns=columns)
    return ConsoleResult(frame, len(rows) > row_limit, time.perf_counter() - started, statement)


def _no_rows(_: int) -> list[tuple]:
    return []


@contextmanager
def _sqlite_rows(connection: sqlite3.Connection, statement: str, timeout_s: float,
                 _batch_rows: int) -> Iterator[tuple[list[str], Fetch]]:
    deadline = time.perf_counter() + timeout_s  # the whole statement, every fetch included
    connection.set_progress_handler(lambda: int(time.perf_counter() > deadline), 10_000)
    cursor = connection.cursor()
    try:
        cursor.execute(statement)  # sqlite3 refuses a second statement
        columns = [column[0] for column in cursor.description or []]
        yield columns, (cursor.fetchmany if columns else _no_rows)
    except (sqlite3.Error, sqlite3.Warning) as error:
        message = first_line(error)
        if "interrupted" in message:
            message = f"stopped after the {timeout_s:g} s time limit"
        elif "not authorized" in message:
            message = "not authorized: the console only reads (SELECT, read-only PRAGMA)"
        raise AtlasError(f"query failed: {message}") from None
    finally:
        cursor.close()
        connection.rollback()


@contextmanager
def _postgresql_rows(connection: Any, statement: str, timeout_s: float,
                     batch_rows: int) -> Iterator[tuple[list[str], Fetch]]:
    import psycopg

    try:
        milliseconds = max(1, int(timeout_s * 1000))
        with connection.cursor() as setup:
            setup.execute("SET TRANSACTION READ ONLY")
            setup.execute(f"SET LOCAL statement_timeout = {milliseconds}")  # each FETCH gets the limit
            setup.execute(f"SET LOCAL idle_in_transaction_session_timeout = {milliseconds + 5000}")
        # EXPLAIN / SHOW cannot be DECLAREd; prepare=True sends them through the extended protocol
        # too, so the server still rejects a second statement. Their output is small.
        utility = _is_utility(statement)
        with connection.cursor() if utility else connection.cursor(name=CONSOLE_CURSOR) as cursor:
            if utility:
                cursor.execute(statement, prepare=True)
            else:  # DECLARE ... CURSOR FOR <one query>
                cursor.itersize = batch_rows
                cursor.execute(statement)
            columns = [column.name for column in cursor.description or []]
            yield columns, (cursor.fetchmany if columns else _no_rows)
    except psycopg.Error as error:
        message = first_line(error)
        if isinstance(error, psycopg.errors.QueryCanceled):
            message = f"stopped after the {timeout_s:g} s time limit ({message})"
        raise AtlasError(f"query failed: {message}") from None
    finally:
        try:
            connection.rollback()
        except psycopg.Error:
            pass  # the connection is discarded anyway


def _is_utility(statement: str) -> bool:
    words = statement.lstrip("( \t\r\n").split(None, 1)
    return bool(words) and words[0].upper() in {"EXPLAIN", "SHOW"}


def run_console_query(engine: Engine, sql: str, row_limit: int = 1000, timeout_s: float = 10.0) -> ConsoleResult:
    """The console's path: friendly refusals from the parser (SqlRefused), then the database decides."""
    from atlas.store.sql_check import check_query

    return execute_read_only(engine, check_query(sql, engine.dialect.name), row_limit, timeout_s)
