"""Text sources, the builtin:docstrings corpus and deterministic cached tokenization."""

from atlas.data.sources import content_hash, iter_documents, source_fingerprint
from atlas.data.tokens import Batch, TokenizedDataset, token_upper_bound, tokenizer_hash

__all__ = [
    "Batch",
    "TokenizedDataset",
    "content_hash",
    "iter_documents",
    "source_fingerprint",
    "token_upper_bound",
    "tokenizer_hash",
]
