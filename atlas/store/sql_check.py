"""Friendly refusals for the read-only SQL entry points, from a real SQL parser (sqlglot).

This is NOT the security boundary: the database is (a role that can only SELECT on PostgreSQL, a
read-only file with an authorizer on SQLite, one statement per server parse; see read_only.py).
The parser only turns the commonest mistakes into a clear sentence before the database is asked,
and lets through what is legitimate: aliases named like keywords, E'' strings, nested comments,
table-valued pragmas. Text the parser cannot read goes to the database, which has the last word.
"""

from __future__ import annotations

import logging

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from atlas.errors import AtlasError
from atlas.store.read_only import SQLITE_PRAGMAS_WITH_ARGUMENT, SQLITE_PRAGMAS_WITHOUT_ARGUMENT

QUERY_KINDS = "SELECT, WITH ... SELECT, VALUES, TABLE, EXPLAIN, SHOW or a read-only PRAGMA"
_READ_COMMANDS = frozenset({"EXPLAIN", "SHOW", "DESCRIBE"})
_WRITES = (exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter, exp.Copy)
# Statements that are certainly not queries; anything the parser does not classify goes to the database.
_NOT_QUERIES = _WRITES + (exp.Set, exp.Commit, exp.Rollback, exp.Transaction, exp.Grant, exp.Revoke,
                          exp.Attach, exp.Detach, exp.Use, exp.Kill, exp.Analyze, exp.Comment, exp.TruncateTable)
_DIALECTS = {"postgresql": "postgres", "sqlite": "sqlite"}


class SqlRefused(AtlasError):
    """The text is not one read-only query; the message says why and what is accepted."""


def check_query(sql: str, dialect: str) -> str:
    """The statement to send (surrounding blanks and trailing ';' removed), or SqlRefused.

    dialect: the SQLAlchemy dialect name ('postgresql' or 'sqlite').
    """
    statement = sql.strip().rstrip(";").strip()
    if not statement:
        raise SqlRefused("refused: the query is empty; write one SELECT statement")
    read = _DIALECTS.get(dialect, dialect)
    parsed = _parse(statement, read)
    if parsed is None:
        return statement  # the parser cannot read it: the database decides (and explains)
    if len(parsed) > 1:
        raise SqlRefused("refused: several statements in one go; run one statement at a time")
    _refuse_writes(parsed[0], statement, read)
    return statement


def _parse(statement: str, dialect: str) -> list[exp.Expression] | None:
    logger = logging.getLogger("sqlglot")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "falling back to parsing as a Command" is not the user's business
    try:
        return [tree for tree in sqlglot.parse(statement, read=dialect) if tree is not None]
    except SqlglotError:
        return None
    finally:
        logger.setLevel(level)


def _refuse_writes(tree: exp.Expression, statement: str, dialect: str) -> None:
    if isinstance(tree, exp.Command):
        if str(tree.this).upper() not in _READ_COMMANDS:
            _refuse(_first_word(statement, dialect))
        return
    if isinstance(tree, exp.Pragma):
        _check_pragma(tree)
        return
    if isinstance(tree, _NOT_QUERIES):
        _refuse(_first_word(statement, dialect))
    writer = next(iter(tree.find_all(*_WRITES)), None)
    if writer is not None:
        raise SqlRefused(f"refused: a {writer.key.upper()} inside the query; the console only reads")
    if isinstance(tree, exp.Select) and tree.args.get("into") is not None:
        raise SqlRefused("refused: SELECT ... INTO creates a table; the console only reads")


def _check_pragma(tree: exp.Pragma) -> None:
    """SQLite pragmas that only read (the authorizer enforces the same lists)."""
    target = tree.this
    has_value = isinstance(target, exp.EQ) or bool(isinstance(target, exp.Anonymous) and target.expressions)
    name = (target.this if isinstance(target, exp.EQ) else target)
    name = (name.name if isinstance(name, exp.Expression) else str(name)).lower()
    allowed = SQLITE_PRAGMAS_WITH_ARGUMENT if has_value else SQLITE_PRAGMAS_WITHOUT_ARGUMENT
    if name not in allowed:
        raise SqlRefused(f"refused: PRAGMA {name}{'(...)' if has_value else ''} changes or is not a read-only pragma; "
                         f"allowed: {', '.join(sorted(SQLITE_PRAGMAS_WITHOUT_ARGUMENT))}")


def _first_word(statement: str, dialect: str) -> str:
    try:
        return sqlglot.tokenize(statement, read=dialect)[0].text.upper()
    except (SqlglotError, IndexError):
        return statement.split()[0].upper()


def _refuse(word: str) -> None:
    raise SqlRefused(f"refused: {word} is not a query; the console is read-only ({QUERY_KINDS})")
