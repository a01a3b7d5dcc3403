"""Where derived data (collected corpora, tokenized datasets) is cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "ATLAS_CACHE_DIR"


def cache_dir(subdir: str = "") -> Path:
    """The cache root ($ATLAS_CACHE_DIR, else ~/.cache/neuron-atlas), or a subfolder of it, created."""
    root = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "neuron-atlas").expanduser()
    path = root / subdir if subdir else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(payload: Any, length: int = 24) -> str:
    """A short hex digest of a JSON-serializable value, independent of dict ordering."""
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:length]
