"""Job options are the fields of a config dataclass, declared once: the CLI parses them (tyro), the
ledger hashes them.

A field's docstring is its --help text (the options every job shares carry theirs as a Doc in their
type). Two markers in a field's type leave it out of the config hash:
TARGET names what to run on; RUN_OPTION changes how, not what, is computed.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated

from typing_extensions import Doc


@dataclasses.dataclass(frozen=True)
class HashMarker:
    """Annotated[...] metadata: the field is not part of the config hash, for the reason named."""

    reason: str


TARGET = HashMarker("target")
RUN_OPTION = HashMarker("run_option")

ModelName = Annotated[str | None, TARGET, Doc("Run on this registered model (name from `atlas model list`).")]
FamilyName = Annotated[str | None, TARGET, Doc("Run on every registered model of this family.")]
DatasetName = Annotated[str | None, TARGET, Doc("Registered dataset to run on (name from `atlas dataset list`).")]
Overwrite = Annotated[bool, RUN_OPTION, Doc("Recompute and replace results that already exist for the same config.")]


@functools.cache
def hashed_fields(config_cls: type) -> tuple[str, ...]:
    """The fields that change results: those marked neither TARGET nor RUN_OPTION."""
    hints = typing.get_type_hints(config_cls, include_extras=True)
    return tuple(f.name for f in dataclasses.fields(config_cls)
                 if not any(isinstance(meta, HashMarker) for meta in getattr(hints[f.name], "__metadata__", ())))
