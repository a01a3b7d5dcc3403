"""Job `heads`: per attention head, the subjoiner score, attention to the first position and to the previous token.

One ledger unit per (model, dataset); one table row per (layer, head) in head_stats. The definitions
(word structure from decoded token strings, the count-matched baseline at word starts) are in
atlas/metrics/heads.py. One forward pass per batch (eager attention), stopped after the last block;
each block's attention probabilities are reduced to float64 per-head sums as they are made, so
nothing of size q x k outlives its block. Query positions: the counted positions of
ingest/next_token.py (real, non-special unless --no-exclude-special-tokens; rows cut to the model's
context). A cheap first pass over the token ids (no model) finds the longest word prefix, the
longest window the baseline needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session

from atlas.data import TokenizedDataset
from atlas.devices import model_dtype, resolve_device
from atlas.metrics.heads import HeadStatsAccumulator, head_sums, word_flags, word_positions
from atlas.store import Store
from atlas.store.schema import Dataset, HeadStat, Model
from ingest.next_token import NextTokenConfig, open_tokens, require_positions, run_per_model, scored_batches
from ingest.runner import replace_rows

KIND = "heads"


@dataclass
class HeadsConfig(NextTokenConfig):
    """Per attention head: the subjoiner score (attention from a word's continuation to the earlier tokens of
    the same word, minus the same-length previous-token attention at word starts), and the mean attention
    to the first position and to the previous token."""

    exclude_special_tokens: bool = True
    """Do not count special tokens (BOS) as query positions nor as tokens of a word or of a baseline window."""


@dataclass
class VocabularyFlags:
    starts_word: torch.Tensor  # bool [vocab] on the device
    continues: torch.Tensor    # bool [vocab] on the device

    def words(self, input_ids: torch.Tensor, counted: torch.Tensor):
        return word_positions(self.starts_word[input_ids], self.continues[input_ids], counted)


def vocabulary_flags(tokenizer, device: str) -> VocabularyFlags:
    starts, continues = word_flags([tokenizer.decode([i]) for i in range(len(tokenizer))])
    return VocabularyFlags(torch.from_numpy(starts).to(device), torch.from_numpy(continues).to(device))


def longest_prefix(rows: TokenizedDataset, n_rows: int, flags: VocabularyFlags, batch_size: int,
                   exclude_special_tokens: bool) -> int:
    """The most earlier same-word tokens of any continuation in the first n_rows rows (uncut: an upper bound)."""
    longest, device = 0, flags.starts_word.device
    for batch in rows.batches(batch_size, n_rows=n_rows):
        counted = batch.stat_mask if exclude_special_tokens else batch.attention_mask.bool()
        longest = max(longest, flags.words(batch.input_ids.to(device), counted.to(device)).longest_prefix)
    return longest


def measure(loaded, batches, flags: VocabularyFlags, window: int) -> HeadStatsAccumulator:
    """Head sums of every batch (ScoredBatch: input_ids, attention_mask, counted), window = longest prefix."""
    from atlas.modeling import run_to_last_block

    adapter, model = loaded.adapter, loaded.model
    sums = HeadStatsAccumulator(window)
    with torch.inference_mode():
        for batch in batches:
            words = flags.words(batch.input_ids, batch.counted)
            sums.add_positions(words)
            with adapter.capture_sublayers(model, reduce_probs=lambda probs: head_sums(probs, words, window)) as writes:
                run_to_last_block(loaded, batch.input_ids, batch.attention_mask)
            for layer, layer_sums in enumerate(writes.attention_probs):
                sums.add_layer(layer, layer_sums)
    return sums


def compute(model_row: Model, dataset: Dataset, config: HeadsConfig) -> dict[str, list]:
    from atlas.modeling import load_model

    loaded = load_model(model_row.source, model_row.revision, dtype=model_dtype(config.dtype),
                        attn_implementation="eager")
    device = resolve_device(config.device)
    loaded.model.to(device)
    token_rows, n_rows = open_tokens(dataset, loaded, config.tokens)
    flags = vocabulary_flags(loaded.tokenizer, device)
    window = longest_prefix(token_rows, n_rows, flags, config.batch_size, config.exclude_special_tokens)
    batches = scored_batches(token_rows, n_rows, loaded, batch_size=config.batch_size,
                             exclude_special_tokens=config.exclude_special_tokens, device=device,
                             label=f"heads {model_row.name}")
    sums = measure(loaded, batches, flags, window)
    require_positions(int(sums.counts["first"][0]), dataset)
    return sums.results()


def write(session: Session, model_id: int, dataset_id: int, columns: dict[str, list], job_id: int) -> int:
    where = {"model_id": model_id, "dataset_id": dataset_id}
    return replace_rows(session, HeadStat, where, {**columns, "job_id": job_id})


def run(config: HeadsConfig, store: Store) -> None:
    run_per_model(KIND, config, store, compute, write)
