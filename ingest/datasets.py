"""What every data job needs of a registered dataset: its token rows for a tokenizer, and checks
that fail before any work starts (the dataset holds the tokens asked for, its source is unchanged,
the model takes its context)."""

from __future__ import annotations

from typing import Any

from atlas.data import TokenizedDataset, iter_documents, source_fingerprint
from atlas.errors import AtlasError
from atlas.registry import dataset_content_hash
from atlas.store.schema import Dataset


def tokenize(dataset: Dataset, tokenizer: Any) -> TokenizedDataset:
    """The dataset's token rows for this tokenizer (cached on disk, shared by the jobs of a family)."""
    documents = iter_documents(dataset.source, dataset.split, dataset.text_field)
    return TokenizedDataset.build(
        documents, tokenizer, dataset.n_tokens, dataset.ctx_len, dataset.sample_seed,
        dataset_key=source_fingerprint(dataset.source, dataset.split, dataset.text_field),
    )


def check_dataset(dataset: Dataset, tokens: int | None) -> None:
    """Before any job starts: the dataset holds the tokens asked for and its source has not changed."""
    if tokens is not None and tokens > dataset.n_tokens:
        raise AtlasError(f"--tokens {tokens} exceeds the {dataset.n_tokens} tokens of dataset {dataset.name!r}: "
                         "register a larger dataset with `atlas dataset add`")
    if dataset_content_hash(dataset.source, dataset.split, dataset.text_field) != dataset.content_hash:
        raise AtlasError(f"the source of dataset {dataset.name!r} ({dataset.source}) changed since it was "
                         "registered: register it again under a new name")


def check_context(loaded: Any, dataset: Dataset) -> None:
    """Jobs that compare activations position by position need whole rows: refuse a too-long context."""
    limit = getattr(loaded.config, "max_position_embeddings", None)
    if limit is not None and dataset.ctx_len > limit:
        raise AtlasError(f"dataset {dataset.name!r} has ctx {dataset.ctx_len} but {loaded.source} takes at most "
                         f"{limit} positions: register a dataset with a smaller --ctx")
