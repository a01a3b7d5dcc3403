"""GPT-NeoX (Pythia): nn.Linear weights are [out, in]; the embedding may be padded beyond the tokenizer."""

from __future__ import annotations

import torch
from torch import nn

from atlas.adapters.base import Adapter, _optional, _owned


class NeoXAdapter(Adapter):
    name = "neox"
    model_types = ("gpt_neox",)
    final_norm_kind = "layernorm"
    blocks_path = "gpt_neox.layers"
    down_proj_path = "mlp.dense_4h_to_h"
    final_norm_path = "gpt_neox.final_layer_norm"
    embed_path = "gpt_neox.embed_in"
    mlp_path = "mlp"
    attention_path = "attention"
    mlp_norm_path = "post_attention_layernorm"  # with parallel residual it normalises the block input

    def w_in(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.dense_h_to_4h.weight)

    def b_in(self, block: nn.Module) -> torch.Tensor | None:
        return _optional(block.mlp.dense_h_to_4h.bias)

    def w_out(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.dense_4h_to_h.weight).T
