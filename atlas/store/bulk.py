"""Bulk writes: binary COPY on PostgreSQL (psycopg 3), executemany on SQLite. Callers see one function.

NaN means "undefined" in the atlas (a zero-variance neuron's correlation, say) and is stored as NULL.
PostgreSQL text cannot hold NUL characters (byte-level tokenizers decode token 0 to one), so every
backend stores NUL as the visible escape \\x00: the same rows on SQLite and PostgreSQL.

On PostgreSQL the COPY buffer is built column-wise with numpy in PostgreSQL's binary COPY format
(exact float64, no text formatting): per row an int16 field count, then per field an int32 byte
length (-1 for NULL) and the value's bytes, big-endian. A table with a column type this module does
not encode falls back to psycopg's own binary dumpers, row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import orjson
from sqlalchemy import JSON
from sqlalchemy.orm import DeclarativeBase, Session

Columns = Mapping[str, Any]  # column name -> 1-d array / list, or a scalar repeated on every row

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_TRAILER = b"\xff\xff"
_CHUNK_BYTES = 1 << 20  # COPY data built per chunk: the server stores one while the next is built
# PostgreSQL type -> the numpy dtype of its binary COPY value
_FIXED = {"smallint": ">i2", "integer": ">i4", "bigint": ">i8", "real": ">f4", "double precision": ">f8",
          "boolean": "?"}
_TEXT = {"text", "character varying", "character", "json", "jsonb", "name"}


def _json_default(o: Any) -> Any:  # numpy values nested in a JSON column's lists
    if isinstance(o, (np.ndarray, np.generic)):
        return o.tolist()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


# orjson: the values json.dumps would write (floats as their shortest round-trip repr; compact separators),
# about ten times faster, as bytes ready for COPY; numpy arrays and scalars natively; a NaN becomes null.
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _json_bytes(value: Any) -> bytes:
    return orjson.dumps(value, default=_json_default, option=_JSON_OPTIONS)


def _json(value: Any) -> str:
    return _json_bytes(value).decode()


# --- columns -> Python lists (SQLite, and the rows of the generic PostgreSQL path) ---------------

def _length(columns: Columns) -> int:
    lengths = {len(v) for v in columns.values() if isinstance(v, (list, tuple, np.ndarray))}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 1


def _python_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\\x00")
    return value


def _python_list(value: Any, n: int) -> list:
    """One column as a list of plain Python values: NaN -> None, NUL -> \\x00."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:  # a 2-d array is a column of lists (JSON)
            return value.tolist()
        values = value.tolist()  # numpy -> Python scalars in one C loop
        if value.dtype.kind == "f":
            for i in np.flatnonzero(np.isnan(value)).tolist():
                values[i] = None
            return values
        if value.dtype.kind not in "OUS":
            return values
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        return [_python_scalar(value)] * n
    kinds = set(map(type, values))
    if kinds <= {int, bool, type(None)} or (kinds == {str} and "\x00" not in "".join(values)):
        return values
    return [_python_scalar(v) for v in values]


def _json_values(value: Any, n: int) -> list:
    """A JSON column's values (lists, dicts, numbers...); None and a NaN are NULL."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif not isinstance(value, (list, tuple)):
        value = [value] * n
    return [None if isinstance(v, float) and v != v else v for v in value] \
        if any(isinstance(v, float) for v in value) else value


def rows_from_columns(columns: Columns) -> tuple[list[str], list[tuple]]:
    """Turn {name: array or scalar} into (names, rows) with plain Python values."""
    n = _length(columns)
    return list(columns), list(zip(*(_python_list(value, n) for value in columns.values())))


# --- the one write path --------------------------------------------------------------------------

def bulk_insert(session: Session, model: type[DeclarativeBase], columns: Columns) -> int:
    """Insert the rows given column-wise, inside the session's transaction. Returns the row count."""
    table = model.__table__
    missing = [name for name in columns if name not in table.c]
    if missing:
        raise ValueError(f"table {table.name} has no column {', '.join(missing)}")
    n = _length(columns)
    if n == 0 or not columns:
        return 0
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        _copy(connection.connection.driver_connection, table.name, dict(columns), n)
    else:
        _executemany(connection, table, columns, n)
    return n


def insert_rows(session: Session, model: type[DeclarativeBase], names: Sequence[str], rows: Iterable[Sequence]) -> int:
    """Insert rows given row-wise (tuples in the order of names)."""
    rows = list(rows)
    if not rows:
        return 0
    return bulk_insert(session, model, {name: list(values) for name, values in zip(names, zip(*rows))})


def _executemany(connection, table, columns: Columns, n: int) -> None:
    """SQLite: one executemany of tuples; SQLAlchemy's bind processors (JSON, DateTime) as its insert would."""
    series = []
    for name, value in columns.items():
        kind = table.c[name].type
        if isinstance(kind, JSON):  # as SQLAlchemy's JSON type writes it (json.dumps), numpy values allowed
            null = None if kind.none_as_null else "null"
            series.append([null if v is None else _json(v) for v in _json_values(value, n)])
            continue
        values = _python_list(value, n)
        process = kind._cached_bind_processor(connection.dialect)
        series.append(values if process is None else list(map(process, values)))
    names = ", ".join(connection.dialect.identifier_preparer.quote(name) for name in columns)
    sql = f"INSERT INTO {connection.dialect.identifier_preparer.format_table(table)} ({names}) " \
          f"VALUES ({', '.join('?' * len(series))})"
    connection.exec_driver_sql(sql, list(zip(*series)))


# --- PostgreSQL: binary COPY built column-wise ---------------------------------------------------

@dataclass
class _Field:
    """One column's binary COPY values: per-row byte lengths (-1 = NULL) and the values."""

    lengths: np.ndarray  # int64, one per row
    values: Any  # fixed width: a numpy array of the wire dtype (any value where NULL); else bytes per row


def _column_types(cursor, table: str) -> dict[str, str]:
    cursor.execute("SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
                   "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped", (f'"{table}"',))
    return dict(cursor.fetchall())


def _copy(dbapi_connection, table: str, columns: dict[str, Any], n: int) -> None:
    names = list(columns)
    column_list = ", ".join(f'"{name}"' for name in names)
    with dbapi_connection.cursor() as cursor:
        types = _column_types(cursor, table)
        kinds = [types[name] for name in names]
        with cursor.copy(f'COPY "{table}" ({column_list}) FROM STDIN WITH (FORMAT BINARY)') as copy:
            if all(kind in _FIXED or kind in _TEXT for kind in kinds):
                _copy_binary(copy, [columns[name] for name in names], names, kinds, n)
            else:  # a type without a numpy encoder here (a timestamp, say): psycopg dumps each value
                copy.set_types(kinds)  # psycopg's json dumper serialises the Python objects itself
                for row in zip(*(_python_list(columns[name], n) for name in names)):
                    copy.write_row(row)


def _copy_binary(copy, values: list, names: list[str], kinds: list[str], n: int) -> None:
    """The COPY stream in chunks of rows, each encoded column-wise; chunk sizes follow the bytes per row."""
    copy.write(_SIGNATURE)
    start, rows = 0, 1024
    while start < n:
        stop = min(n, start + rows)
        fields = [_field(_rows_of(value, start, stop), kind, stop - start, name)
                  for value, name, kind in zip(values, names, kinds)]
        sent = 0
        for data in _binary_rows(fields, 0, stop - start):
            copy.write(data)
            sent += len(data)
        rows = max(64, _CHUNK_BYTES * (stop - start) // max(sent, 1))
        start = stop
    copy.write(_TRAILER)


def _rows_of(value: Any, start: int, stop: int) -> Any:
    return value[start:stop] if isinstance(value, (list, tuple, np.ndarray)) else value


def _field(value: Any, kind: str, n: int, name: str) -> _Field:
    if kind in _FIXED:
        return _fixed_field(value, np.dtype(_FIXED[kind]), n, name)
    if kind in ("json", "jsonb"):
        prefix = b"\x01" if kind == "jsonb" else b""  # jsonb's binary form: format version 1, then the text
        return _bytes_field([None if v is None else prefix + _json_bytes(v) for v in _json_values(value, n)])
    if isinstance(value, np.ndarray) and value.dtype.kind == "U" and not _has_nul(value):
        encoded = np.char.encode(value, "utf-8")  # a numpy str array: encoded without a Python loop
        return _Field(np.char.str_len(encoded).astype(np.int64), encoded)
    return _text_field(_python_list(value, n))


def _fixed_field(value: Any, dtype: np.dtype, n: int, name: str) -> _Field:
    """Numbers and booleans: NaN and None are NULL; integers must fit the column (no silent wrap)."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        value = _python_scalar(value)
        if value is None:  # a NULL on every row
            return _Field(np.full(n, -1, np.int64), np.zeros(n, dtype))
    if isinstance(value, (list, tuple)) and not any(v is None for v in value):
        value = np.array(value)
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype.kind == "O"):
        values = [_python_scalar(v) for v in value]
        null = np.fromiter((v is None for v in values), bool, len(values))
        array = np.array([0 if v is None else v for v in values]) if null.any() else np.array(values)
    else:
        array = np.asarray(value)
        null = np.zeros(array.shape, bool)
    if array.ndim == 0:
        array, null = np.broadcast_to(array, (n,)), np.broadcast_to(null, (n,))
    if array.dtype.kind == "f":
        null = null | np.isnan(array)
    if dtype.kind == "i":
        array = _checked_integers(array, null, dtype, name)
    elif dtype.kind == "b" and array.dtype.kind not in "biu":
        raise ValueError(f"column {name}: booleans expected, got {array.dtype} values")
    return _Field(np.where(null, -1, dtype.itemsize), array.astype(dtype, copy=False))


def _checked_integers(array: np.ndarray, null: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    if array.dtype.kind == "f":
        finite = array[~null]
        if not np.array_equal(finite, np.round(finite)):
            raise ValueError(f"column {name} is an integer column: got fractional values")
        array = np.where(null, 0, array)
    elif array.dtype.kind not in "biu":
        raise ValueError(f"column {name} is an integer column: got {array.dtype} values")
    info = np.iinfo(dtype)
    present = array[~null]
    if present.size and (present.min() < info.min or present.max() > info.max):
        raise ValueError(f"column {name}: a value is out of range for {dtype.itemsize * 8}-bit integers")
    return array


def _text_field(values: list) -> _Field:
    """UTF-8 text; None is NULL, NUL is stored as \\x00."""
    texts = ["" if v is None else v if type(v) is str else str(v) for v in values]
    joined = "".join(texts)
    if "\x00" in joined:
        texts = [t.replace("\x00", "\\x00") for t in texts]
    if joined.isascii():  # one character, one byte: lengths without encoding each value
        encoded = [t.encode("ascii") for t in texts]
    else:
        encoded = [t.encode() for t in texts]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    lengths[np.fromiter((v is None for v in values), bool, len(values))] = -1
    return _Field(lengths, encoded)


def _bytes_field(values: list[bytes | None]) -> _Field:
    """Encoded text (JSON from orjson: a NUL is escaped there); None is NULL."""
    encoded = [b"" if v is None else v for v in values]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    lengths[np.fromiter((v is None for v in values), bool, len(values))] = -1
    return _Field(lengths, encoded)


def _has_nul(values: np.ndarray) -> bool:
    """Whether a numpy str array holds a NUL before a value's end (trailing ones are padding)."""
    chars = values.reshape(-1).view(np.uint32).reshape(len(values), -1)
    return bool(((chars == 0) & (np.arange(chars.shape[1]) < np.char.str_len(values)[:, None])).any())


def _binary_rows(fields: list[_Field], start: int, stop: int) -> Iterable[bytes]:
    """Rows start..stop: one numpy record a row, text padded to the longest value of the chunk, then the
    padding and the value bytes of NULLs dropped in one masked copy."""
    lengths = [field.lengths[start:stop] for field in fields]
    layout: list[tuple] = [("count", ">i2")]
    for j, (field, length) in enumerate(zip(fields, lengths)):
        width = field.values.dtype if isinstance(field.values, np.ndarray) and field.values.dtype.kind != "S" \
            else f"S{max(1, int(length.max(initial=0)))}"
        layout += [(f"length{j}", ">i4"), (f"value{j}", width)]
    record = np.dtype(layout)
    rows = stop - start
    if rows > 1 and rows * record.itemsize > 4 * _CHUNK_BYTES:  # a few long values: pad fewer rows at once
        middle = (start + stop) // 2
        yield from _binary_rows(fields, start, middle)
        yield from _binary_rows(fields, middle, stop)
        return
    records = np.empty(rows, record)
    records["count"] = len(fields)
    keep = None
    for j, (field, length) in enumerate(zip(fields, lengths)):
        records[f"length{j}"] = length
        records[f"value{j}"] = field.values[start:stop]
        value_type, offset = record.fields[f"value{j}"][:2]
        if value_type.kind == "S" or (length < 0).any():
            if keep is None:
                keep = np.ones((rows, record.itemsize), bool)
            keep[:, offset:offset + value_type.itemsize] = np.arange(value_type.itemsize) < length[:, None]
    if keep is None:
        yield records.tobytes()
    else:
        yield records.view(np.uint8).reshape(rows, record.itemsize)[keep].tobytes()
