"""Exact streaming top-k per feature (neuron), with a payload carried along each kept entry.

Entries are ordered by value (descending), ties broken by the smaller key (an int64 such as
row * ctx_len + position, increasing through the stream): the result is therefore independent of
how the stream was batched, and equals a brute-force sort by (-value, key). Ties are common in
real activations (every document that starts with the same token gives the same value).

The payload is a fixed-width float vector per kept entry (e.g. the neuron's activation on the
tokens around the example), computed by the caller only for the entries a batch adds.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from atlas.metrics._arrays import Device, host

# (batch-row indices [p], feature indices [p]) of the entries a batch adds -> their payloads [p, W]
PayloadFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_STATE_KEYS = ("values", "keys", "payload")


def _stable_descending(values: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reorder along dim 0 by value, descending; equal values keep their current order."""
    order = torch.sort(values, dim=0, descending=True, stable=True).indices
    return (values.gather(0, order), *(_gather_rows(t, order) for t in others))


def _gather_rows(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """tensor [n, ...F] reordered per feature by order [m, F] (a payload's middle dims follow)."""
    if tensor.ndim == 2:
        return tensor.gather(0, order)
    index = order[:, None, :].expand(order.shape[0], tensor.shape[1], order.shape[1])
    return tensor.gather(0, index)


def batch_top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [min(k, n), F] of each column's k largest values, ties broken by the smaller index,
    ordered by (value descending, index ascending)."""
    k = min(k, values.shape[0])
    top = values.topk(k, dim=0).indices
    threshold = values.gather(0, top[-1:])  # each column's k-th largest value
    at_least = torch.ge(values, threshold, out=torch.empty_like(values)).sum(dim=0)  # float sums: fast, exact
    ambiguous = (at_least > k).nonzero().squeeze(1)
    if ambiguous.numel():  # ties at the boundary: topk may pick any of them; a stable sort picks the first
        order = torch.sort(values[:, ambiguous], dim=0, descending=True, stable=True).indices[:k]
        top[:, ambiguous] = order
    top = top.sort(dim=0).values  # index ascending, then a stable sort by value
    return _stable_descending(values.gather(0, top), top)[1]


def _entries_above(values: torch.Tensor, threshold: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The columns with values strictly above their threshold [C], and each one's best (at most k) such
    entries as dense (values [d, C], rows [d, C]) ordered by (value descending, row ascending), padded
    with -inf; d = the largest count. Only the batch's few entries above the thresholds are sorted."""
    n_columns = values.shape[1]
    flat = torch.gt(values, threshold).reshape(-1).nonzero().squeeze(1)  # row-major: earlier rows first
    rows, columns, found = flat // n_columns, flat % n_columns, values.reshape(-1)[flat]
    order = torch.sort(found, descending=True, stable=True).indices
    order = order[torch.sort(columns[order], stable=True).indices]  # by column, then value, then row
    rows, columns, found = rows[order], columns[order], found[order]
    present, counts = torch.unique_consecutive(columns, return_counts=True)
    if present.numel() == 0:
        return found.reshape(0, 0), rows.reshape(0, 0), present
    slot = torch.repeat_interleave(torch.arange(present.shape[0], device=values.device), counts)
    rank = torch.arange(columns.shape[0], device=values.device) - (torch.cumsum(counts, 0) - counts)[slot]
    keep = rank < k
    depth = min(k, int(counts.max()))
    dense_values = torch.full((depth, present.shape[0]), -torch.inf, dtype=values.dtype, device=values.device)
    dense_rows = torch.zeros((depth, present.shape[0]), dtype=torch.int64, device=values.device)
    dense_values[rank[keep], slot[keep]] = found[keep]
    dense_rows[rank[keep], slot[keep]] = rows[keep]
    return dense_values, dense_rows, present


class StreamingTopK:
    """The k largest values per feature over a stream, with their int64 keys and payloads."""

    def __init__(self, n_features: int, k: int, payload_width: int = 0, device: Device = "cpu") -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.n_features, self.k, self.payload_width = n_features, k, payload_width
        self.device = torch.device(device)  # batches are merged here; only results leave it
        self.values = torch.full((0, n_features), -torch.inf, dtype=torch.float32, device=self.device)
        self.keys = torch.zeros((0, n_features), dtype=torch.int64, device=self.device)
        # Payloads stay where they were written: rank r of feature f has its payload in row slots[r, f] of the
        # store, so a merge writes only the entering entries' payloads and moves none.
        self.slots = torch.zeros((0, n_features), dtype=torch.int64, device=self.device)
        self.store = torch.zeros((k, payload_width, n_features), dtype=torch.float32, device=self.device)

    def update(self, values: torch.Tensor, keys: torch.Tensor, payload: PayloadFn | None = None) -> None:
        """Add a batch: values [n, F], keys [n] strictly increasing and larger than every earlier key."""
        if values.ndim != 2 or values.shape[1] != self.n_features:
            raise ValueError(f"expected values [n, {self.n_features}], got {tuple(values.shape)}")
        if values.shape[0] == 0:
            return
        values = values.detach().to(self.device, torch.float32)
        keys = keys.to(self.device)
        if self.values.shape[0] < self.k:
            candidates = batch_top_indices(values, self.k)
            self._merge(values.gather(0, candidates), candidates, keys, payload, None)
            return
        # Once k entries are held, only a value above a feature's k-th one can enter (an equal value loses:
        # its key is later). After the first batches few features have one, and few values per feature.
        found, rows, columns = _entries_above(values, self.values[-1], self.k)
        if columns.numel():
            self._merge(found, rows, keys, payload, None if columns.numel() == self.n_features else columns)

    def _merge(self, found: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, payload: PayloadFn | None,
               columns: torch.Tensor | None) -> None:
        """Merge a batch's candidates (values `found` [d, C] at batch rows `rows`, each column best first,
        -inf padding) into the kept entries of the given feature columns (None: all); payloads are made
        only for the candidates that enter."""
        every = columns is None
        kept_values, kept_keys, kept_slots = (self.values, self.keys, self.slots) if every else \
            (self.values[:, columns], self.keys[:, columns], self.slots[:, columns])
        held, width = kept_values.shape[0], found.shape[1]
        both = torch.cat([kept_values, found])
        # Kept entries first: after the stable sort, an equal value keeps the earlier key. With k entries
        # held, the -inf padding never enters.
        order = torch.sort(both, dim=0, descending=True, stable=True).indices[: min(self.k, held + found.shape[0])]
        entering = order >= held
        batch_rows = rows.gather(0, (order - held).clamp(min=0))
        kept_order = order.clamp(max=max(held - 1, 0))
        keys_kept = kept_keys.gather(0, kept_order) if held else torch.zeros_like(order)
        new_keys = torch.where(entering, keys[batch_rows], keys_kept)
        # The kept entries that stay are a prefix of each column's ranks, so the store rows after that prefix
        # (those of the entries pushed out, then the unused ones) take the entering entries, in rank order.
        unused = torch.arange(held, self.k, device=self.device)[:, None].expand(self.k - held, width)
        pool = torch.cat([kept_slots, unused])
        first_free = order.shape[0] - entering.sum(dim=0, keepdim=True)
        free = pool.gather(0, (first_free + entering.cumsum(dim=0) - 1).clamp(0, self.k - 1))
        new_slots = torch.where(entering, free, pool.gather(0, kept_order))
        ranks, at = entering.nonzero(as_tuple=True)
        if ranks.numel() and self.payload_width:
            features = at if every else columns[at]
            self.store[new_slots[ranks, at], :, features] = 0.0 if payload is None else \
                payload(batch_rows[ranks, at], features).to(self.device, torch.float32)
        best = (both.gather(0, order), new_keys, new_slots)
        if every:
            self.values, self.keys, self.slots = best
        else:  # k entries were held in every column, so the merged ones fit in place
            self.values[:, columns], self.keys[:, columns], self.slots[:, columns] = best

    @property
    def payload(self) -> torch.Tensor:
        """The kept entries' payloads [m, W, F], best first."""
        return _gather_rows(self.store, self.slots)

    def merge(self, other: StreamingTopK) -> None:
        """Fold in the top-k of a LATER part of the stream (a later token shard: every key of `other` is larger
        than this one's), exactly as if its batches had followed: merged in stream order, the result
        equals the unsharded one entry for entry."""
        if (other.n_features, other.payload_width) != (self.n_features, self.payload_width):
            raise ValueError(f"cannot merge top-k of {other.n_features} features (payload {other.payload_width}) "
                             f"into {self.n_features} (payload {self.payload_width})")
        merged = _stable_descending(torch.cat([self.values, other.values.to(self.device)]),
                                    torch.cat([self.keys, other.keys.to(self.device)]),
                                    torch.cat([self.payload, other.payload.to(self.device)]))
        self._set(*(t[: self.k] for t in merged))

    def _set(self, values: torch.Tensor, keys: torch.Tensor, payload: torch.Tensor) -> None:
        """Hold these ranked entries (payload [m, W, F] best first), the store in rank order."""
        self.values, self.keys = values.contiguous(), keys.contiguous()
        self.slots = torch.arange(values.shape[0], device=self.device)[:, None].expand_as(values).contiguous()
        self.store[: values.shape[0]] = payload

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values [m, F], keys [m, F], payload [m, W, F]), best first; m = min(k, items seen)."""
        return host(self.values), host(self.keys), host(self.payload)

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(zip(_STATE_KEYS, self.result()))

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], k: int, device: Device = "cpu") -> StreamingTopK:
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"top-k checkpoint lacks {missing}")
        payload = np.asarray(state["payload"])
        top = cls(payload.shape[2], k, payload.shape[1], device)
        top._set(*(torch.from_numpy(np.array(state[key], dtype=dtype)).to(top.device)
                   for key, dtype in zip(_STATE_KEYS, (np.float32, np.int64, np.float32))))
        return top
