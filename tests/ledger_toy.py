"""A toy ledger unit for tests/test_ledger.py, also runnable as a real `atlas` process:

    python -m tests.ledger_toy toy --model-id 1 --seconds 3 --db URL

Its compute sleeps (long enough for a second process, or a dying database, to meet it), then returns
rows that are written through the ledger like any job's, through the real `atlas.cli.main()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import typer

from atlas.store import Store
from atlas.store.schema import NeuronVocab
from ingest.options import Overwrite
from ingest.runner import JobKey, replace_rows, run_unit


@dataclass
class ToyConfig:
    overwrite: Overwrite = False
    scale: float = 1.0  # a science option


def toy_key(model_id: int) -> JobKey:
    return JobKey("toy", model_id=model_id)


def toy_values(scale: float = 1.0) -> np.ndarray:
    return np.arange(4) * scale


def write_toy(session, model_id: int, values: np.ndarray) -> int:
    return replace_rows(session, NeuronVocab, {"model_id": model_id}, {
        "layer": 0, "neuron": 0, "direction": "top", "rank": np.arange(len(values)), "token_id": 1, "token": "t",
        "value": values})


def run_toy(store: Store, model_id: int, config: ToyConfig = ToyConfig(), seconds: float = 0.0,
            during: Optional[Callable[[], None]] = None) -> str:
    """One toy unit; `during` runs inside compute (a test looking at the ledger mid-job)."""
    def compute() -> np.ndarray:
        time.sleep(seconds)
        if during is not None:
            during()
        return toy_values(config.scale)

    return run_unit(store, toy_key(model_id), config, compute,
                    lambda session, values, _job_id: write_toy(session, model_id, values),
                    overwrite=config.overwrite, label=f"toy model {model_id}")


def _add_toy_command() -> None:
    from atlas import cli

    @cli.app.command("toy")
    def toy(model_id: int = typer.Option(..., "--model-id", help="Registered model id the toy rows are about."),
            seconds: float = typer.Option(0.0, "--seconds", help="How long compute() sleeps."),
            start_at: float = typer.Option(0.0, "--start-at", help="Wall-clock time (epoch s) to claim at, so "
                                                                   "two processes race for the claim."),
            db: Optional[str] = cli.DbOption) -> None:
        """The toy unit through the ledger."""
        store = cli.open_store(db)
        time.sleep(max(0.0, start_at - time.time()))
        run_toy(store, model_id, seconds=seconds)


if __name__ == "__main__":
    _add_toy_command()
    from atlas.cli import main

    main()
