"""Shared pytest fixtures. Tiny models are built once per session (see tests/tiny.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import ARCHITECTURES, build_tiny_family, build_tiny_model, build_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 512, <|endoftext|> = BOS/EOS/pad) saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """arch -> directory of a tiny seeded model with its tokenizer, for gpt2, neox, llama and phi."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / f"tiny-{arch}", seed=0, tokenizer_dir=tiny_tokenizer_dir)
            for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, tiny_tokenizer_dir) -> list[Path]:
    """Directories of the tiny GPT-2 with seeds 0..3 (one family: same tokenizer and shape)."""
    return build_tiny_family(tmp_path_factory.mktemp("tiny-family"), tiny_tokenizer_dir)

# Database fixtures (store, db_url, empty_db_url on SQLite and PostgreSQL).
from tests.fixtures_db import db_url, empty_db_url, pg_server, pg_template, store  # noqa: E402,F401
# Tiny models of every architecture after a few training steps (nonzero accuracy).
from tests.fixtures_trained import trained_tiny_models  # noqa: E402,F401
from tests.fixtures_filled import filled_any_db_url, filled_db_url, filled_docs_file  # noqa: E402,F401
