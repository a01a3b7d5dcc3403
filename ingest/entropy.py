"""Job `entropy`: entropy neurons (Gurnee et al. 2024 section 5.3), found in the weights and tested by intervention.

Candidates: the top --candidates neurons of the last two layers by null_frac x ||w_out|| (processed
weights: the share of the write in the bottom singular directions of the processed unembedding, times
its size), plus any --neurons. One ledger unit per (model, dataset), two passes over the dataset:

1. observe: each candidate's min, max and mean activation over the counted positions (the SPEC's
   statistics positions: every real non-special token), and the untouched model's entropy, loss and
   final-norm scale at the scored positions (ingest/next_token.py: positions with a next token).
2. intervene: per batch the untouched residual stream is computed once; for a candidate of layer l the
   blocks l..L-1 are rerun from it (modeling.final_residual) with a pre-hook on the down-projection
   that sets the neuron's activation to v at the scored positions only, for several values v at once
   (the batch repeated, one copy per value). The last block's output is the final norm's input: its
   sigma gives the norm scale and unembed(final_norm(.)) at the scored positions the model's logits.

Grid per candidate: 0, its dataset mean, and --grid-size values from min(observed min, 0) to
2 x observed max, sorted by value. Means are float64 sums over the positions; d_* = value - untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from sqlalchemy.orm import Session

from atlas.devices import model_dtype, resolve_device
from atlas.errors import AtlasError
from atlas.metrics.entropy import DEFAULT_GRID_SIZE, DEFAULT_NULL_SPACE_FRACTION, GridValue
from atlas.metrics.layers import MeanAccumulator
from atlas.registry import resolve_models
from atlas.store import Store
from atlas.store.schema import Dataset, EntropyIntervention, Model
from ingest.next_token import (NextTokenConfig, check_options as check_next_token_options, open_tokens,
                               require_positions, run_per_model, scored_batches)
from ingest.options import RUN_OPTION
from ingest.runner import replace_rows
from ingest.weights import check_null_space_fraction, null_space

KIND = "entropy"
UNTOUCHED = "untouched"
Neuron = tuple[int, int]  # (layer, neuron)
_NEURON = re.compile(r"^\s*(\d+)\.(\d+)\s*$")


@dataclass
class EntropyConfig(NextTokenConfig):
    """Entropy neurons: null-space fraction candidates, and the mean next-token entropy, loss and final-norm
    scale with each candidate's activation fixed to values on a grid (and their change from the untouched model)."""

    candidates: int = 4
    """The top N of the last two layers by null_frac x ||w_out|| (processed weights)."""
    neurons: str | None = None
    """Extra neurons to intervene on, as LAYER.NEURON,LAYER.NEURON (e.g. 11.3030,11.2859)."""
    null_space_fraction: float = DEFAULT_NULL_SPACE_FRACTION
    """The effective null space of the unembedding: its bottom max(1, round(FRACTION x d_model)) singular directions."""
    grid_size: int = DEFAULT_GRID_SIZE
    """Evenly spaced values from min(observed min, 0) to 2 x observed max (besides 0 and the dataset mean)."""
    values_per_pass: Annotated[int, RUN_OPTION] = 10
    """Grid values run together in one forward pass (the batch repeated once per value): lower it on low memory."""


def parse_neurons(text: str | None) -> list[Neuron]:
    """'11.3030,11.2859' -> [(11, 3030), (11, 2859)] (duplicates dropped, order kept)."""
    if not text:
        return []
    neurons: list[Neuron] = []
    for entry in text.split(","):
        match = _NEURON.match(entry)
        if not match:
            raise AtlasError(f"--neurons entry {entry.strip()!r} is not LAYER.NEURON: write e.g. 11.3030,11.2859")
        neuron = (int(match[1]), int(match[2]))
        if neuron not in neurons:
            neurons.append(neuron)
    return neurons


def check_neurons_fit(neurons: list[Neuron], model_row: Model) -> None:
    for layer, neuron in neurons:
        if layer >= model_row.n_layers or neuron >= model_row.d_mlp:
            raise AtlasError(f"--neurons {layer}.{neuron} is not in {model_row.name} ({model_row.n_layers} layers of "
                             f"{model_row.d_mlp} neurons): pick layers 0..{model_row.n_layers - 1}, neurons "
                             f"0..{model_row.d_mlp - 1}")


def check_options(config: EntropyConfig) -> list[Neuron]:
    check_next_token_options(config.tokens, config.batch_size)
    check_null_space_fraction(config.null_space_fraction)
    if config.candidates < 0:
        raise AtlasError(f"--candidates must be at least 0, got {config.candidates}")
    if config.grid_size < 2:
        raise AtlasError(f"--grid-size must be at least 2, got {config.grid_size}")
    if config.values_per_pass < 1:
        raise AtlasError(f"--values-per-pass must be at least 1, got {config.values_per_pass}")
    neurons = parse_neurons(config.neurons)
    if config.candidates == 0 and not neurons:
        raise AtlasError("nothing to intervene on: set --candidates above 0 or name --neurons")
    return neurons


# -- candidates (weights only) ---------------------------------------------------------------------

def choose_neurons(loaded, config: EntropyConfig) -> list[Neuron]:
    """The top --candidates of the last two layers by null_frac x ||w_out|| (processed), then --neurons."""
    from atlas.metrics.entropy import candidate_scores, top_candidates
    from atlas.metrics.weights import process_w_out

    adapter, model = loaded.adapter, loaded.model
    basis = null_space(loaded, config.null_space_fraction)
    blocks = adapter.blocks(model)
    center = adapter.final_norm_kind == "layernorm"
    scores = {layer: candidate_scores(process_w_out(adapter.w_out(blocks[layer]), center=center), basis)
              for layer in range(max(0, len(blocks) - 2), len(blocks))}
    chosen = top_candidates(scores, config.candidates)
    return chosen + [n for n in parse_neurons(config.neurons) if n not in chosen]


# -- pass 1: activation range and the untouched model ---------------------------------------------

def observe(loaded, batches, neurons: list[Neuron]):
    """(ActivationRange of the neurons, in their order, over counted positions; MeanAccumulator of the untouched
    model's per-position metrics under UNTOUCHED)."""
    from atlas.metrics.entropy import ActivationRange, intervention_metrics
    from atlas.modeling import run_to_last_block

    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.blocks(model)
    activations = ActivationRange(len(neurons))
    sums = MeanAccumulator()
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int, columns: list[int]):
        def record(module, args):
            captured[layer] = args[0][..., columns]
        return record

    by_layer = _by_layer(neurons)
    with torch.inference_mode():
        for batch in batches:
            handles = [adapter.down_proj(blocks[layer]).register_forward_pre_hook(capture(layer, columns))
                       for layer, columns in by_layer.items()]
            try:
                with adapter.capture_residual_stream(model) as states:
                    run_to_last_block(loaded, batch.input_ids, batch.attention_mask)
            finally:
                for handle in handles:
                    handle.remove()
            values = torch.stack([captured[layer][..., by_layer[layer].index(neuron)]
                                  for layer, neuron in neurons], dim=-1)
            activations.add(values[batch.counted])
            final = states[-1][batch.positions]
            sums.add(UNTOUCHED, intervention_metrics(adapter.logits_from_residual(model, final), batch.targets,
                                                     adapter.final_norm_sigma(model, final)))
    return activations, sums


def _by_layer(neurons: list[Neuron]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        grouped.setdefault(layer, []).append(neuron)
    return grouped


# -- pass 2: interventions -------------------------------------------------------------------------

def set_activation(neuron: int, positions: torch.Tensor, row_values: torch.Tensor):
    """A forward pre-hook on a down-projection: the neuron's activation becomes row_values[row] at `positions`
    (bool [rows, T]) and stays what the model computed elsewhere."""
    def replace(module, args):
        activation = args[0].clone()
        column = activation[..., neuron]
        activation[..., neuron] = torch.where(positions, row_values[:, None].to(activation.dtype), column)
        return (activation, *args[1:])

    return replace


def intervene(loaded, batches, grids: dict[Neuron, list[GridValue]], values_per_pass: int) -> MeanAccumulator:
    """Per-position metrics with each neuron's activation set to each grid value, under ((layer, neuron), step)."""
    from atlas.metrics.entropy import intervention_metrics
    from atlas.modeling import final_residual, run_to_last_block

    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.blocks(model)
    n_layers = len(blocks)
    sums = MeanAccumulator()
    with torch.inference_mode():
        for batch in batches:
            with adapter.capture_residual_stream(model) as states:
                run_to_last_block(loaded, batch.input_ids, batch.attention_mask)
            n = batch.n_positions
            for (layer, neuron), grid in grids.items():
                for first in range(0, len(grid), values_per_pass):
                    steps = range(first, min(first + values_per_pass, len(grid)))
                    copies = len(steps)
                    values = torch.tensor([grid[s].value for s in steps], device=batch.input_ids.device)
                    rows = batch.input_ids.shape[0]
                    positions = batch.positions.repeat(copies, 1)
                    hook = set_activation(neuron, positions, values.repeat_interleave(rows))
                    handle = adapter.down_proj(blocks[layer]).register_forward_pre_hook(hook)
                    try:
                        final = final_residual(loaded, batch.input_ids.repeat(copies, 1),
                                               batch.attention_mask.repeat(copies, 1), range(layer, n_layers),
                                               states[layer].repeat(copies, 1, 1))
                    finally:
                        handle.remove()
                    scored = final[positions]  # copy by copy: the batch's scored positions, in row-major order
                    for copy, step in enumerate(steps):
                        hidden = scored[copy * n:(copy + 1) * n]
                        sums.add(((layer, neuron), step), intervention_metrics(
                            adapter.logits_from_residual(model, hidden), batch.targets,
                            adapter.final_norm_sigma(model, hidden)))
            del states
    return sums


# -- rows --------------------------------------------------------------------------------------------

METRICS = ("entropy", "loss", "norm_scale")


def rows(grids: dict[Neuron, list[GridValue]], sums: MeanAccumulator, base: MeanAccumulator) -> dict[str, list[Any]]:
    untouched = {name: base.mean(UNTOUCHED, name) for name in METRICS}
    columns: dict[str, list[Any]] = {name: [] for name in (
        "layer", "neuron", "step", "value", "value_kind", "n_positions", *METRICS, *(f"d_{m}" for m in METRICS))}
    for (layer, neuron), grid in grids.items():
        for step, point in enumerate(grid):
            group = ((layer, neuron), step)
            columns["layer"].append(layer)
            columns["neuron"].append(neuron)
            columns["step"].append(step)
            columns["value"].append(point.value)
            columns["value_kind"].append(point.kind)
            columns["n_positions"].append(sums.count(group, "entropy"))
            for name in METRICS:
                mean = sums.mean(group, name)
                columns[name].append(mean)
                columns[f"d_{name}"].append(mean - untouched[name])
    return columns


def compute(model_row: Model, dataset: Dataset, config: EntropyConfig) -> dict[str, list[Any]]:
    from atlas.metrics.entropy import value_grid
    from atlas.modeling import load_model

    loaded = load_model(model_row.source, model_row.revision, dtype=model_dtype(config.dtype))
    device = resolve_device(config.device)
    loaded.model.to(device)
    neurons = choose_neurons(loaded, config)
    token_rows, n_rows = open_tokens(dataset, loaded, config.tokens)

    def batches(step: str):
        return scored_batches(token_rows, n_rows, loaded, batch_size=config.batch_size,
                              exclude_special_tokens=config.exclude_special_tokens, device=device,
                              label=f"entropy {model_row.name} ({step})")

    activations, base = observe(loaded, batches("observe"), neurons)
    require_positions(base.count(UNTOUCHED, "entropy"), dataset)
    grids = {neuron: value_grid(float(low), float(high), float(mean), config.grid_size)
             for neuron, low, high, mean in zip(neurons, activations.min, activations.max, activations.mean)}
    sums = intervene(loaded, batches("intervene"), grids, config.values_per_pass)
    return rows(grids, sums, base)


def write(session: Session, model_id: int, dataset_id: int, columns: dict[str, list[Any]], job_id: int) -> int:
    return replace_rows(session, EntropyIntervention, {"model_id": model_id, "dataset_id": dataset_id},
                        {**columns, "job_id": job_id})


def run(config: EntropyConfig, store: Store) -> None:
    extra = check_options(config)
    with store.session() as session:
        models = resolve_models(session, config.model, config.family)
    for model_row in models:
        check_neurons_fit(extra, model_row)
    run_per_model(KIND, config, store, compute, write)
