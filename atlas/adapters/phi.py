"""Phi-1/1.5/2: attention and MLP read the same input_layernorm output (parallel block); lm_head has a bias."""

from __future__ import annotations

import torch
from torch import nn

from atlas.adapters.base import Adapter, QueryKeyWeights, _optional, _owned, separate_query_key
from atlas.errors import AtlasError


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
    attention_norm_path = "input_layernorm"  # shared with the MLP (parallel block)
    rotary_path = "model.rotary_emb"  # rotates the first rotary_ndims dims of each head

    def w_in(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.fc1.weight)

    def b_in(self, block: nn.Module) -> torch.Tensor | None:
        return _optional(block.mlp.fc1.bias)

    def w_out(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.fc2.weight).T

    def query_key(self, block: nn.Module) -> QueryKeyWeights:
        if getattr(block.self_attn, "qk_layernorm", False):
            raise AtlasError("this Phi model normalises queries and keys per head (qk_layernorm): the query is "
                             "not linear in the residual stream, so attention scores of neurons are undefined")
        return separate_query_key(block.self_attn)
