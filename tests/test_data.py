"""Text sources, the builtin:docstrings corpus and cached tokenization (atlas/data)."""

from __future__ import annotations

import ast
import collections
import hashlib
import inspect
import json
import re
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from atlas.data import TokenizedDataset, content_hash, iter_documents, source_fingerprint, tokenizer_hash
from atlas.data.docstrings import collect_docstrings
from atlas.data.sources import TXT_WHOLE_FILE_MAX_BYTES
from atlas.data.tokens import shuffled
from atlas.errors import AtlasError

SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def training_text() -> list[str]:
    """Prose that ships with Python: docstrings of a few standard-library modules."""
    return [inspect.getdoc(module) for module in (ast, collections, inspect, json, re, string)] * 3


@pytest.fixture(scope="session")
def bpe(training_text) -> Tokenizer:
    """A small byte-level BPE, trained deterministically."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(training_text, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer(bpe) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIALS)


@pytest.fixture(scope="session")
def tokenizer_without_bos(bpe) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|eos|>", pad_token="<|pad|>")


def paragraphs(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of varied length."""
    rng = np.random.default_rng(seed)
    words = "the neuron fires on digits while another layer suppresses common tokens".split()
    return [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for i in range(n)]


# -- sources ---------------------------------------------------------------------------------

def test_small_txt_file_is_one_document(tmp_path):
    path = tmp_path / "essay.txt"
    path.write_text("\n  First paragraph.\n\nSecond paragraph.\n\n")
    assert list(iter_documents(str(path))) == ["First paragraph.\n\nSecond paragraph."]


def test_large_txt_file_is_split_on_blank_lines(tmp_path):
    blocks = [f"Paragraph {i} " + "word " * 50 for i in range(200)]
    text = "\n\n".join(blocks) + "\n \t\n\n\nlast one\n"
    assert len(text.encode()) > TXT_WHOLE_FILE_MAX_BYTES
    path = tmp_path / "book.txt"
    path.write_text(text)
    assert list(iter_documents(str(path))) == [block.strip() for block in blocks] + ["last one"]


def test_jsonl_reads_the_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "alpha", "id": 1}\n\n{"text": "beta"}\n{"text": "  "}\n{"body": "x", "text": "gamma"}\n')
    assert list(iter_documents(str(path))) == ["alpha", "beta", "gamma"]
    path2 = tmp_path / "other.jsonl"
    path2.write_text('{"body": "one"}\n{"body": "two"}\n')
    assert list(iter_documents(str(path2), text_field="body")) == ["one", "two"]


def test_parquet_reads_the_text_column_in_batches(tmp_path):
    texts = [f"row {i}" for i in range(2500)] + [None, ""]
    pq.write_table(pa.table({"id": list(range(2502)), "content": texts}), tmp_path / "t.parquet", row_group_size=700)
    assert list(iter_documents(str(tmp_path / "t.parquet"), text_field="content")) == texts[:2500]


def test_folder_reads_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("from b/2")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n')
    (tmp_path / "c.parquet").touch()
    pq.write_table(pa.table({"text": ["from c"]}), tmp_path / "c.parquet")
    (tmp_path / "b" / "10.txt").write_text("from b/10")
    (tmp_path / ".hidden.md").write_text("ignored")
    assert list(iter_documents(str(tmp_path))) == ["from a", "from b/10", "from b/2", "from c"]


def test_builtin_docstrings_small_cap_is_deterministic_and_cached(isolated_cache):
    first = collect_docstrings(max_bytes=200_000)
    assert not first.from_cache
    assert 150_000 < first.stats.n_bytes <= 200_000 and first.stats.reached_cap
    assert first.stats.n_skipped_short > 0 and first.stats.n_docstrings == len(first.documents)
    assert len(set(first.documents)) == len(first.documents)
    assert all(len(text) >= 32 and text == inspect.cleandoc(text) for text in first.documents)
    # Standard library first: the first file in sorted order is __future__.py.
    assert first.documents[0] == inspect.getdoc(__import__("__future__"))
    second = collect_docstrings(max_bytes=200_000)
    assert second.from_cache and second.documents == first.documents and second.stats == first.stats
    recollected = collect_docstrings(max_bytes=200_000, use_cache=False)
    assert recollected.documents == first.documents
    assert list(iter_documents("builtin:docstrings", docstrings_max_bytes=200_000)) == first.documents
    assert list((isolated_cache / "docstrings").glob("*.jsonl"))


def test_content_hash_depends_on_order_and_boundaries():
    assert content_hash(["a", "b"]) == content_hash(iter(["a", "b"]))
    assert content_hash(["ab"]) != content_hash(["a", "b"])
    assert content_hash(["b", "a"]) != content_hash(["a", "b"])
    assert content_hash([]) == hashlib.sha256().hexdigest()


def test_source_fingerprint_follows_file_contents(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n')
    before = source_fingerprint(str(path))
    assert source_fingerprint(str(path)) == before
    assert source_fingerprint(str(path), text_field="body") != before
    path.write_text('{"text": "two"}\n')
    assert source_fingerprint(str(path)) != before
    assert source_fingerprint("owner/name") == "hf:owner/name:train:text"


# -- bad input -------------------------------------------------------------------------------

def one_line_error(call) -> str:
    with pytest.raises(AtlasError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_path_is_an_error(tmp_path):
    message = one_line_error(lambda: iter_documents(str(tmp_path / "nope.txt")))
    assert "no such file" in message


def test_empty_sources_are_errors(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    assert "no documents" in one_line_error(lambda: list(iter_documents(str(tmp_path / "blank.txt"))))
    (tmp_path / "empty").mkdir()
    assert "no documents" in one_line_error(lambda: list(iter_documents(str(tmp_path / "empty"))))


def test_missing_text_field_names_the_fields(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x", "title": "y"}\n')
    message = one_line_error(lambda: list(iter_documents(str(tmp_path / "d.jsonl"))))
    assert "'text'" in message and "body, title" in message
    pq.write_table(pa.table({"content": ["x"], "n": [1]}), tmp_path / "t.parquet")
    message = one_line_error(lambda: iter_documents(str(tmp_path / "t.parquet")))  # raised up front
    assert "'text'" in message and "content, n" in message
    assert "not text" in one_line_error(lambda: iter_documents(str(tmp_path / "t.parquet"), text_field="n"))


def test_unknown_file_type_and_bad_lines_are_errors(tmp_path):
    (tmp_path / "notes.md").write_text("# notes")
    assert "unknown file type '.md'" in one_line_error(lambda: iter_documents(str(tmp_path / "notes.md")))
    assert "unknown file type" in one_line_error(lambda: iter_documents(str(tmp_path)))  # in a folder too
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    assert "bad.jsonl:2" in one_line_error(lambda: list(iter_documents(str(tmp_path / "bad.jsonl"))))
    assert "unknown builtin" in one_line_error(lambda: iter_documents("builtin:poems"))


def test_unreachable_hub_dataset_says_a_local_file_works(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = one_line_error(lambda: next(iter_documents("NeelNanda/pile-10k")))
    assert "NeelNanda/pile-10k" in message and "local" in message


# -- tokenization ----------------------------------------------------------------------------

def test_rows_are_bos_plus_tokens_and_truncation_is_counted(tokenizer):
    documents = paragraphs(40)
    ctx_len = 24
    data = TokenizedDataset.build(documents, tokenizer, n_tokens=10**6, ctx_len=ctx_len, sample_seed=None)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in documents]
    assert data.n_rows == 40 and data.source_exhausted
    assert list(data.doc_indices) == list(range(40))
    for row, ids in enumerate(encoded):
        assert data.row(row).tolist() == [tokenizer.bos_token_id] + ids[: ctx_len - 1]
        assert set(np.asarray(data.ids[row, len(data.row(row)):]).tolist()) <= {tokenizer.pad_token_id}
    overflow = [len(ids) - (ctx_len - 1) for ids in encoded if len(ids) > ctx_len - 1]
    assert data.n_truncated_docs == len(overflow) > 0
    assert data.n_truncated_tokens == sum(overflow)
    assert data.n_tokens == sum(min(len(ids), ctx_len - 1) + 1 for ids in encoded)
    assert data.n_special_positions == 40 and data.n_stat_positions == data.n_tokens - 40


def test_collection_stops_once_n_tokens_are_held(tokenizer):
    data = TokenizedDataset.build(paragraphs(200), tokenizer, n_tokens=500, ctx_len=32, sample_seed=None)
    assert not data.source_exhausted
    assert 500 <= data.n_tokens < 500 + 32
    assert data.n_tokens - int(data.lengths[-1]) < 500
    assert data.ids.shape == (data.n_rows, 32) and data.ids.dtype == np.int32


def test_stat_mask_excludes_bos_pad_and_special_tokens_in_text(tokenizer):
    documents = ["short", "a longer document with more words in it", "text with <|eos|> inside"]
    data = TokenizedDataset.build(documents, tokenizer, n_tokens=1000, ctx_len=64, sample_seed=None)
    (batch,) = data.batches(8)
    width = int(data.lengths.max())
    assert batch.input_ids.shape == (3, width) and batch.input_ids.dtype == torch.long
    specials = set(tokenizer.all_special_ids)
    for b in range(3):
        length = int(data.lengths[b])
        ids = batch.input_ids[b].tolist()
        expected = [p < length and ids[p] not in specials for p in range(width)]
        assert batch.stat_mask[b].tolist() == expected
        assert batch.attention_mask[b].tolist() == [int(p < length) for p in range(width)]
        assert not batch.stat_mask[b, 0]  # BOS
    assert tokenizer.eos_token_id in batch.input_ids[2].tolist()
    assert data.n_special_positions == 3 + 1
    assert int(batch.stat_mask.sum()) == data.n_stat_positions


def test_batches_cover_rows_in_order_trimmed_to_their_longest_row(tokenizer):
    data = TokenizedDataset.build(paragraphs(30), tokenizer, n_tokens=10**6, ctx_len=40, sample_seed=3)
    batches = list(data.batches(7))
    assert [len(b.row_indices) for b in batches] == [7, 7, 7, 7, 2]
    assert torch.cat([b.row_indices for b in batches]).tolist() == list(range(30))
    assert torch.cat([b.doc_indices for b in batches]).tolist() == data.doc_indices.tolist()
    for b in batches:
        assert b.input_ids.shape[1] == int(b.lengths.max())
        rows = [data.row(int(r)).tolist() for r in b.row_indices]
        assert [ids[:n].tolist() for ids, n in zip(b.input_ids, b.lengths)] == rows
    with pytest.raises(AtlasError):
        next(data.batches(0))


def test_builds_are_deterministic_and_cached(tokenizer, isolated_cache, monkeypatch, tmp_path):
    documents = paragraphs(60)
    first = TokenizedDataset.build(documents, tokenizer, n_tokens=800, ctx_len=32, sample_seed=7)
    again = TokenizedDataset.build(documents, tokenizer, n_tokens=800, ctx_len=32, sample_seed=7)
    assert not first.from_cache and again.from_cache and again.directory == first.directory
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "fresh"))
    rebuilt = TokenizedDataset.build(iter(documents), tokenizer, n_tokens=800, ctx_len=32, sample_seed=7,
                                     dataset_key=f"content:{content_hash(documents)}")
    assert not rebuilt.from_cache and rebuilt.key == first.key
    for name in ("ids.npy", "lengths.npy", "doc_indices.npy"):
        assert (rebuilt.directory / name).read_bytes() == (first.directory / name).read_bytes()
    other_seed = TokenizedDataset.build(documents, tokenizer, n_tokens=800, ctx_len=32, sample_seed=8)
    assert other_seed.key != first.key and other_seed.doc_indices.tolist() != first.doc_indices.tolist()
    with pytest.raises(TypeError):
        TokenizedDataset.build(iter(documents), tokenizer, n_tokens=800, ctx_len=32)


def test_a_family_shares_one_file(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    reloaded(["x" * 50] * 2, padding=True, truncation=True, max_length=8)  # runtime state must not matter
    assert tokenizer_hash(reloaded) == tokenizer_hash(tokenizer)
    documents = paragraphs(20)
    first = TokenizedDataset.build(documents, tokenizer, n_tokens=300, ctx_len=16)
    second = TokenizedDataset.build(documents, reloaded, n_tokens=300, ctx_len=16)
    assert second.from_cache and second.directory == first.directory


def test_shuffle_is_a_seeded_permutation():
    documents = [str(i) for i in range(50)]
    small_buffer = [index for index, _ in shuffled(documents, seed=1, buffer_size=8)]
    assert sorted(small_buffer) == list(range(50)) and small_buffer != list(range(50))
    assert small_buffer == [index for index, _ in shuffled(iter(documents), seed=1, buffer_size=8)]
    full = [index for index, _ in shuffled(documents, seed=1, buffer_size=100)]
    assert full == np.random.default_rng(1).permutation(50).tolist()
    assert [index for index, _ in shuffled(documents, seed=None, buffer_size=8)] == list(range(50))


def test_tokenizer_without_bos_gives_rows_of_plain_tokens(tokenizer_without_bos):
    documents = paragraphs(5)
    data = TokenizedDataset.build(documents, tokenizer_without_bos, n_tokens=10**5, ctx_len=128, sample_seed=None)
    assert data.row(0).tolist() == tokenizer_without_bos(documents[0])["input_ids"][:128]
    assert data.n_special_positions == 0
    (batch,) = data.batches(5)
    assert bool(batch.stat_mask[0, 0]) and int(batch.stat_mask.sum()) == data.n_tokens


def test_context_window_is_clipped_to_the_row(tokenizer):
    data = TokenizedDataset.build(["one two three four five six seven eight nine ten " * 3], tokenizer,
                                  n_tokens=10, ctx_len=64, sample_seed=None)
    row = data.row(0)
    window, index = data.context_window(0, 30, before=24, after=4)
    assert window.tolist() == row[6:35].tolist() and index == 24
    window, index = data.context_window(0, 2, before=24, after=4)
    assert window.tolist() == row[0:7].tolist() and index == 2
    last = len(row) - 1
    window, index = data.context_window(0, last)
    assert window.tolist() == row[last - 24:].tolist() and window[index] == row[last]
    with pytest.raises(IndexError):
        data.context_window(0, len(row))


def test_bad_build_options_are_errors(tokenizer):
    assert "ctx_len" in one_line_error(lambda: TokenizedDataset.build(["a"], tokenizer, n_tokens=10, ctx_len=1))
    assert "n_tokens" in one_line_error(lambda: TokenizedDataset.build(["a"], tokenizer, n_tokens=0, ctx_len=8))


def test_chunked_encoding_gives_the_same_rows(tokenizer, monkeypatch, tmp_path):
    import atlas.data.tokens as tokens

    documents = paragraphs(50) + ["with <|eos|> inside"] * 3
    whole = TokenizedDataset.build(documents, tokenizer, n_tokens=900, ctx_len=20, sample_seed=5)
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "chunked"))
    monkeypatch.setattr(tokens, "ENCODE_CHUNK_DOCS", 7)
    chunked = TokenizedDataset.build(documents, tokenizer, n_tokens=900, ctx_len=20, sample_seed=5)
    assert not chunked.from_cache and chunked.meta == whole.meta
    assert np.array_equal(chunked.ids, whole.ids) and np.array_equal(chunked.doc_indices, whole.doc_indices)
    stat_positions = sum(int(batch.stat_mask.sum()) for batch in chunked.batches(4))
    assert stat_positions == chunked.n_stat_positions
