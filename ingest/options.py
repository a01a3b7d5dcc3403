"""Job options are dataclass fields; their metadata drives the CLI and what the ledger records.

metadata keys: help (the --help text), target (names what to run on: not part of the config hash),
run_option (changes how, not what, is computed: not part of the config hash).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, *, target: bool = False, run_option: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "target": target, "run_option": run_option})


MODEL_OR_FAMILY = {
    "model": lambda: option(None, "Run on this registered model (name from `atlas model list`).", target=True),
    "family": lambda: option(None, "Run on every registered model of this family.", target=True),
}


def DATASET() -> Any:  # noqa: N802 (reads like the constants above)
    return option(None, "Registered dataset to run on (name from `atlas dataset list`).", target=True)


def OVERWRITE() -> Any:  # noqa: N802
    return option(False, "Recompute and replace results that already exist for the same config.", run_option=True)
