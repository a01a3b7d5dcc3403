"""What to run next when the database lacks what a page shows: the CLI command, never a stack trace.

The commands live here only, so a change to the CLI is one edit.
"""

from __future__ import annotations

import streamlit as st

NEXT_COMMANDS: dict[str, str] = {
    "demo": "atlas demo",
    "weights": "atlas ingest weights --family {family}",
    "activations": "atlas ingest activations --family {family} --dataset {dataset}",
    "correlations": "atlas ingest correlations --family {family} --dataset {dataset}",
    "interventions": "atlas ingest interventions --family {family} --dataset {dataset}",
    "lens": "atlas ingest lens --family {family} --dataset {dataset}",
    "labels": "atlas ingest labels --family {family} --dataset {dataset}",
    "entropy": "atlas ingest entropy --family {family} --dataset {dataset}",
    "attention-roles": "atlas ingest attention-roles --family {family} --dataset {dataset}",
    "heads": "atlas ingest heads --family {family} --dataset {dataset}",
    "ensembling": "atlas study ensembling --family {family} --dataset {dataset} --feature ends_with_ing",
    "train": "atlas train-seeds --family {family} --seeds 0 1 2 --dataset {dataset}",
}


def next_command(step: str, family: str | None = None, dataset: str | None = None) -> str:
    return NEXT_COMMANDS[step].format(family=family or "F", dataset=dataset or "D")


def show_missing(missing: str, *steps: str, family: str | None = None, dataset: str | None = None) -> None:
    """An info box: what is missing, and the command(s) that fill it."""
    commands = "\n".join(next_command(step, family, dataset) for step in steps)
    st.info(f"{missing}. Run:", icon=":material/terminal:")
    st.code(commands, language="bash")


def show_empty_database() -> None:
    show_missing(
        "The database has no models yet: ingest a family of models (one per seed), or build the demo",
        "weights", "demo",
    )
