"""Streaming exports of a table, a view or one SELECT to Parquet, CSV or JSON Lines.

Rows come through the read-only path (atlas.store.read_only): the SQLite file opened read-only, or
PostgreSQL as the atlas_reader role through a server-side cursor. They are fetched batch_rows at a
time and written as they arrive, so memory holds one batch whatever the size of the result. A file
is written next to its destination and renamed into place at the end: a failed export leaves
nothing behind.

Parquet keeps column types: the Arrow schema comes from the first batch; a column that is NULL
throughout that batch takes its type from its first non-NULL value in the result (one probing query),
and stays the null type when it has none. JSON columns of a table exported by name are lists on
both backends (SQLite returns them as text); a JSON object is written as JSON text and a NUMERIC as
a double.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from sqlalchemy import JSON, Engine

from atlas.errors import AtlasError, first_line
from atlas.store.read_only import atlas_relations, read_only_rows
from atlas.store.sql_check import check_query

FORMATS = ("parquet", "csv", "jsonl")
DEFAULT_BATCH_ROWS = 10_000
DEFAULT_TIMEOUT_S = 3600.0
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Batch = Sequence[tuple]
Probe = Callable[[int], Any]  # column index -> its first non-NULL value in the result, or None


@dataclass(frozen=True)
class ExportResult:
    path: Path
    rows: int
    batches: int


# --- what to read --------------------------------------------------------------------------------


def check_format(fmt: str, formats: Sequence[str] = FORMATS) -> str:
    if fmt not in formats:
        raise AtlasError(f"unknown format {fmt!r}: use one of {', '.join(formats)}")
    return fmt


def resolve_source(source: str, dialect: str) -> tuple[str, frozenset[str]]:
    """The statement for a table or view name or one SELECT, and the JSON columns to decode (tables only).

    A write or several statements are refused here (sql_check), before anything is opened or written.
    """
    name = source.strip()
    if not _IDENTIFIER.fullmatch(name):
        return check_query(source, dialect), frozenset()
    relations = atlas_relations()
    if name not in relations:
        raise AtlasError(f"unknown table or view {name!r}: use one of {', '.join(sorted(relations))}, "
                         "or one SELECT statement in quotes")
    return f"SELECT * FROM {name}", _json_columns(name)


def _json_columns(table: str) -> frozenset[str]:
    from atlas.store.schema import Base

    found = Base.metadata.tables.get(table)
    return frozenset() if found is None else frozenset(c.name for c in found.columns if isinstance(c.type, JSON))


def _decoder(columns: Sequence[str], json_columns: frozenset[str]) -> Callable[[Batch], Batch]:
    """Decodes the JSON text SQLite returns for a table's JSON columns (PostgreSQL returns lists)."""
    indexes = [index for index, name in enumerate(columns) if name in json_columns]
    if not indexes:
        return lambda batch: batch

    def decode(batch: Batch) -> Batch:
        rows = [list(row) for row in batch]
        for row in rows:
            for index in indexes:
                if isinstance(row[index], str):
                    row[index] = json.loads(row[index])
        return [tuple(row) for row in rows]

    return decode


def _check_columns(columns: Sequence[str]) -> None:
    if not columns:
        raise AtlasError("the statement returns no columns: export a SELECT")
    duplicates = sorted({name for name in columns if columns.count(name) > 1})
    if duplicates:
        raise AtlasError(f"several columns are named {', '.join(duplicates)}: give each column its own alias (AS)")


# --- the export ----------------------------------------------------------------------------------


def export_query(engine: Engine, source: str, fmt: str, out: str | Path, batch_rows: int = DEFAULT_BATCH_ROWS,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> ExportResult:
    """Write a table, view or SELECT (`source`) to `out` in `fmt`, batch_rows rows at a time.

    engine: a read-only engine (atlas.store.read_only.console_engine).
    """
    check_format(fmt)
    if batch_rows < 1:
        raise AtlasError(f"--batch-rows must be at least 1, not {batch_rows}")
    out = check_out_file(out)
    statement, json_columns = resolve_source(source, engine.dialect.name)
    with read_only_rows(engine, statement, timeout_s, batch_rows) as (columns, fetch):
        _check_columns(columns)
        decode = _decoder(columns, json_columns)
        batches = (decode(batch) for batch in iter(lambda: fetch(batch_rows), []))

        def probe(index: int) -> Any:
            row = [None] * len(columns)
            row[index] = first_value(engine, statement, columns[index], timeout_s)
            return decode([tuple(row)])[0][index]

        rows, count = write_atomically(out, lambda sink: write_rows(fmt, columns, batches, sink, probe))
    return ExportResult(out, rows, count)


def first_value(engine: Engine, statement: str, column: str, timeout_s: float) -> Any:
    """The first non-NULL value of one column of the statement's result, or None (there is none, or
    the statement cannot be a subquery: EXPLAIN, PRAGMA)."""
    quoted = '"' + column.replace('"', '""') + '"'
    # The statement on lines of its own: a trailing -- comment must not swallow the closing parenthesis.
    probe = f"SELECT q.{quoted} FROM (\n{statement}\n) AS q WHERE q.{quoted} IS NOT NULL LIMIT 1"
    try:
        with read_only_rows(engine, probe, timeout_s, batch_rows=1) as (_, fetch):
            found = fetch(1)
    except AtlasError:
        return None
    return found[0][0] if found else None


def check_out_file(out: str | Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise AtlasError(f"{out} is a folder: --out takes the path of the file to write")
    if not out.parent.is_dir():
        raise AtlasError(f"folder {out.parent} does not exist: create it or choose another --out")
    return out


def write_atomically(out: Path, write: Callable[[BinaryIO], tuple[int, int]]) -> tuple[int, int]:
    """write(sink) into a hidden file beside `out`, renamed onto `out` only when it succeeds."""
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as sink:
            counts = write(sink)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return counts


def write_rows(fmt: str, columns: Sequence[str], batches: Iterable[Batch], sink: BinaryIO,
               probe: Probe | None = None) -> tuple[int, int]:
    """Write the batches in `fmt` to a binary sink; returns (rows, batches)."""
    writers = {"parquet": lambda: _write_parquet(columns, batches, sink, probe),
               "csv": lambda: _write_csv(columns, batches, sink),
               "jsonl": lambda: _write_jsonl(columns, batches, sink)}
    return writers[check_format(fmt)]()


def frame_bytes(frame: Any, fmt: str) -> bytes:
    """A pandas DataFrame (the SQL page's result) in `fmt`, through the same writers."""
    rows = [tuple(_from_frame(value) for value in row) for row in frame.itertuples(index=False, name=None)]
    sink = io.BytesIO()
    write_rows(fmt, [str(name) for name in frame.columns], [rows] if rows else [], sink)
    return sink.getvalue()


def _from_frame(value: Any) -> Any:
    """pandas' values as the database's: numpy scalars as Python's, NaN and NA (pandas' NULL) as None."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


# --- Parquet -------------------------------------------------------------------------------------


def _write_parquet(columns: Sequence[str], batches: Iterable[Batch], sink: BinaryIO,
                   probe: Probe | None) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, schema, rows, count = None, None, 0, 0
    try:
        for batch in batches:
            if writer is None:
                schema = _arrow_schema(columns, batch, probe)
                writer = pq.ParquetWriter(sink, schema)
            writer.write_batch(_record_batch(schema, batch, rows))  # one row group per batch
            rows, count = rows + len(batch), count + 1
        if writer is None:  # no rows: the columns, with no type to keep
            writer = pq.ParquetWriter(sink, pa.schema([pa.field(name, pa.null()) for name in columns]))
    finally:
        if writer is not None:
            writer.close()
    return rows, count


def _parquet_value(value: Any) -> Any:
    """A JSON object as text (its keys vary by row); a NUMERIC as a double (its precision varies by
    row, e.g. PostgreSQL's AVG of integers, which no one Arrow decimal type holds)."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return float(value) if isinstance(value, decimal.Decimal) else value


def _arrow_array(values: list) -> Any:
    """The values as Arrow infers them; a column of mixed types (SQLite is dynamically typed) as text."""
    import pyarrow as pa

    values = [_parquet_value(value) for value in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if value is None else _text(value) for value in values], type=pa.string())


def _arrow_schema(columns: Sequence[str], batch: Batch, probe: Probe | None) -> Any:
    import pyarrow as pa

    fields = []
    for index, name in enumerate(columns):
        arrow_type = _arrow_array([row[index] for row in batch]).type
        if arrow_type == pa.null() and probe is not None:
            found = probe(index)
            if found is not None:
                arrow_type = _arrow_array([found]).type
        fields.append(pa.field(name, arrow_type))
    return pa.schema(fields)


def _record_batch(schema: Any, batch: Batch, first_row: int) -> Any:
    """The batch under the file's schema. Arrow's safe cast refuses a lossy change (1.5 into an
    integer column), which pa.array(values, type=...) would silently truncate."""
    import pyarrow as pa

    arrays = []
    for index, field in enumerate(schema):
        array = _arrow_array([row[index] for row in batch])
        if array.type != field.type:
            try:
                array = array.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
                raise AtlasError(f"column {field.name!r} holds {array.type} in the rows from {first_row + 1:,} where "
                                 f"the first rows held {field.type} ({first_line(error)}): CAST it in the "
                                 "query so that every row has one type") from None
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# --- CSV and JSON Lines --------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def _write_csv(columns: Sequence[str], batches: Iterable[Batch], sink: BinaryIO) -> tuple[int, int]:
    text = io.TextIOWrapper(sink, encoding="utf-8", newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    rows, count = 0, 0
    for batch in batches:
        writer.writerows(["" if value is None else _text(value) for value in row] for row in batch)
        rows, count = rows + len(batch), count + 1
    text.flush()
    text.detach()  # the caller owns the sink
    return rows, count


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_value(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null, inside lists and objects too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: json_value(item) for key, item in value.items()}
    return value


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(json_value(record), ensure_ascii=False, default=_json_default, allow_nan=False) + "\n"


def _write_jsonl(columns: Sequence[str], batches: Iterable[Batch], sink: BinaryIO) -> tuple[int, int]:
    rows, count = 0, 0
    for batch in batches:
        sink.write("".join(json_line(dict(zip(columns, row))) for row in batch).encode("utf-8"))
        rows, count = rows + len(batch), count + 1
    return rows, count


def iter_rows(fetch: Callable[[int], list[tuple]], batch_rows: int) -> Iterator[tuple]:
    """Every row of a read_only_rows stream, fetched batch_rows at a time."""
    for batch in iter(lambda: fetch(batch_rows), []):
        yield from batch
