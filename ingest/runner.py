"""The jobs ledger: skip what is done, record what runs, replace results in one transaction.

Every unit of work (one model, one model pair, one shard) goes through `run_unit`:
  1. a done job with the same kind, target and config hash -> skipped (unless overwrite);
  2. a `running` row is committed, so a crash leaves a trace in the ledger;
  3. compute() runs outside any transaction (it may take hours);
  4. write() deletes the target's old rows and inserts the new ones, and the job is marked done,
     all in ONE transaction: readers see the old results or the new ones, never a mix;
  5. on any error the job is marked failed with its message and no result row is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, TypeVar

from rich.console import Console
from sqlalchemy import delete, select, update
from sqlalchemy.orm import DeclarativeBase, Session

from atlas import __version__
from atlas.errors import AtlasError
from atlas.store import Store, bulk_insert
from atlas.store.schema import Job

T = TypeVar("T")
console = Console(stderr=True)


def science_config(config: Any) -> dict[str, Any]:
    """The options that change results: every dataclass field not marked as a target or a run option."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if not f.metadata.get("target") and not f.metadata.get("run_option")
    }


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


def find_done(session: Session, key: JobKey, hash_: str | None = None) -> Job | None:
    query = select(Job).where(*key.where(), Job.status == "done")
    if hash_ is not None:
        query = query.where(Job.config_hash == hash_)
    return session.scalars(query.order_by(Job.id.desc())).first()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _start(store: Store, key: JobKey, config: dict[str, Any], hash_: str) -> int:
    with store.transaction() as session:
        job = Job(
            kind=key.kind, model_id=key.model_id, dataset_id=key.dataset_id, other_model_id=key.other_model_id,
            shard=key.shard, config=config, config_hash=hash_, status="running", atlas_version=__version__,
        )
        session.add(job)
        session.flush()
        return job.id


def _fail(store: Store, job_id: int, error: BaseException) -> None:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    with store.transaction() as session:
        session.execute(
            update(Job).where(Job.id == job_id)
            .values(status="failed", error=f"{type(error).__name__}: {message}", finished_at=_now())
        )


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
    """Run one unit of work through the ledger. Returns 'skipped' or 'done'."""
    science = science_config(config)
    hash_ = config_hash(science)
    label = label or key.kind
    with store.session() as session:
        if not overwrite and find_done(session, key, hash_) is not None:
            console.print(f"[yellow]skipped[/] {label}: already done with this config (use --overwrite to recompute)")
            return "skipped"
    job_id = _start(store, key, science, hash_)
    try:
        result = compute()
        with store.transaction() as session:
            n_rows = write(session, result, job_id)
            session.execute(update(Job).where(*key.where(), Job.status == "done").values(status="replaced"))
            session.execute(
                update(Job).where(Job.id == job_id).values(status="done", finished_at=_now(), n_rows=n_rows)
            )
    except BaseException as error:  # KeyboardInterrupt too: the ledger says the job did not finish
        _fail(store, job_id, error)
        raise
    console.print(f"[green]done[/] {label}: {n_rows} rows (job {job_id})")
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

    Done keys are skipped; the others are marked running, computed by ONE compute(pending) call,
    and written (write returns the row count per key) and marked done in ONE transaction.
    Returns the keys that ran.
    """
    science = science_config(config)
    hash_ = config_hash(science)
    label = label or (keys[0].kind if keys else "")
    with store.session() as session:
        pending = [key for key in keys if overwrite or find_done(session, key, hash_) is None]
    if len(pending) < len(keys):
        console.print(f"[yellow]skipped[/] {label}: {len(keys) - len(pending)} of {len(keys)} already done "
                      "with this config (use --overwrite to recompute)")
    if not pending:
        return []
    job_ids = {key: _start(store, key, science, hash_) for key in pending}
    try:
        result = compute(pending)
        with store.transaction() as session:
            n_rows = write(session, result, job_ids)
            for key, job_id in job_ids.items():
                session.execute(update(Job).where(*key.where(), Job.status == "done").values(status="replaced"))
                session.execute(update(Job).where(Job.id == job_id)
                                .values(status="done", finished_at=_now(), n_rows=n_rows.get(key)))
    except BaseException as error:  # KeyboardInterrupt too: the ledger says the jobs did not finish
        for job_id in job_ids.values():
            _fail(store, job_id, error)
        raise
    console.print(f"[green]done[/] {label}: {sum(n_rows.values())} rows (jobs {', '.join(map(str, job_ids.values()))})")
    return pending
