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
import re
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from sqlalchemy.orm import Session

from atlas.devices import model_dtype, resolve_device
from atlas.errors import AtlasError
from atlas.metrics.correlation import PRECISIONS
from atlas.registry import require_shared_tokenizer, resolve_dataset, resolve_models, verified_weights_hash
from atlas.store import Store
from atlas.store.schema import Dataset, Model, NeuronCorrelation
from atlas.store.summaries import refresh_universality
from ingest.correlation_consumer import CorrelationConsumer
from ingest.correlation_plan import (KIND, Block, flush_every, forward_bytes, gram_bytes, model_pass_bytes, pack_passes,
                                     pair_blocks, pair_key, same_step_pairs)
from ingest.correlation_shards import SHARD_FORMAT, RunContext, combine_blocks, load_shard, save_shard, shard_path
from ingest.datasets import check_context, check_dataset, check_tokens, tokenize
from ingest.family_pass import Checkpoint, PassModel, run_family_pass
from ingest.options import (ADDED_OPTION, RUN_OPTION, TARGET, CpusPerTask, DatasetName, DeviceName, ExecutorName,
                            GpusPerTask, ModelDtype, Overwrite, RayAddress, ShardDir, TokenShards)
from ingest.progress import show_result
from ingest.runner import JobKey, config_hash, find_done, replace_rows, run_unit, run_units, science_config

# The plan, the consumer and the shards live in their own modules; their names stay importable from here.
__all__ = ["KIND", "Block", "CorrelationConsumer", "CorrelationsConfig", "forward_bytes", "gram_bytes", "model_pass_bytes",
           "pack_passes", "pair_blocks", "parse_bytes", "run", "same_step_pairs"]

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
    precision: Annotated[Literal["float64", "float32", "tf32", "bfloat16"], ADDED_OPTION] = "float32"
    """Precision of the per-batch product of shifted activations, accumulated in float64 whatever it is:
    float64, float32, tf32 (TensorFloat-32 on CUDA; float32 elsewhere) or bfloat16. The README's table
    gives what each costs in max_corr against float64."""
    memory_budget: Annotated[str, RUN_OPTION] = "4GiB"
    """Memory of one pass besides the models' weights (e.g. 512MiB, 4GiB, 80GB): the accumulators, the layer
    covariances, each model's statistics, a batch of its activations and the forward's temporaries. Pairs
    that do not fit are split into shards; the peak stays within about 5% of it."""
    batch_size: Annotated[int, RUN_OPTION] = 16
    """Rows (documents) per batch."""
    dtype: ModelDtype = "float32"
    device: DeviceName = "auto"
    checkpoint_every: Annotated[int, RUN_OPTION] = 50
    """Checkpoint the accumulators every this many batches (0: never by count)."""
    checkpoint_seconds: Annotated[float, RUN_OPTION] = 300.0
    """... and at least this often in seconds (0: never by time)."""
    token_shards: TokenShards = 1
    executor: ExecutorName = "local"
    ray_address: RayAddress = None
    gpus_per_task: GpusPerTask = None
    cpus_per_task: CpusPerTask = 1.0
    shard_dir: ShardDir = None
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
    if config.token_shards < 1:
        raise AtlasError(f"--token-shards must be at least 1, got {config.token_shards}")
    if config.precision not in PRECISIONS:
        raise AtlasError(f"--precision {config.precision!r} is not one of {', '.join(PRECISIONS)}")
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


# -- writing --------------------------------------------------------------------------------------

def write_pair(session: Session, a: Model, b: Model, result: dict[str, np.ndarray], job_id: int,
               context: RunContext, refresh: bool = True) -> int:
    """Replace the pair's rows, both directions (one per neuron of A against B, one per neuron of B against
    A); NaN maxima become NULL, partner -1 becomes NULL. With refresh, the two models' universality summary
    is rebuilt in the same transaction (a caller writing several pairs refreshes once, after them all)."""
    n_rows = sum(_write_direction(session, model, other, side, result, job_id, context)
                 for side, model, other in (("a", a, b), ("b", b, a)))
    if refresh:
        refresh_universality(session, (a.id, b.id), context.dataset.id)
    return n_rows


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
    n_rows, written = {}, set()
    for block in blocks:
        result, job_id = results[block.key], job_ids[block.key]
        if block.sharded:
            save_shard(block, result, job_id, context)
            n_rows[block.key] = (block.a_stop - block.a_start) * block.a_d_mlp + (block.b_stop - block.b_start) * block.b_d_mlp
        else:
            a, b = context.models[block.a_id], context.models[block.b_id]
            n_rows[block.key] = write_pair(session, a, b, result, job_id, context, refresh=False)
            written |= {a.id, b.id}
    refresh_universality(session, written, context.dataset.id)
    return n_rows


# -- computing ------------------------------------------------------------------------------------

def compute_pass(blocks: list[Block], context: RunContext) -> tuple[dict[JobKey, dict[str, np.ndarray]], Checkpoint]:
    """One family pass over the dataset feeding every block's accumulator; the pass's checkpoint is
    returned to be deleted once the results are committed."""
    from atlas.modeling import load_model

    config, dataset = context.config, context.dataset
    model_ids = sorted({block.a_id for block in blocks} | {block.b_id for block in blocks})
    loaded = [PassModel(i, load_model(context.models[i].source, context.models[i].revision,
                                        dtype=model_dtype(config.dtype))) for i in model_ids]
    weights = [(m.model_id, verified_weights_hash(context.store, context.models[m.model_id], m.loaded)) for m in loaded]
    device = resolve_device(config.device)
    for model in loaded:
        check_context(model.loaded, dataset)
        model.loaded.model.to(device)
    tokens = tokenize(dataset, loaded[0].loaded.tokenizer)
    n_rows = tokens.n_rows if config.tokens is None else tokens.rows_for_tokens(config.tokens)
    consumer = CorrelationConsumer(blocks, device, flush_every=flush_every(n_rows, config.batch_size, dataset.ctx_len))
    checkpoint = Checkpoint({
        "job": KIND, "format": SHARD_FORMAT, "config": context.config_hash,
        "units": [(b.a_id, b.b_id, b.a_start, b.a_stop, b.b_start, b.b_stop) for b in blocks],
        "models": weights,  # by content: changed files never resume stale sums
        "dataset": (dataset.id, dataset.content_hash), "tokens": tokens.key, "n_rows": n_rows,
        "batch_size": config.batch_size, "device": str(device),
    }, config.checkpoint_every, config.checkpoint_seconds)
    run_family_pass(loaded, tokens, {"correlations": consumer}, batch_size=config.batch_size, n_rows=n_rows,
                    stat_positions="non_special" if config.exclude_special_tokens else "all",
                    checkpoint=checkpoint, device=device, release_memory=True,
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
        batch_positions = config.batch_size * dataset.ctx_len  # the most a batch can hold
        blocks = {(a.id, b.id): pair_blocks(a, b, dataset.id, budget, config.precision, batch_positions)
                  for a, b in pending}
        to_compute = [block for pair_blocks_ in blocks.values() for block in _blocks_to_compute(session, pair_blocks_, context)]
    if len(pending) < len(pairs):
        log.info(f"skipped {len(pairs) - len(pending)} of {len(pairs)} seed pairs: already done "
                 "with this config (use --overwrite to recompute)")
    passes = pack_passes(to_compute, budget, batch_positions)
    if config.token_shards > 1 or config.executor != "local":
        run_token_shards(passes, context)
        passes = []
    for units in passes:
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


# -- token shards on an executor ---------------------------------------------------------------------

def run_token_shards(passes: list[list[Block]], context: RunContext) -> None:
    """Every pass cut into --token-shards units run on the executor (all passes' units at once, so a
    cluster runs them side by side); each pass's units are merged into its blocks' rows (one transaction per
    pass) as soon as they are all done, so that their states leave the shard directory early."""
    from ingest.correlation_units import FinishPass, finish_pass, pass_units
    from ingest.token_shards import delete_states, prepare_stream, run_pass_units, token_ranges, with_done_ids

    config, dataset, store = context.config, context.dataset, context.store
    if not passes:
        return
    stream = prepare_stream(config, dataset, context.models[passes[0][0].a_id])
    executor, n_rows = stream.executor, stream.n_rows
    flush = flush_every(n_rows, config.batch_size, dataset.ctx_len)
    ranges = token_ranges(-(-n_rows // config.batch_size), config.token_shards, flush)
    if len(ranges) < config.token_shards:
        log.warning(f"--token-shards {config.token_shards}: the dataset has {len(ranges)} flush groups of "
                    f"{flush} batch(es), so it runs as {len(ranges)} shards")
    units = [pass_units(blocks, context, ranges, stream.tokens_dir, stream.directory, n_rows, flush)
             for blocks in passes]
    pass_of = {unit.state_path: index for index, pass_ in enumerate(units) for unit in pass_}
    finished: set[int] = set()

    def finish(index: int) -> None:
        """Merge the pass's units (on the executor) and write its blocks' rows."""
        finished.add(index)
        blocks = passes[index]

        def compute(claimed: list[JobKey]) -> dict[JobKey, dict[str, np.ndarray]]:
            # On Ray the merge takes a CPU slot: on a GPU it would queue behind every unit still waiting.
            on_ray = executor.name == "ray"
            task = FinishPass(tuple(with_done_ids(store, units[index], context.config_hash)), config.baseline_seed,
                              "cpu" if on_ray else config.device)
            results = executor.call(finish_pass, task, gpus=0 if on_ray else None)
            return {key: result for key, result in results.items() if key in claimed}

        def write(session: Session, results, job_ids: dict[JobKey, int]):
            return write_pass(session, [block for block in blocks if block.key in job_ids], results, job_ids, context)

        ran = run_units(store, [block.key for block in blocks], config, compute, write, overwrite=True,
                        label=f"correlations {dataset.name} ({len(blocks)} units, {len(ranges)} token shards)")
        if ran:
            delete_states(units[index])

    arrived: set[str] = set()

    def after_unit(unit) -> None:
        """A pass whose units all ran in this run is merged at once (one with units done by an earlier run, or
        done before --overwrite replaced them, waits for the end: their ledger rows may be stale)."""
        arrived.add(unit.state_path)
        index = pass_of[unit.state_path]
        if index not in finished and all(other.state_path in arrived for other in units[index]):
            finish(index)

    run_pass_units(store, [unit for pass_ in units for unit in pass_], config, executor,
                   f"correlations {dataset.name}", after_unit=after_unit)
    for index in range(len(passes)):  # passes whose units were done before this run
        if index not in finished:
            finish(index)
