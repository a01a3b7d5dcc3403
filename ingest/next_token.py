"""What the next-token jobs (interventions, lens) share: the dataset's token rows and the scored positions.

Positions: the prediction at position t is scored against token t+1, at every t where token t counts
and token t+1 is real (padding never). By default a special token as input does not count (the
SPEC's rule for statistics): the prediction made from BOS alone, of a document's first token, is
left out. --no-exclude-special-tokens counts it. Rows longer than the model's context are cut to
it; the last kept position is scored against the first cut token. Every metric of a job uses the
same positions, and a batch is dropped from memory before the next one is read.

Token shards (jobs whose config is a ShardedNextTokenConfig and who hand run_per_model a ShardedMeasure):
with --token-shards K or --executor ray every model's batches are cut into K ranges, each a ledger unit
(ingest/token_shards.py) that a worker runs with nothing but the unit: it loads the model, checks its
weights against the registered hash, sums the job's per-position metrics over its range into a
MeanAccumulator and saves its state. The driver then merges each model's states in stream order (sums
and counts add) and writes the model's rows in one transaction, as an unsharded run does; only the
order of float64 additions differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, TYPE_CHECKING

import torch

from atlas.data import TokenizedDataset
from atlas.errors import AtlasError
from atlas.metrics.layers import MeanAccumulator, next_token_positions, next_tokens
from atlas.registry import resolve_dataset, resolve_models
from atlas.store import Store
from atlas.store.schema import Dataset, Model
from ingest.datasets import check_dataset, check_tokens, tokenize
from ingest.options import (RUN_OPTION, CpusPerTask, DatasetName, DeviceName, ExecutorName, FamilyName, GpusPerTask,
                            ModelDtype, ModelName, Overwrite, RayAddress, ShardDir, TokenShards)
from ingest.progress import RateColumn, progress_bar
from ingest.runner import JobKey, config_hash, run_unit, science_config

if TYPE_CHECKING:  # transformers is slow to import: the CLI imports this module at start-up
    from atlas.modeling import LoadedModel
    from ingest.token_shards import ModelSpec, ShardedStream

log = logging.getLogger(__name__)


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
class ShardedNextTokenConfig(NextTokenConfig):
    """The options of a next-token job that can cut its pass into token shards and run them on Ray."""

    token_shards: TokenShards = 1
    executor: ExecutorName = "local"
    ray_address: RayAddress = None
    gpus_per_task: GpusPerTask = None
    cpus_per_task: CpusPerTask = 1.0
    shard_dir: ShardDir = None


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
    device: str, label: str, batches: range | None = None, show_progress: bool = True,
) -> Iterator[ScoredBatch]:
    """The first n_rows rows in batches, cut to the model's context, with a progress bar in tokens.

    batches: the indices of the batches to read (a token shard; default: all of them)."""
    max_positions = loaded.adapter.max_positions(loaded.model)
    target = torch.device(device)
    first, stop_row = (0, n_rows) if batches is None else (batches.start, min(batches.stop * batch_size, n_rows))
    with progress_bar(RateColumn("tokens")) as bar:
        task = bar.add_task(label, total=int(rows.lengths[first * batch_size:stop_row].sum()), visible=show_progress)
        for batch in rows.batches(batch_size, first_batch=first, n_rows=stop_row):
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


def run_per_model(kind: str, config: Any, store: Store, compute: Callable, write: Callable,
                  sharded: ShardedMeasure | None = None) -> None:
    """The loop of a per-model next-token job: one ledger unit per model of --model/--family on --dataset.

    compute(model_row, dataset, config) -> result; write(session, model_id, dataset_id, result, job_id) -> rows.
    sharded: how the job measures in token shards (its config a ShardedNextTokenConfig), taken when
    --token-shards is above 1 or --executor is not local.
    """
    check_options(config.tokens, config.batch_size)
    shards, executor = getattr(config, "token_shards", 1), getattr(config, "executor", "local")
    if shards < 1:
        raise AtlasError(f"--token-shards must be at least 1, got {shards}")
    with store.session() as session:
        models = resolve_models(session, config.model, config.family)
        dataset = resolve_dataset(session, config.dataset)
    check_dataset(dataset, config.tokens)
    check_tokens(store, dataset, models)
    if shards > 1 or executor != "local":
        if sharded is None:
            raise AtlasError(f"the {kind} job cannot run in token shards: leave out --token-shards and --executor")
        run_token_shards(kind, config, store, models, dataset, sharded, write)
        return
    for model_row in models:
        run_unit(
            store, JobKey(kind, model_id=model_row.id, dataset_id=dataset.id), config,
            compute=lambda m=model_row: compute(m, dataset, config),
            write=lambda session, result, job_id, m=model_row: write(session, m.id, dataset.id, result, job_id),
            overwrite=config.overwrite, label=f"{kind} {model_row.name} on {dataset.name}",
        )


# -- token shards on an executor ---------------------------------------------------------------------

@dataclass(frozen=True)
class ShardedMeasure:
    """How a job measures one model in token shards.

    measure(model_row) -> a picklable measure(loaded, batches) -> MeanAccumulator (a module-level function,
    or a functools.partial of one), run by the workers; result(sums, model_row, dataset) -> the result that
    the job's write takes, made by the driver from the merged sums."""

    measure: Callable[[Model], Callable[[Any, Iterable[ScoredBatch]], MeanAccumulator]]
    result: Callable[[MeanAccumulator, Model, Dataset], Any]
    attn_implementation: str | None = None  # how the workers load the model ("eager" for attention probabilities)


@dataclass(frozen=True)
class NextTokenUnit:
    """One task: one model's per-position metrics summed over a range of batches. Picklable, and all a
    worker needs (no database)."""

    label: str
    keys: tuple[JobKey, ...]   # its ledger row
    model: ModelSpec
    measure: Callable[[Any, Iterable[ScoredBatch]], MeanAccumulator]
    attn_implementation: str | None
    tokens_dir: str
    n_rows: int
    batch_size: int
    batches: range
    exclude_special_tokens: bool
    dtype: str
    device: str
    state_path: str
    job_ids: tuple[int, ...] = ()  # set by the driver once the keys are claimed

    def make_consumer(self, device: Any = None) -> MeanAccumulator:
        """An empty accumulator, for token_shards.merge_states to load this unit's state into."""
        return MeanAccumulator()


def run_next_token_unit(unit: NextTokenUnit) -> int:
    """Run one unit (on a worker, or in the driver's process): returns the tokens it read. Its state is
    saved in the shard directory, stamped with the unit's job ids."""
    from atlas.devices import resolve_device
    from ingest.token_shards import load_checked, save_state

    device = resolve_device(unit.device)
    loaded = load_checked(unit.model, unit.dtype, device, unit.attn_implementation)
    tokens = TokenizedDataset(Path(unit.tokens_dir), from_cache=True)
    batches = scored_batches(tokens, unit.n_rows, loaded, batch_size=unit.batch_size,
                             exclude_special_tokens=unit.exclude_special_tokens, device=str(device), label=unit.label,
                             batches=unit.batches, show_progress=False)
    sums = unit.measure(loaded, batches)
    save_state(Path(unit.state_path), sums.state_dict(), unit.job_ids)
    rows = slice(unit.batches.start * unit.batch_size, min(unit.batches.stop * unit.batch_size, unit.n_rows))
    return int(tokens.lengths[rows].sum())


def run_token_shards(kind: str, config: Any, store: Store, models: list[Model], dataset: Dataset,
                     sharded: ShardedMeasure, write: Callable) -> None:
    """One unit per (model, token range) on the executor, all models' units at once; then per model its
    units' states merged in stream order into its rows, written through run_unit (one transaction each)."""
    from ingest.token_shards import (delete_states, merge_states, model_spec, pending_models, prepare_stream,
                                     run_pass_units, shard_label, shard_setup, state_path, token_ranges, unit_key,
                                     with_done_ids)

    hash_ = config_hash(science_config(config))
    keys, pending = pending_models(store, kind, models, dataset, config)
    if not pending:
        return
    setup = shard_setup(config)
    executor, directory = setup
    streams: dict[str, ShardedStream] = {}  # per tokenizer hash: the token rows the workers read
    units: dict[int, list[NextTokenUnit]] = {}
    for m in pending:
        if m.tokenizer_hash not in streams:
            streams[m.tokenizer_hash] = prepare_stream(config, dataset, m, setup)
        tokens_dir, n_rows = streams[m.tokenizer_hash].tokens_dir, streams[m.tokenizer_hash].n_rows
        ranges = token_ranges(-(-n_rows // config.batch_size), config.token_shards)
        units[m.id] = [NextTokenUnit(
            label=f"{kind} {m.name} {shard_label(index, len(ranges))}",
            keys=(unit_key(keys[m.id], index, len(ranges)),), model=model_spec(m), measure=sharded.measure(m),
            attn_implementation=sharded.attn_implementation, tokens_dir=str(tokens_dir), n_rows=n_rows,
            batch_size=config.batch_size, batches=batches, exclude_special_tokens=config.exclude_special_tokens,
            dtype=config.dtype, device=config.device,
            state_path=str(state_path(directory, kind, {
                "config": hash_, "model": (m.id, m.source, m.revision, m.weights_hash),
                "dataset": (dataset.id, dataset.content_hash), "tokens": tokens_dir.name, "n_rows": n_rows,
                "batch_size": config.batch_size, "batches": (batches.start, batches.stop)})),
        ) for index, batches in enumerate(ranges)]
    run_pass_units(store, [unit for model_units in units.values() for unit in model_units], config, executor,
                   f"{kind} {dataset.name}", work=run_next_token_unit)
    for m in pending:
        def compute(m: Model = m) -> Any:
            return sharded.result(merge_states(with_done_ids(store, units[m.id], hash_)), m, dataset)

        status = run_unit(
            store, keys[m.id], config, compute=compute,
            write=lambda session, result, job_id, m=m: write(session, m.id, dataset.id, result, job_id),
            overwrite=config.overwrite, label=f"{kind} {m.name} on {dataset.name} ({len(units[m.id])} token shards)",
        )
        if status == "done":
            delete_states(units[m.id])
