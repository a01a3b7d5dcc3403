"""Planning the correlations job: which seed pairs, which blocks of whole layers, which passes.

A pair of seeds {A, B} is one block when its accumulator and both sides' layer covariances fit the memory
budget, else a grid of blocks (a group of A's layers x a group of B's layers, atlas.metrics.correlation.
layer_grid). Blocks are packed into passes over the data whose accumulators fit the budget together.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlas.metrics.correlation import CorrelationAccumulator, layer_grid
from atlas.store.schema import Model
from ingest.runner import JobKey

KIND = "correlations"


def same_step_pairs(models: list[Model]) -> list[tuple[Model, Model]]:
    """Unordered pairs {A, B} (A the lower id) of different seeds at the same training step: checkpoints
    are compared step by step; a model without a step pairs with the others without one. One
    accumulator per pair gives both directions, so k seeds need k(k-1)/2 of them."""
    return [(a, b) for a in models for b in models if a.id < b.id and a.step == b.step]


# -- planning -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One unit of work: A's whole layers [a_start, a_stop) against B's whole layers [b_start, b_stop).

    Its accumulator gives both directions: A's neurons against these B layers (rows) and B's against
    these A layers (columns)."""

    key: JobKey
    a_id: int
    b_id: int
    a_start: int
    a_stop: int
    a_d_mlp: int
    b_start: int
    b_stop: int
    b_d_mlp: int
    sharded: bool  # False: the block is the whole pair and writes its rows directly
    precision: str = "float32"  # of the per-batch product (the accumulators' buffers follow it)

    @property
    def a_columns(self) -> slice:
        return slice(self.a_start * self.a_d_mlp, self.a_stop * self.a_d_mlp)

    @property
    def b_columns(self) -> slice:
        return slice(self.b_start * self.b_d_mlp, self.b_stop * self.b_d_mlp)

    @property
    def a_layer_sizes(self) -> list[int]:
        return [self.a_d_mlp] * (self.a_stop - self.a_start)

    @property
    def b_layer_sizes(self) -> list[int]:
        return [self.b_d_mlp] * (self.b_stop - self.b_start)

    @property
    def a_gram_key(self) -> tuple[int, int, int]:
        return self.a_id, self.a_start, self.a_stop

    @property
    def b_gram_key(self) -> tuple[int, int, int]:
        return self.b_id, self.b_start, self.b_stop

    def gram_sizes(self) -> dict[tuple[int, int, int], list[int]]:
        return {self.a_gram_key: self.a_layer_sizes, self.b_gram_key: self.b_layer_sizes}

    def accumulator_bytes(self) -> int:
        return CorrelationAccumulator.estimate_bytes(self.a_stop * self.a_d_mlp - self.a_start * self.a_d_mlp,
                                                     self.b_layer_sizes, track_gram=False, precision=self.precision)


def gram_bytes(layer_sizes: list[int], precision: str = "float32") -> int:
    return CorrelationAccumulator.estimate_bytes(0, layer_sizes, track_gram=True, precision=precision)


def pair_key(a: Model, b: Model, dataset_id: int) -> JobKey:
    return JobKey(KIND, model_id=a.id, dataset_id=dataset_id, other_model_id=b.id)


def pair_blocks(a: Model, b: Model, dataset_id: int, budget: int, precision: str = "float32") -> list[Block]:
    """The pair as one block when it fits the budget (with both sides' layer covariances), else its shards."""
    grid = layer_grid(a.n_layers, a.d_mlp, b.n_layers, b.d_mlp, budget, precision)
    sharded = len(grid) > 1
    blocks = []
    for a_layers, b_layers in grid:
        shard = f"a{a_layers.start}:{a_layers.stop}/b{b_layers.start}:{b_layers.stop}" if sharded else None
        key = JobKey(KIND, model_id=a.id, dataset_id=dataset_id, other_model_id=b.id, shard=shard)
        blocks.append(Block(key, a.id, b.id, a_layers.start, a_layers.stop, a.d_mlp,
                            b_layers.start, b_layers.stop, b.d_mlp, sharded, precision))
    return blocks


def pack_passes(blocks: list[Block], budget: int) -> list[list[Block]]:
    """Greedy packing of blocks into passes whose accumulators and layer covariances fit the budget together
    (a covariance shared by several blocks of a pass counts once).

    Each block fits alone (layer_grid counted both sides' covariances), so every pass gets one."""
    passes: list[list[Block]] = []
    current: list[Block] = []
    used, grams = 0, set()

    def extra_bytes(block: Block, held: set) -> int:
        new = {key: sizes for key, sizes in block.gram_sizes().items() if key not in held}
        return block.accumulator_bytes() + sum(gram_bytes(sizes, block.precision) for sizes in new.values())

    for block in blocks:
        extra = extra_bytes(block, grams)
        if current and used + extra > budget:
            passes.append(current)
            current, used, grams = [], 0, set()
            extra = extra_bytes(block, grams)
        current.append(block)
        used += extra
        grams.update(block.gram_sizes())
    if current:
        passes.append(current)
    return passes
