"""A model's neurons in the shape of Neuronpedia's exports: one JSON object per neuron.

The fields follow Neuronpedia's data model (its Prisma models `Neuron` and `Activation`, the rows of
its features/ and activations/ export files), with the neuron's activations nested in it:

    modelId, layer, index        the atlas model name; the source id "{layer}-mlp"; the neuron (a string,
                                 as Neuronpedia stores it)
    hookName                     blocks.{layer}.mlp.hook_post (TransformerLens)
    maxActApprox, frac_nonzero   activation_stats.max and frac_active on the dataset
    pos_str, pos_values          the top vocabulary tokens (W_U . w_out) and their values
    neg_str, neg_values          the bottom vocabulary tokens
    activations                  the top examples: modelId, layer, index, dataSource (the dataset),
                                 dataIndex (the document), tokens, values (one per token), maxValue
                                 (the firing activation), minValue, maxValueTokenIndex (the firing token)

Rows stream from three ordered read-only queries merged by (layer, neuron); every neuron of the
model's shape gets an object. Written to a new folder (OUT/LAYER/NEURON.json) or to one JSON Lines
file when OUT ends in .jsonl, in either case atomically.
"""

from __future__ import annotations

import itertools
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import Engine

from atlas.errors import AtlasError
from atlas.read.export import (DEFAULT_BATCH_ROWS, DEFAULT_TIMEOUT_S, check_out_file, iter_rows, json_line,
                               write_atomically)
from atlas.read.queries import hook_name, json_list
from atlas.store.read_only import execute_read_only, read_only_rows


def source_id(layer: int) -> str:
    """Neuronpedia names a source "{layer}-{set}"; the atlas's one set is the MLP neurons."""
    return f"{int(layer)}-mlp"


def export_neuronpedia(engine: Engine, model: str, out: str | Path, dataset: str | None = None,
                       batch_rows: int = DEFAULT_BATCH_ROWS, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, str | None]:
    """Write every neuron of `model` (top examples from `dataset`: default, the model's only one).

    engine: a read-only engine (atlas.store.read_only.console_engine).
    Returns the number of neurons written and the dataset their activations come from.
    """
    if batch_rows < 1:
        raise AtlasError(f"--batch-rows must be at least 1, not {batch_rows}")
    info = _model(engine, model, timeout_s)
    dataset_id, dataset = _dataset(engine, info, dataset, timeout_s)
    target = Path(out)
    jsonl = target.suffix == ".jsonl"
    check_out_file(target) if jsonl else _check_new_folder(target)
    with ExitStack() as stack:
        records = _records(stack, engine, info, dataset_id, dataset, batch_rows, timeout_s)
        if jsonl:
            count, _ = write_atomically(target, lambda sink: _write_jsonl(records, sink))
        else:
            count = _write_folder(records, target)
    return count, dataset


# --- the model and the dataset -------------------------------------------------------------------


def _select(engine: Engine, sql: str, timeout_s: float) -> list[dict[str, Any]]:
    """A small query on the read-only path (no parameters there: only integer ids are interpolated)."""
    frame = execute_read_only(engine, sql, row_limit=1_000_000, timeout_s=timeout_s).frame
    return frame.to_dict("records")


def _model(engine: Engine, name: str, timeout_s: float) -> dict[str, Any]:
    models = _select(engine, "SELECT id, name, n_layers, d_mlp FROM models ORDER BY name", timeout_s)
    found = [row for row in models if row["name"] == name]
    if not found:
        known = ", ".join(row["name"] for row in models) or "none registered"
        raise AtlasError(f"no model named {name!r}: --model takes one of {known}")
    return {key: (value if key == "name" else int(value)) for key, value in found[0].items()}


def _dataset(engine: Engine, info: dict[str, Any], name: str | None, timeout_s: float) -> tuple[int | None, str | None]:
    """The dataset of the model's top examples: the one named, else the only one (None when it has none)."""
    rows = _select(engine, "SELECT d.id, d.name FROM datasets d WHERE EXISTS (SELECT 1 FROM activation_stats a "
                           f"WHERE a.model_id = {info['id']} AND a.dataset_id = d.id) ORDER BY d.name", timeout_s)
    names = {row["name"]: int(row["id"]) for row in rows}
    if name is not None:
        if name not in names:
            raise AtlasError(f"{info['name']} has no activations on dataset {name!r}: --dataset takes one of "
                             f"{', '.join(names) or 'none (run `atlas ingest activations`)'}")
        return names[name], name
    if len(names) > 1:
        raise AtlasError(f"{info['name']} has activations on several datasets: choose one with --dataset "
                         f"({', '.join(names)})")
    if names:
        only = next(iter(names))
        return names[only], only
    if not _select(engine, f"SELECT 1 AS found FROM neuron_vocab WHERE model_id = {info['id']} LIMIT 1", timeout_s):
        raise AtlasError(f"nothing to export for {info['name']}: run `atlas ingest weights --model {info['name']}` "
                         "and `atlas ingest activations`")
    return None, None  # weights only: vocabulary tokens, no activations


def _check_new_folder(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AtlasError(f"{target} exists and is not an empty folder: choose a new --out folder "
                         "(or a .jsonl file for one line per neuron)")
    if not target.parent.is_dir():
        raise AtlasError(f"folder {target.parent} does not exist: create it or choose another --out")


# --- merging the three streams -------------------------------------------------------------------


class _Neurons:
    """Rows ordered by (layer, neuron, ...), handed out one neuron at a time."""

    def __init__(self, rows: Iterator[tuple]):
        self._groups = itertools.groupby(rows, key=lambda row: (int(row[0]), int(row[1])))
        self._next = next(self._groups, None)

    def take(self, key: tuple[int, int]) -> list[tuple]:
        while self._next is not None and self._next[0] < key:  # a neuron outside the model's shape
            self._next = next(self._groups, None)
        if self._next is None or self._next[0] != key:
            return []
        rows = list(self._next[1])
        self._next = next(self._groups, None)
        return rows


def _stream(stack: ExitStack, engine: Engine, sql: str | None, batch_rows: int, timeout_s: float) -> _Neurons:
    """The rows of one ordered query (no query: no rows), read while the export writes."""
    if sql is None:
        return _Neurons(iter(()))
    _, fetch = stack.enter_context(read_only_rows(engine, sql, timeout_s, batch_rows))
    return _Neurons(iter_rows(fetch, batch_rows))


def _records(stack: ExitStack, engine: Engine, info: dict[str, Any], dataset_id: int | None, dataset: str | None,
             batch_rows: int, timeout_s: float) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    """((layer, neuron), record) for every neuron of the model's shape, in order."""
    model_id, on_data = info["id"], f"model_id = {info['id']} AND dataset_id = {dataset_id}"
    has_data = dataset_id is not None
    stats = _stream(stack, engine, f"SELECT layer, neuron, max, frac_active FROM activation_stats WHERE {on_data} "
                                   "ORDER BY layer, neuron" if has_data else None, batch_rows, timeout_s)
    vocab = _stream(stack, engine, "SELECT layer, neuron, direction, token, value FROM neuron_vocab "
                                   f"WHERE model_id = {model_id} ORDER BY layer, neuron, direction DESC, rank",
                    batch_rows, timeout_s)
    examples = _stream(stack, engine, "SELECT layer, neuron, doc_index, activation, context_tokens, highlight_index, "
                                      f"context_activations FROM top_examples WHERE {on_data} "
                                      "ORDER BY layer, neuron, rank" if has_data else None, batch_rows, timeout_s)
    for key in itertools.product(range(info["n_layers"]), range(info["d_mlp"])):
        yield key, _record(info["name"], key, stats.take(key), vocab.take(key), examples.take(key), dataset)


def _record(model: str, key: tuple[int, int], stats: list[tuple], vocab: list[tuple], examples: list[tuple],
            dataset: str | None) -> dict[str, Any]:
    layer, neuron = key
    top = [(row[3], row[4]) for row in vocab if row[2] == "top"]
    bottom = [(row[3], row[4]) for row in vocab if row[2] == "bottom"]
    activations = [_activation(model, key, row, dataset) for row in examples]
    max_act = stats[0][2] if stats else max((a["maxValue"] for a in activations), default=None)
    return {
        "modelId": model, "layer": source_id(layer), "index": str(neuron), "hookName": hook_name(layer),
        "maxActApprox": max_act, "frac_nonzero": stats[0][3] if stats else None,
        "pos_str": [token for token, _ in top], "pos_values": [value for _, value in top],
        "neg_str": [token for token, _ in bottom], "neg_values": [value for _, value in bottom],
        "activations": activations,
    }


def _activation(model: str, key: tuple[int, int], row: tuple, dataset: str | None) -> dict[str, Any]:
    _, _, doc_index, activation, tokens, highlight, values = row
    tokens = json_list(tokens) or []
    values = json_list(values)
    if values is None:  # stored without per-token values: only the firing token's is known
        values = [activation if index == highlight else None for index in range(len(tokens))]
    known = [value for value in values if value is not None]
    return {"modelId": model, "layer": source_id(key[0]), "index": str(key[1]), "dataSource": dataset,
            "dataIndex": str(doc_index), "tokens": tokens, "values": values, "maxValue": activation,
            "minValue": min(known, default=activation), "maxValueTokenIndex": int(highlight)}


# --- writing -------------------------------------------------------------------------------------


def _write_jsonl(records: Iterator[tuple[tuple[int, int], dict[str, Any]]], sink: Any) -> tuple[int, int]:
    count = 0
    for _, record in records:
        sink.write(json_line(record).encode("utf-8"))
        count += 1
    return count, 1


def _write_folder(records: Iterator[tuple[tuple[int, int], dict[str, Any]]], target: Path) -> int:
    """OUT/LAYER/NEURON.json, written in a hidden sibling folder renamed onto OUT at the end."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    count = 0
    try:
        for (layer, neuron), record in records:
            folder = partial / str(layer)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{neuron}.json").write_text(json_line(record), encoding="utf-8")
            count += 1
        if target.exists():
            target.rmdir()  # checked empty before anything was read
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return count

