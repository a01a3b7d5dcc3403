"""Job `labels`: automatic neuron-family labels from token features (SPEC "Functional roles").

Per neuron and source, the top_n token features by variance reduction (atlas/metrics/labels.py):
  vocab          x = W_U . w_out over the vocabulary (processed weights as the weights job: final norm
                 folded into W_U; LayerNorm models centred; padded vocabulary rows sliced off);
  current_token  x = the activation at every counted position (non-special unless asked), f of its token;
  next_token     x = the activation at every scored position (ingest/next_token.py), f of the next token.
Labels with VR 0 (nothing explained: an absent feature, a constant neuron) are not stored, so a neuron
may have fewer than top_n rows. For the prediction / suppression neurons of the weights job
(neurons.vocab_class), the activation when the next token is in the neuron's top / bottom set_size
tokens by W_U . w_out, against when it is not. The token features of the model's tokenizer are
stored too (token_features, per tokenizer hash).

Without --dataset only the vocabulary source runs (one ledger unit per model); with it, one unit per
(model, dataset) writes all three. The float64 accumulators live on the model's device; only results
cross to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from typing_extensions import Doc
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from atlas.data.features import feature_matrix
from atlas.devices import model_dtype, resolve_device
from atlas.errors import AtlasError
from atlas.metrics._arrays import accumulator_device
from atlas.metrics.labels import (FeatureSplit, StreamingFeatureVariance, StreamingTokenSetRatio, top_features,
                                  vocab_token_sets, vocab_variance_reduction)
from atlas.registry import resolve_models
from atlas.store import Store
from atlas.store.schema import Dataset, Model, Neuron, NeuronLabel, NeuronTokenSet, TokenFeature
from atlas.store.summaries import refresh_label_counts
from ingest.next_token import NextTokenConfig, open_tokens, require_positions, run_per_model, scored_batches
from ingest.options import RUN_OPTION, TARGET
from ingest.progress import progress_bar
from ingest.runner import JobKey, replace_rows, run_unit

KIND = "labels"
DATA_SOURCES = ("current_token", "next_token")
SET_CLASSES = {"prediction": True, "suppression": False}  # class -> the set holds the largest W_U . w_out

LabelsDataset = Annotated[str | None, TARGET, Doc("Registered dataset (`atlas dataset list`) for the current- and "
                                                  "next-token labels and the token sets; without it, vocabulary "
                                                  "labels only.")]


@dataclass
class LabelsConfig(NextTokenConfig):
    """Neuron labels: the token features (digits, leading space, punctuation, ...) that explain most of a neuron's
    vocabulary effect (W_U . w_out) and, with --dataset, of its activation by the current and the next token; and
    for prediction/suppression neurons the mean activation when the next token is in their token set."""

    dataset: LabelsDataset = None
    exclude_special_tokens: bool = True
    """Leave special tokens (BOS) out: as the current token, and as the input of a next-token position."""
    top_n: int = 3
    """Labels (features with the largest variance reduction) to store per neuron and source."""
    set_size: int = 50
    """Tokens in a prediction (suppression) neuron's set: its top (bottom) tokens by W_U . w_out."""
    chunk_mb: Annotated[int, RUN_OPTION] = 256
    """Memory bound of one neurons x vocabulary float64 chunk, in MiB."""


@dataclass
class LabelResults:
    features: dict[str, Any]                                    # token_features columns
    labels: dict[str, dict[str, Any]]                           # source -> neuron_labels columns
    token_sets: dict[str, Any] | None = None                    # neuron_token_sets columns (with a dataset)
    n_positions: dict[str, int] = field(default_factory=dict)   # source -> positions seen


def check_options(config: LabelsConfig) -> None:
    for name in ("top_n", "set_size", "chunk_mb", "batch_size"):
        if getattr(config, name) < 1:
            raise AtlasError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.tokens is not None and config.tokens < 1:
        raise AtlasError(f"--tokens must be at least 1, got {config.tokens}")


def require_weights(session: Session, model: Model) -> None:
    n_rows = session.scalar(select(func.count()).select_from(Neuron).where(Neuron.model_id == model.id))
    if not n_rows:
        raise AtlasError(f"model {model.name!r} has no weight statistics (labels need its prediction/suppression "
                         f"classes): run `atlas ingest weights --model {model.name}` first")


def vocab_classes(store: Store, model: Model) -> np.ndarray:
    """neurons.vocab_class as an object array [n_layers, d_mlp]."""
    classes = np.full((model.n_layers, model.d_mlp), "none", dtype=object)
    with store.session() as session:
        for layer, neuron, vocab_class in session.execute(
                select(Neuron.layer, Neuron.neuron, Neuron.vocab_class).where(Neuron.model_id == model.id)):
            classes[layer, neuron] = vocab_class
    return classes


# -- computing ----------------------------------------------------------------------------------------

def _label_rows(splits: list[FeatureSplit], names: list[str], top_n: int) -> dict[str, np.ndarray]:
    """The top_n features per neuron of every layer, largest VR first; VR 0 (nothing explained) left out."""
    parts = []
    for layer, split in enumerate(splits):
        order, scores = top_features(split.score, top_n)
        neuron, rank = np.nonzero(scores > 0)
        feature = order[neuron, rank]
        parts.append({
            "layer": np.full(len(neuron), layer), "neuron": neuron, "rank": rank,
            "feature": np.asarray(names, dtype=object)[feature], "score": scores[neuron, rank],
            "mean_with": split.mean_with[neuron, feature], "mean_without": split.mean_without[neuron, feature],
        })
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _processed_unembedding(loaded, vocab_size: int, device: torch.device) -> torch.Tensor:
    from atlas.metrics.weights import process_unembedding

    adapter, model = loaded.adapter, loaded.model
    unembed, _ = adapter.unembedding(model)
    center = adapter.final_norm_kind == "layernorm"
    return process_unembedding(unembed[:, :vocab_size], adapter.final_norm_scale(model), center=center).to(device)


def _class_index(layer_classes: np.ndarray, cls: str, device: torch.device) -> torch.Tensor:
    """The neurons of one layer with vocab_class `cls`, as indices on the device."""
    return torch.from_numpy(np.flatnonzero(layer_classes == cls)).to(device)


def vocab_pass(loaded, classes: np.ndarray, features: np.ndarray, config: LabelsConfig, device: torch.device,
               label: str) -> tuple[list[FeatureSplit], list[dict[str, torch.Tensor]]]:
    """Per layer: the vocabulary-source split, and the token-set membership of its prediction/suppression
    neurons (class -> bool [vocab, neurons of that class], on the device)."""
    from atlas.metrics.weights import process_w_out

    adapter, model = loaded.adapter, loaded.model
    unembed = _processed_unembedding(loaded, features.shape[0], device)
    vocab_features = torch.from_numpy(features[:unembed.shape[1]]).to(device)
    center = adapter.final_norm_kind == "layernorm"
    splits, sets = [], []
    with progress_bar() as bar:
        task = bar.add_task(f"{label} (vocabulary)", total=len(adapter.blocks(model)))
        for layer, block in enumerate(adapter.blocks(model)):
            w_out = process_w_out(adapter.w_out(block), center=center).to(device)
            splits.append(vocab_variance_reduction(w_out, unembed, vocab_features,
                                                   max_chunk_bytes=config.chunk_mb << 20))
            sets.append({cls: vocab_token_sets(w_out[_class_index(classes[layer], cls, device)], unembed,
                                               config.set_size, largest=largest, max_chunk_bytes=config.chunk_mb << 20)
                         for cls, largest in SET_CLASSES.items() if (classes[layer] == cls).any()})
            bar.advance(task)
    return splits, sets


def data_pass(loaded, batches, features: torch.Tensor, classes: np.ndarray,
              sets: list[dict[str, torch.Tensor]], device: torch.device):
    """Stream the batches: per layer, VR accumulators for the current- and next-token sources and the
    token-set ratios of the layer's prediction/suppression neurons."""
    from atlas.modeling import capture_neuron_activations

    n_layers, d_mlp = classes.shape
    variance = {source: [StreamingFeatureVariance(d_mlp, features.shape[1], device) for _ in range(n_layers)]
                for source in DATA_SOURCES}
    selected = [{cls: _class_index(classes[layer], cls, device) for cls in layer_sets}
                for layer, layer_sets in enumerate(sets)]
    ratios = [{cls: StreamingTokenSetRatio(members, device) for cls, members in layer_sets.items()}
              for layer_sets in sets]
    for batch in batches:
        acts = capture_neuron_activations(loaded, batch.input_ids, batch.attention_mask)  # [b, T, L, d_mlp]
        current, following = acts[batch.counted], acts[batch.positions]
        targets = batch.targets.to(device)
        current_features, next_features = features[batch.input_ids[batch.counted]], features[targets]
        for layer in range(n_layers):
            variance["current_token"][layer].update(current[:, layer], current_features)
            variance["next_token"][layer].update(following[:, layer], next_features)
            for cls, ratio in ratios[layer].items():
                ratio.update(following[:, layer, selected[layer][cls]], targets)
    return variance, ratios


TOKEN_SET_COLUMNS = {"layer": np.int64, "neuron": np.int64, "vocab_class": object, "set_size": np.int64,
                     "n_in_set": np.int64, "n_out_set": np.int64, "mean_in_set": np.float64,
                     "mean_out_set": np.float64, "ratio": np.float64}


def _token_set_rows(ratios, classes: np.ndarray, set_size: int) -> dict[str, Any]:
    parts = [{name: np.zeros(0, dtype) for name, dtype in TOKEN_SET_COLUMNS.items()}]  # typed, for zero rows
    for layer, layer_ratios in enumerate(ratios):
        for cls, accumulator in layer_ratios.items():
            result = accumulator.result()
            neuron = np.flatnonzero(classes[layer] == cls)
            parts.append({
                "layer": np.full(len(neuron), layer), "neuron": neuron,
                "vocab_class": np.full(len(neuron), cls, dtype=object),
                "set_size": np.full(len(neuron), min(set_size, accumulator.members.shape[0])),
                "n_in_set": result.n_in, "n_out_set": result.n_out,
                "mean_in_set": result.mean_in, "mean_out_set": result.mean_out, "ratio": result.ratio,
            })
    return {name: np.concatenate([p[name] for p in parts]) for name in TOKEN_SET_COLUMNS}


def compute(model_row: Model, dataset: Dataset | None, config: LabelsConfig, store: Store) -> LabelResults:
    from atlas.modeling import load_model

    classes = vocab_classes(store, model_row)
    loaded = load_model(model_row.source, model_row.revision, dtype=model_dtype(config.dtype))
    device = resolve_device(config.device)
    state_device = accumulator_device(device)
    token_strings = [loaded.tokenizer.decode([i]) for i in range(len(loaded.tokenizer))]
    names, descriptions, features = feature_matrix(token_strings)
    label = f"labels {model_row.name}"
    splits, sets = vocab_pass(loaded, classes, features, config, state_device, label)
    result = LabelResults(
        features={"feature": names, "description": descriptions, "n_tokens": features.sum(axis=0),
                  "token_ids": [np.flatnonzero(column).tolist() for column in features.T]},
        labels={"vocab": _label_rows(splits, names, config.top_n)},
    )
    if dataset is None:
        return result
    loaded.model.to(device)
    token_rows, n_rows = open_tokens(dataset, loaded, config.tokens)
    batches = scored_batches(token_rows, n_rows, loaded, batch_size=config.batch_size,
                             exclude_special_tokens=config.exclude_special_tokens, device=device, label=label)
    variance, ratios = data_pass(loaded, batches, torch.from_numpy(features).to(device), classes, sets, state_device)
    for source in DATA_SOURCES:
        layer_splits = [accumulator.result() for accumulator in variance[source]]
        result.n_positions[source] = layer_splits[0].n
        result.labels[source] = _label_rows(layer_splits, names, config.top_n)
    require_positions(result.n_positions["next_token"], dataset)
    result.token_sets = _token_set_rows(ratios, classes, config.set_size)
    return result


# -- writing ------------------------------------------------------------------------------------------

def write(session: Session, model_row: Model, dataset_id: int | None, result: LabelResults, job_id: int) -> int:
    """Replace the tokenizer's features, the model's vocabulary labels and (with a dataset) its dataset labels
    and token sets, and the model's rank-0 label counts (label_counts), in the unit's transaction."""
    replace_rows(session, TokenFeature, {"tokenizer_hash": model_row.tokenizer_hash}, result.features)
    n_rows = 0
    for source, columns in result.labels.items():
        where = {"model_id": model_row.id, "dataset_id": None if source == "vocab" else dataset_id, "source": source}
        n_rows += replace_rows(session, NeuronLabel, where, {**columns, "job_id": job_id})
    refresh_label_counts(session, [model_row.id])
    if result.token_sets is not None:
        where = {"model_id": model_row.id, "dataset_id": dataset_id}
        n_rows += replace_rows(session, NeuronTokenSet, where, {**result.token_sets, "job_id": job_id})
    return n_rows


def run(config: LabelsConfig, store: Store) -> None:
    check_options(config)
    with store.session() as session:
        models = resolve_models(session, config.model, config.family)
        for model_row in models:
            require_weights(session, model_row)
    if config.dataset is not None:
        run_per_model(KIND, config, store,
                      compute=lambda m, dataset, c: compute(m, dataset, c, store),
                      write=lambda session, model_id, dataset_id, result, job_id:
                      write(session, session.get(Model, model_id), dataset_id, result, job_id))
        return
    for model_row in models:
        run_unit(store, JobKey(KIND, model_id=model_row.id), config,
                 compute=lambda m=model_row: compute(m, None, config, store),
                 write=lambda session, result, job_id, m=model_row: write(session, m, None, result, job_id),
                 overwrite=config.overwrite, label=f"labels {model_row.name} (vocabulary)")
