"""Bulk writes: COPY on PostgreSQL (psycopg 3), executemany on SQLite. Callers see one function.

NaN means "undefined" in the atlas (a zero-variance neuron's correlation, say) and is stored as NULL.
PostgreSQL text cannot hold NUL characters (byte-level tokenizers decode token 0 to one), so every
backend stores NUL as the visible escape \\x00: the same rows on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from sqlalchemy import JSON
from sqlalchemy.orm import DeclarativeBase, Session

Columns = Mapping[str, Any]  # column name -> 1-d array / list, or a scalar repeated on every row


def _python_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\\x00")
    return value


def rows_from_columns(columns: Columns) -> tuple[list[str], list[tuple]]:
    """Turn {name: array or scalar} into (names, rows) with plain Python values."""
    names = list(columns)
    lengths = {len(v) for v in columns.values() if isinstance(v, (list, tuple, np.ndarray))}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 1
    series = []
    for value in columns.values():
        if isinstance(value, np.ndarray):
            value = value.tolist()  # numpy -> Python scalars in one C loop
        elif not isinstance(value, (list, tuple)):
            value = [value] * n
        series.append(value)
    rows = [tuple(_python_value(v) for v in row) for row in zip(*series)]
    return names, rows


def bulk_insert(session: Session, model: type[DeclarativeBase], columns: Columns) -> int:
    """Insert the rows given column-wise, inside the session's transaction. Returns the row count."""
    names, rows = rows_from_columns(columns)
    return insert_rows(session, model, names, rows)


def insert_rows(session: Session, model: type[DeclarativeBase], names: Sequence[str], rows: Iterable[Sequence]) -> int:
    table = model.__table__
    json_columns = {i for i, name in enumerate(names) if isinstance(table.c[name].type, JSON)}
    rows = [tuple(_python_value(v) for v in row) for row in rows]
    if not rows:
        return 0
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        _copy(connection.connection.driver_connection, table.name, names, rows, json_columns)
    else:
        connection.execute(table.insert(), [dict(zip(names, row)) for row in rows])
    return len(rows)


def _copy(dbapi_connection, table: str, names: Sequence[str], rows: list[tuple], json_columns: set[int]) -> None:
    column_list = ", ".join(f'"{name}"' for name in names)
    with dbapi_connection.cursor() as cursor:
        with cursor.copy(f'COPY "{table}" ({column_list}) FROM STDIN') as copy:
            for row in rows:
                if json_columns:
                    row = tuple(json.dumps(v) if i in json_columns and v is not None else v for i, v in enumerate(row))
                copy.write_row(row)
