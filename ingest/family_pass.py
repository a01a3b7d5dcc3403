"""One streaming pass of a family of models over a tokenized dataset, feeding pluggable consumers.

Every model sees the same batches and runs once per batch; each consumer (activation statistics,
cross-seed correlations, ...) receives a PassBatch per batch with every model's neuron activations.
The pass checkpoints its consumers' states every so often; a rerun with the same checkpoint key
resumes after the last checkpointed batch and, since every consumer's state is saved exactly
(float64 / int64 arrays) and batches are fixed, ends with exactly the state of an uninterrupted pass.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import numpy as np
import torch

from atlas.data import Batch, TokenizedDataset
from atlas.data.cache import cache_dir, stable_hash
from atlas.devices import release_free_host_memory
from atlas.metrics._arrays import reused_buffer
from ingest.progress import RateColumn, progress_bar

if TYPE_CHECKING:  # transformers is slow to import: the CLI imports this module at start-up
    from atlas.modeling import LoadedModel

CHECKPOINT_FORMAT = 1
log = logging.getLogger(__name__)


@dataclass
class PassBatch:
    """What consumers see for one batch. Feature f of a model is neuron f % d_mlp of layer f // d_mlp.
    The activation tensors live in buffers the pass reuses: a consumer that keeps them past its consume
    call copies them."""

    index: int                               # batch number within the pass
    batch: Batch                             # token ids, masks, dataset rows, document indices (on CPU)
    stat_rows: torch.Tensor                  # long [n]: index of the stat position's row within the batch
    stat_positions: torch.Tensor             # long [n]: its position within the row
    keys: torch.Tensor                       # long [n]: dataset row * ctx_len + position, increasing
    activations: dict[int, torch.Tensor]     # model id -> [n, n_layers * d_mlp] at the stat positions
    all_positions: dict[int, torch.Tensor]   # model id -> [b, L, n_layers * d_mlp], every position

    @property
    def n_positions(self) -> int:
        return int(self.keys.shape[0])


class Consumer(Protocol):
    """Anything that accumulates over the pass and can save and restore its state exactly.

    Optional methods: prime(step) -> bool takes what the stream's first batch fixes (a shift) without
    counting it, for a token shard that starts later; ready_to_checkpoint(next_batch) -> bool says where a
    checkpoint keeps the state bit-identical to an uninterrupted pass (default: anywhere)."""

    def consume(self, step: PassBatch) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None: ...


@dataclass
class PassModel:
    model_id: int
    loaded: LoadedModel


class Checkpoint:
    """The consumers' states and the next batch index in one .npz file, replaced atomically."""

    def __init__(self, key_payload: dict, every_batches: int = 50, every_seconds: float = 60.0,
                 directory: Path | None = None) -> None:
        self.key = stable_hash({"format": CHECKPOINT_FORMAT, **key_payload}, length=32)
        self.path = (directory or cache_dir("checkpoints")) / f"{self.key}.npz"
        self.every_batches, self.every_seconds = every_batches, every_seconds
        self._last_save = time.monotonic()
        self._saved_at = 0  # the pass's next batch at the last save (or where this run started)

    def begin(self, first_batch: int) -> None:
        """The run feeds batches from first_batch on: count the batches for `due` from there."""
        self._saved_at, self._last_save = first_batch, time.monotonic()

    def due(self, next_batch: int) -> bool:
        """A save is due once every_batches batches or every_seconds seconds have passed since the last one
        (it stays due until saved: a consumer may ask to wait for its next boundary)."""
        by_count = self.every_batches > 0 and next_batch - self._saved_at >= self.every_batches
        by_time = self.every_seconds > 0 and time.monotonic() - self._last_save >= self.every_seconds
        return by_count or by_time

    def save(self, next_batch: int, consumers: Mapping[str, Consumer]) -> None:
        arrays = {"__next_batch__": np.array(next_batch, dtype=np.int64), "__key__": np.array(self.key)}
        for name, consumer in consumers.items():
            arrays.update({f"{name}/{key}": value for key, value in consumer.state_dict().items()})
        staging = self.path.with_suffix(f".{os.getpid()}.tmp.npz")
        with open(staging, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, self.path)  # a kill mid-write leaves the previous checkpoint intact
        self._last_save = time.monotonic()
        self._saved_at = next_batch

    def load(self, consumers: Mapping[str, Consumer]) -> int:
        """Restore the consumers; returns the batch to start from (0 without a checkpoint)."""
        if not self.path.exists():
            return 0
        with np.load(self.path) as saved:
            if str(saved["__key__"]) != self.key:
                return 0
            for name, consumer in consumers.items():
                prefix = f"{name}/"
                consumer.load_state_dict({k[len(prefix):]: saved[k] for k in saved.files if k.startswith(prefix)})
            return int(saved["__next_batch__"])

    def delete(self) -> None:
        """Remove the checkpoint and any staging file a killed writer left half-written."""
        self.path.unlink(missing_ok=True)
        for stale in self.path.parent.glob(f"{self.key}.*.tmp.npz"):
            stale.unlink(missing_ok=True)


def model_activations(loaded: LoadedModel, batch: Batch, device: torch.device,
                      buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[b, L, n_layers * d_mlp] neuron activations of one batch (float32), written into a buffer of
    `buffers` when given (overwritten by the next batch), else into a new tensor."""
    from atlas.modeling import capture_neuron_activations

    adapter, model = loaded.adapter, loaded.model
    b, length = batch.input_ids.shape
    shape = (b, length, adapter.n_layers(model), adapter.d_mlp(model))
    out = None if buffers is None else reused_buffer(buffers, "all_positions", shape, device, model.dtype)
    acts = capture_neuron_activations(loaded, batch.input_ids.to(device), batch.attention_mask.to(device), out=out)
    return acts.reshape(b, length, shape[2] * shape[3]).float()


def run_family_pass(
    models: Sequence[PassModel],
    dataset: TokenizedDataset,
    consumers: Mapping[str, Consumer],
    *,
    batch_size: int,
    n_rows: int,
    stat_positions: str = "non_special",
    checkpoint: Checkpoint | None = None,
    device: str = "cpu",
    label: str = "pass",
    batches: range | None = None,
    show_progress: bool = True,
    release_memory: bool = False,
) -> None:
    """Feed every batch of the first n_rows rows, with every model's activations, to every consumer.

    stat_positions: "non_special" (exclude BOS/EOS/pad and every other special token) or "all"
    (every real token; padding is never a position).
    batches: the indices of the batches to feed (a token shard of the pass; default: all of them). A
    range that starts later first primes the consumers with the stream's first batch.
    release_memory: after each batch, return the allocator's free host pages to the OS (for a job that
    keeps to a memory budget on the CPU; a few ms a batch).
    """
    target = torch.device(device)
    n_batches = -(-n_rows // batch_size)
    batches = range(n_batches) if batches is None else range(batches.start, min(batches.stop, n_batches))
    restored = checkpoint.load(consumers) if checkpoint else 0
    first_batch = max(batches.start, restored)
    if first_batch == batches.start and batches.start > 0:
        _prime(models, dataset, consumers, batch_size, n_rows, stat_positions, target)
    rows = slice(batches.start * batch_size, min(batches.stop * batch_size, n_rows))
    n_tokens = int(dataset.lengths[rows].sum())
    done_tokens = int(dataset.lengths[rows.start: min(first_batch * batch_size, rows.stop)].sum())
    if checkpoint is not None:
        checkpoint.begin(first_batch)
    if first_batch > batches.start:
        log.info(f"resuming {label} from its checkpoint: {done_tokens:,} of {n_tokens:,} tokens "
                 f"already done ({checkpoint.path})")
    ready = [getattr(consumer, "ready_to_checkpoint", None) for consumer in consumers.values()]
    buffers: dict[int, dict[str, torch.Tensor]] = {model.model_id: {} for model in models}
    with progress_bar(RateColumn("tokens")) as bar:
        task = bar.add_task(label, total=n_tokens, completed=done_tokens, visible=show_progress)
        stream = dataset.batches(batch_size, first_batch=first_batch, n_rows=min(rows.stop, n_rows))
        for offset, batch in enumerate(stream):
            index = first_batch + offset
            step = _pass_batch(index, batch, models, dataset.ctx_len, stat_positions, target, buffers)
            for consumer in consumers.values():
                consumer.consume(step)
            if release_memory and target.type == "cpu":
                release_free_host_memory()
            bar.advance(task, int(batch.lengths.sum()))
            if (checkpoint is not None and checkpoint.due(index + 1)
                    and all(check(index + 1) for check in ready if check is not None)):
                checkpoint.save(index + 1, consumers)


def _prime(models: Sequence[PassModel], dataset: TokenizedDataset, consumers: Mapping[str, Consumer],
           batch_size: int, n_rows: int, stat_positions: str, device: torch.device) -> None:
    """Show the stream's first batches to the consumers that take a shift from them, until all have it."""
    priming = [consumer for consumer in consumers.values() if hasattr(consumer, "prime")]
    for index, batch in enumerate(dataset.batches(batch_size, n_rows=n_rows)):
        if not priming:
            return
        step = _pass_batch(index, batch, models, dataset.ctx_len, stat_positions, device)
        priming = [consumer for consumer in priming if not consumer.prime(step)]


def _pass_batch(index: int, batch: Batch, models: Sequence[PassModel], ctx_len: int, stat_positions: str,
                device: torch.device, buffers: dict[int, dict[str, torch.Tensor]] | None = None) -> PassBatch:
    """The batch's activations; in `buffers` (per model) when given, else in new tensors."""
    mask = batch.stat_mask if stat_positions == "non_special" else batch.attention_mask.bool()
    rows, positions = mask.nonzero(as_tuple=True)
    keys = batch.row_indices[rows] * ctx_len + positions
    flat = (rows * mask.shape[1] + positions).to(device)  # the stat positions among all of the batch's
    all_positions, activations = {}, {}
    with torch.inference_mode():
        for model in models:
            mine = None if buffers is None else buffers[model.model_id]
            acts = model_activations(model.loaded, batch, device, mine)
            all_positions[model.model_id] = acts
            every = acts.view(-1, acts.shape[-1])
            out = None if mine is None else reused_buffer(mine, "stat_positions", (flat.shape[0], every.shape[1]),
                                                          every.device, every.dtype)
            activations[model.model_id] = torch.index_select(every, 0, flat, out=out)
    return PassBatch(index, batch, rows, positions, keys, activations, all_positions)
