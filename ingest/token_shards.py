"""Token shards: a job's stream cut into ranges of batches whose consumer states merge exactly.

With `--token-shards K` a pass over the dataset becomes K units of (models, range of batches). Each
unit is a ledger row (its key's shard ends in "t<i>/<K>") and a task any worker can run with nothing
but the unit (`run_pass_unit`: no database): it loads its models, checks their weights against the
registered hash, feeds its batches to a fresh consumer and saves the consumer's state in the shard
directory, stamped with the unit's job ids. The driver marks each unit done as it arrives, and once
all the units of a pass are done it merges their states in stream order (moments by Chan/Pebay,
top-k by merge, sums and products by addition with the shift of the stream's first batch) and writes
the rows once, in one transaction.

Why the merged state equals the unsharded one: ranges start at multiples of the consumer's flush group
(the correlation products are summed in float32 within a group and in float64 across groups, so a
shard boundary never splits a group); every shard shifts by the stream's first batch; top-k ties go
to the earlier key and shards merge in stream order. What differs is only the order of float64
additions (about 1e-16 relative).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from atlas.data.cache import cache_dir, stable_hash
from atlas.errors import AtlasError, first_line
from atlas.store import Store
from ingest.executors import Executor
from ingest.family_pass import Checkpoint, Consumer, PassModel, run_family_pass
from ingest.progress import progress_bar
from ingest.runner import Heartbeat, JobKey, _claim_all, _fail, _now, config_hash, find_done, science_config

log = logging.getLogger(__name__)

STATE_FORMAT = 1
MIN_FLUSH_GROUPS = 64  # flush groups a pass has at least (if it has that many batches): where shards may start
KILL_ONCE_ENV = "ATLAS_TEST_KILL_UNIT_ONCE"  # test hook: a marker file path; see _KillOnce


# -- planning ---------------------------------------------------------------------------------------

def flush_batches(n_batches: int, batch_positions: int, flush_tokens: int) -> int:
    """Batches per float32 flush group: about flush_tokens positions, but small enough that a pass has
    MIN_FLUSH_GROUPS groups to cut token shards at (on a small dataset the groups are short)."""
    return max(1, min(flush_tokens // max(batch_positions, 1), n_batches // MIN_FLUSH_GROUPS))


def token_ranges(n_batches: int, shards: int, align: int = 1) -> list[range]:
    """Batches [0, n_batches) in `shards` consecutive ranges of near-equal length, each starting at a
    multiple of align (fewer ranges when there are fewer aligned groups than shards)."""
    if shards < 1:
        raise AtlasError(f"--token-shards must be at least 1, got {shards}")
    groups = max(1, -(-n_batches // align))
    count = min(shards, groups)
    bounds = [min(n_batches, round(i * groups / count) * align) for i in range(count + 1)]
    bounds[-1] = n_batches
    return [range(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def shard_label(index: int, count: int) -> str:
    return f"t{index}/{count}"


def unit_key(key: JobKey, index: int, count: int) -> JobKey:
    """The ledger key of token shard `index` of `count` of a target (after its own shard, if any)."""
    suffix = shard_label(index, count)
    return dataclasses.replace(key, shard=f"{key.shard}|{suffix}" if key.shard else suffix)


def shard_directory(shard_dir: str | None) -> Path:
    """--shard-dir (a directory every worker and the driver can read), default the cache's shards/."""
    path = Path(shard_dir).expanduser() if shard_dir else cache_dir("shards")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AtlasError(f"--shard-dir {str(path)!r} cannot be created ({first_line(error)}): "
                         "give a writable directory that every worker can read") from None
    return path


def shared_tokens(tokens_dir: Path, directory: Path) -> Path:
    """The token rows in the shard directory (copied once, atomically), so that workers on other machines
    read the very rows the driver tokenized."""
    target = directory / "tokens" / tokens_dir.name
    if (target / "meta.json").exists() or tokens_dir.resolve() == target.resolve():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{tokens_dir.name}-"))
    try:
        shutil.copytree(tokens_dir, staging, dirs_exist_ok=True)
        try:
            os.rename(staging, target)
        except OSError:  # another driver published it first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class ShardedStream:
    """What the driver of a sharded job prepares once: the executor, the shard directory, the token rows
    (copied there for remote workers) and the rows the pass reads."""

    executor: Executor
    directory: Path
    tokens: Any  # TokenizedDataset (the driver's copy)
    tokens_dir: Path  # where workers read it
    n_rows: int


def shard_setup(config: Any) -> tuple[Executor, Path]:
    """The executor and the shard directory a sharded job's options name (once per run)."""
    from ingest.executors import make_executor

    return (make_executor(config.executor, config.ray_address, config.gpus_per_task, config.cpus_per_task),
            shard_directory(config.shard_dir))


def prepare_stream(config: Any, dataset: Any, model: Any,
                   setup: tuple[Executor, Path] | None = None) -> ShardedStream:
    """From a job's config (executor, Ray and shard options, --tokens), its dataset and one of its models
    (the tokenizer; a job whose models differ in tokenizer prepares one stream per tokenizer, sharing `setup`)."""
    from atlas.modeling import load_tokenizer
    from ingest.datasets import tokenize

    executor, directory = setup or shard_setup(config)
    tokens = tokenize(dataset, load_tokenizer(model.source, model.revision))
    tokens_dir = tokens.directory if executor.name == "local" else shared_tokens(tokens.directory, directory)
    n_rows = tokens.n_rows if config.tokens is None else tokens.rows_for_tokens(config.tokens)
    return ShardedStream(executor, directory, tokens, tokens_dir, n_rows)


def model_spec(model: Any) -> ModelSpec:
    return ModelSpec(model.id, model.name, model.source, model.revision, model.weights_hash)


# -- the unit a worker runs --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load a model and check that it is the registered one."""

    model_id: int
    name: str
    source: str
    revision: str | None
    weights_hash: str | None


@dataclass(frozen=True)
class PassUnit:
    """One task: a consumer fed a range of the pass's batches by a set of models. Picklable, and all a
    worker needs (no database)."""

    label: str
    keys: tuple[JobKey, ...]                  # its ledger rows (one per target the pass serves)
    models: tuple[ModelSpec, ...]
    make_consumer: Callable[[torch.device], Any]  # a picklable factory (functools.partial of a consumer class)
    tokens_dir: str
    n_rows: int
    batch_size: int
    batches: range
    stat_positions: str
    dtype: str
    device: str
    state_path: str
    checkpoint_every: int
    checkpoint_seconds: float
    job_ids: tuple[int, ...] = ()             # set by the driver once the keys are claimed
    release_memory: bool = False              # a budgeted pass: free host pages go back after each batch

    @property
    def n_tokens(self) -> int:
        from atlas.data import TokenizedDataset

        lengths = TokenizedDataset(Path(self.tokens_dir)).lengths
        rows = slice(self.batches.start * self.batch_size, min(self.batches.stop * self.batch_size, self.n_rows))
        return int(lengths[rows].sum())


def state_path(directory: Path, kind: str, identity: dict[str, Any]) -> Path:
    """Where a unit's state lives: named by everything it depends on (config, models, tokens, range)."""
    folder = directory / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stable_hash({'format': STATE_FORMAT, **identity}, length=32)}.npz"


def load_checked(spec: ModelSpec, dtype: str, device: torch.device, attn_implementation: str | None = None) -> Any:
    """Load a unit's model on a worker, on its device, refusing weights other than the registered ones (a
    worker on another machine may hold other files at the same path)."""
    from atlas.devices import model_dtype
    from atlas.modeling import load_model, loaded_weight_files
    from atlas.provenance import scan_weights

    loaded = load_model(spec.source, spec.revision, dtype=model_dtype(dtype), attn_implementation=attn_implementation)
    actual = scan_weights(loaded_weight_files(loaded)).weights_hash
    if spec.weights_hash and actual != spec.weights_hash:
        raise AtlasError(f"the weights of model {spec.name!r} at {spec.source} on this worker differ from the "
                         f"registered ones (sha256 {spec.weights_hash[:12]}, here {actual[:12]}): give every "
                         "worker the same files")
    loaded.model.to(device)
    return loaded


def run_pass_unit(unit: PassUnit) -> int:
    """Run one unit (on a worker, or in the driver's process): returns the tokens it fed. The state file is
    replaced atomically at the end; a killed run resumes from its checkpoint in the shard directory."""
    from atlas.data import TokenizedDataset
    from atlas.devices import resolve_device

    device = resolve_device(unit.device)
    models = [PassModel(spec.model_id, load_checked(spec, unit.dtype, device)) for spec in unit.models]
    tokens = TokenizedDataset(Path(unit.tokens_dir), from_cache=True)
    consumer = unit.make_consumer(device)
    path = Path(unit.state_path)
    checkpoint = Checkpoint({"unit": path.name, "device": str(device)}, unit.checkpoint_every,
                            unit.checkpoint_seconds, directory=path.parent)
    consumers: dict[str, Consumer] = {"state": consumer}
    if os.environ.get(KILL_ONCE_ENV):
        consumers["kill"] = _KillOnce(Path(os.environ[KILL_ONCE_ENV]))
    run_family_pass(models, tokens, consumers, batch_size=unit.batch_size, n_rows=unit.n_rows,
                    stat_positions=unit.stat_positions, checkpoint=checkpoint, device=str(device),
                    label=unit.label, batches=unit.batches, show_progress=False, release_memory=unit.release_memory)
    save_state(path, consumer.state_dict(), unit.job_ids)
    checkpoint.delete()
    return unit.n_tokens


class _KillOnce:
    """Test hook (ATLAS_TEST_KILL_UNIT_ONCE=marker): the first unit to feed its third batch anywhere creates
    the marker and SIGKILLs its own process, as a lost worker would die; retries find the marker and
    run on. Costs nothing when the variable is unset (this consumer is not created)."""

    def __init__(self, marker: Path) -> None:
        self.marker, self.seen = marker, 0

    def consume(self, step: Any) -> None:
        self.seen += 1
        if self.seen == 3:
            try:
                descriptor = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(descriptor)
            os.kill(os.getpid(), signal.SIGKILL)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        return None


def save_state(path: Path, state: dict[str, np.ndarray], job_ids: Sequence[int]) -> None:
    staging = path.with_suffix(f".{os.getpid()}.tmp.npz")
    with open(staging, "wb") as handle:
        np.savez(handle, __job_ids__=np.array(sorted(job_ids), dtype=np.int64), **state)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def has_state(path: Path, job_ids: Sequence[int]) -> bool:
    """Whether the unit's state file is there and was written for these jobs (reads only the stamp: a state
    can be many GB)."""
    if not path.exists():
        return False
    try:
        with np.load(path) as saved:
            return saved["__job_ids__"].tolist() == sorted(job_ids)
    except (OSError, ValueError, KeyError):  # a truncated or foreign file: compute the unit again
        return False


def load_state(path: Path, job_ids: Sequence[int]) -> dict[str, np.ndarray] | None:
    """A unit's saved state, or None when it is missing or was written for other jobs."""
    if not path.exists():
        return None
    with np.load(path) as saved:
        if saved["__job_ids__"].tolist() != sorted(job_ids):
            return None
        return {name: saved[name] for name in saved.files if name != "__job_ids__"}


# -- the driver ------------------------------------------------------------------------------------

def pending_models(store: Store, kind: str, models: list[Any], dataset: Any, config: Any
                   ) -> tuple[dict[int, JobKey], list[Any]]:
    """Each model's ledger key for a per-model job on the dataset, and the models without results for this
    config (all of them with --overwrite); says how many are skipped."""
    hash_ = config_hash(science_config(config))
    keys = {m.id: JobKey(kind, model_id=m.id, dataset_id=dataset.id) for m in models}
    with store.session() as session:
        pending = [m for m in models if config.overwrite or find_done(session, keys[m.id], hash_) is None]
    if len(pending) < len(models):
        log.info(f"skipped {kind} of {len(models) - len(pending)} of {len(models)} models: already done with this "
                 "config (use --overwrite to recompute)")
    return keys, pending


def done_job_ids(store: Store, unit: PassUnit, hash_: str) -> list[int] | None:
    """The done jobs of all the unit's keys, or None while one of them is not done."""
    with store.session() as session:
        jobs = [find_done(session, key, hash_) for key in unit.keys]
    return None if any(job is None for job in jobs) else [job.id for job in jobs]


def unit_ready(store: Store, unit: PassUnit, hash_: str) -> bool:
    ids = done_job_ids(store, unit, hash_)
    return ids is not None and has_state(Path(unit.state_path), ids)


def run_pass_units(store: Store, units: list[PassUnit], config: Any, executor: Executor, label: str,
                   work: Callable[[Any], int] = run_pass_unit,
                   after_unit: Callable[[Any], None] | None = None) -> None:
    """Run the units that are not done (in the ledger, with their state file intact) on the executor.

    work: what a worker does with a unit (default: a family pass over its batches); any frozen dataclass
    with keys, job_ids, label, state_path and batches serves as a unit, its work saving its state with
    save_state(state_path, ..., job_ids); merge_states then needs its make_consumer(device), an empty
    state with load_state_dict and merge.

    The driver claims each unit's keys, keeps their heartbeat, and marks each unit done the moment its
    outcome arrives, so that a driver killed midway and rerun does only the units still missing. A
    failed unit is marked failed with its error; the others run on; the run then stops with the error.
    """
    science = science_config(config)
    hash_ = config_hash(science)
    overwrite = bool(getattr(config, "overwrite", False))
    pending = [unit for unit in units if overwrite or not unit_ready(store, unit, hash_)]
    if len(pending) < len(units):
        log.info(f"skipped {len(units) - len(pending)} of {len(units)} token-shard units of {label}: already done")
    claimed: list[PassUnit] = []
    for unit in pending:
        ids, _ = _claim_all(store, list(unit.keys), science, hash_, True, label)
        if len(ids) == len(unit.keys):
            claimed.append(dataclasses.replace(unit, job_ids=tuple(ids[key] for key in unit.keys)))
        elif ids:  # part of the unit is another process's: leave it all to that process
            _fail(store, list(ids.values()), AtlasError("another process holds part of this unit"))
    if not claimed:
        return
    errors: list[str] = []
    with Heartbeat(store, [job_id for unit in claimed for job_id in unit.job_ids]), \
            progress_bar() as bar:
        task = bar.add_task(f"{label}: {len(claimed)} unit(s) on {executor.name}", total=len(claimed))
        started = time.perf_counter()
        try:
            for index, outcome in executor.map(work, claimed):
                unit = claimed[index]
                if isinstance(outcome, BaseException):
                    _fail(store, list(unit.job_ids), outcome)
                    errors.append(f"{unit.label}: {first_line(outcome)}")
                else:
                    _mark_done(store, unit)
                    if after_unit is not None:
                        after_unit(unit)
                bar.advance(task)
        except BaseException as error:  # Ctrl-C or a lost cluster: the units not reported did not finish
            _fail(store, [job_id for unit in claimed for job_id in unit.job_ids], error)
            raise
        log.debug(f"{label}: {len(claimed)} units in {time.perf_counter() - started:.1f}s")
    if errors:
        raise AtlasError(f"{len(errors)} of {len(claimed)} units failed ({errors[0]}); rerun the job: the units "
                         "already done are skipped")


def _mark_done(store: Store, unit: PassUnit) -> None:
    from sqlalchemy import update

    from atlas.store.schema import Job

    with store.transaction() as session:
        for key, job_id in zip(unit.keys, unit.job_ids):
            session.execute(update(Job).where(*key.where(), Job.status == "done").values(status="replaced"))
            session.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                            .values(status="done", finished_at=_now(), n_rows=0))


def with_done_ids(store: Store, units: list[PassUnit], hash_: str) -> list[PassUnit]:
    """The units stamped with their done jobs' ids (what their state files must carry), in stream order;
    an AtlasError names the first that is not done."""
    stamped = []
    for unit in sorted(units, key=lambda unit: unit.batches.start):
        ids = done_job_ids(store, unit, hash_)
        if ids is None:
            raise AtlasError(f"token shard {unit.label} is not done: rerun the job")
        stamped.append(dataclasses.replace(unit, job_ids=tuple(ids)))
    return stamped


def merge_states(units: Sequence[PassUnit], device: str | torch.device = "cpu") -> Any:
    """The consumer of a whole pass: its units' saved states merged in stream order (no database: this
    runs where the executor puts it)."""
    merged = None
    for unit in sorted(units, key=lambda unit: unit.batches.start):
        state = load_state(Path(unit.state_path), unit.job_ids)
        if state is None:
            raise AtlasError(f"the state of token shard {unit.label} is missing from {Path(unit.state_path).parent} "
                             "(a --shard-dir that this machine cannot read?): rerun the job")
        part = unit.make_consumer(torch.device(device))
        part.load_state_dict(state)
        if merged is None:
            merged = part
        else:
            merged.merge(part)
    return merged


def delete_states(units: list[PassUnit]) -> None:
    for unit in units:
        Path(unit.state_path).unlink(missing_ok=True)
