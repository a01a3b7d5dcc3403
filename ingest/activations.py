"""Job `activations`: exact activation statistics and top activating examples of every neuron.

One streaming pass (ingest/family_pass.py) over a registered dataset: every pending model of the
family sees the same batches. Per model, per layer, exact float64 moments (StreamingMoments); over
all neurons, an exact streaming top-k (ties broken by the earlier position) that carries each
example's context activations along, gathered from the batch while it is in memory (no second
pass). Context token ids come from the token memmap when the results are written. Special tokens
are left out of statistics and examples unless --no-exclude-special-tokens; the job config records it.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Mapping

import numpy as np
import torch
from sqlalchemy.orm import Session

from atlas.devices import model_dtype, resolve_device
from atlas.data import TokenizedDataset
from atlas.errors import AtlasError
from atlas.metrics.moments import StreamingMoments
from atlas.metrics.topk import StreamingTopK
from atlas.registry import require_shared_tokenizer, resolve_dataset, resolve_models, verified_weights_hash
from atlas.store import Store
from atlas.store.schema import ActivationStat, Dataset, Model, TopExample
from ingest.datasets import check_context, check_dataset, check_tokens, tokenize
from ingest.family_pass import Checkpoint, PassBatch, PassModel, run_family_pass
from ingest.options import (RUN_OPTION, CpusPerTask, DatasetName, DeviceName, ExecutorName, FamilyName, GpusPerTask,
                            ModelDtype, ModelName, Overwrite, RayAddress, ShardDir, TokenShards)
from ingest.runner import JobKey, config_hash, replace_rows, run_units, science_config

KIND = "activations"
log = logging.getLogger(__name__)


@dataclass
class ActivationsConfig:
    """Activation moments (n, mean, var, skew, kurt, max, min, frac_active) and top-k examples of every neuron."""

    model: ModelName = None
    family: FamilyName = None
    dataset: DatasetName = None
    tokens: int | None = None
    """Use only the first rows of the dataset holding this many tokens (default: all)."""
    top_k: int = 20
    """Top activating examples to keep per neuron."""
    context_before: int = 24
    """Context tokens stored before each top example's token."""
    context_after: int = 4
    """Context tokens stored after each top example's token."""
    exclude_special_tokens: bool = True
    """Leave special tokens (BOS/EOS/pad) out of statistics and examples."""
    batch_size: Annotated[int, RUN_OPTION] = 16
    """Rows (documents) per batch."""
    dtype: ModelDtype = "float32"
    device: DeviceName = "auto"
    checkpoint_every: Annotated[int, RUN_OPTION] = 50
    """Checkpoint the accumulators every this many batches (0: never by count)."""
    checkpoint_seconds: Annotated[float, RUN_OPTION] = 60.0
    """... and at least this often in seconds (0: never by time)."""
    token_shards: TokenShards = 1
    executor: ExecutorName = "local"
    ray_address: RayAddress = None
    gpus_per_task: GpusPerTask = None
    cpus_per_task: CpusPerTask = 1.0
    shard_dir: ShardDir = None
    overwrite: Overwrite = False


class ActivationStatsConsumer:
    """Per model: one StreamingMoments per layer and one StreamingTopK over all neurons."""

    def __init__(self, shapes: Mapping[int, tuple[int, int]], top_k: int, before: int, after: int,
                 device: str | torch.device = "cpu") -> None:
        self.shapes = dict(shapes)  # model id -> (n_layers, d_mlp)
        self.top_k, self.before, self.after = top_k, before, after
        self.device = torch.device(device)  # the state stays beside the activations; results cross once
        self.offsets = torch.arange(-before, after + 1, device=self.device)
        self.moments = {m: [StreamingMoments(d_mlp, self.device) for _ in range(n_layers)]
                        for m, (n_layers, d_mlp) in shapes.items()}
        self.top = {m: StreamingTopK(n_layers * d_mlp, top_k, len(self.offsets), self.device)
                    for m, (n_layers, d_mlp) in shapes.items()}

    def consume(self, step: PassBatch) -> None:
        for model_id, (n_layers, d_mlp) in self.shapes.items():
            acts = step.activations[model_id]
            for layer, moments in enumerate(self.moments[model_id]):
                moments.update(acts[:, layer * d_mlp:(layer + 1) * d_mlp])  # float64 temporaries of one layer
            self.top[model_id].update(acts, step.keys,
                                      lambda index, features, m=model_id: self._contexts(step, m, index, features))

    def _contexts(self, step: PassBatch, model_id: int, index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The activation of each entering example's neuron around its position [p, W] (index: the
        examples' stat rows in the batch, features: their neurons); NaN outside the example's row."""
        full = step.all_positions[model_id].to(self.device)
        n_rows, length, n_features = full.shape
        index = index.to(self.device)
        rows = step.stat_rows.to(self.device)[index][:, None]                                   # [p, 1]
        positions = step.stat_positions.to(self.device)[index][:, None] + self.offsets[None, :]  # [p, W]
        valid = (positions >= 0) & (positions < step.batch.lengths.to(self.device)[rows])
        flat = (rows * length + positions.clamp(0, length - 1)) * n_features + features.to(self.device)[:, None]
        return full.reshape(-1)[flat].masked_fill(~valid, float("nan"))

    def merge(self, other: ActivationStatsConsumer) -> None:
        """Fold in the consumer of the NEXT token shard (Chan/Pebay moments; top-k in stream order)."""
        if other.shapes != self.shapes:
            raise ValueError("cannot merge consumers of different models")
        for model_id, layers in self.moments.items():
            for mine, theirs in zip(layers, other.moments[model_id]):
                mine.merge(theirs)
            self.top[model_id].merge(other.top[model_id])

    def state_dict(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for model_id, layers in self.moments.items():
            for layer, moments in enumerate(layers):
                state.update({f"{model_id}/moments{layer}/{k}": v for k, v in moments.state_dict().items()})
            state.update({f"{model_id}/top/{k}": v for k, v in self.top[model_id].state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        for model_id, layers in self.moments.items():
            for layer in range(len(layers)):
                layers[layer] = StreamingMoments.from_state_dict(part(f"{model_id}/moments{layer}/"), self.device)
            self.top[model_id] = StreamingTopK.from_state_dict(part(f"{model_id}/top/"), self.top_k, self.device)


@dataclass
class ModelResults:
    stats: dict[str, Any]
    examples: dict[str, Any]


# -- preparing ----------------------------------------------------------------------------------

def _check_options(config: ActivationsConfig) -> None:
    for name in ("top_k", "batch_size", "token_shards"):
        if getattr(config, name) < 1:
            raise AtlasError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    for name in ("context_before", "context_after"):
        if getattr(config, name) < 0:
            raise AtlasError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(config, name)}")
    if config.tokens is not None and config.tokens < 1:
        raise AtlasError(f"--tokens must be at least 1, got {config.tokens}")


# -- computing ----------------------------------------------------------------------------------

def compute(models: list[Model], dataset: Dataset, config: ActivationsConfig, store: Store) -> tuple[dict[int, ModelResults], Checkpoint]:
    """Run the pass for `models` and turn each model's accumulators into rows; also the pass's checkpoint,
    to delete once the rows are committed."""
    from atlas.modeling import load_model

    loaded = [PassModel(m.id, load_model(m.source, m.revision, dtype=model_dtype(config.dtype))) for m in models]
    weights = {m.id: verified_weights_hash(store, m, pass_model.loaded) for m, pass_model in zip(models, loaded)}
    device = resolve_device(config.device)
    for model in loaded:
        check_context(model.loaded, dataset)
        model.loaded.model.to(device)
    tokenizer = loaded[0].loaded.tokenizer
    tokens = tokenize(dataset, tokenizer)
    n_rows = tokens.n_rows if config.tokens is None else tokens.rows_for_tokens(config.tokens)
    consumer = ActivationStatsConsumer({m.id: (m.n_layers, m.d_mlp) for m in models}, config.top_k,
                                       config.context_before, config.context_after, device)
    checkpoint = Checkpoint(_checkpoint_key(weights, dataset, tokens, n_rows, config, device),
                            config.checkpoint_every, config.checkpoint_seconds)
    run_family_pass(loaded, tokens, {"stats": consumer}, batch_size=config.batch_size, n_rows=n_rows,
                    stat_positions="non_special" if config.exclude_special_tokens else "all",
                    checkpoint=checkpoint, device=device,
                    label=f"activations {dataset.name} x {len(models)} model(s)")
    token_strings = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    return {m.id: _model_results(consumer, m, tokens, token_strings, config) for m in models}, checkpoint


def _checkpoint_key(weights: Mapping[int, str], dataset: Dataset, tokens: TokenizedDataset, n_rows: int,
                    config: ActivationsConfig, device: torch.device) -> dict[str, Any]:
    """What the saved accumulators depend on; weights maps model id -> weights hash (by content, not by path)."""
    return {
        "job": KIND, "config": config_hash(science_config(config)),
        "models": sorted(weights.items()),
        "dataset": (dataset.id, dataset.content_hash), "tokens": tokens.key, "n_rows": n_rows,
        "batch_size": config.batch_size, "device": str(device),
    }


def _model_results(consumer: ActivationStatsConsumer, model: Model, tokens: TokenizedDataset,
                   token_strings: list[str], config: ActivationsConfig) -> ModelResults:
    moments = [layer.result() for layer in consumer.moments[model.id]]
    if moments[0]["n"][0] == 0:
        raise AtlasError("the dataset holds no token positions for statistics (only special tokens?): "
                         "register a dataset with more text")
    stats = {name: np.concatenate([layer[name] for layer in moments]) for name in moments[0]}
    stats["layer"] = np.repeat(np.arange(model.n_layers), model.d_mlp)
    stats["neuron"] = np.tile(np.arange(model.d_mlp), model.n_layers)
    values, keys, payload = consumer.top[model.id].result()
    return ModelResults(stats, _example_rows(values, keys, payload, model.d_mlp, tokens, token_strings, config))


def _example_rows(values: np.ndarray, keys: np.ndarray, payload: np.ndarray, d_mlp: int,
                  tokens: TokenizedDataset, token_strings: list[str], config: ActivationsConfig) -> dict[str, Any]:
    """One row per (neuron, rank): where it fired, and the context window as ids, strings and activations."""
    n_ranks, n_features = values.shape
    columns: dict[str, list] = {name: [] for name in (
        "layer", "neuron", "rank", "doc_index", "position", "activation",
        "context_token_ids", "context_tokens", "highlight_index", "context_activations")}
    order = keys.T.reshape(-1)  # feature by feature, rank by rank
    windows = tokens.context_windows(order // tokens.ctx_len, order % tokens.ctx_len, config.context_before,
                                     config.context_after)
    for (feature, rank), key, (ids, highlight) in zip(itertools.product(range(n_features), range(n_ranks)),
                                                      order.tolist(), windows):
        row, position = divmod(key, tokens.ctx_len)
        first = config.context_before - highlight  # offset of the window's first token in the payload
        columns["layer"].append(feature // d_mlp)
        columns["neuron"].append(feature % d_mlp)
        columns["rank"].append(rank)
        columns["doc_index"].append(int(tokens.doc_indices[row]))
        columns["position"].append(position)
        columns["activation"].append(float(values[rank, feature]))
        columns["context_token_ids"].append(ids.tolist())
        columns["context_tokens"].append([token_strings[i] for i in ids])
        columns["highlight_index"].append(highlight)
        columns["context_activations"].append(payload[rank, first:first + len(ids), feature].tolist())
    return columns


# -- writing ------------------------------------------------------------------------------------

def write(session: Session, results: dict[int, ModelResults], dataset_id: int, job_ids: dict[JobKey, int]) -> dict[JobKey, int]:
    n_rows = {}
    for key, job_id in job_ids.items():
        result = results[key.model_id]
        where = {"model_id": key.model_id, "dataset_id": dataset_id}
        n_examples = replace_rows(session, TopExample, where, result.examples)
        n_rows[key] = replace_rows(session, ActivationStat, where, {**result.stats, "job_id": job_id}) + n_examples
    return n_rows


def run(config: ActivationsConfig, store: Store) -> None:
    _check_options(config)
    with store.session() as session:
        models = resolve_models(session, config.model, config.family)
        dataset = resolve_dataset(session, config.dataset)
    require_shared_tokenizer(models)
    check_dataset(dataset, config.tokens)
    check_tokens(store, dataset, models)
    if config.token_shards > 1 or config.executor != "local":
        run_token_shards(models, dataset, config, store)
        return
    by_id = {m.id: m for m in models}
    checkpoints: list[Checkpoint] = []

    def compute_pending(keys: list[JobKey]) -> dict[int, ModelResults]:
        results, checkpoint = compute([by_id[key.model_id] for key in keys], dataset, config, store)
        checkpoints.append(checkpoint)
        return results

    run_units(
        store, [JobKey(KIND, model_id=m.id, dataset_id=dataset.id) for m in models], config,
        compute=compute_pending,
        write=lambda session, results, job_ids: write(session, results, dataset.id, job_ids),
        overwrite=config.overwrite, label=f"activations {dataset.name}",
    )
    for checkpoint in checkpoints:  # the results are committed: the accumulators are no longer needed
        checkpoint.delete()


# -- token shards on an executor ---------------------------------------------------------------------

def run_token_shards(models: list[Model], dataset: Dataset, config: ActivationsConfig, store: Store) -> None:
    """One unit per (model, token range) on the executor; then each model's units merged in stream order
    (Chan/Pebay moments, top-k by merge) into its rows, one transaction for the models done."""
    from ingest.token_shards import (PassUnit, delete_states, merge_states, model_spec, pending_models,
                                     prepare_stream, run_pass_units, shard_label, state_path, token_ranges, unit_key,
                                     with_done_ids)

    hash_ = config_hash(science_config(config))
    keys, pending = pending_models(store, KIND, models, dataset, config)
    if not pending:
        return
    stream = prepare_stream(config, dataset, pending[0])
    ranges = token_ranges(-(-stream.n_rows // config.batch_size), config.token_shards)
    units = {m.id: [PassUnit(
        label=f"activations {m.name} {shard_label(index, len(ranges))}",
        keys=(unit_key(keys[m.id], index, len(ranges)),), models=(model_spec(m),),
        make_consumer=functools.partial(ActivationStatsConsumer, {m.id: (m.n_layers, m.d_mlp)}, config.top_k,
                                        config.context_before, config.context_after),
        tokens_dir=str(stream.tokens_dir), n_rows=stream.n_rows, batch_size=config.batch_size, batches=batches,
        stat_positions="non_special" if config.exclude_special_tokens else "all", dtype=config.dtype,
        device=config.device, checkpoint_every=config.checkpoint_every, checkpoint_seconds=config.checkpoint_seconds,
        state_path=str(state_path(stream.directory, KIND, {
            "config": hash_, "model": (m.id, m.source, m.revision, m.weights_hash),
            "dataset": (dataset.id, dataset.content_hash), "tokens": stream.tokens_dir.name, "n_rows": stream.n_rows,
            "batch_size": config.batch_size, "batches": (batches.start, batches.stop)})),
    ) for index, batches in enumerate(ranges)] for m in pending}
    run_pass_units(store, [unit for model_units in units.values() for unit in model_units], config,
                   stream.executor, f"activations {dataset.name}")
    tokenizer_strings = _token_strings(pending[0])

    def compute(claimed: list[JobKey]) -> dict[int, ModelResults]:
        by_id = {m.id: m for m in pending}
        return {key.model_id: _model_results(merge_states(with_done_ids(store, units[key.model_id], hash_)),
                                             by_id[key.model_id], stream.tokens, tokenizer_strings, config)
                for key in claimed}

    ran = run_units(store, [keys[m.id] for m in pending], config, compute,
                    lambda session, results, job_ids: write(session, results, dataset.id, job_ids),
                    overwrite=True, label=f"activations {dataset.name} ({len(ranges)} token shards)")
    for key in ran:
        delete_states(units[key.model_id])


def _token_strings(model: Model) -> list[str]:
    from atlas.modeling import load_tokenizer

    tokenizer = load_tokenizer(model.source, model.revision)
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]
