"""The `atlas` command end to end (real subprocesses): registration, the weights job, one-line errors."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys

import pytest
from transformers import BertConfig


def atlas(*args: str, db: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas.cli", *args, "--db", db], capture_output=True, text=True,
                          timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_model_add_and_weights_end_to_end(db_url, tiny_models, tmp_path):
    gpt2 = str(tiny_models["gpt2"])
    added = atlas("model", "add", gpt2, "--family", "tiny", "--seed", "0", db=db_url)
    assert added.returncode == 0, added.stderr
    assert "registered" in added.stdout
    again = atlas("model", "add", gpt2, "--family", "tiny", "--seed", "0", db=db_url)
    assert again.returncode == 0 and "already registered" in again.stdout
    other = atlas("model", "add", str(tiny_models["neox"]), "--family", "tiny", "--seed", "1",
                  "--name", tiny_models["gpt2"].name, db=db_url)
    assert "already registered from" in one_line_error(other)
    listed = atlas("model", "list", db=db_url)
    assert tiny_models["gpt2"].name in listed.stdout

    first = atlas("-q", "ingest", "weights", "--family", "tiny", db=db_url)  # -q: the results, nothing else
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    assert [line.split(":")[0] for line in first.stdout.splitlines()] == [f"done weights {tiny_models['gpt2'].name}"]
    second = atlas("ingest", "weights", "--family", "tiny", db=db_url)
    assert second.returncode == 0 and "skipped" in second.stderr and second.stdout == ""
    verbose = atlas("-v", "ingest", "weights", "--family", "tiny", "--overwrite", "--partition-scale", "5.12",
                    db=db_url)
    assert verbose.returncode == 0, verbose.stderr
    assert "claimed weights" in verbose.stderr and "computed and written in" in verbose.stderr  # debug lines
    assert verbose.stdout.startswith("done weights")

    query = "SELECT vocab_class, count(*) FROM neurons GROUP BY 1"
    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")
        counts = dict(sqlite3.connect(path).execute(query).fetchall())
    else:
        from tests.fixtures_db import _libpq
        psql = subprocess.run(["psql", _libpq(db_url), "-Atc", query], capture_output=True, text=True, check=True)
        counts = {line.split("|")[0]: int(line.split("|")[1]) for line in psql.stdout.split()}
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(gpt2)
    assert sum(counts.values()) == config.n_layer * config.n_inner


def test_version():
    result = subprocess.run([sys.executable, "-m", "atlas.cli", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"atlas \S+ \(torch \S+, transformers \S+\)\n", result.stdout), result.stdout


def test_bad_inputs_are_one_line_errors(db_url, tmp_path):
    missing = atlas("model", "add", str(tmp_path / "nope"), "--family", "f", "--seed", "0", db=db_url)
    assert "nope" in one_line_error(missing)
    bert_dir = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert_dir)
    bert = atlas("model", "add", str(bert_dir), "--family", "f", "--seed", "0", db=db_url)
    message = one_line_error(bert)
    assert "bert" in message.lower() and "gpt2" in message
    unknown = atlas("ingest", "weights", "--model", "ghost", db=db_url)
    assert "not registered" in one_line_error(unknown)


def test_unmigrated_postgres_names_the_upgrade_command(empty_db_url):
    if empty_db_url.startswith("sqlite"):
        pytest.skip("the embedded SQLite default upgrades itself")
    result = atlas("model", "list", db=empty_db_url)
    assert "atlas db upgrade" in one_line_error(result)
    upgraded = atlas("db", "upgrade", db=empty_db_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert atlas("model", "list", db=empty_db_url).returncode == 0
