"""Deterministic, cached tokenization of a document stream into fixed-width rows.

Each document becomes one row: [BOS if the tokenizer has one] + its tokens, truncated to
ctx_len (truncated documents and the tokens they lose are counted, never dropped silently).
Rows are collected until at least n_tokens non-pad tokens (BOS included) are held; the last row
is kept whole, so the total may pass n_tokens by less than one row.

Document order: with sample_seed=None, source order. With an integer seed, a seeded shuffle
buffer of `shuffle_buffer` documents (numpy default_rng(seed)): each new document replaces a
random buffered one, which is emitted; the remainder is emitted in a seeded random order. A source
of at most `shuffle_buffer` documents thus gets a uniform random permutation, and memory stays
bounded for a stream of any length. doc_indices record each row's position in SOURCE order.

Storage, in <cache>/tokens/<key>/: ids.npy (int32 [n_rows, ctx_len], pad-filled, read as a
memmap), lengths.npy, doc_indices.npy, meta.json. The key hashes the dataset key, the tokenizer
hash, n_tokens, ctx_len, the seed and the buffer size: the models of one family share a
tokenizer hash and therefore the very same file, and a second build is a cache hit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from atlas.data.cache import cache_dir, stable_hash
from atlas.data.sources import content_hash
from atlas.errors import AtlasError

FORMAT_VERSION = 1
DEFAULT_SHUFFLE_BUFFER = 10_000
# Documents per batch-encoding call: large batches let the Rust tokenizer's threads share the
# work; the byte bound limits the encoding wasted past n_tokens (at most one chunk).
ENCODE_CHUNK_DOCS = 1024
ENCODE_CHUNK_BYTES = 1 << 20
ROW_DTYPE = np.dtype("<i4")


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor        # long [b, L], L = longest row of the batch; pad-filled
    attention_mask: torch.Tensor   # long [b, L], 1 at real tokens
    stat_mask: torch.Tensor        # bool [b, L], True where a position counts for statistics
    lengths: torch.Tensor          # long [b]
    row_indices: torch.Tensor      # long [b], rows of the dataset
    doc_indices: torch.Tensor      # long [b], documents of the source (source order)


def token_upper_bound(texts: Iterable[str], enough: int | None = None) -> tuple[int, int]:
    """(bound, documents read): UTF-8 bytes plus one BOS per document, an upper bound on the tokens any
    byte-level BPE gives (a token holds at least one byte; characters would not bound it for non-ASCII
    text). Reading stops once the bound reaches `enough`."""
    bound = n_documents = 0
    for text in texts:
        n_documents += 1
        bound += len(text.encode("utf-8", "surrogatepass")) + 1
        if enough is not None and bound >= enough:
            break
    return bound, n_documents


def tokenizer_hash(tokenizer: Any) -> str:
    """Identifies what a tokenizer does to text: its full fast-tokenizer state and special ids.

    The one identity of a tokenizer in the atlas: models.tokenizer_hash and the token cache keys.
    Runtime truncation/padding settings are left out: transformers changes them per call. A slow
    (pure Python) tokenizer is identified by its class and vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab()}
    return stable_hash({
        "state": state,
        "bos": tokenizer.bos_token_id,
        "pad": _pad_id(tokenizer),
        "special": sorted(tokenizer.all_special_ids),
    }, length=64)  # a full sha256: it is stored as the identity of a model's tokenizer


class TokenizedDataset:
    """Rows of token ids on disk (memory-mapped), with the bookkeeping a statistics pass needs."""

    def __init__(self, directory: Path, from_cache: bool = False):
        self.directory = Path(directory)
        self.meta: dict[str, Any] = json.loads((self.directory / "meta.json").read_text())
        self.ids = np.load(self.directory / "ids.npy", mmap_mode="r")
        self.lengths = np.load(self.directory / "lengths.npy")
        self.doc_indices = np.load(self.directory / "doc_indices.npy")
        self.special_ids = torch.tensor(self.meta["special_ids"], dtype=torch.long)
        self.from_cache = from_cache

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        documents: Iterable[str],
        tokenizer: Any,
        n_tokens: int,
        ctx_len: int,
        sample_seed: int | None = 0,
        *,
        dataset_key: str | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> TokenizedDataset:
        """Tokenize `documents` (or open the cached result of an identical earlier build).

        dataset_key identifies the documents (e.g. sources.source_fingerprint); without one,
        `documents` must be a sequence and its content_hash is the key.
        """
        _check_options(n_tokens, ctx_len, shuffle_buffer)
        if dataset_key is None:
            if not isinstance(documents, Sequence):
                raise TypeError("pass dataset_key for a one-shot document iterator (its content cannot be hashed twice)")
            dataset_key = f"content:{content_hash(documents)}"
        tokenizer_key = tokenizer_hash(tokenizer)
        key = stable_hash({
            "format": FORMAT_VERSION, "dataset": dataset_key, "tokenizer": tokenizer_key,
            "n_tokens": n_tokens, "ctx_len": ctx_len, "seed": sample_seed, "buffer": shuffle_buffer,
        })
        directory = cache_dir("tokens") / key
        if (directory / "meta.json").exists():
            return cls(directory, from_cache=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}-"))
        try:
            meta = _write_rows(staging, documents, tokenizer, n_tokens, ctx_len, sample_seed, shuffle_buffer)
            meta.update(key=key, dataset_key=dataset_key, tokenizer_hash=tokenizer_key)
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            _publish(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(directory)

    # -- reading ---------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def ctx_len(self) -> int:
        return self.meta["ctx_len"]

    @property
    def tokenizer_hash(self) -> str:
        """The tokenizer the rows were made with (models.tokenizer_hash of the models that read them)."""
        return self.meta["tokenizer_hash"]

    @property
    def n_rows(self) -> int:
        return self.meta["n_rows"]

    @property
    def n_tokens(self) -> int:
        """Non-pad tokens held (BOS included)."""
        return self.meta["n_tokens"]

    @property
    def n_stat_positions(self) -> int:
        """Positions that count for statistics: n_tokens - n_special_positions."""
        return self.meta["n_tokens"] - self.meta["n_special_positions"]

    @property
    def n_special_positions(self) -> int:
        return self.meta["n_special_positions"]

    @property
    def n_truncated_docs(self) -> int:
        return self.meta["n_truncated_docs"]

    @property
    def n_truncated_tokens(self) -> int:
        """Tokens cut off the end of truncated documents (not in any row)."""
        return self.meta["n_truncated_tokens"]

    @property
    def source_exhausted(self) -> bool:
        """True if the source ran out before n_tokens were collected."""
        return self.meta["source_exhausted"]

    def batches(self, batch_size: int, *, first_batch: int = 0, n_rows: int | None = None) -> Iterator[Batch]:
        """Consecutive rows in dataset order, trimmed to the longest row of each batch.

        first_batch skips that many batches (a resumed pass); n_rows limits the pass to a prefix.
        """
        if batch_size < 1:
            raise AtlasError(f"batch size must be at least 1, got {batch_size}")
        stop_row = self.n_rows if n_rows is None else min(n_rows, self.n_rows)
        for start in range(first_batch * batch_size, stop_row, batch_size):
            yield self._batch(start, min(start + batch_size, stop_row))

    def rows_for_tokens(self, n_tokens: int) -> int:
        """The fewest leading rows that hold at least n_tokens tokens (all rows if there are fewer)."""
        cumulative = np.cumsum(self.lengths, dtype=np.int64)
        return int(min(np.searchsorted(cumulative, n_tokens) + 1, self.n_rows))

    def _batch(self, start: int, stop: int) -> Batch:
        lengths = torch.from_numpy(self.lengths[start:stop].astype(np.int64))
        width = int(lengths.max())
        input_ids = torch.from_numpy(np.asarray(self.ids[start:stop, :width], dtype=np.int64))
        real = torch.arange(width)[None, :] < lengths[:, None]
        return Batch(
            input_ids=input_ids,
            attention_mask=real.long(),
            stat_mask=real & ~torch.isin(input_ids, self.special_ids),
            lengths=lengths,
            row_indices=torch.arange(start, stop),
            doc_indices=torch.from_numpy(self.doc_indices[start:stop].astype(np.int64)),
        )

    def row(self, row: int) -> np.ndarray:
        """The token ids of one row, without padding."""
        return np.array(self.ids[row, : self.lengths[row]])

    def context_window(self, row: int, position: int, before: int = 24, after: int = 4) -> tuple[np.ndarray, int]:
        """Token ids around (row, position), clipped to the row, and the firing token's index in them."""
        return next(self.context_windows(np.array([row]), np.array([position]), before, after))


    def context_windows(self, rows: np.ndarray, positions: np.ndarray, before: int = 24,
                        after: int = 4) -> Iterator[tuple[np.ndarray, int]]:
        """context_window of many (row, position) pairs, reading each needed row once (one gather from the
        file instead of a read per example)."""
        rows, positions = np.asarray(rows, dtype=np.int64), np.asarray(positions, dtype=np.int64)
        needed, which = np.unique(rows, return_inverse=True)
        ids = np.asarray(self.ids[needed])
        lengths = np.asarray(self.lengths)[needed]
        for index, position in zip(which.tolist(), positions.tolist()):
            length = int(lengths[index])
            if not 0 <= position < length:
                raise IndexError(f"position {position} is outside row {int(needed[index])} of length {length}")
            first = max(0, position - before)
            yield ids[index, first: min(length, position + after + 1)], position - first


# -- building helpers ------------------------------------------------------------------------

def _check_options(n_tokens: int, ctx_len: int, shuffle_buffer: int) -> None:
    if n_tokens < 1:
        raise AtlasError(f"n_tokens must be at least 1, got {n_tokens}")
    if ctx_len < 2:
        raise AtlasError(f"ctx_len must be at least 2 (BOS and one token), got {ctx_len}")
    if shuffle_buffer < 1:
        raise AtlasError(f"shuffle buffer must hold at least 1 document, got {shuffle_buffer}")


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise AtlasError(f"{type(tokenizer).__name__} is not a fast tokenizer; load it with AutoTokenizer(use_fast=True)")


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def shuffled(documents: Iterable[str], seed: int | None, buffer_size: int) -> Iterator[tuple[int, str]]:
    """(source index, document) in the seeded shuffle-buffer order described in the module docstring."""
    if seed is None:
        yield from enumerate(documents)
        return
    rng = np.random.default_rng(seed)
    buffer: list[tuple[int, str]] = []
    for item in enumerate(documents):
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(rng.integers(buffer_size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def _chunks(items: Iterator[tuple[int, str]]) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    n_chars = 0
    for item in items:
        chunk.append(item)
        n_chars += len(item[1])
        if len(chunk) == ENCODE_CHUNK_DOCS or n_chars >= ENCODE_CHUNK_BYTES:
            yield chunk
            chunk, n_chars = [], 0
    if chunk:
        yield chunk


@dataclass
class _RowCounts:
    n_rows: int = 0
    n_tokens: int = 0
    n_special_positions: int = 0
    n_truncated_docs: int = 0
    n_truncated_tokens: int = 0
    n_empty_docs: int = 0       # documents that encode to no tokens at all


def _write_rows(
    staging: Path, documents: Iterable[str], tokenizer: Any,
    n_tokens: int, ctx_len: int, seed: int | None, buffer_size: int,
) -> dict[str, Any]:
    """Encode and write rows to staging/ids.bin until n_tokens are held; then the .npy files."""
    # A private copy of the Rust tokenizer: no truncation/padding, and the caller's is not mutated.
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.no_truncation()
    encoder.no_padding()
    bos, pad = tokenizer.bos_token_id, _pad_id(tokenizer)
    special = np.array(sorted(tokenizer.all_special_ids), dtype=np.int64)
    capacity = ctx_len - (bos is not None)
    counts, lengths, doc_indices = _RowCounts(), [], []
    with open(staging / "ids.bin", "wb") as raw:
        for chunk in _chunks(shuffled(documents, seed, buffer_size)):
            encodings = encoder.encode_batch([text for _, text in chunk], add_special_tokens=False)
            rows = np.full((len(chunk), ctx_len), pad, dtype=ROW_DTYPE)
            n_written = 0
            for (doc_index, _), encoding in zip(chunk, encodings):
                if counts.n_tokens >= n_tokens:
                    break
                tokens = encoding.ids
                if not tokens:
                    counts.n_empty_docs += 1
                    continue
                if len(tokens) > capacity:
                    counts.n_truncated_docs += 1
                    counts.n_truncated_tokens += len(tokens) - capacity
                row = ([bos] if bos is not None else []) + tokens[:capacity]
                rows[n_written, : len(row)] = row
                n_written += 1
                counts.n_rows += 1
                counts.n_tokens += len(row)
                lengths.append(len(row))
                doc_indices.append(doc_index)
            rows = rows[:n_written]
            real = np.arange(ctx_len) < np.array(lengths[len(lengths) - n_written:])[:, None]
            counts.n_special_positions += int((np.isin(rows, special) & real).sum())
            raw.write(rows.tobytes())
            if counts.n_tokens >= n_tokens:
                break
    if counts.n_rows == 0:
        raise AtlasError("the documents hold no tokens; check the source")
    exhausted = counts.n_tokens < n_tokens  # said by the caller, which knows whether it is fatal
    _raw_to_npy(staging / "ids.bin", staging / "ids.npy", (counts.n_rows, ctx_len))
    np.save(staging / "lengths.npy", np.array(lengths, dtype=ROW_DTYPE))
    np.save(staging / "doc_indices.npy", np.array(doc_indices, dtype=np.int64))
    return {
        **counts.__dict__, "format": FORMAT_VERSION, "ctx_len": ctx_len, "n_tokens_requested": n_tokens,
        "sample_seed": seed, "shuffle_buffer": buffer_size, "source_exhausted": exhausted,
        "bos_token_id": bos, "pad_id": pad, "special_ids": special.tolist(),
    }


def _raw_to_npy(raw: Path, target: Path, shape: tuple[int, int]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(ROW_DTYPE), "fortran_order": False, "shape": shape}
    with open(target, "wb") as out, open(raw, "rb") as source:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(source, out, length=1 << 22)
    raw.unlink()


def _publish(staging: Path, directory: Path) -> None:
    """Move a finished build into place atomically; a concurrent identical build may have won."""
    try:
        os.rename(staging, directory)
    except OSError:
        if not (directory / "meta.json").exists():
            raise
