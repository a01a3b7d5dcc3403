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
    combined = {}
    for side, own, model in (("a", lambda blk: (blk.a_start, blk.a_stop, blk.a_d_mlp), a),
                             ("b", lambda blk: (blk.b_start, blk.b_stop, blk.b_d_mlp), b)):
        other_start = (lambda blk: blk.b_start) if side == "a" else (lambda blk: blk.a_start)
        n = model.n_layers * model.d_mlp
        out = {f"{side}_max_corr": np.full(n, np.nan), f"{side}_baseline_max_corr": np.full(n, np.nan),
               f"{side}_partner_layer": np.full(n, -1, dtype=np.int64),
               f"{side}_partner_neuron": np.full(n, -1, dtype=np.int64)}
        groups: dict[tuple[int, int, int], list[dict[str, np.ndarray]]] = {}
        for block, result in sorted(parts, key=lambda part: (own(part[0]), other_start(part[0]))):
            groups.setdefault(own(block), []).append(result)
        for (start, stop, d_mlp), results in groups.items():
            neurons = slice(start * d_mlp, stop * d_mlp)
            best, layer, neuron = combine_maxima([r[f"{side}_max_corr"] for r in results],
                                                 [r[f"{side}_partner_layer"] for r in results],
                                                 [r[f"{side}_partner_neuron"] for r in results])
            (baseline,) = combine_maxima([r[f"{side}_baseline_max_corr"] for r in results])
            out[f"{side}_max_corr"][neurons], out[f"{side}_baseline_max_corr"][neurons] = best, baseline
            out[f"{side}_partner_layer"][neurons], out[f"{side}_partner_neuron"][neurons] = layer, neuron
        combined.update(out)
    return combined
