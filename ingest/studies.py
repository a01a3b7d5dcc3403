"""Case studies: like the ingest jobs (a typed config dataclass and `run(config, store)` through the ledger),
each about one question rather than every neuron. STUDIES maps `atlas study <name>` to (config class, run)."""

from __future__ import annotations

from typing import Any, Callable

from ingest import ensembling

STUDIES: dict[str, tuple[type, Callable[[Any, Any], None]]] = {
    "ensembling": (ensembling.EnsemblingConfig, ensembling.run),
}
