"""Exact streaming top-k per feature (neuron), with a payload carried along each kept entry.

Entries are ordered by value (descending), ties broken by the smaller key (an int64 such as
row * ctx_len + position, increasing through the stream): the result is therefore independent of
how the stream was batched, and equals a brute-force sort by (-value, key). Ties are common in
real activations (every document that starts with the same token gives the same value).

The payload is a fixed-width float vector per kept entry (e.g. the neuron's activation on the
tokens around the example), computed by the caller only for a batch's candidates.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from atlas.metrics._arrays import Device, host

# (candidate batch-row indices [k', C], the C feature columns they are for, None for all F) -> payload [k', W, C]
PayloadFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
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
    ambiguous = ((values >= threshold).sum(dim=0) > k).nonzero().squeeze(1)
    if ambiguous.numel():  # ties at the boundary: topk may pick any of them; a stable sort picks the first
        order = torch.sort(values[:, ambiguous], dim=0, descending=True, stable=True).indices[:k]
        top[:, ambiguous] = order
    top = top.sort(dim=0).values  # index ascending, then a stable sort by value
    return _stable_descending(values.gather(0, top), top)[1]


class StreamingTopK:
    """The k largest values per feature over a stream, with their int64 keys and payloads."""

    def __init__(self, n_features: int, k: int, payload_width: int = 0, device: Device = "cpu") -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.n_features, self.k, self.payload_width = n_features, k, payload_width
        self.device = torch.device(device)  # batches are merged here; only results leave it
        self.values = torch.full((0, n_features), -torch.inf, dtype=torch.float32, device=self.device)
        self.keys = torch.zeros((0, n_features), dtype=torch.int64, device=self.device)
        self.payload = torch.zeros((0, payload_width, n_features), dtype=torch.float32, device=self.device)

    def update(self, values: torch.Tensor, keys: torch.Tensor, payload: PayloadFn | None = None) -> None:
        """Add a batch: values [n, F], keys [n] strictly increasing and larger than every earlier key."""
        if values.ndim != 2 or values.shape[1] != self.n_features:
            raise ValueError(f"expected values [n, {self.n_features}], got {tuple(values.shape)}")
        if values.shape[0] == 0:
            return
        values = values.detach().to(self.device, torch.float32)
        keys = keys.to(self.device)
        if self.values.shape[0] < self.k:
            self._merge(values, keys, payload, None)
            return
        # Once k entries are held, a feature changes only where the batch beats its k-th value (an equal
        # value loses: its key is later), and after the first batches that is a small share of them.
        columns = (values > self.values[-1]).any(dim=0).nonzero().squeeze(1)
        if columns.numel() == self.n_features:
            self._merge(values, keys, payload, None)
        elif columns.numel():
            self._merge(values[:, columns], keys, payload, columns)

    def _merge(self, values: torch.Tensor, keys: torch.Tensor, payload: PayloadFn | None,
               columns: torch.Tensor | None) -> None:
        """Merge the batch's best k of the given feature columns (None: all) into the kept entries."""
        index = batch_top_indices(values, self.k)
        width = values.shape[1]
        candidate_payload = (payload(index, columns).to(self.device, torch.float32) if payload is not None
                             else torch.zeros((index.shape[0], self.payload_width, width), device=self.device))
        kept = (self.values, self.keys, self.payload) if columns is None else \
            (self.values[:, columns], self.keys[:, columns], self.payload[:, :, columns])
        # Earlier entries first: after the stable sort, equal values keep the smaller key first.
        merged = _stable_descending(
            torch.cat([kept[0], values.gather(0, index)]),
            torch.cat([kept[1], keys[index]]),
            torch.cat([kept[2], candidate_payload]),
        )
        best = [t[: self.k] for t in merged]
        if columns is None:
            self.values, self.keys, self.payload = (t.contiguous() for t in best)
        else:  # the kept rows are full (k of them), so the merged ones fit in place
            self.values[:, columns], self.keys[:, columns], self.payload[:, :, columns] = best

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
        self.values, self.keys, self.payload = (t[: self.k].contiguous() for t in merged)

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
        top.values = torch.from_numpy(np.array(state["values"], dtype=np.float32)).to(top.device)
        top.keys = torch.from_numpy(np.array(state["keys"], dtype=np.int64)).to(top.device)
        top.payload = torch.from_numpy(np.array(payload, dtype=np.float32)).to(top.device)
        return top
