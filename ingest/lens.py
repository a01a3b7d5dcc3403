"""Job `lens`: the logit lens at every residual stream state, and per-layer statistics.

One forward pass per batch (eager attention, for the attention probabilities), stopped after the
last block: the adapter's captures give h_0..h_L (h_L before the final norm, which Hugging Face's
last hidden state already includes), each block's attention and MLP writes, and each block's
attention to the previous five tokens (reduced as the probabilities are made). The lens at state
l is unembed(final_norm(h_l)), the norm's statistics taken from h_l itself; the final
distribution is the lens at h_L, i.e. the model's own logits. The lens on the scored positions of
ingest/next_token.py (a prediction needs a next token); the layer statistics on every counted
position (non-special, the last token of a row included), attn_prev5 on those with q >= 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session

from atlas.devices import model_dtype, resolve_device
from atlas.metrics.layers import (PREVIOUS_TOKENS_WINDOW, MeanAccumulator, next_token_metrics,
                                  previous_token_attention, write_norms)
from atlas.store import Store
from atlas.store.schema import Dataset, LayerStat, LogitLens, Model
from ingest.next_token import (ShardedMeasure, ShardedNextTokenConfig, open_tokens, require_positions, run_per_model,
                               scored_batches)
from ingest.runner import replace_rows

KIND = "lens"


@dataclass
class LensConfig(ShardedNextTokenConfig):
    """Logit lens (KL to the final distribution, entropy, top-1 agreement, accuracy) at every residual
    state, and per layer the attention to the previous five tokens and the sub-layer write norms."""


@dataclass
class LensResults:
    lens: dict[str, list[Any]]    # one row per residual state 0..L
    stats: dict[str, list[Any]]   # one row per block 0..L-1


def measure(loaded, batches) -> MeanAccumulator:
    """Per-position lens metrics (group ('lens', state)) and layer statistics (group ('stats', layer)), summed."""
    from atlas.modeling import run_to_last_block

    adapter, model = loaded.adapter, loaded.model
    sums = MeanAccumulator()
    with torch.inference_mode():
        for batch in batches:
            with adapter.capture_residual_stream(model) as states, \
                    adapter.capture_sublayers(model, reduce_probs=previous_token_attention) as writes:
                run_to_last_block(loaded, batch.input_ids, batch.attention_mask)
            final = adapter.logits_from_residual(model, states[-1][batch.positions])
            for state, hidden in enumerate(states):
                logits = adapter.logits_from_residual(model, hidden[batch.positions])
                sums.add(("lens", state), next_token_metrics(logits, batch.targets, reference=final))
            late_queries = batch.counted.clone()
            late_queries[:, :PREVIOUS_TOKENS_WINDOW] = False  # fewer than five previous tokens
            for layer in range(len(writes.attention)):
                sums.add(("stats", layer), {
                    "attn_out_norm": write_norms(writes.attention[layer], batch.counted),
                    "mlp_out_norm": write_norms(writes.mlp[layer], batch.counted),
                    "attn_prev5": writes.attention_probs[layer][late_queries],
                })
    return sums


def results(sums: MeanAccumulator, n_layers: int) -> LensResults:
    states = range(n_layers + 1)
    lens = {
        "layer": list(states),
        "kl_to_final": [sums.mean(("lens", s), "kl") for s in states],
        "entropy_nats": [sums.mean(("lens", s), "entropy") for s in states],
        "entropy_bits": [sums.mean(("lens", s), "entropy") / math.log(2) for s in states],
        "top1_agreement": [sums.mean(("lens", s), "top1_agreement") for s in states],
        "accuracy": [sums.mean(("lens", s), "accuracy") for s in states],
    }
    layers = range(n_layers)
    stats = {
        "layer": list(layers),
        "attn_prev5": [sums.mean(("stats", l), "attn_prev5") for l in layers],  # NaN -> NULL: no query q >= 5
        "attn_out_norm": [sums.mean(("stats", l), "attn_out_norm") for l in layers],
        "mlp_out_norm": [sums.mean(("stats", l), "mlp_out_norm") for l in layers],
    }
    return LensResults(lens, stats)


def compute(model_row: Model, dataset: Dataset, config: LensConfig) -> LensResults:
    from atlas.modeling import load_model

    loaded = load_model(model_row.source, model_row.revision, dtype=model_dtype(config.dtype),
                        attn_implementation="eager")
    device = resolve_device(config.device)
    loaded.model.to(device)
    token_rows, n_rows = open_tokens(dataset, loaded, config.tokens)
    batches = scored_batches(token_rows, n_rows, loaded, batch_size=config.batch_size,
                             exclude_special_tokens=config.exclude_special_tokens, device=device,
                             label=f"lens {model_row.name}")
    return finish(measure(loaded, batches), model_row, dataset)


def finish(sums: MeanAccumulator, model_row: Model, dataset: Dataset) -> LensResults:
    require_positions(sums.count(("lens", 0), "loss"), dataset)
    return results(sums, model_row.n_layers)


def shard_measure(model_row: Model):
    """What a token shard's worker runs on this model (picklable)."""
    return measure


def write(session: Session, model_id: int, dataset_id: int, result: LensResults, job_id: int) -> int:
    where = {"model_id": model_id, "dataset_id": dataset_id}
    n_stats = replace_rows(session, LayerStat, where, {**result.stats, "job_id": job_id})
    return replace_rows(session, LogitLens, where, {**result.lens, "job_id": job_id}) + n_stats


def run(config: LensConfig, store: Store) -> None:
    run_per_model(KIND, config, store, compute, write,
                  ShardedMeasure(shard_measure, finish, attn_implementation="eager"))
