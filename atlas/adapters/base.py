"""What an architecture adapter declares (in the spirit of TransformerLens' model bridges).

An adapter is the only code that knows module paths, weight orientation, norms and the
unembedding of an architecture. Everything else asks the adapter.

Conventions (all tensors returned detached, in the model's dtype, never views that a caller
could mutate into the model: callers may `.double()` / `.clone()` freely):
- w_in(block)   -> [d_mlp, d_model]  the neuron's input weight vector (up_proj for gated MLPs)
- w_gate(block) -> [d_mlp, d_model] or None
- b_in(block)   -> [d_mlp] or None
- w_out(block)  -> [d_mlp, d_model]  the neuron's row of the down-projection
- unembedding(model) -> (W_U [d_model, vocab], b_U [vocab] or None)
- final_norm_scale(model) -> gamma [d_model]; final_norm_kind: "layernorm" | "rmsnorm"
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar, Iterator

import torch
from torch import nn


class Adapter:
    name: ClassVar[str]                      # short architecture name stored in models.architecture
    model_types: ClassVar[tuple[str, ...]]   # transformers config.model_type values handled
    final_norm_kind: ClassVar[str]           # "layernorm" (centre W_U and w_out) or "rmsnorm"
    blocks_path: ClassVar[str]               # dotted path of the nn.ModuleList of blocks
    down_proj_path: ClassVar[str]            # dotted path, inside a block, of the MLP down-projection
    final_norm_path: ClassVar[str]           # dotted path of the final norm module
    embed_path: ClassVar[str]                # dotted path of the token embedding

    # -- structure -------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def down_proj(self, block: nn.Module) -> nn.Module:
        """The module whose INPUT is the neuron activation [batch, seq, d_mlp]."""
        return block.get_submodule(self.down_proj_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def d_model(self, model: nn.Module) -> int:
        return self.w_out(self.blocks(model)[0]).shape[1]

    def d_mlp(self, model: nn.Module) -> int:
        return self.w_out(self.blocks(model)[0]).shape[0]

    # -- weights ---------------------------------------------------------------------------
    def w_in(self, block: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def w_gate(self, block: nn.Module) -> torch.Tensor | None:
        return None

    def b_in(self, block: nn.Module) -> torch.Tensor | None:
        raise NotImplementedError

    def w_out(self, block: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def unembedding(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        return head.weight.detach().T, (bias.detach() if bias is not None else None)

    def final_norm_scale(self, model: nn.Module) -> torch.Tensor:
        return self.final_norm(model).weight.detach()

    # -- interventions ---------------------------------------------------------------------
    @contextmanager
    def block_order(self, model: nn.Module, order: list[int]) -> Iterator[None]:
        """Run the model with its blocks in `order` (a deletion omits an index, a swap permutes)."""
        parent_path, _, attr = self.blocks_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        original = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList([original[i] for i in order]))
        try:
            yield
        finally:
            setattr(parent, attr, original)
