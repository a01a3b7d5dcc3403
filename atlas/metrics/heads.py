"""Per-head attention statistics: the subjoiner score, attention to the first position and to the previous token.

Word structure, from the decoded token strings s = tokenizer.decode([i]):
  starts a word       s = " " + letters (one leading space, the rest alphabetic: " un");
  continues alphabet  s = letters (alphabetic, no leading space: "believ", "able").
A token is alphabetic when it is either. In a row (only counted positions: never padding, nor special
tokens unless counted), a word is a maximal run of alphabetic tokens in which only the first may
start a word: a new run begins at a word-starting token, after a non-alphabetic or uncounted token,
or at the row start. Position q CONTINUES a word when its token continues the alphabet and the token
before it is alphabetic; its m(q) >= 1 earlier same-word tokens are q - m(q) .. q - 1 (back to the
token with the leading space, or to the run's first token).

Per head, with A[q, k] its attention probabilities (SPEC "Subjoiner heads"):
  subjoiner_attn     = mean over continuations q of sum_{k=1..m(q)} A[q, q-k];
  baseline(m)        = mean over word-START positions p (counted, token starts a word) whose m previous
                       tokens are all counted (so a special first token, the attention sink, is never
                       in a window) of sum_{k=1..m} A[p, p-k];
  subjoiner_baseline = mean over continuations q of baseline(m(q)) (count-matched: each window length
                       weighs as often as continuations use it);
  subjoiner          = subjoiner_attn - subjoiner_baseline.
A previous-token head scores ~0 (both sides ~1); a head that reads back exactly to the word start
scores high. Undefined (NaN) without continuations, or when some m(q) has no baseline position.
  attn_first = mean over counted queries q of A[q, 0];
  attn_prev  = mean over counted queries q >= 1 of A[q, q-1].
A tokenizer whose single-token decode shows no leading spaces (SentencePiece drops its word marker)
has no word boundaries: no token continues a word and the subjoiner score is undefined.

Sums are float64 on the probabilities' device; HeadStatsAccumulator turns batches into means equal to
those over their concatenation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Columns of the per-layer sums a reducer returns (then one per window length m = 1..K).
FIRST, PREV, CONTINUATION, WINDOWS = 0, 1, 2, 3


def word_flags(token_strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(starts_word, continues) bool [vocab] from decoded token strings (see the module docstring)."""
    starts = np.array([s.startswith(" ") and s[1:].isalpha() for s in token_strings], dtype=bool)
    continues = np.array([s.isalpha() for s in token_strings], dtype=bool)
    if not starts.any():  # no word boundaries visible: nothing can be said to continue a word
        continues[:] = False
    return starts, continues


@dataclass
class WordPositions:
    """A batch's word structure, all [b, T] on the batch's device."""

    counted: torch.Tensor   # bool: query positions that count
    prefix: torch.Tensor    # long: m(q) at continuations, 0 elsewhere
    is_start: torch.Tensor  # bool: counted positions whose token starts a word
    room: torch.Tensor      # long: how many counted positions immediately precede each position

    @property
    def longest_prefix(self) -> int:
        return int(self.prefix.max()) if self.prefix.numel() else 0


def word_positions(starts_word: torch.Tensor, continues: torch.Tensor, counted: torch.Tensor) -> WordPositions:
    """Word structure of token rows: starts_word / continues are the vocabulary flags looked up at each
    position (bool [b, T]), counted the positions that count (bool [b, T])."""
    starts_word, continues, counted = starts_word & counted, continues & counted, counted.bool()
    alphabetic = starts_word | continues
    before = torch.zeros_like(alphabetic)
    before[:, 1:] = alphabetic[:, :-1]
    continuation = continues & before
    index = torch.arange(counted.shape[1], device=counted.device).expand_as(counted)
    run_begin = torch.where(alphabetic & ~continuation, index, torch.zeros_like(index)).cummax(dim=1).values
    prefix = torch.where(continuation, index - run_begin, torch.zeros_like(index))
    last_uncounted = torch.where(~counted, index, torch.full_like(index, -1)).cummax(dim=1).values
    previous_uncounted = torch.cat([torch.full_like(index[:, :1], -1), last_uncounted[:, :-1]], dim=1)
    return WordPositions(counted, prefix, starts_word, index - 1 - previous_uncounted)


def head_sums(probs: torch.Tensor, words: WordPositions, window: int) -> torch.Tensor:
    """float64 [heads, 3 + window]: sums over the batch of A[q, 0] (counted q), A[q, q-1] (counted q >= 1),
    the continuations' same-word attention, and for m = 1..window the word starts' attention to their m
    previous tokens (starts with room >= m). probs [b, heads, q, k] as the model made them (b, q <= T)."""
    batch, heads, n_queries, _ = probs.shape
    counted = words.counted[:, :n_queries].double()
    prefix, room = words.prefix[:, :n_queries], words.room[:, :n_queries]
    is_start = words.is_start[:, :n_queries]
    out = torch.zeros(heads, WINDOWS + window, dtype=torch.float64, device=probs.device)
    out[:, FIRST] = torch.einsum("bhq,bq->h", probs[..., 0].double(), counted)
    running = torch.zeros(batch, heads, n_queries, dtype=torch.float64, device=probs.device)
    for k in range(1, min(max(window, 1), n_queries - 1) + 1):
        running[..., k:] += torch.diagonal(probs, offset=-k, dim1=-2, dim2=-1).double()  # A[q, q-k], q >= k
        if k == 1:
            out[:, PREV] = torch.einsum("bhq,bq->h", running, counted)  # q = 0 adds nothing: running is 0 there
        if k <= window:
            out[:, CONTINUATION] += torch.einsum("bhq,bq->h", running, (prefix == k).double())
            out[:, WINDOWS + k - 1] = torch.einsum("bhq,bq->h", running, (is_start & (room >= k)).double())
    return out


def position_counts(words: WordPositions, window: int) -> dict[str, np.ndarray]:
    """Counts that go with head_sums (the same for every head and layer): first [1], prev [1],
    continuations by m [window], word starts with room >= m [window]."""
    counted, prefix = words.counted, words.prefix
    ms = torch.arange(1, window + 1, device=prefix.device)
    return {
        "first": np.array([int(counted.sum())]),
        "prev": np.array([int(counted[:, 1:].sum())]),
        "continuations": (prefix[..., None] == ms).sum(dim=(0, 1)).cpu().numpy(),
        "starts": (words.is_start[..., None] & (words.room[..., None] >= ms)).sum(dim=(0, 1)).cpu().numpy(),
    }


class HeadStatsAccumulator:
    """Per-layer float64 head sums and the position counts over batches; means per head at the end."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.sums: dict[int, torch.Tensor] = {}
        self.counts = {"first": np.zeros(1, np.int64), "prev": np.zeros(1, np.int64),
                       "continuations": np.zeros(window, np.int64), "starts": np.zeros(window, np.int64)}

    def add_positions(self, words: WordPositions) -> None:
        for name, values in position_counts(words, self.window).items():
            self.counts[name] += values

    def add_layer(self, layer: int, sums: torch.Tensor) -> None:
        self.sums[layer] = sums if layer not in self.sums else self.sums[layer] + sums

    def results(self) -> dict[str, list]:
        """Columns with one entry per (layer, head), layer-major: layer, head, subjoiner, subjoiner_attn,
        subjoiner_baseline, n_continuations, attn_first, attn_prev (NaN where undefined)."""
        columns: dict[str, list] = {name: [] for name in (
            "layer", "head", "subjoiner", "subjoiner_attn", "subjoiner_baseline", "n_continuations",
            "attn_first", "attn_prev")}
        n_continuations = int(self.counts["continuations"].sum())
        for layer in sorted(self.sums):
            sums = self.sums[layer].cpu().numpy()
            attn, baseline = self._subjoiner(sums)
            for head in range(sums.shape[0]):
                columns["layer"].append(layer)
                columns["head"].append(head)
                columns["subjoiner_attn"].append(attn[head])
                columns["subjoiner_baseline"].append(baseline[head])
                columns["subjoiner"].append(attn[head] - baseline[head])
                columns["n_continuations"].append(n_continuations)
                columns["attn_first"].append(_ratio(sums[head, FIRST], self.counts["first"][0]))
                columns["attn_prev"].append(_ratio(sums[head, PREV], self.counts["prev"][0]))
        return columns

    def _subjoiner(self, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        heads = sums.shape[0]
        used = self.counts["continuations"]
        total = int(used.sum())
        if total == 0:
            return np.full(heads, math.nan), np.full(heads, math.nan)
        attn = sums[:, CONTINUATION] / total
        needed = used > 0
        if (self.counts["starts"][needed] == 0).any():  # a window length with no word start to compare with
            return attn, np.full(heads, math.nan)
        per_window = sums[:, WINDOWS:][:, needed] / self.counts["starts"][needed]
        return attn, per_window @ used[needed] / total


def _ratio(total: float, count: int) -> float:
    return float(total) / int(count) if count else math.nan
