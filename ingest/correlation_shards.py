"""Shards of a pair too large for one pass: each block's maxima wait in a cache file (named by the config,
the models and the dataset, stamped with the job that wrote it) until all of the pair's blocks are done,
then combine into the pair's rows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atlas.data.cache import cache_dir, stable_hash
from atlas.metrics.correlation import combine_maxima
from atlas.store import Store
from atlas.store.schema import Dataset, Model
from ingest.correlation_plan import Block

if TYPE_CHECKING:
    from ingest.correlations import CorrelationsConfig

SHARD_FORMAT = 2  # 2: blocks of whole layers on both sides, both directions


@dataclass
class RunContext:
    """What every unit of one run shares."""

    config: CorrelationsConfig
    dataset: Dataset
    models: dict[int, Model]
    config_hash: str
    store: Store  # where a job records a weights hash the registry lacks


def shard_path(block: Block, context: RunContext) -> Path:
    a, b = context.models[block.a_id], context.models[block.b_id]
    name = stable_hash({
        "format": SHARD_FORMAT, "config": context.config_hash, "shard": block.key.shard,
        "a": (a.id, a.source, a.revision), "b": (b.id, b.source, b.revision),
        "dataset": (context.dataset.id, context.dataset.content_hash),
    })
    return cache_dir("correlation-shards") / f"{name}.npz"


def save_shard(block: Block, result: dict[str, np.ndarray], job_id: int, context: RunContext) -> None:
    path = shard_path(block, context)
    staging = path.with_suffix(f".{os.getpid()}.tmp.npz")
    with open(staging, "wb") as handle:
        np.savez(handle, job_id=np.array(job_id, dtype=np.int64), **result)
    os.replace(staging, path)


def load_shard(block: Block, job_id: int, context: RunContext) -> dict[str, np.ndarray] | None:
    """The block's saved maxima, or None when the file is missing or belongs to another job."""
    path = shard_path(block, context)
    if not path.exists():
        return None
    with np.load(path) as saved:
        if int(saved["job_id"]) != job_id:
            return None
        return {name: saved[name] for name in saved.files if name != "job_id"}


def combine_blocks(parts: list[tuple[Block, dict[str, np.ndarray]]], a: Model, b: Model) -> dict[str, np.ndarray]:
    """A pair's per-neuron results from its blocks, both directions: each side's best over the other side's
    layer groups (the earlier group wins ties, as the first column does in one block)."""
    return {**_combine_side(parts, "a", a), **_combine_side(parts, "b", b)}


def _combine_side(parts: list[tuple[Block, dict[str, np.ndarray]]], side: str, model: Model) -> dict[str, np.ndarray]:
    other = "b" if side == "a" else "a"
    n = model.n_layers * model.d_mlp
    out = {f"{side}_max_corr": np.full(n, np.nan), f"{side}_baseline_max_corr": np.full(n, np.nan),
           f"{side}_partner_layer": np.full(n, -1, dtype=np.int64),
           f"{side}_partner_neuron": np.full(n, -1, dtype=np.int64)}
    by_group: dict[tuple[int, int], list[dict[str, np.ndarray]]] = {}  # this side's columns -> block results
    for block, result in sorted(parts, key=lambda part: getattr(part[0], f"{other}_start")):
        columns = getattr(block, f"{side}_columns")
        by_group.setdefault((columns.start, columns.stop), []).append(result)
    for (start, stop), results in by_group.items():
        best, layer, neuron = combine_maxima(*([r[f"{side}_{name}"] for r in results]
                                               for name in ("max_corr", "partner_layer", "partner_neuron")))
        (baseline,) = combine_maxima([r[f"{side}_baseline_max_corr"] for r in results])
        out[f"{side}_max_corr"][start:stop], out[f"{side}_baseline_max_corr"][start:stop] = best, baseline
        out[f"{side}_partner_layer"][start:stop], out[f"{side}_partner_neuron"][start:stop] = layer, neuron
    return out
