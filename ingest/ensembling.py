"""Study `ensembling`: prediction-ensembling probes for one token feature (SPEC "Stages of inference").

One ledger unit per (model, dataset, feature): JobKey kind "ensembling", shard = the feature.
Positions: t is a candidate when token t counts (non-special), token t+1 is real and t >= min_context
(t tokens of context before it); class 1 when token t+1 has the feature. The probed neurons'
activations and the model's probability on f-tokens are recorded at every candidate in one full
forward pass per batch; the balanced set, the split and the probes come after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from atlas.data.features import FEATURES, feature_matrix
from atlas.devices import model_dtype, resolve_device
from atlas.errors import AtlasError
from atlas.metrics import probes
from atlas.metrics.layers import next_token_positions, next_tokens
from atlas.registry import resolve_dataset, resolve_models
from atlas.store import Store, bulk_insert
from atlas.store.schema import Dataset, Model, Neuron, ProbeResult, ProbeRun
from ingest.datasets import check_dataset, check_tokens
from ingest.next_token import check_options, open_tokens
from ingest.options import RUN_OPTION, TARGET, DatasetName, DeviceName, FamilyName, ModelDtype, ModelName, Overwrite
from ingest.progress import RateColumn, progress_bar
from ingest.runner import JobKey, run_unit

KIND = "ensembling"
MIN_PER_CLASS = 10  # fewer positions of a class than this leave nothing to train and test on


@dataclass
class EnsemblingConfig:
    """Prediction ensembling: logistic probes on the strongest prediction/suppression neurons of the second half
    for whether the next token has a token feature (one neuron, and the top k by test accuracy), beside the
    model's own accuracy."""

    model: ModelName = None
    family: FamilyName = None
    dataset: DatasetName = None
    feature: Annotated[str, TARGET] = "ends_with_ing"
    """Token feature of the catalogue (atlas/data/features.py), e.g. ends_with_ing, digits, comma."""
    n_neurons: int = 32
    """How many neurons to probe (largest |score| among prediction and suppression neurons, layer >= n_layers // 2)."""
    neuron_pool: str = "classed"
    """Which neurons compete: 'classed' (prediction and suppression neurons, the paper's) or 'all' (every neuron
    of the second half, for small models where no vocabulary kurtosis passes the class threshold)."""
    min_context: int = 24
    """A position t is used only when at least this many tokens come before it."""
    max_per_class: int = 5000
    """At most this many positions per class (drawn with --seed)."""
    train_fraction: float = 0.7
    """Share of each class in the training split (the rest is the held-out test split)."""
    seed: int = 0
    """Seed of the position draw, the train/test split and the probes."""
    tokens: int | None = None
    """Use only the first rows of the dataset holding this many tokens (default: all)."""
    batch_size: Annotated[int, RUN_OPTION] = 8
    """Rows (documents) per batch."""
    dtype: ModelDtype = "float32"
    device: DeviceName = "auto"
    overwrite: Overwrite = False


@dataclass
class Candidates:
    """Every candidate position of the dataset: where it is, its class, what the model and the neurons say."""

    rows: np.ndarray           # int [n]: dataset row
    positions: np.ndarray      # int [n]: t, the position before the target token
    labels: np.ndarray         # bool [n]: token t+1 has the feature
    f_probability: np.ndarray  # float64 [n]: the model's next-token probability on f-tokens
    activations: np.ndarray    # float64 [n, n_neurons]


@dataclass
class EnsemblingResult:
    feature: str
    neurons: dict[str, np.ndarray]  # layer, neuron, vocab_class, score: the probed neurons by rank (|score|)
    chosen: np.ndarray              # indices into the candidates: the balanced set, sorted
    labels: np.ndarray              # bool, of the balanced set
    train: np.ndarray               # bool, of the balanced set
    accuracies: probes.ProbeAccuracies
    model_accuracy: float           # on the test split
    candidates: Candidates


def check_config(config: EnsemblingConfig) -> None:
    check_options(config.tokens, config.batch_size)
    if config.feature not in {f.name for f in FEATURES}:
        raise AtlasError(f"no token feature named {config.feature!r}: pick one of atlas/data/features.py "
                         f"(e.g. ends_with_ing, digits, comma; `atlas ingest labels` lists them too)")
    if config.n_neurons < 1 or config.min_context < 0 or config.max_per_class < MIN_PER_CLASS:
        raise AtlasError(f"--n-neurons must be >= 1, --min-context >= 0 and --max-per-class >= {MIN_PER_CLASS}")
    if not 0 < config.train_fraction < 1:
        raise AtlasError(f"--train-fraction must be in (0, 1), got {config.train_fraction}")
    if config.neuron_pool not in NEURON_POOLS:
        raise AtlasError(f"--neuron-pool must be one of {', '.join(NEURON_POOLS)}, got {config.neuron_pool!r}")


def feature_mask(tokenizer, name: str) -> np.ndarray:
    """bool [len(tokenizer)]: the feature over the decoded single tokens."""
    feature = next(f for f in FEATURES if f.name == name)
    strings = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    return feature_matrix(strings, [feature])[2][:, 0]


NEURON_POOLS = {"classed": probes.PROBED_CLASSES, "all": None}


def neuron_candidates(session: Session, model_row: Model, pool: str = "classed") -> dict[str, np.ndarray]:
    """Neurons of the second half (layer, neuron, vocab_class) from the weights job: the prediction and
    suppression ones, or with pool 'all' every one."""
    if session.scalars(select(Neuron.layer).where(Neuron.model_id == model_row.id).limit(1)).first() is None:
        raise AtlasError(f"model {model_row.name!r} has no neuron classes yet: run "
                         f"`atlas ingest weights --model {model_row.name}` first")
    rows = session.execute(
        select(Neuron.layer, Neuron.neuron, Neuron.vocab_class)
        .where(Neuron.model_id == model_row.id, Neuron.layer >= model_row.n_layers // 2,
               *([] if NEURON_POOLS[pool] is None else [Neuron.vocab_class.in_(NEURON_POOLS[pool])]))
        .order_by(Neuron.layer, Neuron.neuron)).all()
    if not rows:
        raise AtlasError(f"model {model_row.name!r} has no prediction or suppression neuron in layers "
                         f">= {model_row.n_layers // 2}: nothing to probe (--neuron-pool all probes every neuron "
                         "of the second half)")
    layers, neurons, classes = zip(*rows)
    return {"layer": np.array(layers), "neuron": np.array(neurons), "vocab_class": np.array(classes, dtype=object)}


def score_neurons(loaded, candidates: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """The SPEC score of each candidate, on processed weights (as `atlas ingest weights`)."""
    from atlas.metrics.weights import process_unembedding, process_w_out

    adapter, model = loaded.adapter, loaded.model
    center = adapter.final_norm_kind == "layernorm"
    unembed, _ = adapter.unembedding(model)
    unembed = process_unembedding(unembed[:, :len(mask)], adapter.final_norm_scale(model), center=center)
    scores = np.empty(len(candidates["layer"]))
    for layer in np.unique(candidates["layer"]):
        here = candidates["layer"] == layer
        w_out = process_w_out(adapter.w_out(adapter.blocks(model)[int(layer)]), center=center)
        scores[here] = probes.neuron_scores(w_out[torch.as_tensor(candidates["neuron"][here])], unembed, mask)
    return scores


def collect(loaded, token_rows, n_rows: int, layers: np.ndarray, neurons: np.ndarray, mask: np.ndarray,
            config: EnsemblingConfig, device: torch.device, label: str) -> Candidates:
    """One full forward pass per batch: the probed neurons' activations (down-projection inputs) and the
    probability on f-tokens at every candidate position."""
    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.blocks(model)
    max_positions = adapter.max_positions(model)
    f_tokens = torch.as_tensor(mask)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("rows", "positions", "labels", "f_probability",
                                                                "activations")}
    captured: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(module, args):
            captured[layer] = args[0]
        return hook

    handles = [adapter.down_proj(blocks[int(layer)]).register_forward_pre_hook(record(int(layer)))
               for layer in np.unique(layers)]
    try:
        with progress_bar(RateColumn("tokens")) as bar, torch.inference_mode():
            task = bar.add_task(label, total=int(token_rows.lengths[:n_rows].sum()))
            for batch in token_rows.batches(config.batch_size, n_rows=n_rows):
                positions = next_token_positions(batch.attention_mask, batch.stat_mask, max_positions)
                positions[:, :config.min_context] = False
                bar.advance(task, int(batch.lengths.sum()))
                if not positions.any():
                    continue
                width = positions.shape[1]
                targets = next_tokens(batch.input_ids, positions)
                logits = model(input_ids=batch.input_ids[:, :width].to(device),
                               attention_mask=batch.attention_mask[:, :width].to(device), use_cache=False).logits
                where = positions.to(device)
                row_in_batch, t = positions.nonzero(as_tuple=True)
                parts["rows"].append(batch.row_indices[row_in_batch].numpy())
                parts["positions"].append(t.numpy())
                parts["labels"].append(mask[targets.numpy()])
                parts["f_probability"].append(probes.feature_probability(logits[where], f_tokens))
                parts["activations"].append(np.stack(
                    [captured[int(layer)][where][:, int(neuron)].double().cpu().numpy()
                     for layer, neuron in zip(layers, neurons)], axis=1))
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    if not parts["rows"]:
        return Candidates(np.zeros(0, int), np.zeros(0, int), np.zeros(0, bool), np.zeros(0), np.zeros((0, len(layers))))
    return Candidates(**{name: np.concatenate(values) for name, values in parts.items()})


def analyse(candidates: Candidates, neurons: dict[str, np.ndarray], config: EnsemblingConfig,
            dataset: Dataset, model_name: str) -> EnsemblingResult:
    """The balanced set, the split, the probes and the model's accuracy on the test split."""
    n_with, n_without = int(candidates.labels.sum()), int((~candidates.labels).sum())
    if min(n_with, n_without) < MIN_PER_CLASS:
        raise AtlasError(f"{model_name} on {dataset.name!r}: only {n_with} positions whose next token is "
                         f"{config.feature} and {n_without} without (after {config.min_context} tokens of context), "
                         f"{MIN_PER_CLASS} of each needed: pick a more frequent feature, a larger dataset or a "
                         "smaller --min-context")
    chosen = probes.balanced_positions(candidates.labels, config.max_per_class, config.seed)
    labels = candidates.labels[chosen]
    train = probes.train_split(labels, config.train_fraction, config.seed)
    accuracies = probes.probe_accuracies(candidates.activations[chosen], labels, train, config.seed)
    model_acc = probes.model_accuracy(candidates.f_probability[chosen][~train], labels[~train])
    return EnsemblingResult(config.feature, neurons, chosen, labels, train, accuracies, model_acc, candidates)


def compute(model_row: Model, dataset: Dataset, config: EnsemblingConfig,
            candidates: dict[str, np.ndarray]) -> EnsemblingResult:
    from atlas.modeling import load_model

    loaded = load_model(model_row.source, model_row.revision, dtype=model_dtype(config.dtype))
    device = resolve_device(config.device)
    loaded.model.to(device)
    mask = feature_mask(loaded.tokenizer, config.feature)
    if not mask.any():
        raise AtlasError(f"no token of {model_row.name}'s vocabulary has the feature {config.feature!r}: "
                         "pick another feature")
    scores = score_neurons(loaded, candidates, mask)
    picked = probes.choose_neurons(candidates["layer"], candidates["vocab_class"], scores, model_row.n_layers,
                                   config.n_neurons, NEURON_POOLS[config.neuron_pool])
    neurons = {**{name: values[picked] for name, values in candidates.items()}, "score": scores[picked]}
    token_rows, n_rows = open_tokens(dataset, loaded, config.tokens)
    found = collect(loaded, token_rows, n_rows, neurons["layer"], neurons["neuron"], mask, config, device,
                    label=f"{KIND} {model_row.name} {config.feature}")
    return analyse(found, neurons, config, dataset, model_row.name)


def result_rows(result: EnsemblingResult) -> dict[str, np.ndarray]:
    """probe_results columns: the individual probes by |score| rank, then the top-k probes (rank = k - 1)."""
    neurons, acc = result.neurons, result.accuracies
    n = len(neurons["layer"])
    order = acc.order
    columns = {name: np.concatenate([neurons[name], neurons[name][order]])
               for name in ("layer", "neuron", "vocab_class", "score")}
    return {
        "kind": np.array(["individual"] * n + ["topk"] * n, dtype=object),
        "rank": np.concatenate([np.arange(n), np.arange(n)]),
        **columns,
        "accuracy": np.concatenate([acc.individual_test, acc.topk_test]),
        "train_accuracy": np.concatenate([acc.individual_train, acc.topk_train]),
    }


def write(session: Session, model_id: int, dataset_id: int, result: EnsemblingResult, config: EnsemblingConfig,
          job_id: int) -> int:
    """Replace the (model, dataset, feature) run and its probe rows."""
    where = (ProbeRun.model_id == model_id, ProbeRun.dataset_id == dataset_id, ProbeRun.feature == result.feature)
    old = session.scalars(select(ProbeRun.id).where(*where)).all()
    if old:  # explicit: SQLite enforces ON DELETE CASCADE only with its foreign-key pragma
        session.execute(delete(ProbeResult).where(ProbeResult.run_id.in_(old)))
        session.execute(delete(ProbeRun).where(ProbeRun.id.in_(old)))
    run_row = ProbeRun(model_id=model_id, dataset_id=dataset_id, feature=result.feature,
                       n_train=int(result.train.sum()), n_test=int((~result.train).sum()), split_seed=config.seed,
                       min_context=config.min_context, model_accuracy=result.model_accuracy, job_id=job_id)
    session.add(run_row)
    session.flush()
    return 1 + bulk_insert(session, ProbeResult, {"run_id": run_row.id, **result_rows(result)})


def run(config: EnsemblingConfig, store: Store) -> None:
    check_config(config)
    with store.session() as session:
        models = resolve_models(session, config.model, config.family)
        dataset = resolve_dataset(session, config.dataset)
        neurons = {m.id: neuron_candidates(session, m, config.neuron_pool) for m in models}
    check_dataset(dataset, config.tokens)
    check_tokens(store, dataset, models)
    for model_row in models:
        run_unit(
            store, JobKey(KIND, model_id=model_row.id, dataset_id=dataset.id, shard=config.feature), config,
            compute=lambda m=model_row: compute(m, dataset, config, neurons[m.id]),
            write=lambda session, result, job_id, m=model_row: write(session, m.id, dataset.id, result, config,
                                                                      job_id),
            overwrite=config.overwrite, label=f"{KIND} {model_row.name} on {dataset.name} ({config.feature})",
        )
