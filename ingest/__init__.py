"""Batch ingest jobs: each module holds a typed config dataclass and `run(config, store)`.

JOBS maps the `atlas ingest <name>` subcommand to (config class, run function); the CLI parses the
config's fields (tyro, help from their docstrings), so a job's options are declared once.
"""

from __future__ import annotations

from typing import Any, Callable

from ingest import activations, correlations, interventions, lens, weights
from ingest import labels
from ingest import entropy
from ingest import attention_roles
from ingest import heads

JOBS: dict[str, tuple[type, Callable[[Any, Any], None]]] = {
    "weights": (weights.WeightsConfig, weights.run),
    "activations": (activations.ActivationsConfig, activations.run),
    "correlations": (correlations.CorrelationsConfig, correlations.run),
    "interventions": (interventions.InterventionsConfig, interventions.run),
    "lens": (lens.LensConfig, lens.run),
    "entropy": (entropy.EntropyConfig, entropy.run),
    "labels": (labels.LabelsConfig, labels.run),
    "attention-roles": (attention_roles.AttentionRolesConfig, attention_roles.run),
    "heads": (heads.HeadsConfig, heads.run),
}
