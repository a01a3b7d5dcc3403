"""GPT-2 (and GPT-2 checkpoints such as the stanford-crfm seeds): Conv1D weights are stored [in, out]."""

from __future__ import annotations

import torch
from torch import nn

from atlas.adapters.base import Adapter, QueryKeyWeights, _optional, _owned


class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2",)
    final_norm_kind = "layernorm"
    blocks_path = "transformer.h"
    down_proj_path = "mlp.c_proj"
    final_norm_path = "transformer.ln_f"
    embed_path = "transformer.wte"
    mlp_path = "mlp"
    attention_path = "attn"
    mlp_norm_path = "ln_2"
    attention_norm_path = "ln_1"

    def w_in(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.c_fc.weight).T  # Conv1D [d_model, d_mlp] -> rows per neuron

    def b_in(self, block: nn.Module) -> torch.Tensor | None:
        return _optional(block.mlp.c_fc.bias)

    def w_out(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.c_proj.weight)  # Conv1D [d_mlp, d_model]: already a row per neuron

    def query_key(self, block: nn.Module) -> QueryKeyWeights:
        # c_attn is a fused Conv1D [d_model, 3 * d_model]: columns q | k | v, head-major within each
        attention = block.attn
        n_heads, d_head, d_model = attention.num_heads, attention.head_dim, attention.embed_dim
        weight, bias = _owned(attention.c_attn.weight), _owned(attention.c_attn.bias)
        w_q, w_k = (weight[:, s * d_model:(s + 1) * d_model].T.reshape(n_heads, d_head, d_model) for s in (0, 1))
        b_q, b_k = (bias[s * d_model:(s + 1) * d_model].reshape(n_heads, d_head) for s in (0, 1))
        return QueryKeyWeights(w_q, b_q, w_k, b_k)
