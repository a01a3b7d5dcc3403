"""Seed-family training: one shared tokenizer and data, one GPT-2 per seed (no database)."""

from atlas.training.corpus import (
    FamilyCorpus,
    encode_documents,
    pack_rows,
    prepare_corpus,
    split_documents,
    unigram_entropy,
)
from atlas.training.tokenizer import END_OF_TEXT, train_bpe_tokenizer
from atlas.training.train import TrainConfig, TrainResult, build_model, train_seed

__all__ = [
    "END_OF_TEXT",
    "FamilyCorpus",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "encode_documents",
    "pack_rows",
    "prepare_corpus",
    "split_documents",
    "train_bpe_tokenizer",
    "train_seed",
    "unigram_entropy",
]
