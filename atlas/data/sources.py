"""Text sources: where documents come from, as a stream of strings.

A source is one of:
- `builtin:docstrings`: the docstrings of the standard library and installed packages (offline).
- a local file: `.txt`, `.jsonl` (one JSON object per line) or `.parquet` (a column);
- a local folder: every such file below it, in sorted relative-path order (hidden files skipped);
- a Hugging Face dataset id (`owner/name`, optionally `owner/name:config`, or prefixed `hf:`),
  read through `datasets` with streaming=True so a large dataset is never downloaded whole, at
  an optional revision (branch, tag or commit).

Documents of a .txt file: the whole file is one document when it is at most
TXT_WHOLE_FILE_MAX_BYTES; a larger file (a book, a dump) is split into one document per
paragraph (blank-line separated), so that context-length truncation does not throw most of it
away. Documents are stripped of surrounding whitespace, and empty ones are not documents.

Bad input raises AtlasError when `iter_documents` is called (path, file type, missing text
field where the schema is known up front) or while iterating (a bad JSON line, a source that
turns out to hold no documents).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from atlas.data.docstrings import collect_docstrings, corpus_key
from atlas.errors import AtlasError, first_line

DOCSTRINGS_SOURCE = "builtin:docstrings"
DEFAULT_DOCSTRINGS_MAX_BYTES = 16_000_000   # about 5M tokens: plenty for a demo, 15 s to collect
TXT_WHOLE_FILE_MAX_BYTES = 32_768
FILE_TYPES = (".txt", ".jsonl", ".parquet")
PARSING_VERSION = 1  # bump when the rules above change: it is part of source_fingerprint
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def iter_documents(
    source: str,
    split: str = "train",
    text_field: str = "text",
    *,
    revision: str | None = None,
    docstrings_max_bytes: int | None = DEFAULT_DOCSTRINGS_MAX_BYTES,
) -> Iterator[str]:
    """The documents of `source` in a fixed order (see the module docstring for the kinds).

    revision: the branch, tag or commit of a hub dataset (default: its main branch)."""
    _check_revision(source, revision)
    if source.startswith("builtin:"):
        _check_builtin(source)
        return _non_empty(source, _docstrings(docstrings_max_bytes))
    path = _local_path(source)
    if path is not None:
        return _non_empty(source, _local_documents(path, text_field))
    return _non_empty(source, _hub_documents(_hub_id(source), split, text_field, revision))


def content_hash(documents: Iterable[str]) -> str:
    """SHA-256 of the documents in order; document boundaries count ("ab" differs from "a","b")."""
    digest = hashlib.sha256()
    for text in documents:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def source_fingerprint(
    source: str,
    split: str = "train",
    text_field: str = "text",
    *,
    revision: str | None = None,
    docstrings_max_bytes: int | None = DEFAULT_DOCSTRINGS_MAX_BYTES,
) -> str:
    """A cache key that changes when the documents of `source` can change, without parsing them.

    Local files: a hash of their relative paths and bytes. builtin:docstrings: the corpus key
    (Python version, installed distributions, cap). Hub datasets: the id, config, split, field and
    revision asked for (a hub branch that moves keeps its fingerprint: hash the documents with
    content_hash when that matters).
    """
    _check_revision(source, revision)
    if source.startswith("builtin:"):
        _check_builtin(source)
        return f"docstrings:{corpus_key(docstrings_max_bytes)}"
    path = _local_path(source)
    if path is None:
        at = f"@{revision}" if revision else ""  # no suffix without a revision: older keys stay valid
        return f"hf:{_hub_id(source)}:{split}:{text_field}{at}"
    digest = hashlib.sha256(f"v{PARSING_VERSION}:{text_field}".encode())
    for file in _source_files(path):
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return f"files:{digest.hexdigest()}"


# -- builtin ---------------------------------------------------------------------------------

def _check_builtin(source: str) -> None:
    if source != DOCSTRINGS_SOURCE:
        raise AtlasError(f"unknown builtin source {source!r}: the only builtin is {DOCSTRINGS_SOURCE!r}")


def _docstrings(max_bytes: int | None) -> Iterator[str]:
    yield from collect_docstrings(max_bytes).documents


# -- local files -----------------------------------------------------------------------------

def _local_path(source: str) -> Path | None:
    """The path if `source` names a local file or folder; None if it is a hub dataset id."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    looks_local = source.startswith(("/", ".", "~")) or source.lower().endswith(FILE_TYPES + (".json",))
    if looks_local:
        raise AtlasError(f"{source}: no such file or folder; pass an existing .txt/.jsonl/.parquet file or folder")
    return None


def _source_files(path: Path) -> list[Path]:
    if path.is_file():
        _check_file_type(path)
        return [path]
    files = sorted(
        (file for file in path.rglob("*") if file.is_file()
         and not any(part.startswith(".") for part in file.relative_to(path).parts)),
        key=lambda file: file.relative_to(path).parts,
    )
    for file in files:
        _check_file_type(file)
    return files


def _check_file_type(file: Path) -> None:
    if file.suffix.lower() not in FILE_TYPES:
        raise AtlasError(f"{file}: unknown file type {file.suffix or '(none)'!r}; supported: {', '.join(FILE_TYPES)}")


def _local_documents(path: Path, text_field: str) -> Iterator[str]:
    readers: dict[str, Callable[[Path, str], Iterator[str]]] = {
        ".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents,
    }
    files = _source_files(path)
    for file in files:
        if file.suffix.lower() == ".parquet":
            _check_parquet_field(file, text_field)  # fail before reading anything
    return (text for file in files for text in readers[file.suffix.lower()](file, text_field))


def _txt_documents(file: Path, text_field: str) -> Iterator[str]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise AtlasError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start}); convert it to UTF-8") from None
    pieces = [text] if file.stat().st_size <= TXT_WHOLE_FILE_MAX_BYTES else PARAGRAPH_BREAK.split(text)
    for piece in pieces:
        if piece.strip():
            yield piece.strip()


def _jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            text = _json_text(file, line_number, line, text_field)
            if text.strip():
                yield text.strip()


def _json_text(file: Path, line_number: int, line: str, text_field: str) -> str:
    where = f"{file}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise AtlasError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise AtlasError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if text_field not in record:
        raise AtlasError(f"{where}: no text field {text_field!r}; fields: {', '.join(map(str, record)) or '(none)'}")
    text = record[text_field]
    if not isinstance(text, str):
        raise AtlasError(f"{where}: field {text_field!r} holds {type(text).__name__}, not text; pick a text field")
    return text


def _check_parquet_field(file: Path, text_field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(file)
    if text_field not in schema.names:
        raise AtlasError(f"{file}: no text field {text_field!r}; fields: {', '.join(schema.names)}")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise AtlasError(f"{file}: column {text_field!r} is {column_type}, not text; pick a text column")


def _parquet_documents(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text and text.strip():
                yield text.strip()


# -- Hugging Face hub ------------------------------------------------------------------------

def _hub_id(source: str) -> str:
    return source.removeprefix("hf:")


def _hub_documents(dataset_id: str, split: str, text_field: str, revision: str | None) -> Iterator[str]:
    import datasets

    name, _, config = dataset_id.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split, streaming=True, revision=revision)
        stream = iter(dataset)
        first = next(stream, None)
    except Exception as error:  # datasets raises many types (ConnectionError, FileNotFound, HTTP, ValueError)
        reason = first_line(error)
        raise AtlasError(
            f"cannot load dataset {name!r} (split {split!r}) from the Hugging Face hub: {reason}; "
            "check the id, split and network, or pass a local .txt/.jsonl/.parquet file or folder (works offline)"
        ) from None
    if first is None:
        return
    if text_field not in first:
        raise AtlasError(f"dataset {name!r}: no text field {text_field!r}; fields: {', '.join(first)}")
    for record in _chain_first(first, stream):
        text = record[text_field]
        if text is not None and not isinstance(text, str):
            raise AtlasError(f"dataset {name!r}: field {text_field!r} holds {type(text).__name__}, not text; pick a text field")
        if text and text.strip():
            yield text.strip()


def resolved_dataset_revision(source: str, revision: str | None, content_hash: str) -> str | None:
    """What a registered dataset resolves to: a hub dataset's commit SHA (None when offline or the hub
    does not answer: registration never waits on it), else "sha256:" + the dataset's content hash."""
    if not _is_hub(source):
        return f"sha256:{content_hash}"
    from atlas.provenance import hub_commit

    try:
        return hub_commit(_hub_id(source).partition(":")[0], revision, repo_type="dataset")
    except Exception:  # unreachable, or a hub answer that datasets itself got past: no SHA to record
        return None


def _is_hub(source: str) -> bool:
    return not source.startswith("builtin:") and _local_path(source) is None


def _check_revision(source: str, revision: str | None) -> None:
    if revision is not None and not _is_hub(source):
        raise AtlasError(f"--revision {revision} applies to Hugging Face hub datasets only, and {source} is "
                         "local or builtin: drop --revision")


def _chain_first(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


# -- common ----------------------------------------------------------------------------------

def _non_empty(source: str, documents: Iterator[str]) -> Iterator[str]:
    """Pass documents through; a source that yields none is an error, not an empty dataset."""
    count = 0
    for text in documents:
        count += 1
        yield text
    if count == 0:
        raise AtlasError(f"{source}: the source holds no documents (no non-empty text); check the path, field or split")
