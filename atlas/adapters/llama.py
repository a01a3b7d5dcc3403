"""Llama and its MLP-identical relatives (Mistral, Qwen2): gated MLP down(act(gate(x)) * up(x)), RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from atlas.adapters.base import Adapter, QueryKeyWeights, _optional, _owned, separate_query_key


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    final_norm_kind = "rmsnorm"
    blocks_path = "model.layers"
    down_proj_path = "mlp.down_proj"
    final_norm_path = "model.norm"
    embed_path = "model.embed_tokens"
    mlp_path = "mlp"
    attention_path = "self_attn"
    mlp_norm_path = "post_attention_layernorm"
    attention_norm_path = "input_layernorm"
    rotary_path = "model.rotary_emb"

    def w_in(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.up_proj.weight)

    def b_in(self, block: nn.Module) -> torch.Tensor | None:
        return _optional(block.mlp.up_proj.bias)

    def w_gate(self, block: nn.Module) -> torch.Tensor | None:
        return _owned(block.mlp.gate_proj.weight)

    def b_gate(self, block: nn.Module) -> torch.Tensor | None:
        return _optional(block.mlp.gate_proj.bias)

    def w_out(self, block: nn.Module) -> torch.Tensor:
        return _owned(block.mlp.down_proj.weight).T

    def query_key(self, block: nn.Module) -> QueryKeyWeights:
        return separate_query_key(block.self_attn)
