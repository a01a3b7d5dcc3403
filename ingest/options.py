"""Job options are the fields of a config dataclass, declared once: the CLI parses them (tyro), the
ledger hashes them.

A field's docstring is its --help text (the options every job shares carry theirs as a Doc in their
type). Two markers in a field's type leave it out of the config hash:
TARGET names what to run on; RUN_OPTION changes how, not what, is computed.
A third, ADDED_OPTION, marks an option added after results existed whose default reproduces them: it
enters the hash only when set to another value, so results already in a database stay done.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Literal

from typing_extensions import Doc


@dataclasses.dataclass(frozen=True)
class HashMarker:
    """Annotated[...] metadata: the field is not part of the config hash, for the reason named."""

    reason: str


TARGET = HashMarker("target")
RUN_OPTION = HashMarker("run_option")
ADDED_OPTION = HashMarker("added_option")

ModelName = Annotated[str | None, TARGET, Doc("Run on this registered model (name from `atlas model list`).")]
FamilyName = Annotated[str | None, TARGET, Doc("Run on every registered model of this family.")]
DatasetName = Annotated[str | None, TARGET, Doc("Registered dataset to run on (name from `atlas dataset list`).")]
Overwrite = Annotated[bool, RUN_OPTION, Doc("Recompute and replace results that already exist for the same config.")]
ModelDtype = Annotated[Literal["float32", "bfloat16", "float16"], ADDED_OPTION,
                       Doc("Dtype of the model's weights and forward pass (statistics are accumulated in float64 "
                           "whatever it is).")]
DeviceName = Annotated[str, RUN_OPTION, Doc("Torch device of the models and the accumulators: auto (cuda if "
                                            "available, else mps, else cpu), cpu, cuda, cuda:N or mps.")]


@functools.cache
def hashed_fields(config_cls: type) -> tuple[str, ...]:
    """The fields that change results: those marked neither TARGET nor RUN_OPTION (ADDED_OPTION fields
    count only where they differ from their default: see hashed_values)."""
    hints = typing.get_type_hints(config_cls, include_extras=True)
    return tuple(f.name for f in dataclasses.fields(config_cls)
                 if not ({TARGET, RUN_OPTION} & set(_markers(hints[f.name]))))


def hashed_values(config: object) -> dict[str, object]:
    """The config's values that change results, by field name, for the config hash."""
    cls = type(config)
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {name: getattr(config, name) for name in hashed_fields(cls)
            if ADDED_OPTION not in _markers(hints[name]) or getattr(config, name) != defaults[name]}


def _markers(hint: object) -> tuple[HashMarker, ...]:
    return tuple(meta for meta in getattr(hint, "__metadata__", ()) if isinstance(meta, HashMarker))

# Scale-out: the same options on every job that can cut its pass into token shards and run them on Ray.
TokenShards = Annotated[int, RUN_OPTION, Doc(
    "Cut the pass over the dataset into this many ranges of tokens, each a unit of work recorded in the ledger; "
    "their states merge exactly into the rows one pass would give. With --executor ray they run in parallel.")]
ExecutorName = Annotated[Literal["local", "ray"], RUN_OPTION, Doc(
    "Where the units run: local (this process, one after another) or ray (a Ray task each, with retries; "
    "pip install 'neuron-atlas[ray]').")]
RayAddress = Annotated[str | None, RUN_OPTION, Doc(
    "The Ray cluster to run on: auto (the one `ray start --head` started on this machine) or HOST:PORT of its "
    "head; default: start Ray on this machine for this run.")]
GpusPerTask = Annotated[float | None, RUN_OPTION, Doc(
    "GPUs each Ray task takes (default: 1 when the cluster has GPUs, else 0).")]
CpusPerTask = Annotated[float, RUN_OPTION, Doc("CPUs each Ray task takes (its torch threads follow it).")]
ShardDir = Annotated[str | None, RUN_OPTION, Doc(
    "Directory for the units' saved states and checkpoints, and a copy of the token rows: every worker and the "
    "driver must reach it (a shared filesystem on a cluster of several machines). Default: the cache's shards/.")]
