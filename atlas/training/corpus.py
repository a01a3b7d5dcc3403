"""Documents -> token rows for a seed family: a held-out split, packing, and the unigram bar.

The split is fixed by the texts, never by a training seed: every seed of a family trains on the
same rows and is evaluated on the same held-out documents.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from atlas.errors import AtlasError

SPLIT_SALT = "neuron-atlas-heldout"  # the split belongs to the family, not to a training seed


@dataclass(frozen=True)
class FamilyCorpus:
    """What every seed of a family trains and is evaluated on."""

    train_rows: np.ndarray            # [n_train_rows, ctx] int64, packed documents
    heldout_rows: np.ndarray          # [n_heldout_rows, ctx] int64, packed held-out documents
    heldout_documents: list[np.ndarray]  # held-out documents as token ids, unpacked, in order


def split_documents(
    texts: Sequence[str], heldout_fraction: float
) -> tuple[list[str], list[str]]:
    """Disjoint train / held-out documents, order kept.

    A document is held out when a hash of its text falls below heldout_fraction, so repeated
    documents land on the same side (no leak through duplicates) and the split of a document
    does not change when the corpus grows.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise AtlasError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train, heldout = [], []
    for text in texts:
        (heldout if hash_fraction(text) < heldout_fraction else train).append(text)
    if not train or not heldout:
        raise AtlasError(
            f"{len(texts)} documents are too few for a held-out split; provide more text"
        )
    return train, heldout


def hash_fraction(text: str) -> float:
    """A fixed pseudo-random number in [0, 1) determined by the text alone."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{text}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> list[np.ndarray]:
    """Token ids of each document, without special tokens (packing adds the separators)."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded if len(ids) > 0]


def pack_rows(documents: Sequence[np.ndarray], ctx: int, separator_id: int) -> np.ndarray:
    """Concatenate `<sep> doc <sep> doc ...` and cut it into full rows of ctx tokens.

    The tail that does not fill a row is dropped. Packing wastes no compute on padding, and a
    document that spans two rows is still seen whole across them.
    """
    if not documents:
        raise AtlasError("no documents to pack; provide non-empty texts")
    separator = np.array([separator_id], dtype=np.int64)
    stream = np.concatenate([piece for doc in documents for piece in (separator, doc)])
    n_rows = len(stream) // ctx
    if n_rows == 0:
        raise AtlasError(
            f"{len(stream)} tokens do not fill one row of ctx={ctx}; provide more text"
        )
    return stream[: n_rows * ctx].reshape(n_rows, ctx)


def prepare_corpus(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    ctx: int,
    heldout_fraction: float = 0.05,
) -> FamilyCorpus:
    """Split documents, encode them and pack each split into rows of ctx tokens."""
    train_texts, heldout_texts = split_documents(texts, heldout_fraction)
    separator_id = tokenizer.eos_token_id
    train_documents = encode_documents(tokenizer, train_texts)
    heldout_documents = encode_documents(tokenizer, heldout_texts)
    return FamilyCorpus(
        train_rows=pack_rows(train_documents, ctx, separator_id),
        heldout_rows=pack_rows(heldout_documents, ctx, separator_id),
        heldout_documents=heldout_documents,
    )


def unigram_entropy(
    train_rows: np.ndarray, heldout_rows: np.ndarray, vocab_size: int | None = None
) -> float:
    """Cross-entropy (nats per token) of the held-out tokens under the training unigram model.

    The bar a trained model must beat: a model that ignores context cannot do better. Counts get
    add-one smoothing over the vocabulary so that a token unseen in training costs a finite amount.
    """
    train_ids = np.asarray(train_rows).ravel()
    heldout_ids = np.asarray(heldout_rows).ravel()
    if heldout_ids.size == 0 or train_ids.size == 0:
        raise AtlasError("unigram_entropy needs non-empty train and held-out tokens")
    size = max(int(train_ids.max()), int(heldout_ids.max())) + 1
    if vocab_size is not None:
        if vocab_size < size:
            raise AtlasError(f"token id {size - 1} is outside vocab_size {vocab_size}")
        size = vocab_size
    counts = np.bincount(train_ids, minlength=size).astype(np.float64) + 1.0
    log_probabilities = np.log(counts) - np.log(counts.sum())
    return float(-log_probabilities[heldout_ids].mean())
