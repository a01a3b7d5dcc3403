"""The correlations job cut into token shards: the units of each pass (its blocks over a range of
batches) and the task that merges a pass's units into its blocks' maxima, where the executor runs it
(the merged products of a large pass are big: a GPU worker computes the maxima, the driver gets only
the per-neuron results)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.correlation_consumer import CorrelationConsumer
from ingest.correlation_plan import KIND, Block
from ingest.correlation_shards import RunContext
from ingest.runner import JobKey
from ingest.token_shards import PassUnit, merge_states, model_spec, shard_label, state_path, unit_key


def pass_units(blocks: list[Block], context: RunContext, ranges: list[range], tokens_dir: Path, directory: Path,
               n_rows: int, flush: int) -> list[PassUnit]:
    """One unit per token range of this pass of blocks."""
    config, dataset = context.config, context.dataset
    model_ids = sorted({block.a_id for block in blocks} | {block.b_id for block in blocks})
    models = tuple(model_spec(context.models[i]) for i in model_ids)
    units = []
    for index, batches in enumerate(ranges):
        shard = shard_label(index, len(ranges))
        units.append(PassUnit(
            label=f"correlations {dataset.name} {shard} ({len(blocks)} block(s))",
            keys=tuple(unit_key(block.key, index, len(ranges)) for block in blocks),
            models=models,
            make_consumer=functools.partial(CorrelationConsumer, blocks, flush_every=flush),
            tokens_dir=str(tokens_dir), n_rows=n_rows, batch_size=config.batch_size, batches=batches,
            stat_positions="non_special" if config.exclude_special_tokens else "all",
            dtype=config.dtype, device=config.device,
            state_path=str(state_path(directory, KIND, {
                "config": context.config_hash, "blocks": [block.key.claim_key for block in blocks],
                "models": [(m.model_id, m.source, m.revision, m.weights_hash) for m in models],
                "dataset": (dataset.id, dataset.content_hash), "tokens": tokens_dir.name, "n_rows": n_rows,
                "batch_size": config.batch_size, "batches": (batches.start, batches.stop), "flush": flush})),
            checkpoint_every=config.checkpoint_every, checkpoint_seconds=config.checkpoint_seconds,
            release_memory=True,
        ))
    return units


@dataclass(frozen=True)
class FinishPass:
    """Merge a pass's units (stamped with their done jobs) and compute its blocks' maxima and baselines."""

    units: tuple[PassUnit, ...]
    baseline_seed: int
    device: str


def finish_pass(task: FinishPass) -> dict[JobKey, dict[str, np.ndarray]]:
    from atlas.devices import resolve_device

    consumer: CorrelationConsumer = merge_states(task.units, resolve_device(task.device))
    return consumer.results(task.baseline_seed)
