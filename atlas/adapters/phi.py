"""Phi-1/1.5/2: attention and MLP read the same input_layernorm output (parallel block); lm_head has a bias."""

from __future__ import annotations

import torch
from torch import nn

from atlas.adapters.base import Adapter, _optional, _owned


class PhiAdapter(Adapter):
    name = "phi"
    model_types = ("phi",)
    final_norm_kind = "layernorm"
    blocks_path = "model.layers"
    down_proj_path = "mlp.fc2"
    final_norm_path = "model.final_layernorm"
    embed_path = "model.embed_tokens"
    mlp_path = "mlp"
    attention_path = "self_attn"
    mlp_norm_path = "input_layernorm"

    def w_in(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.fc1.weight)

    def b_in(self, block: nn.Module) -> torch.Tensor | None:
        return _optional(block.mlp.fc1.bias)

    def w_out(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.fc2.weight).T
