"""Job `correlations`: cross-seed max correlations, partners and the rotation baseline (universal neurons).

For every unordered pair {A, B} of a family's seeds (at the same step) without results for this config,
one accumulator of X_A^T X_B gives both directions: every neuron of A gets max_j rho(A_i, B_j) and its
partner (layer, neuron), every neuron of B gets max_i rho(B_j, A_i) and its partner, and each gets the
same max against the other model rotated per layer by a seeded random orthogonal matrix (B's layers for
A's baseline, A's for B's). The baselines come from the pair's sums and cross-products and from each
layer's covariance on the same positions: no second pass over the data. k seeds cost k(k-1)/2 pairs.

Units and memory. A pair whose accumulator fits --memory-budget is one unit (ledger key: the pair, the
lower model id first). A larger pair is cut by layer_grid into blocks of whole layers on both sides
(group of A's layers x group of B's layers); each block is a unit of its own (ledger key: the pair +
shard "a0:4/b4:8") whose maxima go to a file in the cache, and the pair's rows are written from the
combined blocks once all of them are done. Units are packed into passes whose accumulators fit the
budget together: within a pass every model runs once per batch, whatever the number of pairs
(ingest/family_pass.py), and the covariance of each layer group is accumulated once per pass.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Mapping

import numpy as np
import torch
from sqlalchemy.orm import Session

from atlas.devices import resolve_device
from atlas.data.cache import cache_dir, stable_hash
from atlas.errors import AtlasError
from atlas.metrics.correlation import (
    CorrelationAccumulator,
    TransposedView,
    combine_maxima,
    layer_grid,
    max_correlations,
    rotated_baseline_max,
)
from atlas.registry import require_shared_tokenizer, resolve_dataset, resolve_models, verified_weights_hash
from atlas.store import Store
from atlas.store.schema import Dataset, Model, NeuronCorrelation
from ingest.datasets import check_context, check_dataset, check_tokens, tokenize
from ingest.family_pass import Checkpoint, PassBatch, PassModel, run_family_pass
from ingest.options import RUN_OPTION, TARGET, DatasetName, Overwrite
from ingest.progress import show_result
from ingest.runner import JobKey, config_hash, find_done, replace_rows, run_unit, run_units, science_config

KIND = "correlations"
SHARD_FORMAT = 2  # 2: blocks of whole layers on both sides, both directions
log = logging.getLogger(__name__)


@dataclass
class CorrelationsConfig:
    """Cross-seed max correlations, partners and rotated baselines of every neuron (universal neurons)."""

    family: Annotated[str | None, TARGET] = None
    """Run on every pair of seeds of this family (at the same training step)."""
    dataset: DatasetName = None
    tokens: int | None = None
    """Use only the first rows of the dataset holding this many tokens (default: all)."""
    baseline_seed: int = 0
    """Seed of the random orthogonal rotation of each layer (the baseline)."""
    universal_threshold: float = 0.5
    """A neuron is universal when its excess correlation exceeds this."""
    exclude_special_tokens: bool = True
    """Leave special tokens (BOS/EOS/pad) out of the statistics."""
    memory_budget: Annotated[str, RUN_OPTION] = "4GiB"
    """Memory for the accumulators of one pass (e.g. 512MiB, 4GiB, 80GB); pairs that do not fit are split into
    shards."""
    batch_size: Annotated[int, RUN_OPTION] = 16
    """Rows (documents) per batch."""
    device: Annotated[str, RUN_OPTION] = "auto"
    """Torch device of the models and the accumulators: auto (cuda if available, else mps, else cpu),
    cpu, cuda, cuda:N or mps."""
    checkpoint_every: Annotated[int, RUN_OPTION] = 50
    """Checkpoint the accumulators every this many batches (0: never by count)."""
    checkpoint_seconds: Annotated[float, RUN_OPTION] = 300.0
    """... and at least this often in seconds (0: never by time)."""
    overwrite: Overwrite = False


# -- options ------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str) -> int:
    """'4GiB' -> 4294967296, '500MB' -> 500000000, '1024' -> 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise AtlasError(f"--memory-budget {value!r} is not a size: write e.g. 512MiB, 4GiB or 80GB")
    return int(float(match.group(1)) * _UNITS[unit])


def _check_options(config: CorrelationsConfig) -> int:
    """Validates the options; returns the memory budget in bytes."""
    if not config.family:
        raise AtlasError("this job needs --family F: it correlates the seeds of one family")
    if config.batch_size < 1:
        raise AtlasError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.tokens is not None and config.tokens < 1:
        raise AtlasError(f"--tokens must be at least 1, got {config.tokens}")
    budget = parse_bytes(config.memory_budget)
    if budget < 1:
        raise AtlasError(f"--memory-budget must be positive, got {config.memory_budget!r}")
    return budget


def _check_family(models: list[Model], family: str) -> None:
    if len(models) < 2:
        raise AtlasError(f"family {family!r} has one model ({models[0].name}): correlations need two seeds or more; "
                         f"register another with `atlas model add SOURCE --family {family} --seed S`")
    if not same_step_pairs(models):
        raise AtlasError(f"family {family!r} has no two seeds at the same step ({', '.join(m.name for m in models)}): "
                         f"register the other seeds at the same --step")
    require_shared_tokenizer(models)


def same_step_pairs(models: list[Model]) -> list[tuple[Model, Model]]:
    """Unordered pairs {A, B} (A the lower id) of different seeds at the same training step: checkpoints
    are compared step by step; a model without a step pairs with the others without one. One
    accumulator per pair gives both directions, so k seeds need k(k-1)/2 of them."""
    return [(a, b) for a in models for b in models if a.id < b.id and a.step == b.step]


# -- planning -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One unit of work: A's whole layers [a_start, a_stop) against B's whole layers [b_start, b_stop).

    Its accumulator gives both directions: A's neurons against these B layers (rows) and B's against
    these A layers (columns)."""

    key: JobKey
    a_id: int
    b_id: int
    a_start: int
    a_stop: int
    a_d_mlp: int
    b_start: int
    b_stop: int
    b_d_mlp: int
    sharded: bool  # False: the block is the whole pair and writes its rows directly

    @property
    def a_columns(self) -> slice:
        return slice(self.a_start * self.a_d_mlp, self.a_stop * self.a_d_mlp)

    @property
    def b_columns(self) -> slice:
        return slice(self.b_start * self.b_d_mlp, self.b_stop * self.b_d_mlp)

    @property
    def a_layer_sizes(self) -> list[int]:
        return [self.a_d_mlp] * (self.a_stop - self.a_start)

    @property
    def b_layer_sizes(self) -> list[int]:
        return [self.b_d_mlp] * (self.b_stop - self.b_start)

    @property
    def a_gram_key(self) -> tuple[int, int, int]:
        return self.a_id, self.a_start, self.a_stop

    @property
    def b_gram_key(self) -> tuple[int, int, int]:
        return self.b_id, self.b_start, self.b_stop

    def gram_sizes(self) -> dict[tuple[int, int, int], list[int]]:
        return {self.a_gram_key: self.a_layer_sizes, self.b_gram_key: self.b_layer_sizes}

    def accumulator_bytes(self) -> int:
        return CorrelationAccumulator.estimate_bytes(self.a_stop * self.a_d_mlp - self.a_start * self.a_d_mlp,
                                                     self.b_layer_sizes, track_gram=False)


def gram_bytes(layer_sizes: list[int]) -> int:
    return CorrelationAccumulator.estimate_bytes(0, layer_sizes, track_gram=True)


def pair_key(a: Model, b: Model, dataset_id: int) -> JobKey:
    return JobKey(KIND, model_id=a.id, dataset_id=dataset_id, other_model_id=b.id)


def pair_blocks(a: Model, b: Model, dataset_id: int, budget: int) -> list[Block]:
    """The pair as one block when it fits the budget (with both sides' layer covariances), else its shards."""
    grid = layer_grid(a.n_layers, a.d_mlp, b.n_layers, b.d_mlp, budget)
    sharded = len(grid) > 1
    blocks = []
    for a_layers, b_layers in grid:
        shard = f"a{a_layers.start}:{a_layers.stop}/b{b_layers.start}:{b_layers.stop}" if sharded else None
        key = JobKey(KIND, model_id=a.id, dataset_id=dataset_id, other_model_id=b.id, shard=shard)
        blocks.append(Block(key, a.id, b.id, a_layers.start, a_layers.stop, a.d_mlp,
                            b_layers.start, b_layers.stop, b.d_mlp, sharded))
    return blocks


def pack_passes(blocks: list[Block], budget: int) -> list[list[Block]]:
    """Greedy packing of blocks into passes whose accumulators and layer covariances fit the budget together
    (a covariance shared by several blocks of a pass counts once).

    Each block fits alone (layer_grid counted both sides' covariances), so every pass gets one."""
    passes: list[list[Block]] = []
    current: list[Block] = []
    used, grams = 0, set()

    def extra_bytes(block: Block, held: set) -> int:
        new = {key: sizes for key, sizes in block.gram_sizes().items() if key not in held}
        return block.accumulator_bytes() + sum(gram_bytes(sizes) for sizes in new.values())

    for block in blocks:
        extra = extra_bytes(block, grams)
        if current and used + extra > budget:
            passes.append(current)
            current, used, grams = [], 0, set()
            extra = extra_bytes(block, grams)
        current.append(block)
        used += extra
        grams.update(block.gram_sizes())
    if current:
        passes.append(current)
    return passes


# -- accumulating -------------------------------------------------------------------------------

class CorrelationConsumer:
    """A family-pass consumer: one accumulator per block (no Gram matrices) and one covariance accumulator
    per layer group of a model (a CorrelationAccumulator with no A neurons), shared by the blocks."""

    def __init__(self, blocks: list[Block], device: str | torch.device = "cpu") -> None:
        self.blocks = blocks
        self.device = torch.device(device)  # every accumulator lives beside the activations
        self.pairs = [self._pair_accumulator(block) for block in blocks]
        self._gram_columns: dict[tuple[int, int, int], slice] = {}
        self.grams: dict[tuple[int, int, int], CorrelationAccumulator] = {}
        for block in blocks:
            for key, columns, sizes in ((block.a_gram_key, block.a_columns, block.a_layer_sizes),
                                        (block.b_gram_key, block.b_columns, block.b_layer_sizes)):
                if key not in self.grams:
                    self._gram_columns[key] = columns
                    self.grams[key] = CorrelationAccumulator(0, sizes, b_layers=range(key[1], key[2]),
                                                             track_gram=True, device=self.device)

    def _pair_accumulator(self, block: Block) -> CorrelationAccumulator:
        return CorrelationAccumulator(block.a_columns.stop - block.a_columns.start, block.b_layer_sizes,
                                      b_layers=range(block.b_start, block.b_stop), track_gram=False, device=self.device)

    def consume(self, step: PassBatch) -> None:
        for block, accumulator in zip(self.blocks, self.pairs):
            accumulator.update(step.activations[block.a_id][:, block.a_columns],
                               step.activations[block.b_id][:, block.b_columns])
        for gram_key, accumulator in self.grams.items():
            x = step.activations[gram_key[0]][:, self._gram_columns[gram_key]]
            accumulator.update(x[:, :0], x)

    def state_dict(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for index, accumulator in enumerate(self.pairs):
            state.update({f"pair{index}/{k}": v for k, v in accumulator.state_dict().items()})
        for index, accumulator in enumerate(self.grams.values()):
            state.update({f"gram{index}/{k}": v for k, v in accumulator.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        self.pairs = [CorrelationAccumulator.from_state_dict(part(f"pair{i}/"), self.device)
                      for i in range(len(self.pairs))]
        self.grams = {key: CorrelationAccumulator.from_state_dict(part(f"gram{i}/"), self.device)
                      for i, key in enumerate(self.grams)}

    def results(self, baseline_seed: int) -> dict[JobKey, dict[str, np.ndarray]]:
        """Per block, both directions: a_* for A's neurons against B's layers, b_* for B's against A's
        (max_corr, partner_layer / partner_neuron (-1: none), baseline_max_corr per neuron)."""
        results = {}
        for block, accumulator in zip(self.blocks, self.pairs):
            if accumulator.n == 0:
                raise AtlasError("the dataset holds no token positions for statistics (only special tokens?): "
                                 "register a dataset with more text")
            transposed = TransposedView(accumulator, block.a_layer_sizes, range(block.a_start, block.a_stop))
            results[block.key] = {
                **self._direction("a", accumulator, self.grams[block.b_gram_key], baseline_seed),
                **self._direction("b", transposed, self.grams[block.a_gram_key], baseline_seed),
            }
        return results

    @staticmethod
    def _direction(side: str, rows_against_columns, other_gram: CorrelationAccumulator,
                   baseline_seed: int) -> dict[str, np.ndarray]:
        """The rows' maxima over the columns' neurons, their partners, and the baseline with the columns'
        layers rotated (their covariances measured once per layer group)."""
        covariances = [other_gram.layer_covariance(i) for i in range(len(other_gram.layer_sizes_b))]
        best, column = max_correlations(rows_against_columns)
        partner_layer, partner_neuron = rows_against_columns.locate(column)
        baseline, _ = rotated_baseline_max(rows_against_columns, baseline_seed, layer_covariances=covariances)
        return {f"{side}_max_corr": best, f"{side}_partner_layer": partner_layer,
                f"{side}_partner_neuron": partner_neuron, f"{side}_baseline_max_corr": baseline}


# -- shards: per-block maxima kept in the cache until their pair is complete --------------------------

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


# -- writing --------------------------------------------------------------------------------------

def write_pair(session: Session, a: Model, b: Model, result: dict[str, np.ndarray], job_id: int,
               context: RunContext) -> int:
    """Replace the pair's rows, both directions (one per neuron of A against B, one per neuron of B against
    A); NaN maxima become NULL, partner -1 becomes NULL."""
    return sum(_write_direction(session, model, other, side, result, job_id, context)
               for side, model, other in (("a", a, b), ("b", b, a)))


def _write_direction(session: Session, model: Model, other: Model, side: str, result: dict[str, np.ndarray],
                     job_id: int, context: RunContext) -> int:
    features = np.arange(model.n_layers * model.d_mlp)

    def nullable(partner: np.ndarray) -> list[int | None]:
        return [int(value) if value >= 0 else None for value in partner]

    where = {"model_id": model.id, "other_model_id": other.id, "dataset_id": context.dataset.id}
    return replace_rows(session, NeuronCorrelation, where, {
        "layer": features // model.d_mlp, "neuron": features % model.d_mlp,
        "max_corr": result[f"{side}_max_corr"], "partner_layer": nullable(result[f"{side}_partner_layer"]),
        "partner_neuron": nullable(result[f"{side}_partner_neuron"]),
        "baseline_max_corr": result[f"{side}_baseline_max_corr"],
        "universal_threshold": context.config.universal_threshold, "job_id": job_id,
    })


def write_pass(session: Session, blocks: list[Block], results: dict[JobKey, dict[str, np.ndarray]],
               job_ids: dict[JobKey, int], context: RunContext) -> dict[JobKey, int]:
    n_rows = {}
    for block in blocks:
        result, job_id = results[block.key], job_ids[block.key]
        if block.sharded:
            save_shard(block, result, job_id, context)
            n_rows[block.key] = (block.a_stop - block.a_start) * block.a_d_mlp + (block.b_stop - block.b_start) * block.b_d_mlp
        else:
            a, b = context.models[block.a_id], context.models[block.b_id]
            n_rows[block.key] = write_pair(session, a, b, result, job_id, context)
    return n_rows


# -- computing ------------------------------------------------------------------------------------

def compute_pass(blocks: list[Block], context: RunContext) -> tuple[dict[JobKey, dict[str, np.ndarray]], Checkpoint]:
    """One family pass over the dataset feeding every block's accumulator; the pass's checkpoint is
    returned to be deleted once the results are committed."""
    from atlas.modeling import load_model

    config, dataset = context.config, context.dataset
    model_ids = sorted({block.a_id for block in blocks} | {block.b_id for block in blocks})
    loaded = [PassModel(i, load_model(context.models[i].source, context.models[i].revision)) for i in model_ids]
    weights = [(m.model_id, verified_weights_hash(context.store, context.models[m.model_id], m.loaded)) for m in loaded]
    device = resolve_device(config.device)
    for model in loaded:
        check_context(model.loaded, dataset)
        model.loaded.model.to(device)
    tokens = tokenize(dataset, loaded[0].loaded.tokenizer)
    n_rows = tokens.n_rows if config.tokens is None else tokens.rows_for_tokens(config.tokens)
    consumer = CorrelationConsumer(blocks, device)
    checkpoint = Checkpoint({
        "job": KIND, "format": SHARD_FORMAT, "config": context.config_hash,
        "units": [(b.a_id, b.b_id, b.a_start, b.a_stop, b.b_start, b.b_stop) for b in blocks],
        "models": weights,  # by content: changed files never resume stale sums
        "dataset": (dataset.id, dataset.content_hash), "tokens": tokens.key, "n_rows": n_rows,
        "batch_size": config.batch_size, "device": str(device),
    }, config.checkpoint_every, config.checkpoint_seconds)
    run_family_pass(loaded, tokens, {"correlations": consumer}, batch_size=config.batch_size, n_rows=n_rows,
                    stat_positions="non_special" if config.exclude_special_tokens else "all",
                    checkpoint=checkpoint, device=device,
                    label=f"correlations {dataset.name}: {len(blocks)} unit(s), {len(model_ids)} model(s)")
    return consumer.results(config.baseline_seed), checkpoint


def _blocks_to_compute(session: Session, blocks: list[Block], context: RunContext) -> list[Block]:
    """A shard done in the ledger whose file is intact is not computed again (unless --overwrite)."""
    def ready(block: Block) -> bool:
        if not block.sharded or context.config.overwrite:
            return False
        job = find_done(session, block.key, context.config_hash)
        return job is not None and load_shard(block, job.id, context) is not None

    return [block for block in blocks if not ready(block)]


def _finish_sharded_pair(store: Store, a: Model, b: Model, blocks: list[Block], context: RunContext) -> None:
    """Combine the pair's shards into its rows (a ledger unit of its own), then drop the shard files."""
    def compute() -> dict[str, np.ndarray]:
        parts = []
        with store.session() as session:
            for block in blocks:
                job = find_done(session, block.key, context.config_hash)
                result = None if job is None else load_shard(block, job.id, context)
                if result is None:
                    raise AtlasError(f"shard {block.key.shard} of {a.name} x {b.name} is missing: rerun the job")
                parts.append((block, result))
        return combine_blocks(parts, a, b)

    outcome = run_unit(store, pair_key(a, b, context.dataset.id), context.config, compute,
                       lambda session, result, job_id: write_pair(session, a, b, result, job_id, context),
                       overwrite=True, label=f"correlations {a.name} x {b.name} ({len(blocks)} shards)")
    if outcome == "done":  # skipped: another process is combining these shards, leave them to it
        for block in blocks:
            shard_path(block, context).unlink(missing_ok=True)


def run(config: CorrelationsConfig, store: Store) -> None:
    budget = _check_options(config)
    with store.session() as session:
        models = resolve_models(session, None, config.family)
        dataset = resolve_dataset(session, config.dataset)
    _check_family(models, config.family)
    check_dataset(dataset, config.tokens)
    check_tokens(store, dataset, models)
    context = RunContext(config, dataset, {m.id: m for m in models}, config_hash(science_config(config)), store)
    pairs = same_step_pairs(models)
    with store.session() as session:
        pending = [(a, b) for a, b in pairs
                   if config.overwrite or find_done(session, pair_key(a, b, dataset.id), context.config_hash) is None]
        blocks = {(a.id, b.id): pair_blocks(a, b, dataset.id, budget) for a, b in pending}
        to_compute = [block for pair_blocks_ in blocks.values() for block in _blocks_to_compute(session, pair_blocks_, context)]
    if len(pending) < len(pairs):
        log.info(f"skipped {len(pairs) - len(pending)} of {len(pairs)} seed pairs: already done "
                 "with this config (use --overwrite to recompute)")
    for units in pack_passes(to_compute, budget):
        checkpoints: list[Checkpoint] = []

        # Only the units this process claimed: another process may be computing the others.
        def compute(claimed: list[JobKey], units: list[Block] = units) -> dict[JobKey, dict[str, np.ndarray]]:
            results, checkpoint = compute_pass([block for block in units if block.key in claimed], context)
            checkpoints.append(checkpoint)
            return results

        def write(session: Session, results, job_ids: dict[JobKey, int], units: list[Block] = units):
            return write_pass(session, [block for block in units if block.key in job_ids], results, job_ids, context)

        run_units(store, [block.key for block in units], config, compute, write,
                  overwrite=True, label=f"correlations {dataset.name} ({len(units)} units)")
        for checkpoint in checkpoints:
            checkpoint.delete()
    for a, b in pending:
        if len(blocks[a.id, b.id]) > 1:
            _finish_sharded_pair(store, a, b, blocks[a.id, b.id], context)
    print_universal_fractions(store, config.family, dataset)


# -- the universal fraction of each model ---------------------------------------------------------

def print_universal_fractions(store: Store, family: str, dataset: Dataset) -> None:
    from atlas.read.queries import universal_fractions

    fractions = universal_fractions(store.engine, family, dataset.name)
    for row in fractions:
        share = row["n_universal"] / row["n_neurons"] if row["n_neurons"] else 0.0
        seeds = row["max_other_seeds"]
        show_result(f"universal {row['model']}: {row['n_universal']}/{row['n_neurons']} neurons ({100 * share:.2f}%) "
                    f"with excess_corr > {row['threshold']:g} against {seeds} other seed(s) on {dataset.name}")
