"""`atlas export` on the filled atlas (SQLite and PostgreSQL): tables, views and SELECTs to Parquet, CSV
and JSONL in batches, Neuronpedia JSON per neuron, and bad input refused before anything is written."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import JSON, Boolean, Float, Integer, String, Text, text

from atlas.cli import main
from atlas.read.export import frame_bytes
from atlas.store import Store
from atlas.store.schema import Base
from tests.fixtures_filled import FILLED_DATASET

KEYS = {"neurons": ("model_id", "layer", "neuron"), "top_examples": ("model_id", "dataset_id", "layer", "neuron", "rank")}
JSON_COLUMNS = {"context_token_ids", "context_tokens", "context_activations"}
NEURONS_QUERY = "SELECT model_id, layer, neuron, vocab_class, vocab_kurt FROM neurons ORDER BY model_id, layer, neuron"


def export(capsys, monkeypatch, url: str, *args: str) -> tuple[int, str, str]:
    """`atlas export ARGS --db URL` in this process, through the CLI's entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["atlas", "export", *args, "--db", url])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


def exported(capsys, monkeypatch, url: str, *args: str) -> str:
    code, out, err = export(capsys, monkeypatch, url, *args)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def store(filled_any_db_url):
    opened = Store(filled_any_db_url)
    yield opened
    opened.dispose()


def rows_of(store: Store, query: str, **params) -> list[dict]:
    """Rows as the driver gives them, JSON text (SQLite) decoded."""
    with store.engine.connect() as conn:
        rows = [dict(row) for row in conn.execute(text(query), params).mappings()]
    for row in rows:
        for key in JSON_COLUMNS & row.keys():
            if isinstance(row[key], str):
                row[key] = json.loads(row[key])
    return rows


def arrow_type(column, values: list) -> pa.DataType:
    """The Parquet type a column of the schema must keep (null when the table holds no value)."""
    if all(value is None for value in values):
        return pa.null()
    if isinstance(column.type, JSON):
        element = next(item for value in values if value for item in value)
        return pa.list_(pa.string() if isinstance(element, str) else pa.float64() if isinstance(element, float)
                        else pa.int64())
    for sql_type, arrow in ((Boolean, pa.bool_()), (Integer, pa.int64()), (Float, pa.float64()),
                            (String, pa.string()), (Text, pa.string())):
        if isinstance(column.type, sql_type):
            return arrow
    raise AssertionError(f"no expected type for {column.type}")


@pytest.mark.parametrize("table", ["neurons", "top_examples"])
def test_parquet_round_trip_keeps_values_and_types(store, capsys, monkeypatch, tmp_path, table):
    path = tmp_path / f"{table}.parquet"
    exported(capsys, monkeypatch, store.url, table, "--format", "parquet", "--out", str(path), "--batch-rows", "100")
    written = pq.read_table(path)
    keys = KEYS[table]
    expected = rows_of(store, f"SELECT * FROM {table} ORDER BY {', '.join(keys)}")
    got = sorted(written.to_pylist(), key=lambda row: tuple(row[key] for key in keys))
    assert got == expected  # every value, floats bit for bit, JSON lists as lists
    columns = Base.metadata.tables[table].columns
    assert written.schema.names == [column.name for column in columns]
    for column in columns:
        assert written.schema.field(column.name).type == arrow_type(column, [row[column.name] for row in expected]), \
            column.name
    if table == "neurons":  # what pandas reads back is what it reads from the database
        with store.engine.connect() as conn:
            direct = pd.read_sql_query(text(f"SELECT * FROM {table} ORDER BY {', '.join(keys)}"), conn)
        back = pd.read_parquet(path).sort_values(list(keys)).reset_index(drop=True)
        pd.testing.assert_frame_equal(back, direct, check_dtype=True)


def test_csv_and_jsonl_hold_the_rows(store, capsys, monkeypatch, tmp_path):
    query = ("SELECT model, layer, neuron, vocab_class, vocab_kurt, excess_corr FROM neuron_atlas "
             "ORDER BY model, layer, neuron")
    expected = rows_of(store, query)
    exported(capsys, monkeypatch, store.url, query, "--format", "csv", "--out", str(tmp_path / "n.csv"))
    exported(capsys, monkeypatch, store.url, query, "--format", "jsonl", "--out", str(tmp_path / "n.jsonl"))
    with open(tmp_path / "n.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table[0] == list(expected[0]) and len(table) == len(expected) + 1
    for row, want in zip(table[1:], expected):
        assert row[:4] == [want["model"], str(want["layer"]), str(want["neuron"]), want["vocab_class"]]
        for cell, value in zip(row[4:], (want["vocab_kurt"], want["excess_corr"])):
            assert (cell == "" and value is None) or float(cell) == value  # repr round-trips
    lines = (tmp_path / "n.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == expected

    examples = tmp_path / "examples.jsonl"
    exported(capsys, monkeypatch, store.url, "top_examples", "--format", "jsonl", "--out", str(examples))
    records = [json.loads(line) for line in examples.read_text(encoding="utf-8").splitlines()]
    keys = KEYS["top_examples"]
    assert sorted(records, key=lambda r: tuple(r[k] for k in keys)) == \
        rows_of(store, f"SELECT * FROM top_examples ORDER BY {', '.join(keys)}")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_big_query_goes_in_batches(store, capsys, monkeypatch, tmp_path, fmt):
    expected = rows_of(store, NEURONS_QUERY)
    assert len(expected) > 300
    path = tmp_path / f"neurons.{fmt}"
    out = exported(capsys, monkeypatch, store.url, NEURONS_QUERY, "--format", fmt, "--out", str(path),
                   "--batch-rows", "7")
    batches = math.ceil(len(expected) / 7)
    assert f"wrote {len(expected):,} rows in {batches:,} batches to {path}" in out
    if fmt == "parquet":
        written = pq.ParquetFile(path)
        assert written.num_row_groups == batches  # one row group per fetched batch
        assert written.read().to_pylist() == expected
    elif fmt == "csv":
        assert len(path.read_text(encoding="utf-8").splitlines()) == len(expected) + 1
    else:
        assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == expected


def test_a_column_null_in_the_first_batch_keeps_its_type(store, capsys, monkeypatch, tmp_path):
    query = ("SELECT layer, neuron, CASE WHEN neuron >= 90 THEN vocab_kurt END AS late FROM neurons "
             "ORDER BY model_id, layer, neuron")
    path = tmp_path / "late.parquet"
    exported(capsys, monkeypatch, store.url, query, "--format", "parquet", "--out", str(path), "--batch-rows", "7")
    written = pq.read_table(path)
    assert written.schema.field("late").type == pa.float64()
    assert written.to_pylist() == rows_of(store, query)


def test_the_jobs_ledger_exports_its_json_objects_as_text(store, capsys, monkeypatch, tmp_path):
    """jobs.config is a JSON object (text on SQLite, a dict on PostgreSQL): one JSON text in Parquet."""
    path = tmp_path / "jobs.parquet"
    exported(capsys, monkeypatch, store.url, "jobs", "--format", "parquet", "--out", str(path), "--batch-rows", "3")
    written = pq.read_table(path)
    expected = rows_of(store, "SELECT id, config FROM jobs ORDER BY id")
    got = sorted(written.select(["id", "config"]).to_pylist(), key=lambda row: row["id"])
    assert [row["id"] for row in got] == [row["id"] for row in expected] and len(got) > 3
    for row, want in zip(got, expected):
        assert json.loads(row["config"]) == (json.loads(want["config"]) if isinstance(want["config"], str)
                                             else want["config"])
    assert written.schema.field("config").type == pa.string()
    started = written.schema.field("started_at").type
    assert started == pa.string() or pa.types.is_timestamp(started)  # SQLite keeps times as text


def test_neuronpedia_files_match_the_tables(store, capsys, monkeypatch, tmp_path):
    model = rows_of(store, "SELECT id, name, n_layers, d_mlp FROM models ORDER BY seed")[1]
    folder = tmp_path / "np"
    out = exported(capsys, monkeypatch, store.url, "neurons", "--format", "neuronpedia", "--model", model["name"],
                   "--out", str(folder), "--batch-rows", "50")
    n_neurons = model["n_layers"] * model["d_mlp"]
    assert f"wrote {n_neurons:,} neurons of {model['name']} (top examples from {FILLED_DATASET})" in out
    files = sorted(folder.glob("*/*.json"), key=lambda p: (int(p.parent.name), int(p.stem)))
    records = [json.loads(path.read_text(encoding="utf-8")) for path in files]
    assert len(records) == n_neurons
    vocab, stats, examples = _tables_by_neuron(store, model["id"])
    for record in records:
        layer, neuron = int(record["layer"].split("-")[0]), int(record["index"])
        key = (layer, neuron)
        assert (record["modelId"], record["layer"], record["index"]) == (model["name"], f"{layer}-mlp", str(neuron))
        assert record["hookName"] == f"blocks.{layer}.mlp.hook_post"
        top = [row for row in vocab.get(key, []) if row["direction"] == "top"]
        bottom = [row for row in vocab.get(key, []) if row["direction"] == "bottom"]
        assert (record["pos_str"], record["pos_values"]) == ([r["token"] for r in top], [r["value"] for r in top])
        assert (record["neg_str"], record["neg_values"]) == ([r["token"] for r in bottom],
                                                             [r["value"] for r in bottom])
        assert record["maxActApprox"] == stats[key]["max"] and record["frac_nonzero"] == stats[key]["frac_active"]
        want = examples.get(key, [])
        assert [a["tokens"] for a in record["activations"]] == [e["context_tokens"] for e in want]
        assert [a["values"] for a in record["activations"]] == [e["context_activations"] for e in want]
        assert [(a["maxValue"], a["maxValueTokenIndex"], a["dataSource"], a["dataIndex"])
                for a in record["activations"]] == \
            [(e["activation"], e["highlight_index"], FILLED_DATASET, str(e["doc_index"])) for e in want]
    assert sum(len(record["activations"]) for record in records) == sum(len(v) for v in examples.values()) > 0

    lines = tmp_path / "np.jsonl"  # the same records, one line each; the only dataset is the default
    exported(capsys, monkeypatch, store.url, "neurons", "--format", "neuronpedia", "--model", model["name"],
             "--out", str(lines))
    assert [json.loads(line) for line in lines.read_text(encoding="utf-8").splitlines()] == records


def _tables_by_neuron(store: Store, model_id: int) -> tuple[dict, dict, dict]:
    def grouped(query: str) -> dict:
        found: dict = {}
        for row in rows_of(store, query, m=model_id):
            found.setdefault((row["layer"], row["neuron"]), []).append(row)
        return found

    vocab = grouped("SELECT * FROM neuron_vocab WHERE model_id = :m ORDER BY layer, neuron, direction DESC, rank")
    stats = {key: rows[0] for key, rows in grouped("SELECT * FROM activation_stats WHERE model_id = :m").items()}
    examples = grouped("SELECT * FROM top_examples WHERE model_id = :m ORDER BY layer, neuron, rank")
    return vocab, stats, examples


def _counts(store: Store) -> list[int]:
    with store.engine.connect() as conn:
        return [conn.execute(text(f"SELECT COUNT(*) FROM {table.name}")).scalar() for table in Base.metadata.sorted_tables]


@pytest.mark.parametrize(("args", "message"), [
    (["nowhere", "--format", "parquet"], "unknown table or view 'nowhere'"),
    (["DELETE FROM models", "--format", "csv"], "refused: DELETE is not a query"),
    (["SELECT 1 AS a; DROP TABLE models", "--format", "jsonl"], "refused: several statements"),
    (["neurons", "--format", "xml"], "unknown format 'xml'"),
    (["neurons", "--format", "parquet", "--batch-rows", "0"], "--batch-rows must be at least 1"),
    (["neurons", "--format", "parquet", "--model", "x"], "--model and --dataset go with --format neuronpedia"),
    (["models", "--format", "neuronpedia", "--model", "x"], "--format neuronpedia exports neurons of one model"),
    (["neurons", "--format", "neuronpedia", "--model", "nowhere"], "no model named 'nowhere'"),
    (["SELECT name AS a, seed AS a FROM models", "--format", "parquet"], "several columns are named a"),
    (["SELECT CASE WHEN neuron < 50 THEN neuron ELSE 'x' END AS mixed FROM neurons ORDER BY model_id, layer, neuron",
      "--format", "parquet", "--batch-rows", "7"], "(query failed|holds string in the rows from 50 where)"),
])
def test_bad_input_is_one_line_and_writes_nothing(store, capsys, monkeypatch, tmp_path, args, message):
    before = _counts(store)
    target = tmp_path / "out" / "result.file"
    target.parent.mkdir()
    code, _, err = export(capsys, monkeypatch, store.url, *args, "--out", str(target))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert list(target.parent.iterdir()) == []  # no file, no partial file
    assert _counts(store) == before


def test_a_neuronpedia_folder_is_never_merged_into(store, capsys, monkeypatch, tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    model = rows_of(store, "SELECT name FROM models ORDER BY seed")[0]["name"]
    code, _, err = export(capsys, monkeypatch, store.url, "neurons", "--format", "neuronpedia", "--model", model,
                          "--out", str(folder))
    assert code == 1 and "is not an empty folder" in err
    assert [path.name for path in folder.iterdir()] == ["mine.txt"]


def test_frame_bytes_writes_the_sql_pages_downloads():
    frame = pd.DataFrame({"n": [1, 2], "x": [0.5, None], "s": ["a", None]})
    assert pq.read_table(io.BytesIO(frame_bytes(frame, "parquet"))).to_pylist() == \
        [{"n": 1, "x": 0.5, "s": "a"}, {"n": 2, "x": None, "s": None}]
    assert frame_bytes(frame, "csv").decode().splitlines() == ["n,x,s", "1,0.5,a", "2,,"]
    assert [json.loads(line) for line in frame_bytes(frame, "jsonl").decode().splitlines()] == \
        [{"n": 1, "x": 0.5, "s": "a"}, {"n": 2, "x": None, "s": None}]
