"""The correlations job's consumer of a family pass: the block accumulators and the layer covariances,
on the job's device, and both directions' maxima and baselines at the end."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from atlas.errors import AtlasError
from atlas.metrics.correlation import (
    ModelColumns,
    SharedCorrelationAccumulator,
    TransposedView,
    max_correlations,
    rotated_baseline_max,
)
from ingest.correlation_plan import Block
from ingest.family_pass import PassBatch
from ingest.runner import JobKey


class CorrelationConsumer:
    """A family-pass consumer. Each model's shift, sums and extremes are computed once per batch
    (ModelColumns) and shared by the accumulators it takes part in: one per block (products only) and
    one covariance accumulator per layer group of a model (no A neurons), shared by the blocks.

    The float32 partial products are added into float64 after every `flush_every` batches, counted from
    the stream's first batch: a token shard that starts at a multiple of flush_every groups its batches
    exactly as the whole pass does, so shards merge by addition into the unsharded sums (to float64
    rounding), and checkpoints wait for such a boundary so that a resumed pass is bit-identical."""

    def __init__(self, blocks: list[Block], device: str | torch.device = "cpu", flush_every: int = 1) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1 batch, got {flush_every}")
        self.blocks, self.flush_every = blocks, flush_every
        self.device = torch.device(device)  # every accumulator lives beside the activations
        self.precision = blocks[0].precision if blocks else "float32"
        self.widths = {block.a_id: block.a_width for block in blocks} | {block.b_id: block.b_width for block in blocks}
        self.models = {model_id: ModelColumns(width, self.device, self.precision)
                       for model_id, width in self.widths.items()}
        self.pairs = [self._pair_accumulator(block) for block in blocks]
        self.grams: dict[tuple[int, int, int], SharedCorrelationAccumulator] = {}
        for block in blocks:
            for key, columns, sizes in ((block.a_gram_key, block.a_columns, block.a_layer_sizes),
                                        (block.b_gram_key, block.b_columns, block.b_layer_sizes)):
                if key not in self.grams:
                    self.grams[key] = self._gram_accumulator(key, columns, sizes)

    def _pair_accumulator(self, block: Block) -> SharedCorrelationAccumulator:
        return SharedCorrelationAccumulator(self.models[block.a_id], block.a_columns, self.models[block.b_id],
                                            block.b_columns, block.b_layer_sizes,
                                            b_layers=range(block.b_start, block.b_stop), track_gram=False,
                                            flush_tokens=None)

    def _gram_accumulator(self, key: tuple[int, int, int], columns: slice,
                          sizes: list[int]) -> SharedCorrelationAccumulator:
        model = self.models[key[0]]
        return SharedCorrelationAccumulator(model, slice(columns.start, columns.start), model, columns, sizes,
                                            b_layers=range(key[1], key[2]), track_gram=True, flush_tokens=None)

    def _accumulators(self) -> list[SharedCorrelationAccumulator]:
        return [*self.pairs, *self.grams.values()]

    def consume(self, step: PassBatch) -> None:
        shifted = {model_id: columns.update(step.activations[model_id]) for model_id, columns in self.models.items()}
        for block, accumulator in zip(self.blocks, self.pairs):
            accumulator.update_products(shifted[block.a_id][:, block.a_columns], shifted[block.b_id][:, block.b_columns])
        for (model_id, _, _), accumulator in self.grams.items():
            y = shifted[model_id][:, accumulator.columns_b]
            accumulator.update_products(y[:, :0], y)
        if (step.index + 1) % self.flush_every == 0:
            for accumulator in self._accumulators():
                accumulator.flush()

    def ready_to_checkpoint(self, next_batch: int) -> bool:
        """Checkpoints only where the pass flushes: saving flushes, and elsewhere that would regroup the sums."""
        return next_batch % self.flush_every == 0

    def prime(self, step: PassBatch) -> bool:
        """Take every model's shift from this batch (the stream's first) without counting it; True once all
        are set. A token shard that does not start the stream primes first, so that all shards share them."""
        return all([columns.prime(step.activations[model_id]) for model_id, columns in self.models.items()])

    def merge(self, other: CorrelationConsumer) -> None:
        """Fold in the consumer of another token shard of the same blocks (sums and products add)."""
        if [block.key for block in other.blocks] != [block.key for block in self.blocks]:
            raise ValueError("cannot merge consumers of different blocks")
        for model_id, columns in self.models.items():
            columns.merge(other.models[model_id])
        for mine, theirs in zip(self._accumulators(), other._accumulators(), strict=True):
            mine.merge_products(theirs)

    def state_dict(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for model_id, columns in self.models.items():
            state.update({f"model{model_id}/{k}": v for k, v in columns.state_dict().items()})
        for index, accumulator in enumerate(self.pairs):
            state.update({f"pair{index}/{k}": v for k, v in accumulator.state_dict().items()})
        for index, accumulator in enumerate(self.grams.values()):
            state.update({f"gram{index}/{k}": v for k, v in accumulator.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        for model_id, columns in self.models.items():  # in place: the accumulators hold these objects
            columns.load_state_dict(part(f"model{model_id}/"))
        for index, accumulator in enumerate(self.pairs):
            accumulator.load_products(part(f"pair{index}/"))
        for index, accumulator in enumerate(self.grams.values()):
            accumulator.load_products(part(f"gram{index}/"))

    def results(self, baseline_seed: int) -> dict[JobKey, dict[str, np.ndarray]]:
        """Per block, both directions: a_* for A's neurons against B's layers, b_* for B's against A's
        (max_corr, partner_layer / partner_neuron (-1: none), baseline_max_corr per neuron)."""
        if any(accumulator.n == 0 for accumulator in self.pairs):
            raise AtlasError("the dataset holds no token positions for statistics (only special tokens?): "
                             "register a dataset with more text")
        # each layer group's covariances once, whatever the number of blocks that rotate it
        covariances = {key: [gram.layer_covariance(i) for i in range(len(gram.layer_sizes_b))]
                       for key, gram in self.grams.items()}
        results = {}
        for block, accumulator in zip(self.blocks, self.pairs):
            transposed = TransposedView(accumulator, block.a_layer_sizes, range(block.a_start, block.a_stop))
            results[block.key] = {
                **self._direction("a", accumulator, covariances[block.b_gram_key], baseline_seed),
                **self._direction("b", transposed, covariances[block.a_gram_key], baseline_seed),
            }
        return results

    @staticmethod
    def _direction(side: str, rows_against_columns, covariances: list[np.ndarray],
                   baseline_seed: int) -> dict[str, np.ndarray]:
        """The rows' maxima over the columns' neurons, their partners, and the baseline with the columns'
        layers rotated (their covariances given)."""
        best, column = max_correlations(rows_against_columns)
        partner_layer, partner_neuron = rows_against_columns.locate(column)
        baseline, _ = rotated_baseline_max(rows_against_columns, baseline_seed, layer_covariances=covariances)
        return {f"{side}_max_corr": best, f"{side}_partner_layer": partner_layer,
                f"{side}_partner_neuron": partner_neuron, f"{side}_baseline_max_corr": baseline}
