"""Planning the correlations job: which seed pairs, which blocks of whole layers, which passes.

A pair of seeds {A, B} is one block when its accumulator and both sides' layer covariances fit the memory
budget, else a grid of blocks (a group of A's layers x a group of B's layers, atlas.metrics.correlation.
layer_grid). Blocks are packed into passes over the data whose accumulators fit the budget together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from atlas.errors import AtlasError
from atlas.metrics.correlation import DEFAULT_FLUSH_TOKENS, CorrelationAccumulator, ModelColumns, layer_grid
from atlas.store.schema import Model
from ingest.runner import JobKey
from ingest.token_shards import flush_batches

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
    precision: str  # of the per-batch product (the accumulators' buffers follow it)
    a_n_layers: int  # the models' layer counts (their whole widths share one ModelColumns per pass)
    b_n_layers: int

    @property
    def a_columns(self) -> slice:
        return slice(self.a_start * self.a_d_mlp, self.a_stop * self.a_d_mlp)

    @property
    def b_columns(self) -> slice:
        return slice(self.b_start * self.b_d_mlp, self.b_stop * self.b_d_mlp)

    @property
    def a_width(self) -> int:
        """A's neurons in all (the model's width, not the block's)."""
        return self.a_n_layers * self.a_d_mlp

    @property
    def b_width(self) -> int:
        return self.b_n_layers * self.b_d_mlp

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
        return CorrelationAccumulator.estimate_bytes(sum(self.a_layer_sizes), self.b_layer_sizes, track_gram=False,
                                                     precision=self.precision)


def gram_bytes(layer_sizes: list[int], precision: str = "float32") -> int:
    return CorrelationAccumulator.estimate_bytes(0, layer_sizes, track_gram=True, precision=precision)


def pair_key(a: Model, b: Model, dataset_id: int) -> JobKey:
    return JobKey(KIND, model_id=a.id, dataset_id=dataset_id, other_model_id=b.id)


def model_pass_bytes(width: int, batch_positions: int, precision: str = "float32") -> int:
    """What a model costs a pass besides its blocks: its ModelColumns (vectors and shifted batch buffers)
    and one batch of its activations, held twice by the family pass (every position, and the counted ones)."""
    return ModelColumns.estimate_bytes(width, batch_positions, precision) + 2 * 4 * batch_positions * width


def forward_bytes(d_mlp: int, batch_positions: int) -> int:
    """The forward pass's own temporaries for one batch (one model runs at a time, so a pass counts its
    widest model once): about six hidden-width float32 values a position (GELU's tanh form holds four
    at once, the residual stream and attention a few of width d_model ~ d_mlp / 4). Measured on the
    tiny GPT-2 of bench/correlations.py: 35 MiB at the peak for 4,096 positions, where this counts 48 MiB."""
    return 4 * 6 * d_mlp * batch_positions


def pair_blocks(a: Model, b: Model, dataset_id: int, budget: int, precision: str = "float32",
                batch_positions: int = 0) -> list[Block]:
    """The pair as one block when it fits the budget (with both sides' layer covariances and both models'
    batch buffers), else its shards."""
    models = (sum(model_pass_bytes(m.n_layers * m.d_mlp, batch_positions, precision) for m in (a, b))
              + forward_bytes(max(a.d_mlp, b.d_mlp), batch_positions))
    if models >= budget:
        raise AtlasError(f"--memory-budget of {budget:,} bytes cannot hold one batch of {a.name} and {b.name} "
                         f"({models:,} bytes with their statistics): lower --batch-size or raise the budget")
    grid = layer_grid(a.n_layers, a.d_mlp, b.n_layers, b.d_mlp, budget - models, precision)
    sharded = len(grid) > 1
    blocks = []
    for a_layers, b_layers in grid:
        shard = f"a{a_layers.start}:{a_layers.stop}/b{b_layers.start}:{b_layers.stop}" if sharded else None
        key = dataclasses.replace(pair_key(a, b, dataset_id), shard=shard)
        blocks.append(Block(key, a.id, b.id, a_layers.start, a_layers.stop, a.d_mlp,
                            b_layers.start, b_layers.stop, b.d_mlp, sharded, precision, a.n_layers, b.n_layers))
    return blocks


def pass_bytes(units: list[Block], batch_positions: int) -> int:
    """What a pass of these blocks holds: their accumulators, each layer group's covariances once (shared
    by the blocks of the pass), each model's statistics and batch buffers once, and the temporaries of
    its widest model's forward."""
    grams = {key: (sizes, block.precision) for block in units for key, sizes in block.gram_sizes().items()}
    models = {}
    for block in units:
        models[block.a_id], models[block.b_id] = (block.a_width, block.precision), (block.b_width, block.precision)
    return (sum(block.accumulator_bytes() for block in units)
            + sum(gram_bytes(sizes, precision) for sizes, precision in grams.values())
            + sum(model_pass_bytes(width, batch_positions, precision) for width, precision in models.values())
            + forward_bytes(max(max(block.a_d_mlp, block.b_d_mlp) for block in units), batch_positions))


def flush_every(n_rows: int, batch_size: int, ctx_len: int) -> int:
    """The pass's flush group in batches (the same for a whole pass and for its token shards)."""
    return flush_batches(-(-n_rows // batch_size), batch_size * ctx_len, DEFAULT_FLUSH_TOKENS)


def pack_passes(blocks: list[Block], budget: int, batch_positions: int = 0) -> list[list[Block]]:
    """Greedy packing of blocks into passes whose pass_bytes fit the budget.

    Each block fits alone (pair_blocks counted the rest), so every pass gets one."""
    passes: list[list[Block]] = []
    for block in blocks:
        if passes and pass_bytes(passes[-1] + [block], batch_positions) <= budget:
            passes[-1].append(block)
        else:
            passes.append([block])
    return passes
