"""kill -9 in the middle of `atlas ingest activations`, rerun: the result equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sqlalchemy import select

from atlas.registry import register_dataset, register_model
from atlas.store import Store
from atlas.store.schema import Job
from tests.test_activations import table_dump

INGEST = ["ingest", "activations", "--family", "tiny", "--dataset", "docs", "--batch-size", "1",
          "--checkpoint-every", "1", "--top-k", "5"]


def atlas(db: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "atlas.cli", *args, "--db", db], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def registered_store(url: str, tiny_family, docs_file) -> Store:
    store = Store(url)
    for seed in (0, 1):
        register_model(store, str(tiny_family[seed]), family="tiny", seed=seed)
    register_dataset(store, "docs", str(docs_file), n_tokens=3000, ctx_len=64)
    return store


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, tiny_family, filled_docs_file):
    env = {**os.environ, "ATLAS_CACHE_DIR": str(tmp_path / "cache")}
    checkpoints = tmp_path / "cache" / "checkpoints"

    reference_url = f"sqlite:///{tmp_path / 'reference.db'}"
    reference = registered_store(reference_url, tiny_family, filled_docs_file)
    assert atlas(reference_url, env, *INGEST).wait(timeout=300) == 0

    killed_url = f"sqlite:///{tmp_path / 'killed.db'}"
    killed = registered_store(killed_url, tiny_family, filled_docs_file)
    process = atlas(killed_url, env, *INGEST)
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("*.npz")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)  # a batch or two past the first checkpoint; on an idle machine the pass takes < 0.5 s
    assert process.poll() is None, "the job finished before it could be killed: make the dataset larger"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert any(checkpoints.glob("*.npz")), "no checkpoint was left behind by the killed job"
    assert table_dump(killed) == []  # nothing half-written
    with killed.session() as session:
        crashed = {job.id: job.status for job in session.scalars(select(Job))}
    assert set(crashed.values()) == {"running"}  # the ledger shows the crash

    rerun = atlas(killed_url, env, *INGEST)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "resum" in stderr.lower(), f"the rerun did not resume from the checkpoint: {stderr[-500:]}"
    assert table_dump(killed) == table_dump(reference)
    with killed.session() as session:
        statuses = {job.id: job.status for job in session.scalars(select(Job))}
    assert "running" not in statuses.values(), statuses  # the rerun took the killed job's claims over
    assert {statuses[job_id] for job_id in crashed} == {"abandoned"}, statuses
    assert {status for job_id, status in statuses.items() if job_id not in crashed} == {"done"}, statuses
    assert not any(checkpoints.iterdir())  # deleted once the rows were committed, half-written staging too
    reference.dispose()
    killed.dispose()


def test_delete_removes_a_staging_file_left_by_a_killed_writer(tmp_path):
    from ingest.family_pass import Checkpoint

    checkpoint = Checkpoint({"job": "x"}, directory=tmp_path)
    checkpoint.save(3, {})
    half_written = tmp_path / f"{checkpoint.key}.12345.tmp.npz"  # what SIGKILL during np.savez leaves
    half_written.write_bytes(b"PK\x03\x04 truncated")
    other_job = tmp_path / "another-key.999.tmp.npz"
    other_job.write_bytes(b"")
    checkpoint.delete()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_job.name]
