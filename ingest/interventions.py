"""Job `interventions`: every single-layer deletion and every adjacent swap of whole blocks (Stages of Inference).

Per batch the unmodified model runs once and keeps its residual states h_0..h_L; an intervention
at layer l shares blocks 0..l-1 with it, so it resumes from h_l and runs only the blocks after
(delete l: l+1..L-1; swap l: l+1, l, l+2..L-1). Logits are formed only at the scored positions
(ingest/next_token.py) and compared there with the unmodified model's, then dropped: a batch's
logits are never kept past the batch. One row per intervention plus the unmodified model's
('none', layer NULL, with no comparison columns).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session

from atlas.devices import model_dtype, resolve_device
from atlas.metrics.layers import MeanAccumulator, next_token_metrics
from atlas.store import Store
from atlas.store.schema import Dataset, LayerIntervention, Model
from ingest.next_token import (ShardedMeasure, ShardedNextTokenConfig, open_tokens, require_positions, run_per_model,
                               scored_batches)
from ingest.runner import replace_rows

KIND = "interventions"
NONE = ("none", None)


@dataclass
class InterventionsConfig(ShardedNextTokenConfig):
    """KL to the unmodified model, top-1 agreement, accuracy (and retention), loss and entropy after
    deleting each layer and swapping each adjacent pair."""


@dataclass(frozen=True)
class Intervention:
    kind: str                  # 'delete' | 'swap'
    layer: int                 # for a swap, the first of the two blocks
    start: int                 # the residual state of the unmodified model the pass resumes from
    order: tuple[int, ...]     # the blocks run after it

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.layer


def interventions(n_layers: int) -> list[Intervention]:
    """Every deletion, then every adjacent swap: 2 * n_layers - 1 passes."""
    deletions = [Intervention("delete", l, l, tuple(range(l + 1, n_layers))) for l in range(n_layers)]
    swaps = [Intervention("swap", l, l, (l + 1, l, *range(l + 2, n_layers))) for l in range(n_layers - 1)]
    return deletions + swaps


def measure(loaded, batches, n_layers: int) -> MeanAccumulator:
    """Per-position metrics of the unmodified model and of every intervention, summed over the batches."""
    from atlas.modeling import final_residual, residual_states

    adapter, model = loaded.adapter, loaded.model
    planned = interventions(n_layers)
    sums = MeanAccumulator()
    with torch.inference_mode():
        for batch in batches:
            states = residual_states(loaded, batch.input_ids, batch.attention_mask)
            original = adapter.logits_from_residual(model, states[-1][batch.positions])
            sums.add(NONE, next_token_metrics(original, batch.targets))
            for step in planned:
                final = final_residual(loaded, batch.input_ids, batch.attention_mask, step.order, states[step.start])
                logits = adapter.logits_from_residual(model, final[batch.positions])
                sums.add(step.key, next_token_metrics(logits, batch.targets, reference=original))
    return sums


def rows(sums: MeanAccumulator, n_layers: int) -> dict[str, list[Any]]:
    """The 'none' row and one row per intervention; retention and loss change relative to 'none'."""
    base_accuracy, base_loss = sums.mean(NONE, "accuracy"), sums.mean(NONE, "loss")
    columns: dict[str, list[Any]] = {name: [] for name in (
        "kind", "layer", "n_positions", "kl", "top1_agreement", "accuracy", "accuracy_retention", "loss",
        "loss_delta", "entropy")}
    for kind, layer in [NONE] + [step.key for step in interventions(n_layers)]:
        group = (kind, layer)
        accuracy, loss = sums.mean(group, "accuracy"), sums.mean(group, "loss")
        intervened = kind != "none"
        columns["kind"].append(kind)
        columns["layer"].append(layer)
        columns["n_positions"].append(sums.count(group, "loss"))
        columns["kl"].append(sums.mean(group, "kl") if intervened else None)
        columns["top1_agreement"].append(sums.mean(group, "top1_agreement") if intervened else None)
        columns["accuracy"].append(accuracy)
        columns["accuracy_retention"].append(accuracy / base_accuracy if intervened and base_accuracy > 0 else None)
        columns["loss"].append(loss)
        columns["loss_delta"].append(loss - base_loss if intervened else None)
        columns["entropy"].append(sums.mean(group, "entropy"))
    return columns


def compute(model_row: Model, dataset: Dataset, config: InterventionsConfig) -> dict[str, list[Any]]:
    from atlas.modeling import load_model

    loaded = load_model(model_row.source, model_row.revision, dtype=model_dtype(config.dtype))
    device = resolve_device(config.device)
    loaded.model.to(device)
    token_rows, n_rows = open_tokens(dataset, loaded, config.tokens)
    batches = scored_batches(token_rows, n_rows, loaded, batch_size=config.batch_size,
                             exclude_special_tokens=config.exclude_special_tokens, device=device,
                             label=f"interventions {model_row.name}")
    return finish(measure(loaded, batches, model_row.n_layers), model_row, dataset)


def finish(sums: MeanAccumulator, model_row: Model, dataset: Dataset) -> dict[str, list[Any]]:
    require_positions(sums.count(NONE, "loss"), dataset)
    return rows(sums, model_row.n_layers)


def shard_measure(model_row: Model):
    """What a token shard's worker runs on this model (picklable)."""
    return functools.partial(measure, n_layers=model_row.n_layers)


def write(session: Session, model_id: int, dataset_id: int, columns: dict[str, list[Any]], job_id: int) -> int:
    return replace_rows(session, LayerIntervention, {"model_id": model_id, "dataset_id": dataset_id},
                        {**columns, "job_id": job_id})  # NaN (no positions) is stored as NULL


def run(config: InterventionsConfig, store: Store) -> None:
    run_per_model(KIND, config, store, compute, write, ShardedMeasure(shard_measure, finish))
