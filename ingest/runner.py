"""The jobs ledger: skip what is done, claim what runs, replace results in one transaction.

Every unit of work (one model, one model pair, one shard) goes through `run_unit`:
  1. a done job with the same kind, target and config hash -> skipped (unless overwrite);
  2. the unit is claimed: its `running` row is committed with a claim key (the target, not the config),
     this pid and host; a partial unique index allows one running row per claim key, so of two jobs
     started together exactly one gets the claim and the other skips the unit with one line. A running
     row whose process is gone (its pid on this host) or whose heartbeat stopped is marked `abandoned`;
  3. compute() runs outside any transaction (it may take hours) while a thread moves the heartbeat;
  4. write() deletes the target's old rows and inserts the new ones, and the job is marked done,
     all in ONE transaction: readers see the old results or the new ones, never a mix;
  5. on any error the job is marked failed with its message and no result row is written; when the
     database itself is gone the claim is left running, goes stale, and the next run abandons it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, TypeVar

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session

from atlas import __version__
from atlas.errors import AtlasError, first_line
from atlas.store import Store, bulk_insert
from atlas.store.schema import Dataset, Job, Model
from ingest.options import hashed_values
from ingest.progress import show_result

T = TypeVar("T")
log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0  # a running job refreshes heartbeat_at this often (ATLAS_HEARTBEAT_S overrides it)
STALE_AFTER_BEATS = 3  # a claim whose heartbeat is older than this many intervals is abandoned
CLAIM_ATTEMPTS = 3  # claim races lost to a holder that finished at once are retried this often


def heartbeat_interval() -> float:
    """Seconds between heartbeats: ATLAS_HEARTBEAT_S (read on every use, so tests can shorten it)."""
    value = os.environ.get("ATLAS_HEARTBEAT_S")
    if value is None:
        return HEARTBEAT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise AtlasError(f"ATLAS_HEARTBEAT_S={value!r} is not a positive number of seconds: unset it or fix it")
    return seconds


def stale_after() -> float:
    return STALE_AFTER_BEATS * heartbeat_interval()


def science_config(config: Any) -> dict[str, Any]:
    """The options that change results: every dataclass field not marked as a target or a run option
    (an added option only where it differs from its default)."""
    return hashed_values(config)


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class JobKey:
    """What a job's results are about; results of one key replace each other."""

    kind: str
    model_id: int | None = None
    dataset_id: int | None = None
    other_model_id: int | None = None
    shard: str | None = None

    def where(self):
        return [
            Job.kind == self.kind,
            Job.model_id.is_(None) if self.model_id is None else Job.model_id == self.model_id,
            Job.dataset_id.is_(None) if self.dataset_id is None else Job.dataset_id == self.dataset_id,
            Job.other_model_id.is_(None) if self.other_model_id is None else Job.other_model_id == self.other_model_id,
            Job.shard.is_(None) if self.shard is None else Job.shard == self.shard,
        ]

    @property
    def claim_key(self) -> str:
        """The target alone, not the config: two configs must never write the same rows at once."""
        ids = [None if value is None else int(value) for value in (self.model_id, self.dataset_id, self.other_model_id)]
        return json.dumps([self.kind, *ids, self.shard])  # int(): a numpy id must give the same key

    def describe(self) -> str:
        parts = [("model", self.model_id), ("dataset", self.dataset_id), ("other model", self.other_model_id),
                 ("shard", self.shard)]
        return ", ".join(f"{name} {value}" for name, value in parts if value is not None)


def find_done(session: Session, key: JobKey, hash_: str | None = None) -> Job | None:
    query = select(Job).where(*key.where(), Job.status == "done")
    if hash_ is not None:
        query = query.where(Job.config_hash == hash_)
    return session.scalars(query.order_by(Job.id.desc())).first()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def seconds_since(moment: datetime | None) -> float | None:
    """Age of a ledger timestamp; SQLite hands them back naive, and the atlas writes UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (_now() - moment).total_seconds())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def claim_problem(pid: int | None, host: str | None, heartbeat_at: datetime | None) -> str | None:
    """Why a running claim is dead (its process is gone or its heartbeat stopped); None while it is live."""
    if host == socket.gethostname() and pid is not None and not _pid_alive(pid):
        return f"its process (pid {pid} on {host}) is gone"
    age = seconds_since(heartbeat_at)
    if age is None:
        return "it has no heartbeat (left running by a job from before claims)"
    if age > stale_after():
        return f"its heartbeat stopped {age:.0f}s ago (pid {pid} on {host})"
    return None


# --- claims --------------------------------------------------------------------------------------


@dataclass
class _Claim:
    job_id: int | None = None  # our running row, when the unit is ours
    holder: Job | None = None  # else the live job computing it
    abandoned: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (job id, why) taken over


class _DoneMeanwhile(Exception):
    """A job with this config finished between the skip check and the claim."""


def _running_rows(session: Session, key: JobKey) -> list[Job]:
    """The unit's running rows: its claim, or rows from before claims (claim_key NULL) for the same target."""
    claims = or_(Job.claim_key == key.claim_key, and_(Job.claim_key.is_(None), *key.where()))
    return list(session.scalars(select(Job).where(Job.status == "running", claims)))


def _revision(resolved: str | None, requested: str | None) -> str | None:
    return resolved or requested


def provenance(session: Session, key: JobKey) -> dict[str, Any]:
    """What produced a job's rows, copied onto its ledger row: the model's source and resolved revision,
    the dataset's, the tokenizer, and the versions of torch and transformers in this process."""
    import torch
    import transformers

    model = session.get(Model, key.model_id) if key.model_id is not None else None
    other = session.get(Model, key.other_model_id) if key.other_model_id is not None else None
    dataset = session.get(Dataset, key.dataset_id) if key.dataset_id is not None else None
    return {
        "model_source": model.source if model else None,
        "model_revision": _revision(model.resolved_revision, model.revision) if model else None,
        "other_model_revision": _revision(other.resolved_revision, other.revision) if other else None,
        "dataset_source": dataset.source if dataset else None,
        "dataset_revision": (_revision(dataset.resolved_revision, dataset.revision) or f"sha256:{dataset.content_hash}"
                             if dataset else None),
        "tokenizer_hash": model.tokenizer_hash if model else None,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def _try_claim(store: Store, key: JobKey, config: dict[str, Any], hash_: str, overwrite: bool) -> _Claim:
    """One transaction: abandon dead claims, insert ours (the unique index refuses a concurrent one)."""
    claim = _Claim()
    with store.transaction() as session:
        for row in _running_rows(session, key):
            problem = claim_problem(row.pid, row.host, row.heartbeat_at)
            if problem is None:
                return _Claim(holder=row, abandoned=claim.abandoned)
            session.execute(update(Job).where(Job.id == row.id, Job.status == "running").values(
                status="abandoned", finished_at=_now(), error=f"abandoned: {problem}; a later run took the unit over"))
            claim.abandoned.append((row.id, problem))
        job = Job(
            kind=key.kind, model_id=key.model_id, dataset_id=key.dataset_id, other_model_id=key.other_model_id,
            shard=key.shard, config=config, config_hash=hash_, status="running", atlas_version=__version__,
            claim_key=key.claim_key, pid=os.getpid(), host=socket.gethostname(), heartbeat_at=_now(),
            **provenance(session, key),
        )
        session.add(job)
        session.flush()
        if not overwrite and find_done(session, key, hash_) is not None:
            raise _DoneMeanwhile  # rolls the claim back: nothing to do
        claim.job_id = job.id
    return claim


def _claim(store: Store, key: JobKey, config: dict[str, Any], hash_: str, overwrite: bool) -> _Claim | None:
    """Claim the unit for this process; None when a job with this config finished meanwhile."""
    for attempt in range(CLAIM_ATTEMPTS):
        try:
            return _try_claim(store, key, config, hash_, overwrite)
        except _DoneMeanwhile:
            return None
        except IntegrityError:
            # Another process committed its claim between our look and our insert.
            with store.session() as session:
                holder = session.scalars(select(Job).where(Job.claim_key == key.claim_key,
                                                           Job.status == "running")).first()
            if holder is not None:
                return _Claim(holder=holder)
            if attempt == CLAIM_ATTEMPTS - 1:  # not a claim race (a deleted model?): let it surface
                raise
    raise AssertionError("unreachable")


def _report(claim: _Claim, label: str) -> None:
    for job_id, problem in claim.abandoned:
        log.warning(f"abandoned job {job_id} ({label}): {problem}; computing it again")
    if claim.holder is not None:
        holder = claim.holder
        age = seconds_since(holder.heartbeat_at)
        beat = "no heartbeat" if age is None else f"heartbeat {age:.0f}s ago"
        log.warning(f"skipped {label}: job {holder.id} is computing it (pid {holder.pid} on {holder.host}, "
             f"{beat}); rerun after it finishes")


# --- running a claimed unit ----------------------------------------------------------------------


class Heartbeat:
    """Moves heartbeat_at of the claimed jobs every interval, on its own short transactions, until closed.

    A database error only skips a beat: the job's own error (or the stale claim, later) reports it.
    """

    def __init__(self, store: Store, job_ids: Iterable[int], interval: float | None = None):
        self.store, self.job_ids = store, list(job_ids)
        self.interval = heartbeat_interval() if interval is None else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="atlas-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.store.transaction() as session:
                    session.execute(update(Job).where(Job.id.in_(self.job_ids), Job.status == "running")
                                    .values(heartbeat_at=_now()))
            except SQLAlchemyError:
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a beat stuck on an unreachable server must not hold the job up


def _fail(store: Store, job_ids: list[int], error: BaseException) -> None:
    message = first_line(error)
    try:
        with store.transaction() as session:
            session.execute(
                update(Job).where(Job.id.in_(job_ids), Job.status == "running")
                .values(status="failed", error=f"{type(error).__name__}: {message}", finished_at=_now())
            )
    except SQLAlchemyError:
        pass  # the database is gone: the error being raised says so; the claim goes stale, a rerun abandons it


def _compute_and_write(store: Store, job_ids: dict[JobKey, int], compute: Callable[[], T],
                       write: Callable[[Session, T], dict[JobKey, int]]) -> dict[JobKey, int]:
    """compute() while the heartbeat moves; write the rows and mark the jobs done in ONE transaction."""
    try:
        with Heartbeat(store, job_ids.values()):
            result = compute()
            with store.transaction() as session:
                n_rows = write(session, result)
                for key, job_id in job_ids.items():
                    session.execute(update(Job).where(*key.where(), Job.status == "done").values(status="replaced"))
                    session.execute(update(Job).where(Job.id == job_id)
                                    .values(status="done", finished_at=_now(), n_rows=n_rows.get(key)))
    except BaseException as error:  # KeyboardInterrupt too: the ledger says the jobs did not finish
        _fail(store, list(job_ids.values()), error)
        raise
    return n_rows


def run_unit(
    store: Store,
    key: JobKey,
    config: Any,
    compute: Callable[[], T],
    write: Callable[[Session, T, int], int],
    *,
    overwrite: bool = False,
    label: str = "",
) -> str:
    """Run one unit of work through the ledger. Returns 'skipped' (done already, or claimed by another
    process) or 'done'."""
    science = science_config(config)
    hash_ = config_hash(science)
    label = label or key.kind
    done_already = f"skipped {label}: already done with this config (use --overwrite to recompute)"
    with store.session() as session:
        if not overwrite and find_done(session, key, hash_) is not None:
            log.info(done_already)
            return "skipped"
    claim = _claim(store, key, science, hash_, overwrite)
    if claim is None:
        log.info(done_already)
        return "skipped"
    _report(claim, label)
    if claim.job_id is None:
        return "skipped"
    job_id = claim.job_id
    log.debug(f"claimed {label}: job {job_id}, config hash {hash_[:12]}")
    started = time.perf_counter()
    n_rows = _compute_and_write(store, {key: job_id}, compute,
                                lambda session, result: {key: write(session, result, job_id)})[key]
    log.debug(f"{label}: computed and written in {time.perf_counter() - started:.1f}s")
    show_result(f"[green]done[/] {label}: {n_rows} rows (job {job_id})")
    return "done"


def replace_rows(
    session: Session, model: type[DeclarativeBase], where: Mapping[str, Any], columns: Mapping[str, Any]
) -> int:
    """Delete the rows of `model` matching `where`, then bulk insert `columns` (with `where` on every row)."""
    table = model.__table__
    session.execute(delete(model).where(*[table.c[name] == value for name, value in where.items()]))
    return bulk_insert(session, model, {**where, **columns})


def require(condition: bool, message: str) -> None:
    if not condition:
        raise AtlasError(message)


def _claim_all(store: Store, keys: list[JobKey], config: dict[str, Any], hash_: str, overwrite: bool,
               label: str) -> tuple[dict[JobKey, int], int]:
    """Claim each key; returns our job id per claimed key and how many keys were done meanwhile."""
    claimed: dict[JobKey, int] = {}
    n_done = 0
    try:
        for key in keys:
            claim = _claim(store, key, config, hash_, overwrite)
            if claim is None:
                n_done += 1
                continue
            _report(claim, f"{label} ({key.describe()})" if key.describe() else label)
            if claim.job_id is not None:
                claimed[key] = claim.job_id
    except BaseException as error:  # the claims taken so far must not stay running
        _fail(store, list(claimed.values()), error)
        raise
    return claimed, n_done


def run_units(
    store: Store,
    keys: list[JobKey],
    config: Any,
    compute: Callable[[list[JobKey]], T],
    write: Callable[[Session, T, dict[JobKey, int]], dict[JobKey, int]],
    *,
    overwrite: bool = False,
    label: str = "",
) -> list[JobKey]:
    """run_unit for units computed together (one pass serving several models).

    Done keys are skipped and so are keys another live process has claimed; the others are claimed,
    computed by ONE compute(claimed) call, written (write returns the row count per key) and marked done
    in ONE transaction. Returns the keys that ran.
    """
    science = science_config(config)
    hash_ = config_hash(science)
    label = label or (keys[0].kind if keys else "")
    with store.session() as session:
        pending = [key for key in keys if overwrite or find_done(session, key, hash_) is None]
    claimed, n_done_meanwhile = _claim_all(store, pending, science, hash_, overwrite, label)
    n_done = len(keys) - len(pending) + n_done_meanwhile
    if n_done:
        log.info(f"skipped {label}: {n_done} of {len(keys)} already done with this config "
                 "(use --overwrite to recompute)")
    if not claimed:
        return []
    ran = list(claimed)
    log.debug(f"claimed {label}: jobs {', '.join(map(str, claimed.values()))}, config hash {hash_[:12]}")
    started = time.perf_counter()
    n_rows = _compute_and_write(store, claimed, lambda: compute(ran),
                                lambda session, result: write(session, result, claimed))
    log.debug(f"{label}: computed and written in {time.perf_counter() - started:.1f}s")
    show_result(f"[green]done[/] {label}: {sum(n_rows.values())} rows (jobs {', '.join(map(str, claimed.values()))})")
    return ran
