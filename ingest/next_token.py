"""What the next-token jobs (interventions, lens) share: the dataset's token rows and the scored positions.

Positions: the prediction at position t is scored against token t+1, at every t where token t counts
and token t+1 is real (padding never). By default a special token as input does not count (the
SPEC's rule for statistics): the prediction made from BOS alone, of a document's first token, is
left out. --no-exclude-special-tokens counts it. Rows longer than the model's context are cut to
it; the last kept position is scored against the first cut token. Every metric of a job uses the
same positions, and a batch is dropped from memory before the next one is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterator, TYPE_CHECKING

import torch

from atlas.data import TokenizedDataset
from atlas.errors import AtlasError
from atlas.metrics.layers import next_token_positions, next_tokens
from atlas.registry import resolve_dataset, resolve_models
from atlas.store import Store
from atlas.store.schema import Dataset
from ingest.datasets import check_dataset, check_tokens, tokenize
from ingest.options import RUN_OPTION, DatasetName, DeviceName, FamilyName, ModelDtype, ModelName, Overwrite
from ingest.progress import RateColumn, progress_bar
from ingest.runner import JobKey, run_unit

if TYPE_CHECKING:  # transformers is slow to import: the CLI imports this module at start-up
    from atlas.modeling import LoadedModel


@dataclass
class NextTokenConfig:
    """The options of every next-token job (interventions, lens); each job subclasses it with its docstring."""

    model: ModelName = None
    family: FamilyName = None
    dataset: DatasetName = None
    tokens: int | None = None
    """Use only the first rows of the dataset holding this many tokens (default: all)."""
    exclude_special_tokens: bool = True
    """Do not score predictions made from a special token (BOS) as input."""
    batch_size: Annotated[int, RUN_OPTION] = 8
    """Rows (documents) per batch."""
    dtype: ModelDtype = "float32"
    device: DeviceName = "auto"
    overwrite: Overwrite = False


@dataclass
class ScoredBatch:
    input_ids: torch.Tensor       # long [b, T] as fed to the model (cut to its context), on the device
    attention_mask: torch.Tensor  # long [b, T], on the device
    positions: torch.Tensor       # bool [b, T], on the device: the scored positions
    targets: torch.Tensor         # long [n] on CPU: token t+1 of each scored position, in row-major order
    # bool [b, T] on the device: every real position (non-special unless asked), the last one of a row
    # included. Layer statistics average over these; only predictions need a next token.
    counted: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.counted is None:
            self.counted = self.attention_mask.bool()

    @property
    def n_positions(self) -> int:
        return int(self.targets.shape[0])


def check_options(tokens: int | None, batch_size: int) -> None:
    if batch_size < 1:
        raise AtlasError(f"--batch-size must be at least 1, got {batch_size}")
    if tokens is not None and tokens < 1:
        raise AtlasError(f"--tokens must be at least 1, got {tokens}")


def open_tokens(dataset: Dataset, loaded: LoadedModel, tokens: int | None) -> tuple[TokenizedDataset, int]:
    """The dataset's token rows for this model's tokenizer (cached) and how many rows to use."""
    rows = tokenize(dataset, loaded.tokenizer)
    return rows, rows.n_rows if tokens is None else rows.rows_for_tokens(tokens)


def scored_batches(
    rows: TokenizedDataset, n_rows: int, loaded: LoadedModel, *, batch_size: int, exclude_special_tokens: bool,
    device: str, label: str,
) -> Iterator[ScoredBatch]:
    """The first n_rows rows in batches, cut to the model's context, with a progress bar in tokens."""
    max_positions = loaded.adapter.max_positions(loaded.model)
    target = torch.device(device)
    with progress_bar(RateColumn("tokens")) as bar:
        task = bar.add_task(label, total=int(rows.lengths[:n_rows].sum()))
        for batch in rows.batches(batch_size, n_rows=n_rows):
            counted = batch.stat_mask if exclude_special_tokens else None
            positions = next_token_positions(batch.attention_mask, counted, max_positions)
            width = positions.shape[1]
            if positions.any():
                real = batch.attention_mask[:, :width].bool()
                counted = real & batch.stat_mask[:, :width] if exclude_special_tokens else real
                yield ScoredBatch(batch.input_ids[:, :width].to(target), batch.attention_mask[:, :width].to(target),
                                  positions.to(target), next_tokens(batch.input_ids, positions), counted.to(target))
            bar.advance(task, int(batch.lengths.sum()))


def require_positions(n_positions: int, dataset: Dataset) -> None:
    if n_positions == 0:
        raise AtlasError(f"dataset {dataset.name!r} has no position with a next token to score (only special "
                         "tokens or one-token rows?): register a dataset with more text")


def run_per_model(kind: str, config: Any, store: Store, compute: Callable, write: Callable) -> None:
    """The loop of a per-model next-token job: one ledger unit per model of --model/--family on --dataset.

    compute(model_row, dataset, config) -> result; write(session, model_id, dataset_id, result, job_id) -> rows.
    """
    check_options(config.tokens, config.batch_size)
    with store.session() as session:
        models = resolve_models(session, config.model, config.family)
        dataset = resolve_dataset(session, config.dataset)
    check_dataset(dataset, config.tokens)
    check_tokens(store, dataset, models)
    for model_row in models:
        run_unit(
            store, JobKey(kind, model_id=model_row.id, dataset_id=dataset.id), config,
            compute=lambda m=model_row: compute(m, dataset, config),
            write=lambda session, result, job_id, m=model_row: write(session, m.id, dataset.id, result, job_id),
            overwrite=config.overwrite, label=f"{kind} {model_row.name} on {dataset.name}",
        )
