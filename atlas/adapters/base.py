"""What an architecture adapter declares (in the spirit of TransformerLens' model bridges).

An adapter is the only code that knows module paths, weight orientation, norms and the
unembedding of an architecture. Everything else asks the adapter.

Conventions (all tensors returned detached, in the model's dtype, never views that a caller
could mutate into the model: callers may `.double()` / `.clone()` freely):
- w_in(block)   -> [d_mlp, d_model]  the neuron's input weight vector (up_proj for gated MLPs)
- w_gate(block) -> [d_mlp, d_model] or None
- b_in(block)   -> [d_mlp] or None   (b_gate likewise for gated MLPs)
- w_out(block)  -> [d_mlp, d_model]  the neuron's row of the down-projection
- b_out(block)  -> [d_model] or None
- unembedding(model) -> (W_U [d_model, vocab], b_U [vocab] or None)
- final_norm_scale(model) -> gamma [d_model]; final_norm_kind: "layernorm" | "rmsnorm" (every norm of the model)
- mlp_norm_scale(block), mlp_norm_bias(block) -> gamma, beta [d_model] of the norm the MLP reads through

Residual stream, sub-layers and attention (for interventions and the logit lens):
- capture_residual_stream(model): h_0 (embeddings, the input of block 0) .. h_L (output of the
  last block, BEFORE the final norm: Hugging Face's last hidden state has it applied).
- capture_sublayers(model): what each block's attention and MLP write into the residual stream,
  and, for a model loaded with attn_implementation="eager", the attention probabilities.
- logits_from_residual(model, h) = unembed(final_norm(h)), the norm's statistics taken from h.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from atlas.errors import AtlasError


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy: callers may modify it in place without touching the model."""
    return tensor.detach().clone()


def _optional(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else _owned(tensor)


def _first(output: Any) -> torch.Tensor:
    """A module's main output: blocks and attention return a tensor or a tuple led by one."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class SublayerOutputs:
    """Per block, in block order (lists grow by one entry per forward call of the block)."""

    attention: list[torch.Tensor] = field(default_factory=list)        # [batch, seq, d_model]
    mlp: list[torch.Tensor] = field(default_factory=list)              # [batch, seq, d_model]
    attention_probs: list[torch.Tensor] = field(default_factory=list)  # [batch, heads, q, k]


class Adapter:
    name: ClassVar[str]                      # short architecture name stored in models.architecture
    model_types: ClassVar[tuple[str, ...]]   # transformers config.model_type values handled
    final_norm_kind: ClassVar[str]           # "layernorm" (centre W_U and w_out) or "rmsnorm"
    blocks_path: ClassVar[str]               # dotted path of the nn.ModuleList of blocks
    down_proj_path: ClassVar[str]            # dotted path, inside a block, of the MLP down-projection
    final_norm_path: ClassVar[str]           # dotted path of the final norm module
    embed_path: ClassVar[str]                # dotted path of the token embedding
    mlp_path: ClassVar[str]                  # dotted path, inside a block, of the MLP (its output is its write)
    attention_path: ClassVar[str]            # dotted path, inside a block, of the attention module
    mlp_norm_path: ClassVar[str]             # dotted path, inside a block, of the norm whose output the MLP reads

    # -- structure -------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def down_proj(self, block: nn.Module) -> nn.Module:
        """The module whose INPUT is the neuron activation [batch, seq, d_mlp]."""
        return block.get_submodule(self.down_proj_path)

    def mlp(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.mlp_path)

    def attention(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attention_path)

    def mlp_input_norm(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.mlp_norm_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def embedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed_path)

    def max_positions(self, model: nn.Module) -> int | None:
        """The longest input the model takes (its position table or trained context); None if unbounded."""
        return getattr(model.config, "max_position_embeddings", None)

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

    def b_gate(self, block: nn.Module) -> torch.Tensor | None:
        return None

    def w_out(self, block: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def b_out(self, block: nn.Module) -> torch.Tensor | None:
        return _optional(getattr(self.down_proj(block), "bias", None))

    def unembedding(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = model.get_output_embeddings()
        return _owned(head.weight).T, _optional(getattr(head, "bias", None))

    def final_norm_scale(self, model: nn.Module) -> torch.Tensor:
        return _owned(self.final_norm(model).weight)

    def final_norm_sigma(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """float64 [...]: the final norm's divisor for its input hidden [..., d_model], with the norm's own eps:
        LayerNorm sqrt(Var(h) + eps) (population variance over d_model), RMSNorm sqrt(mean(h^2) + eps)."""
        norm = self.final_norm(model)
        eps = getattr(norm, "variance_epsilon", None)
        eps = getattr(norm, "eps", None) if eps is None else eps
        if eps is None:  # torch.nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
            eps = torch.finfo(hidden.dtype).eps
        h = hidden.double()
        if self.final_norm_kind == "layernorm":
            h = h - h.mean(dim=-1, keepdim=True)
        return torch.sqrt(h.square().mean(dim=-1) + eps)

    def mlp_norm_scale(self, block: nn.Module) -> torch.Tensor:
        """gamma [d_model] of the norm the MLP reads through (folded into w_in / w_gate when processing)."""
        return _owned(self.mlp_input_norm(block).weight)

    def mlp_norm_bias(self, block: nn.Module) -> torch.Tensor | None:
        """beta [d_model] of that norm (LayerNorm), None for RMSNorm (folded into b_in when processing)."""
        return _optional(getattr(self.mlp_input_norm(block), "bias", None))

    # -- residual stream and logit lens ----------------------------------------------------
    def logits_from_residual(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """unembed(final_norm(h)): the norm recomputes its statistics on `hidden` itself."""
        return model.get_output_embeddings()(self.final_norm(model)(hidden))

    @contextmanager
    def capture_residual_stream(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Yields a list that a forward pass fills with h_0 .. h_L ([batch, seq, d_model] each)."""
        states: list[torch.Tensor] = []
        blocks = self.blocks(model)

        def record_input(module, args, kwargs):
            states.append(args[0] if args else kwargs["hidden_states"])

        def record_output(module, args, output):
            states.append(_first(output))

        handles = [blocks[0].register_forward_pre_hook(record_input, with_kwargs=True)]
        handles += [block.register_forward_hook(record_output) for block in blocks]
        try:
            yield states
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def capture_sublayers(
        self, model: nn.Module, attention_probs: bool = False,
        reduce_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Iterator[SublayerOutputs]:
        """Yields SublayerOutputs that a forward pass fills, block by block.

        reduce_probs, if given, is applied to each block's attention probabilities [batch, heads, q, k]
        as they are made and only its result is kept (long contexts: q x k per head adds up).
        """
        outputs = SublayerOutputs()
        attention_probs = attention_probs or reduce_probs is not None

        def record_attention(module, args, output):
            outputs.attention.append(_first(output))
            if attention_probs:
                probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
                if probs is None:
                    raise AtlasError("attention probabilities need eager attention: load the model with "
                                     "attn_implementation='eager'")
                outputs.attention_probs.append(probs if reduce_probs is None else reduce_probs(probs))

        def record_mlp(module, args, output):
            outputs.mlp.append(_first(output))

        with ExitStack() as stack:
            for block in self.blocks(model):
                stack.callback(self.attention(block).register_forward_hook(record_attention).remove)
                stack.callback(self.mlp(block).register_forward_hook(record_mlp).remove)
            yield outputs

    # -- interventions ---------------------------------------------------------------------
    @contextmanager
    def block_order(self, model: nn.Module, order: list[int]) -> Iterator[None]:
        """Run the model with its blocks in `order` (a deletion omits an index, a swap permutes).

        Blocks keep their own modules (and layer_idx): only the sequence the model iterates changes.
        """
        parent_path, _, attr = self.blocks_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        original = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList([original[i] for i in order]))
        try:
            yield
        finally:
            setattr(parent, attr, original)

    # -- attention queries and keys (attention deactivation) -------------------------------
    # Declared per architecture: the norm the attention reads through, and the model's rotary
    # embedding module (None for learned positions). Query/key weights come from query_key().
    attention_norm_path: ClassVar[str]       # dotted path, inside a block, of the norm whose output the attention reads
    rotary_path: ClassVar[str | None] = None  # dotted path of the rotary embedding module; None: no rotation

    def n_heads(self, model: nn.Module) -> int:
        return int(model.config.num_attention_heads)

    def n_kv_heads(self, model: nn.Module) -> int:
        """Key/value heads; query head h reads key group h // (n_heads / n_kv_heads) (grouped-query attention)."""
        return int(getattr(model.config, "num_key_value_heads", None) or self.n_heads(model))

    def d_head(self, model: nn.Module) -> int:
        return int(getattr(model.config, "head_dim", None) or self.d_model(model) // self.n_heads(model))

    def attention_input_norm(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attention_norm_path)

    def attention_norm_scale(self, block: nn.Module) -> torch.Tensor:
        """gamma [d_model] of the norm the attention reads through (folded into W_Q / W_K when processing)."""
        return _owned(self.attention_input_norm(block).weight)

    def attention_norm_bias(self, block: nn.Module) -> torch.Tensor | None:
        """beta [d_model] of that norm (LayerNorm), None for RMSNorm."""
        return _optional(getattr(self.attention_input_norm(block), "bias", None))

    def query_key(self, block: nn.Module) -> "QueryKeyWeights":
        """The block's query and key projections per head, before any rotation."""
        raise NotImplementedError

    def rotary_dims(self, model: nn.Module) -> int:
        """How many leading dims of each head's query/key are rotated (0: no rotary positions)."""
        if self.rotary_path is None:
            return 0
        probe = torch.zeros(1, 1, dtype=torch.float32)
        cos, _ = model.get_submodule(self.rotary_path)(probe, torch.zeros(1, 1, dtype=torch.long))
        return int(cos.shape[-1])

    def rotate(self, model: nn.Module, vectors: torch.Tensor, positions: torch.Tensor,
               transpose: bool = False) -> torch.Tensor:
        """Query/key vectors [..., P, d_head] rotated as the model rotates them at `positions` [P] (R(p) x;
        R(p)^T x with transpose). The model's own rotary module makes cos/sin and its modeling file's
        apply_rotary_pos_emb applies them to the leading rotary dims; the rest pass unchanged. No-op
        without rotary positions."""
        if self.rotary_path is None:
            return vectors
        cos, sin = model.get_submodule(self.rotary_path)(vectors, positions.reshape(1, -1).to(vectors.device))
        if transpose:  # R(p)^T: the same cos, the opposite sin
            sin = -sin
        apply = sys.modules[type(self.attention(self.blocks(model)[0])).__module__].apply_rotary_pos_emb
        width = cos.shape[-1]
        flat = vectors.reshape(-1, 1, *vectors.shape[-2:])  # [N, 1, P, d_head]: cos/sin broadcast as [1, 1, P, r]
        turned, _ = apply(flat[..., :width], flat[..., :width], cos, sin)
        return torch.cat([turned, flat[..., width:]], dim=-1).reshape(vectors.shape)

    @contextmanager
    def intercept_attention(self, model: nn.Module, handler: "AttentionHandler") -> Iterator[None]:
        """While open, every attention layer hands its post-rotary query/key/value [batch, heads, seq, d_head]
        (key/value with n_kv_heads heads) to handler(layer, query, key, value, attend), which returns what
        the attention function returns ((output [batch, seq, heads, d_head], probs [batch, heads, q, k])).
        attend(query, key, value) runs the modeling file's own eager attention with the layer's mask and
        scaling. Works through transformers' AttentionInterface: no forward is rewritten per architecture;
        the model's attention implementation is restored on exit."""
        _register_attention_probe()
        layer_of = {id(self.attention(block)): layer for layer, block in enumerate(self.blocks(model))}
        previous = model.config._attn_implementation
        token = _ATTENTION_HANDLER.set(lambda module, *args: handler(layer_of[id(module)], *args))
        model.set_attn_implementation(_ATTENTION_PROBE)
        try:
            yield
        finally:
            model.set_attn_implementation(previous)
            _ATTENTION_HANDLER.reset(token)


@dataclass
class QueryKeyWeights:
    """One block's attention projections, per head, as they read the attention norm's output."""

    w_q: torch.Tensor            # [n_heads, d_head, d_model]
    b_q: torch.Tensor | None     # [n_heads, d_head]
    w_k: torch.Tensor            # [n_kv_heads, d_head, d_model]
    b_k: torch.Tensor | None     # [n_kv_heads, d_head]


# handler(layer, query, key, value, attend) -> (attention output, attention probabilities)
AttentionHandler = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_ATTENTION_PROBE = "atlas_probe"
_ATTENTION_HANDLER: ContextVar[Callable | None] = ContextVar("atlas_attention_handler", default=None)


def _probe_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the modeling file's eager attention, through the open handler."""
    eager = sys.modules[type(module).__module__].eager_attention_forward

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return eager(module, q, k, v, attention_mask, **kwargs)

    handler = _ATTENTION_HANDLER.get()
    return attend(query, key, value) if handler is None else handler(module, query, key, value, attend)


def _register_attention_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_ATTENTION_PROBE, _probe_attention)
    AttentionMaskInterface.register(_ATTENTION_PROBE, eager_mask)  # an additive causal+padding mask, as eager's


def separate_query_key(attention: nn.Module) -> QueryKeyWeights:
    """q_proj [n_heads * d_head, d_model] and k_proj [n_kv_heads * d_head, d_model] (Llama, Phi and relatives)."""
    d_head = attention.head_dim
    q, k = attention.q_proj, attention.k_proj
    w_q, w_k = _owned(q.weight), _owned(k.weight)
    b_q, b_k = _optional(q.bias), _optional(k.bias)
    return QueryKeyWeights(w_q.reshape(-1, d_head, w_q.shape[1]), None if b_q is None else b_q.reshape(-1, d_head),
                           w_k.reshape(-1, d_head, w_k.shape[1]), None if b_k is None else b_k.reshape(-1, d_head))
