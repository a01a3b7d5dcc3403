"""Job `attention-roles`: attention deactivation neurons (Gurnee et al. 2024, section 5.2).

One ledger unit per (model, dataset). Three steps:
1. k_first: every head's key at position 0, averaged over the dataset's rows. A key at position 0
   depends only on the first token (causal attention), so this pass feeds each row's first token alone.
2. Scores (atlas/metrics/attention_roles.py): every neuron x every head of a later layer, one GEMM per
   layer in float64, with z against --n-random seeded random directions; the --top-heads heads with
   the largest |z| per neuron are stored. With rotary positions the score is averaged over the query
   positions p in [q_from, ctx - 1] (ctx: the dataset's row width cut to the model's context).
   q_from = --min-query-position (64), or 1 when ctx <= it (a short context); the value used is
   recorded in the job's config as `query_positions_from`. Neurons of the last layer have no later
   head, and a neuron whose processed w_out is zero has no z: neither gets rows. A head whose
   direction is zero (k_first = 0, e.g. a first token with a zero embedding and no biases) has no z
   and is never ranked.
3. Path ablation of the --ablate-pairs pairs with the most negative z (deactivation lowers attention to
   the sink, so only negative scores are candidates), in ONE untouched pass per batch that stops after
   the last head layer needed. At head layer m, for each pair, head h's query is recomputed from the
   residual stream its norm reads minus act x w_out (raw w_out: the neuron's actual write), with the
   adapter's query weights and rotation, and the layer's own eager attention runs again with that
   query for head h only: keys, values, the other heads and every later reader see the original.
   Measured on the non-special positions q >= q_from: mean attention of head h to position 0 and mean
   norm of its output z (= probs @ V, before W_O), untouched and ablated, and the Pearson correlation
   between the neuron's activation and the untouched attention to position 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from sqlalchemy import update
from sqlalchemy.orm import Session

from atlas.devices import model_dtype, resolve_device
from atlas.errors import AtlasError
from atlas.metrics.attention_roles import (CorrelationAccumulator, effective_keys, fold_query, head_directions,
                                           most_negative, neuron_head_scores, processed_writes,
                                           random_score_std, random_unit_directions, top_by_magnitude, z_scores)
from atlas.store import Store
from atlas.store.schema import Dataset, HeadDeactivation, Job, Model, NeuronHeadScore
from ingest.next_token import check_options, open_tokens, run_per_model, scored_batches
from ingest.options import RUN_OPTION, DatasetName, DeviceName, FamilyName, ModelDtype, ModelName, Overwrite
from ingest.progress import RateColumn, progress_bar
from ingest.runner import replace_rows

KIND = "attention-roles"


@dataclass
class AttentionRolesConfig:
    """Attention deactivation: each neuron's direct effect on later heads' attention to the first position
    (z against random directions), and a path ablation of the strongest deactivating pairs."""

    model: ModelName = None
    family: FamilyName = None
    dataset: DatasetName = None
    tokens: int | None = None
    """Use only the first rows of the dataset holding this many tokens (default: all)."""
    batch_size: Annotated[int, RUN_OPTION] = 8
    """Rows (documents) per batch."""
    top_heads: int = 5
    """Heads stored per neuron: those with the largest |z|."""
    n_random: int = 1000
    """Random directions of the z baseline."""
    seed: int = 0
    """Seed of the random directions."""
    ablate_pairs: int = 10
    """Path-ablate this many (neuron, head) pairs: those with the most negative z (0: none)."""
    min_query_position: int = 64
    """First query position of the rotary average and of the ablation (1 when the context is not longer)."""
    dtype: ModelDtype = "float32"
    device: DeviceName = "auto"
    overwrite: Overwrite = False


@dataclass(frozen=True)
class Pair:
    layer: int
    neuron: int
    head_layer: int
    head: int
    score: float
    z: float


@dataclass
class PairSums:
    n: int = 0
    attn_orig: float = 0.0
    attn_ablated: float = 0.0
    z_norm_orig: float = 0.0
    z_norm_ablated: float = 0.0
    correlation: CorrelationAccumulator = field(default_factory=CorrelationAccumulator)


@dataclass
class AttentionRolesResult:
    scores: dict[str, list[Any]]
    deactivation: dict[str, list[Any]]
    query_positions_from: int


def check_config(config: AttentionRolesConfig) -> None:
    check_options(config.tokens, config.batch_size)
    for name, value, least in (("--top-heads", config.top_heads, 1), ("--n-random", config.n_random, 2),
                               ("--ablate-pairs", config.ablate_pairs, 0),
                               ("--min-query-position", config.min_query_position, 1)):
        if value < least:
            raise AtlasError(f"{name} must be at least {least}, got {value}")


def query_positions_from(ctx: int, min_query_position: int) -> int:
    """The first query position used: min_query_position, or 1 when the context is not longer than it."""
    if ctx < 2:
        raise AtlasError(f"a context of {ctx} token has no query position after the first: register the dataset "
                         "with a longer --ctx-len")
    return min_query_position if ctx > min_query_position else 1


# -- 1. the key at position 0 -------------------------------------------------------------------

def first_keys(loaded, rows, n_rows: int, batch_size: int, device: str) -> list[torch.Tensor]:
    """Per layer, the post-rotary key at position 0 of every key/value head averaged over the rows:
    [n_kv_heads, d_head] float64 each."""
    from atlas.modeling import run_to_last_block

    adapter, model = loaded.adapter, loaded.model
    sums: dict[int, torch.Tensor] = {}

    def record(layer, query, key, value, attend):
        first = key[:, :, 0].double().sum(dim=0)
        sums[layer] = first if layer not in sums else sums[layer] + first
        return attend(query, key, value)

    n = 0
    with adapter.intercept_attention(model, record), progress_bar(RateColumn("rows")) as bar:
        task = bar.add_task(f"{KIND}: keys at position 0", total=n_rows)
        for batch in rows.batches(batch_size, n_rows=n_rows):
            run_to_last_block(loaded, batch.input_ids[:, :1].to(device), batch.attention_mask[:, :1].to(device))
            n += batch.input_ids.shape[0]
            bar.advance(task, batch.input_ids.shape[0])
    return [sums[layer] / n for layer in range(adapter.n_layers(model))]


# -- 2. scores and z ------------------------------------------------------------------------------

def layer_directions(loaded, k_first: torch.Tensor, block, positions: torch.Tensor) -> torch.Tensor:
    """[heads, d_model]: the block's heads' deactivation directions (norm scale folded into W_Q, each head
    reading its key group's k_first, carried through R(p)^T and averaged over the query positions)."""
    adapter, model = loaded.adapter, loaded.model
    n_heads, n_kv = adapter.n_heads(model), adapter.n_kv_heads(model)
    weights = adapter.query_key(block)
    w_q = fold_query(weights.w_q.to(k_first.device), adapter.attention_norm_scale(block).to(k_first.device))
    turned = adapter.rotate(model, k_first[:, None, :].expand(-1, len(positions), -1), positions, transpose=True)
    keys = effective_keys(turned)[torch.arange(n_heads, device=k_first.device) // (n_heads // n_kv)]
    return head_directions(w_q, keys)


def score_all(loaded, k_first: list[torch.Tensor], config: AttentionRolesConfig, q_from: int, ctx: int,
              device: str) -> tuple[dict[str, list[Any]], list[Pair]]:
    """The top heads of every neuron (rows of neuron_head_scores) and the pairs to ablate."""
    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.blocks(model)
    n_layers, n_heads = len(blocks), adapter.n_heads(model)
    centre = adapter.final_norm_kind == "layernorm"
    positions = torch.arange(q_from, ctx, device=device)
    directions = [layer_directions(loaded, k_first[m].to(device), blocks[m], positions) for m in range(1, n_layers)]
    all_heads = torch.cat(directions)  # rows: (m, h) for m = 1..L-1
    unit = random_unit_directions(config.n_random, adapter.d_model(model), config.seed, centre, device)
    unit_std = random_score_std(unit, all_heads)
    rows: dict[str, list[Any]] = {name: [] for name in ("layer", "neuron", "rank", "head_layer", "head", "score", "z")}
    candidates: list[Pair] = []
    for layer in range(n_layers - 1):
        first = layer * n_heads  # later heads start at layer + 1, i.e. row (layer + 1 - 1) * n_heads
        w = processed_writes(adapter.w_out(blocks[layer]).to(device), centre)
        scores = neuron_head_scores(w, all_heads[first:])
        z = z_scores(scores, w.norm(dim=-1), unit_std[first:])
        heads_with_z = unit_std[first:] > 0
        usable = w.norm(dim=-1) > 0
        z = torch.where(usable[:, None] & heads_with_z[None, :], z, torch.full_like(z, float("nan")))
        top = top_by_magnitude(z, config.top_heads, heads_with_z)[usable]      # [kept neurons, k]
        neurons = torch.nonzero(usable).flatten()[:, None].expand_as(top)
        ranks = torch.arange(top.shape[1], device=top.device)[None, :].expand_as(top)
        for name, values in zip(rows, (torch.full_like(top, layer), neurons, ranks, layer + 1 + top // n_heads,
                                       top % n_heads, scores[neurons, top], z[neurons, top])):
            rows[name].extend(values.flatten().tolist())
        for neuron, column in most_negative(z, config.ablate_pairs):
            head_layer, head = divmod(column, n_heads)
            candidates.append(Pair(layer, neuron, layer + 1 + head_layer, head,
                                   float(scores[neuron, column]), float(z[neuron, column])))
    return rows, sorted(candidates, key=lambda pair: pair.z)[:config.ablate_pairs]


# -- 3. path ablation ---------------------------------------------------------------------------

class _Done(Exception):
    """Raised once the last head layer needed has been measured: later blocks never run."""


def path_ablation(loaded, batches, pairs: list[Pair], q_from: int) -> dict[Pair, PairSums]:
    """Sums over the batches' counted positions q >= q_from, per pair, untouched and with the neuron's write
    removed from the head's query only."""
    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.blocks(model)
    sums = {pair: PairSums() for pair in pairs}
    head_layers = sorted({pair.head_layer for pair in pairs})
    neurons = {layer: sorted({p.neuron for p in pairs if p.layer == layer}) for layer in {p.layer for p in pairs}}
    queries = {m: adapter.query_key(blocks[m]) for m in head_layers}
    writes = {pair: adapter.w_out(blocks[pair.layer])[pair.neuron] for pair in pairs}
    captured: dict[Any, torch.Tensor] = {}

    def keep_activations(layer):
        def hook(module, args):
            captured[("act", layer)] = args[0][..., neurons[layer]]
        return hook

    def keep_norm_input(layer):
        def hook(module, args):
            captured[("resid", layer)] = args[0]
        return hook

    def measure(layer, query, key, value, attend):
        output, probs = attend(query, key, value)
        if layer in head_layers:
            for pair in (p for p in pairs if p.head_layer == layer):
                act = captured[("act", pair.layer)][..., neurons[pair.layer].index(pair.neuron)]
                ablated = query.clone()
                ablated[:, pair.head] = ablated_query(adapter, model, blocks[layer], queries[layer], pair.head,
                                                      captured[("resid", layer)] - act[..., None] * writes[pair])
                output_ablated, probs_ablated = attend(ablated, key, value)
                accumulate(sums[pair], captured["select"], act, pair.head, output, probs, output_ablated,
                           probs_ablated)
        if layer == head_layers[-1]:
            raise _Done
        return output, probs

    handles = [adapter.down_proj(blocks[layer]).register_forward_pre_hook(keep_activations(layer)) for layer in neurons]
    handles += [adapter.attention_input_norm(blocks[m]).register_forward_pre_hook(keep_norm_input(m))
                for m in head_layers]
    try:
        with adapter.intercept_attention(model, measure), torch.inference_mode():
            for batch in batches:
                late = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device) >= q_from
                captured["select"] = batch.counted & late[None, :]
                try:
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                except _Done:
                    pass
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return sums


def ablated_query(adapter, model, block, weights, head: int, residual: torch.Tensor) -> torch.Tensor:
    """Head `head`'s post-rotary query [batch, seq, d_head] when its norm reads `residual` [batch, seq, d_model]."""
    normed = adapter.attention_input_norm(block)(residual)
    query = normed @ weights.w_q[head].T
    if weights.b_q is not None:
        query = query + weights.b_q[head]
    return adapter.rotate(model, query, torch.arange(residual.shape[1], device=residual.device))


def accumulate(sums: PairSums, select: torch.Tensor, act: torch.Tensor, head: int, output, probs,
               output_ablated, probs_ablated) -> None:
    """Add one batch: probs [batch, heads, q, k], output [batch, seq, heads, d_head]; select [batch, seq]."""
    first, first_ablated = probs[:, head, :, 0][select].double(), probs_ablated[:, head, :, 0][select].double()
    sums.n += int(select.sum())
    sums.attn_orig += float(first.sum())
    sums.attn_ablated += float(first_ablated.sum())
    sums.z_norm_orig += float(output[:, :, head].double().norm(dim=-1)[select].sum())
    sums.z_norm_ablated += float(output_ablated[:, :, head].double().norm(dim=-1)[select].sum())
    sums.correlation.add(act[select], first)


def deactivation_rows(sums: dict[Pair, PairSums], dataset: Dataset, q_from: int) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {name: [] for name in (
        "layer", "neuron", "head_layer", "head", "score", "z", "n_positions", "attn_first_orig",
        "attn_first_ablated", "z_norm_orig", "z_norm_ablated", "act_attn_corr")}
    for pair, s in sums.items():
        if s.n == 0:
            raise AtlasError(f"dataset {dataset.name!r} has no non-special query position >= {q_from}: register "
                             "a dataset with longer rows, or lower --min-query-position")
        values = (pair.layer, pair.neuron, pair.head_layer, pair.head, pair.score, pair.z, s.n, s.attn_orig / s.n,
                  s.attn_ablated / s.n, s.z_norm_orig / s.n, s.z_norm_ablated / s.n, s.correlation.correlation())
        for name, value in zip(rows, values):
            rows[name].append(value)
    return rows


# -- the job ----------------------------------------------------------------------------------------

def context_length(loaded, dataset: Dataset) -> int:
    limit = loaded.adapter.max_positions(loaded.model)
    return dataset.ctx_len if limit is None else min(dataset.ctx_len, limit)


def compute(model_row: Model, dataset: Dataset, config: AttentionRolesConfig) -> AttentionRolesResult:
    from atlas.modeling import load_model

    loaded = load_model(model_row.source, model_row.revision, dtype=model_dtype(config.dtype),
                        attn_implementation="eager")
    device = resolve_device(config.device)
    loaded.model.to(device)
    ctx = context_length(loaded, dataset)
    q_from = query_positions_from(ctx, config.min_query_position)
    rows, n_rows = open_tokens(dataset, loaded, config.tokens)
    with torch.inference_mode():
        k_first = first_keys(loaded, rows, n_rows, config.batch_size, device)
        scores, pairs = score_all(loaded, k_first, config, q_from, ctx, device)
    deactivation = deactivation_rows({}, dataset, q_from)
    if pairs:
        batches = scored_batches(rows, n_rows, loaded, batch_size=config.batch_size, exclude_special_tokens=True,
                                 device=device, label=f"{KIND} {model_row.name}: path ablation")
        deactivation = deactivation_rows(path_ablation(loaded, batches, pairs, q_from), dataset, q_from)
    return AttentionRolesResult(scores, deactivation, q_from)


def write(session: Session, model_id: int, dataset_id: int, result: AttentionRolesResult, job_id: int) -> int:
    where = {"model_id": model_id, "dataset_id": dataset_id}
    job = session.get(Job, job_id)
    session.execute(update(Job).where(Job.id == job_id)
                    .values(config={**job.config, "query_positions_from": result.query_positions_from}))
    n_pairs = replace_rows(session, HeadDeactivation, where, {**result.deactivation, "job_id": job_id})
    return replace_rows(session, NeuronHeadScore, where, {**result.scores, "job_id": job_id}) + n_pairs


def run(config: AttentionRolesConfig, store: Store) -> None:
    check_config(config)
    run_per_model(KIND, config, store, compute, write)
