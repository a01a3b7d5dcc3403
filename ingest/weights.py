"""Job `weights`: per-neuron weight statistics and vocabulary effects (no data needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from atlas.errors import AtlasError
from atlas.metrics.entropy import DEFAULT_NULL_SPACE_FRACTION
from atlas.metrics.weights import PARTITION_VARIANCE_SCALE
from atlas.registry import resolve_models
from atlas.store import Store
from atlas.store.schema import Model, Neuron, NeuronVocab
from atlas.store.summaries import refresh_layer_classes
from ingest.options import ADDED_OPTION, RUN_OPTION, FamilyName, ModelName, Overwrite
from ingest.progress import progress_bar
from ingest.runner import JobKey, replace_rows, run_unit


@dataclass
class WeightsConfig:
    """Weight statistics, vocabulary moments, class and top/bottom tokens of every neuron."""

    model: ModelName = None
    family: FamilyName = None
    overwrite: Overwrite = False
    fold_final_norm: bool = True
    """Fold the final norm's scale into W_U before the vocabulary cosines (paper)."""
    center: bool = True
    """For LayerNorm models, centre W_U over the vocabulary and w_out over d_model (paper)."""
    top_k: int = 20
    """How many top and bottom vocabulary tokens to store per neuron."""
    weights: str = "processed"
    """Weights for the norms and cosines: 'processed' (the paper's TransformerLens processing: each norm's scale
    folded into the weights that read through it, its bias into b_in, LayerNorm models centred over d_model) or
    'raw' (as stored in the checkpoint)."""
    kurtosis_threshold: float = 10.0
    """Vocabulary kurtosis above which a neuron is prediction/suppression."""
    partition_scale: float = PARTITION_VARIANCE_SCALE
    """A neuron is a partition neuron when its vocabulary variance exceeds SCALE / d_model (5.12 / 1024 = 0.005,
    the paper's value for GPT-2 medium; a random direction gives about 1 / d_model)."""
    chunk_mb: Annotated[int, RUN_OPTION] = 256
    """Memory bound of one neurons x vocabulary chunk, in MiB."""
    null_space_fraction: Annotated[float, ADDED_OPTION] = DEFAULT_NULL_SPACE_FRACTION
    """Entropy neurons: the effective null space of the unembedding is its bottom max(1, round(FRACTION x d_model))
    singular directions; null_frac is the share of ||w_out||^2 in it (always on processed weights, as the SPEC)."""


@dataclass
class LayerWeights:
    """The arrays of one layer, ready for the store."""

    neurons: dict[str, np.ndarray]
    vocab: dict[str, np.ndarray]


WEIGHT_CHOICES = ("processed", "raw")


def check_options(config: WeightsConfig) -> None:
    if config.weights not in WEIGHT_CHOICES:
        raise AtlasError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {config.weights!r}")
    if config.partition_scale <= 0:
        raise AtlasError(f"--partition-scale must be positive, got {config.partition_scale}")
    check_null_space_fraction(config.null_space_fraction)


def check_null_space_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise AtlasError(f"--null-space-fraction must be in (0, 1), got {fraction}")


def null_space(loaded, fraction: float):
    """U_null [d_model, k] of the processed unembedding (padded vocabulary columns dropped) per the SPEC."""
    from atlas.metrics.entropy import null_space_basis
    from atlas.metrics.weights import process_unembedding

    adapter, model = loaded.adapter, loaded.model
    unembed, _ = adapter.unembedding(model)
    processed = process_unembedding(unembed[:, :len(loaded.tokenizer)], adapter.final_norm_scale(model),
                                    center=adapter.final_norm_kind == "layernorm")
    return null_space_basis(processed, fraction, centered=adapter.final_norm_kind == "layernorm")


def block_weights(adapter, block, processed: bool) -> dict:
    """w_in, w_gate, b_in, w_out of one block, raw or processed as TransformerLens does (float64)."""
    from atlas.metrics.weights import fold_norm_bias, process_reading_weights, process_w_out

    w_in, w_out, b_in, w_gate = adapter.w_in(block), adapter.w_out(block), adapter.b_in(block), adapter.w_gate(block)
    if not processed:
        return {"w_in": w_in, "w_gate": w_gate, "b_in": b_in, "w_out": w_out}
    center = adapter.final_norm_kind == "layernorm"
    gamma, beta = adapter.mlp_norm_scale(block), adapter.mlp_norm_bias(block)
    return {
        "w_in": process_reading_weights(w_in, gamma, center=center),
        "w_gate": None if w_gate is None else process_reading_weights(w_gate, gamma, center=center),
        "b_in": fold_norm_bias(b_in, w_in, beta),
        "w_out": process_w_out(w_out, center=center),
    }


def analyse_layer(loaded, layer: int, config: WeightsConfig, token_strings: list[str],
                  null_basis=None) -> LayerWeights:
    """Pure computation for one block: the adapter says where the weights are, metrics do the math.
    null_basis: U_null of null_space(loaded, ...), computed once per model (computed here when not given)."""
    from atlas.metrics.weights import classify, partition_threshold, vocab_effects, weight_stats

    adapter, model = loaded.adapter, loaded.model
    block = adapter.blocks(model)[layer]
    weights = block_weights(adapter, block, processed=config.weights == "processed")
    stats = weight_stats(weights["w_in"], weights["w_out"], weights["b_in"])
    if weights["w_gate"] is not None:
        stats["w_gate_norm"] = np.linalg.norm(np.asarray(weights["w_gate"].double()), axis=1)
    w_out = adapter.w_out(block)  # the vocabulary effects process it themselves (--center)
    vocab_size = len(token_strings)
    unembed, _ = adapter.unembedding(model)
    gamma = adapter.final_norm_scale(model) if config.fold_final_norm else None
    effects = vocab_effects(
        w_out, unembed[:, :vocab_size], gamma,  # padded vocabulary rows (Pythia) are not tokens
        center=config.center and adapter.final_norm_kind == "layernorm",
        top_k=config.top_k, max_chunk_bytes=config.chunk_mb << 20,
    )
    neurons = {
        "layer": layer,
        "neuron": np.arange(w_out.shape[0]),
        **stats,
        "vocab_mean": effects.mean, "vocab_var": effects.var, "vocab_skew": effects.skew, "vocab_kurt": effects.kurt,
        "vocab_class": classify(effects.kurt, effects.skew, effects.var,
                                kurt_threshold=config.kurtosis_threshold,
                                var_threshold=partition_threshold(w_out.shape[1], config.partition_scale)),
        **null_space_columns(adapter, w_out, null_basis if null_basis is not None
                             else null_space(loaded, config.null_space_fraction)),
    }
    return LayerWeights(neurons=neurons, vocab=_vocab_rows(layer, effects, token_strings))


def null_space_columns(adapter, w_out, null_basis) -> dict:
    """null_frac of each neuron (processed w_out, whatever --weights says) and the random expectation: k / d_model,
    k / (d_model - 1) for LayerNorm models (centred w_out)."""
    from atlas.metrics.entropy import null_frac, null_space_dimension
    from atlas.metrics.weights import process_w_out

    centered = adapter.final_norm_kind == "layernorm"
    processed = process_w_out(w_out, center=centered)
    d_model, k = null_basis.shape
    return {"null_frac": null_frac(processed, null_basis),
            "null_frac_random": k / null_space_dimension(d_model, centered)}


def _vocab_rows(layer: int, effects, token_strings: list[str]) -> dict[str, np.ndarray]:
    d_mlp, k = effects.top_ids.shape
    parts = []
    for direction, ids, values in (("top", effects.top_ids, effects.top_values),
                                   ("bottom", effects.bottom_ids, effects.bottom_values)):
        parts.append({
            "layer": np.full(d_mlp * k, layer),
            "neuron": np.repeat(np.arange(d_mlp), k),
            "direction": np.full(d_mlp * k, direction, dtype=object),
            "rank": np.tile(np.arange(k), d_mlp),
            "token_id": ids.reshape(-1),
            "value": values.reshape(-1),
        })
    rows = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    rows["token"] = np.asarray(token_strings, dtype=object)[rows["token_id"]]
    return rows


def compute(model_row: Model, config: WeightsConfig) -> list[LayerWeights]:
    from atlas.modeling import load_model

    loaded = load_model(model_row.source, model_row.revision)
    token_strings = [loaded.tokenizer.decode([i]) for i in range(len(loaded.tokenizer))]
    null_basis = null_space(loaded, config.null_space_fraction)
    with progress_bar() as bar:
        task = bar.add_task(f"weights {model_row.name}", total=model_row.n_layers)
        layers = []
        for layer in range(model_row.n_layers):
            layers.append(analyse_layer(loaded, layer, config, token_strings, null_basis))
            bar.advance(task)
    return layers


def _concat_column(values: list, shapes: list[tuple[int, ...]]):
    """Per-layer arrays or per-layer scalars (the layer index; None for a missing bias) as one column."""
    if all(v is None for v in values):
        return None
    return np.concatenate([np.broadcast_to(np.asarray(v), shape) for v, shape in zip(values, shapes)])


def write(session, model_id: int, layers: list[LayerWeights], job_id: int) -> int:
    neurons = {name: _concat_column([l.neurons[name] for l in layers], [l.neurons["neuron"].shape for l in layers])
               for name in layers[0].neurons}
    vocab = {name: np.concatenate([l.vocab[name] for l in layers]) for name in layers[0].vocab}
    where = {"model_id": model_id}
    replace_rows(session, NeuronVocab, where, vocab)
    n_rows = replace_rows(session, Neuron, where, {**neurons, "job_id": job_id})
    refresh_layer_classes(session, [model_id])
    return n_rows


def run(config: WeightsConfig, store: Store) -> None:
    check_options(config)
    with store.session() as session:
        models = resolve_models(session, config.model, config.family)
    for model_row in models:
        run_unit(
            store, JobKey("weights", model_id=model_row.id), config,
            compute=lambda m=model_row: compute(m, config),
            write=lambda session, layers, job_id, m=model_row: write(session, m.id, layers, job_id),
            overwrite=config.overwrite, label=f"weights {model_row.name}",
        )
