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
    one covariance accumulator per layer group of a model (no A neurons), shared by the blocks."""

    def __init__(self, blocks: list[Block], device: str | torch.device = "cpu") -> None:
        self.blocks = blocks
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
                                            b_layers=range(block.b_start, block.b_stop), track_gram=False)

    def _gram_accumulator(self, key: tuple[int, int, int], columns: slice,
                          sizes: list[int]) -> SharedCorrelationAccumulator:
        model = self.models[key[0]]
        return SharedCorrelationAccumulator(model, slice(columns.start, columns.start), model, columns, sizes,
                                            b_layers=range(key[1], key[2]), track_gram=True)

    def consume(self, step: PassBatch) -> None:
        shifted = {model_id: columns.update(step.activations[model_id]) for model_id, columns in self.models.items()}
        for block, accumulator in zip(self.blocks, self.pairs):
            accumulator.update_products(shifted[block.a_id][:, block.a_columns], shifted[block.b_id][:, block.b_columns])
        for (model_id, _, _), accumulator in self.grams.items():
            y = shifted[model_id][:, accumulator.columns_b]
            accumulator.update_products(y[:, :0], y)

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
