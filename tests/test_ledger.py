"""The jobs ledger tells the truth: claims are atomic, dead claims are abandoned, live ones are left alone,
the heartbeat moves, and a database that goes away mid-job ends the job with one line. SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from atlas.cli import app
from atlas.store import Store
from atlas.store.schema import Job, NeuronVocab
from ingest import runner
from ingest.runner import Heartbeat, JobKey, run_units
from tests.fixtures_db import _libpq
from tests.ledger_toy import ToyConfig, run_toy, toy_key, toy_values, write_toy
from tests.test_store import _add_model

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()


def ledger(store: Store) -> list[Job]:
    with store.session() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def toy_rows(store: Store) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(NeuronVocab))


def insert_claim(store: Store, key: JobKey, *, pid: int | None, host: str | None, heartbeat_age_s: float | None,
                 legacy: bool = False) -> int:
    """A running row as another process would have left it (legacy: from before claims, no claim key)."""
    heartbeat = None if heartbeat_age_s is None else datetime.now(timezone.utc) - timedelta(seconds=heartbeat_age_s)
    with store.transaction() as session:
        job = Job(kind=key.kind, model_id=key.model_id, config={}, config_hash="other", status="running",
                  atlas_version="x", claim_key=None if legacy else key.claim_key, pid=pid,
                  host=host, heartbeat_at=heartbeat)
        session.add(job)
        session.flush()
        return job.id


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def progress(caplog):
    """Reads the progress messages logged since the last read (the ingest loggers; `atlas` prints them on stderr)."""
    caplog.set_level(logging.INFO, logger="ingest")

    def read() -> list[str]:
        lines = [record.getMessage() for record in caplog.records if record.name.startswith("ingest")]
        caplog.clear()
        return lines

    return read


def skipped_line(label: str, holder: int, pid: int, host: str = HOST) -> str:
    """The one line a skipped unit prints, as a pattern: the heartbeat's age depends on the machine's load."""
    return (re.escape(f"skipped {label}: job {holder} is computing it (pid {pid} on {host}, heartbeat ")
            + r"\d+s ago\); rerun after it finishes")


def never() -> None:
    raise AssertionError("compute ran for a unit another process holds")


# --- (a) dead claims are abandoned and the unit recomputed ---------------------------------------


def test_claim_of_a_dead_process_is_abandoned_and_recomputed(store, progress):
    model_id = _add_model(store)
    stale = insert_claim(store, toy_key(model_id), pid=dead_pid(), host=HOST, heartbeat_age_s=0)
    assert run_toy(store, model_id) == "done"
    jobs = ledger(store)
    assert [(j.id, j.status) for j in jobs] == [(stale, "abandoned"), (jobs[1].id, "done")]
    assert "is gone" in jobs[0].error and jobs[0].finished_at is not None
    assert (jobs[1].pid, jobs[1].host, jobs[1].claim_key) == (os.getpid(), HOST, toy_key(model_id).claim_key)
    assert toy_rows(store) == 4
    assert any(line.startswith(f"abandoned job {stale}") for line in progress())


def test_stale_heartbeat_and_claims_from_before_claims_are_abandoned(store):
    model_id = _add_model(store)
    key = toy_key(model_id)
    # Another host: its pid cannot be checked, its heartbeat stopped an hour ago.
    elsewhere = insert_claim(store, key, pid=1, host="another-host", heartbeat_age_s=3600)
    legacy = insert_claim(store, key, pid=None, host=None, heartbeat_age_s=None, legacy=True)
    assert run_toy(store, model_id) == "done"
    status = {j.id: (j.status, j.error) for j in ledger(store)}
    assert status[elsewhere][0] == "abandoned" and "heartbeat stopped" in status[elsewhere][1]
    assert status[legacy][0] == "abandoned" and "from before claims" in status[legacy][1]
    assert [s for s, _ in status.values()].count("done") == 1 and "running" not in [s for s, _ in status.values()]


# --- (b) a live claim of another process is left alone -------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_live_claim_makes_run_unit_skip_with_one_line(store, live_pid, progress, overwrite):
    model_id = _add_model(store)
    holder = insert_claim(store, toy_key(model_id), pid=live_pid, host=HOST, heartbeat_age_s=1)
    progress()
    assert run_toy(store, model_id, ToyConfig(overwrite=overwrite), during=never) == "skipped"
    [line] = progress()
    assert re.fullmatch(skipped_line(f"toy model {model_id}", holder, live_pid), line), line
    assert [(j.id, j.status) for j in ledger(store)] == [(holder, "running")]
    assert toy_rows(store) == 0


def test_live_claim_on_another_host_is_trusted_while_its_heartbeat_moves(store, progress):
    model_id = _add_model(store)
    holder = insert_claim(store, toy_key(model_id), pid=dead_pid(), host="another-host", heartbeat_age_s=0)
    assert run_toy(store, model_id, during=never) == "skipped"
    assert [(j.id, j.status) for j in ledger(store)] == [(holder, "running")]


def test_run_units_computes_only_the_units_it_claimed(store, live_pid, progress, capsys):
    held, free = _add_model(store, "held", 0), _add_model(store, "free", 1)
    keys = [toy_key(held), toy_key(free)]
    holder = insert_claim(store, keys[0], pid=live_pid, host=HOST, heartbeat_age_s=0)
    computed = []

    def compute(claimed):
        computed.append(claimed)
        return toy_values()

    def write(session, values, job_ids):
        return {key: write_toy(session, key.model_id, values) for key in job_ids}

    assert run_units(store, keys, ToyConfig(), compute, write, label="toys") == [keys[1]]
    assert computed == [[keys[1]]]
    [line] = progress()
    assert re.fullmatch(skipped_line(f"toys (model {held})", holder, live_pid), line), line
    assert capsys.readouterr().out.startswith("done toys: 4 rows")  # the result, on stdout
    assert [(j.model_id, j.status) for j in ledger(store)] == [(held, "running"), (free, "done")]


def test_a_concurrent_claim_loses_on_the_unique_index(store, live_pid, monkeypatch, progress):
    """Two processes that both looked before either inserted: the index refuses the second claim."""
    model_id = _add_model(store)
    holder = insert_claim(store, toy_key(model_id), pid=live_pid, host=HOST, heartbeat_age_s=0)
    monkeypatch.setattr(runner, "_running_rows", lambda session, key: [])  # the look misses the holder
    assert run_toy(store, model_id, during=never) == "skipped"
    assert f"job {holder} is computing it" in progress()[-1]
    assert [(j.id, j.status) for j in ledger(store)] == [(holder, "running")]


def test_a_unit_done_between_the_check_and_the_claim_is_skipped(store, monkeypatch, progress):
    model_id = _add_model(store)
    assert run_toy(store, model_id) == "done"
    real_find_done, calls = runner.find_done, []

    def find_done_late(session, key, hash_=None):  # the first look happens before the other job commits
        calls.append(key)
        return None if len(calls) == 1 else real_find_done(session, key, hash_)

    monkeypatch.setattr(runner, "find_done", find_done_late)
    assert run_toy(store, model_id, during=never) == "skipped"
    assert "already done with this config" in progress()[-1]
    assert [j.status for j in ledger(store)] == ["done"]  # the claim was rolled back, no trace


def test_interrupt_marks_the_claim_failed(store):
    model_id = _add_model(store)

    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_toy(store, model_id, during=interrupt)
    [job] = ledger(store)
    assert (job.status, job.error) == ("failed", "KeyboardInterrupt: KeyboardInterrupt")


# --- (c) two identical jobs started together in two processes -----------------------------------


def toy_process(url: str, model_id: int, seconds: float, start_at: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.ledger_toy", "toy", "--model-id", str(model_id), "--seconds", str(seconds),
         "--start-at", str(start_at), "--db", url],
        cwd=REPO, env={**os.environ, "ATLAS_HEARTBEAT_S": "0.5"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def test_two_identical_jobs_at_once_compute_the_unit_once(store, db_url):
    model_id = _add_model(store)
    start_at = time.time() + 6  # both processes are imported by then and claim in the same instant
    processes = [toy_process(db_url, model_id, 3, start_at) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read() + p.stderr.read()) for p in processes]
    for returncode, output in results:
        assert returncode == 0 and "Traceback" not in output, output
    lines = [line for _, output in results for line in output.splitlines() if line.strip()]
    [done] = [job for job in ledger(store)]
    assert done.status == "done" and toy_rows(store) == 4
    assert len(lines) == 2 and f"done toy model {model_id}: 4 rows (job {done.id})" in lines, lines
    [skipped] = [line for line in lines if line.startswith("skipped")]
    assert re.fullmatch(skipped_line(f"toy model {model_id}", done.id, done.pid), skipped), lines


# --- (d) the heartbeat ---------------------------------------------------------------------------


def test_heartbeat_moves_during_compute_and_stops_after(store, monkeypatch):
    monkeypatch.setenv("ATLAS_HEARTBEAT_S", "0.1")
    model_id = _add_model(store)
    seen = []

    def watch():  # compute runs 2 s, far past the 0.3 s after which an unrefreshed claim is stale
        for _ in range(4):
            time.sleep(0.5)
            seen.append(ledger(store)[0].heartbeat_at)

    assert run_toy(store, model_id, during=watch) == "done"
    assert seen == sorted(seen) and len(set(seen)) == 4, seen  # it moved between every look
    assert not any(t.name == "atlas-heartbeat" and t.is_alive() for t in threading.enumerate())
    last = ledger(store)[0].heartbeat_at
    time.sleep(0.3)
    assert ledger(store)[0].heartbeat_at == last


def test_heartbeat_swallows_database_errors(tmp_path, monkeypatch):
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    store = Store(f"sqlite:///{tmp_path / 'no-schema.db'}", check=False)  # no jobs table: every beat fails
    with Heartbeat(store, [1], interval=0.05) as heartbeat:
        time.sleep(0.3)
    assert not heartbeat._thread.is_alive() and errors == []
    store.dispose()


# --- (e) the database goes away mid-job ----------------------------------------------------------


def test_database_gone_mid_job_is_one_line_and_the_rerun_takes_over(pg_server, pg_template):
    name = pg_server.create(template=pg_template)
    url = pg_server.url_of(name)
    store = Store(url)
    model_id = _add_model(store)
    process = toy_process(url, model_id, seconds=8)
    deadline = time.monotonic() + 60
    while not ledger(store) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [j.status for j in ledger(store)] == ["running"], process.communicate()[1]
    admin = psycopg.connect(_libpq(pg_server.url), autocommit=True)
    try:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        _, stderr = process.communicate(timeout=120)
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    [line] = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("error: database error: ") and "not currently accepting connections" in line, line
    assert f"check that the database at {make_url(url).render_as_string(hide_password=True)} is reachable" in line
    assert [j.status for j in ledger(store)] == ["running"]  # left for the rerun to abandon

    rerun = toy_process(url, model_id, seconds=0)
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    jobs = ledger(store)
    assert [j.status for j in jobs] == ["abandoned", "done"] and "is gone" in jobs[0].error
    assert toy_rows(store) == 4
    store.dispose()


# --- `atlas jobs` --------------------------------------------------------------------------------


def test_jobs_command_lists_the_ledger_and_flags_stale_claims(store, db_url):
    model_id = _add_model(store)
    assert run_toy(store, model_id) == "done"
    stale = insert_claim(store, JobKey("other", model_id=model_id), pid=dead_pid(), host=HOST, heartbeat_age_s=5)
    listed = CliRunner().invoke(app, ["jobs", "--db", db_url])
    assert listed.exit_code == 0, listed.output
    rows = [line for line in listed.output.splitlines() if line.startswith("│")]
    assert rows[0].split("│")[1].strip() == str(stale) and "stale (abandoned?)" in rows[0]
    assert "done" in rows[1] and "toy" in rows[1] and f"{os.getpid()}@{HOST}" in rows[1]
    assert [j.status for j in ledger(store)] == ["done", "running"]  # listing writes nothing
    only_done = CliRunner().invoke(app, ["jobs", "--status", "done", "--kind", "toy", "--db", db_url])
    assert only_done.exit_code == 0 and "stale" not in only_done.output and "toy" in only_done.output
    none = CliRunner().invoke(app, ["jobs", "--kind", "nothing", "--db", db_url])
    assert "no jobs match" in none.output

