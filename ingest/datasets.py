"""What every data job needs of a registered dataset: its token rows for a tokenizer, and checks
that fail before any work starts (the dataset holds the tokens asked for and at least one context,
its source is unchanged, the model takes its context)."""

from __future__ import annotations

import logging
from typing import Any, Iterable

from sqlalchemy.dialects import postgresql, sqlite

from atlas.data import TokenizedDataset, iter_documents, source_fingerprint
from atlas.errors import AtlasError
from atlas.registry import dataset_content_hash
from atlas.store import Store
from atlas.store.schema import Dataset, DatasetTokens, Model

log = logging.getLogger(__name__)


def tokenize(dataset: Dataset, tokenizer: Any, store: Store | None = None) -> TokenizedDataset:
    """The dataset's token rows for this tokenizer (cached on disk, shared by the jobs of a family).

    With a store, what the dataset really gave is recorded in dataset_tokens (the registered n_tokens
    is only what was asked for). A dataset short of one context is refused, after it is recorded, so
    that `atlas dataset list` shows why.
    """
    documents = iter_documents(dataset.source, dataset.split, dataset.text_field, revision=dataset_revision(dataset))
    tokens = TokenizedDataset.build(
        documents, tokenizer, dataset.n_tokens, dataset.ctx_len, dataset.sample_seed,
        dataset_key=source_fingerprint(dataset.source, dataset.split, dataset.text_field,
                                       revision=dataset_revision(dataset)),
    )
    if store is not None:
        record_tokens(store, dataset, tokens)
    require_one_context(dataset, tokens)
    if tokens.source_exhausted:
        log.warning("dataset %s ran out at %s of %s requested tokens: jobs use the tokens it holds",
                    dataset.name, f"{tokens.n_tokens:,}", f"{dataset.n_tokens:,}")
    return tokens


def dataset_revision(dataset: Dataset) -> str | None:
    """The revision jobs read: a hub dataset's commit pinned at registration (so every job reads the
    same documents), else the revision asked for (None for local and builtin sources)."""
    resolved = dataset.resolved_revision
    return resolved if resolved and not resolved.startswith("sha256:") else dataset.revision


def check_tokens(store: Store, dataset: Dataset, models: Iterable[Model]) -> None:
    """Before a job claims any ledger row: tokenize once per tokenizer of its models (the jobs then
    hit the cache), record the real counts and refuse a dataset short of one context."""
    from atlas.modeling import load_tokenizer  # transformers is slow to import

    done: set[str] = set()
    for model in models:
        if model.tokenizer_hash not in done:
            tokenize(dataset, load_tokenizer(model.source, model.revision), store)
            done.add(model.tokenizer_hash)


def record_tokens(store: Store, dataset: Dataset, tokens: TokenizedDataset) -> None:
    """Upsert the dataset's real counts under the tokenizer (one row per dataset and tokenizer)."""
    values = dict(dataset_id=dataset.id, tokenizer_hash=tokens.tokenizer_hash, n_tokens=tokens.n_tokens,
                  n_rows=tokens.n_rows, n_truncated_tokens=tokens.n_truncated_tokens,
                  source_exhausted=tokens.source_exhausted)
    counted = ("n_tokens", "n_rows", "n_truncated_tokens", "source_exhausted")
    with store.transaction() as session:  # an upsert: concurrent jobs on one dataset do not clash
        insert = (sqlite if store.is_sqlite else postgresql).insert(DatasetTokens).values(**values)
        session.execute(insert.on_conflict_do_update(index_elements=["dataset_id", "tokenizer_hash"],
                                                     set_={key: insert.excluded[key] for key in counted}))


def require_one_context(dataset: Dataset, tokens: TokenizedDataset) -> None:
    if tokens.n_tokens < dataset.ctx_len:
        raise AtlasError(
            f"dataset {dataset.name!r} gives only {tokens.n_tokens} tokens under tokenizer {tokens.tokenizer_hash[:8]} "
            f"({dataset.n_tokens:,} requested), fewer than one context of {dataset.ctx_len}: add text to "
            f"{dataset.source}, or register it under a new name with --ctx {max(2, tokens.n_tokens)} or less"
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
