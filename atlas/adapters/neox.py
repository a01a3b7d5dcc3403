"""GPT-NeoX (Pythia): nn.Linear weights are [out, in]; the embedding may be padded beyond the tokenizer."""

from __future__ import annotations

import torch
from torch import nn

from atlas.adapters.base import Adapter, QueryKeyWeights, _optional, _owned


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
    attention_norm_path = "input_layernorm"
    rotary_path = "gpt_neox.rotary_emb"  # rotates the first rotary_ndims dims of each head

    def w_in(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.dense_h_to_4h.weight)

    def b_in(self, block: nn.Module) -> torch.Tensor | None:
        return _optional(block.mlp.dense_h_to_4h.bias)

    def w_out(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.dense_4h_to_h.weight).T

    def query_key(self, block: nn.Module) -> QueryKeyWeights:
        # query_key_value [3 * d_model, d_model] is interleaved per head: [heads, (q, k, v), d_head]
        attention = block.attention
        d_head = attention.head_size
        weight = _owned(attention.query_key_value.weight)
        per_head = weight.reshape(-1, 3, d_head, weight.shape[1])
        bias = _optional(attention.query_key_value.bias)
        b = None if bias is None else bias.reshape(-1, 3, d_head)
        return QueryKeyWeights(per_head[:, 0].clone(), None if b is None else b[:, 0].clone(),
                               per_head[:, 1].clone(), None if b is None else b[:, 1].clone())
