"""Adapters against float64 numpy recomputations from the weights, on every architecture.

The reference formulas (norms, activation functions, residual sums) are written out here; only
the weight getters and hook sites under test come from the adapters.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.special import erf
from transformers import BertConfig

from atlas.adapters import SUPPORTED, adapter_for
from atlas.errors import AtlasError
from atlas.modeling import capture_neuron_activations, load_model, model_summary, tokenizer_hash
from tests.tiny import ARCHITECTURES, LLAMA_RELATIVES, NEOX_PADDED_VOCAB, build_tiny_model, build_tokenizer, docstring_texts

ALL_ARCHS = ARCHITECTURES + LLAMA_RELATIVES


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
               "gelu": lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))), "silu": lambda x: x / (1.0 + np.exp(-x))}
# Blocks whose MLP reads the block input (parallel attention and MLP) rather than input + attention.
PARALLEL = {"neox", "phi"}


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def layer_norm(x, gamma, beta, eps):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * gamma + beta


def rms_norm(x, gamma, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * gamma


def apply_norm(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The formula of a LayerNorm or an RMSNorm, with the module's own parameters and epsilon."""
    if isinstance(module, torch.nn.LayerNorm):
        return layer_norm(x, f64(module.weight), f64(module.bias), module.eps)
    return rms_norm(x, f64(module.weight), module.variance_epsilon)


def activation_name(config) -> str:
    return getattr(config, "activation_function", None) or config.hidden_act


@pytest.fixture(scope="module")
def model_dirs(tiny_models, tiny_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-relatives")
    relatives = {arch: build_tiny_model(arch, root / arch, tokenizer_dir=tiny_tokenizer_dir) for arch in LLAMA_RELATIVES}
    return {**tiny_models, **relatives}


@pytest.fixture(scope="module")
def loaded_models(model_dirs):
    return {arch: load_model(str(directory)) for arch, directory in model_dirs.items()}


@pytest.fixture(scope="module")
def batch(loaded_models):
    """Two documents of different lengths, right-padded: [2, 40] with a mask."""
    tokenizer = loaded_models["gpt2"].tokenizer
    texts = docstring_texts()[3:5]
    encoded = [tokenizer(text)["input_ids"][:length] for text, length in zip(texts, (40, 27))]
    ids = torch.full((2, 40), tokenizer.pad_token_id)
    mask = torch.zeros((2, 40), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, mask


def run_with_captures(loaded, ids, mask):
    adapter, model = loaded.adapter, loaded.model
    with adapter.capture_residual_stream(model) as states, adapter.capture_sublayers(model) as sublayers:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    return states, sublayers, logits


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_activations_match_recomputation_from_weights(loaded_models, batch, arch):
    loaded = loaded_models[arch]
    adapter, model = loaded.adapter, loaded.model
    ids, mask = batch
    states, sublayers, _ = run_with_captures(loaded, ids, mask)
    acts = capture_neuron_activations(loaded, ids, mask)
    n_layers = adapter.n_layers(model)
    assert acts.shape == (2, 40, n_layers, 96) and len(states) == n_layers + 1
    act_fn = ACTIVATIONS[activation_name(loaded.config)]
    for layer, block in enumerate(adapter.blocks(model)):
        residual, attention = f64(states[layer]), f64(sublayers.attention[layer])
        mlp_input = apply_norm(adapter.mlp_input_norm(block),
                               residual if arch in PARALLEL else residual + attention)
        w_in, b_in, w_gate, b_gate = adapter.w_in(block), adapter.b_in(block), adapter.w_gate(block), adapter.b_gate(block)
        pre = mlp_input @ f64(w_in).T + (f64(b_in) if b_in is not None else 0.0)
        if w_gate is None:
            expected = act_fn(pre)
        else:
            gate = mlp_input @ f64(w_gate).T + (f64(b_gate) if b_gate is not None else 0.0)
            expected = act_fn(gate) * pre
        got = f64(acts[:, :, layer])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=f"{arch} L{layer}")

        # w_out rows reproduce the MLP's write, and the block output is input + attention + MLP writes
        b_out = adapter.b_out(block)
        mlp_write = got @ f64(adapter.w_out(block)) + (f64(b_out) if b_out is not None else 0.0)
        np.testing.assert_allclose(mlp_write, f64(sublayers.mlp[layer]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(residual + attention + mlp_write, f64(states[layer + 1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_unembedding_reproduces_the_logits(loaded_models, batch, arch):
    loaded = loaded_models[arch]
    adapter, model = loaded.adapter, loaded.model
    states, _, logits = run_with_captures(loaded, *batch)
    W_U, b_U = adapter.unembedding(model)
    final_norm = adapter.final_norm(model)
    gamma = f64(adapter.final_norm_scale(model))
    if adapter.final_norm_kind == "layernorm":
        normalise = lambda h: layer_norm(h, gamma, f64(final_norm.bias), final_norm.eps)
    else:
        normalise = lambda h: rms_norm(h, gamma, final_norm.variance_epsilon)
    bias = f64(b_U) if b_U is not None else 0.0
    expected = normalise(f64(states[-1])) @ f64(W_U) + bias
    np.testing.assert_allclose(f64(logits), expected, rtol=1e-4, atol=1e-4)
    # logit lens on an early state: the final norm's statistics come from that state itself
    with torch.no_grad():
        lens = adapter.logits_from_residual(model, states[1])
    np.testing.assert_allclose(f64(lens), normalise(f64(states[1])) @ f64(W_U) + bias, rtol=1e-4, atol=1e-4)
    assert (b_U is not None) == (arch == "phi")
    assert W_U.shape == (48, NEOX_PADDED_VOCAB if arch == "neox" else 512)


def test_layer_subset_stops_early_and_reuses_the_buffer(loaded_models, batch):
    loaded = loaded_models["gpt2"]
    ids, mask = batch
    full = capture_neuron_activations(loaded, ids, mask)
    head_calls = []
    handle = loaded.model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    try:
        buffer = torch.empty(2, 40, 2, 96)
        subset = capture_neuron_activations(loaded, ids, mask, layers=[2, 0], out=buffer)
        assert subset is buffer and head_calls == []
        torch.testing.assert_close(subset[:, :, 0], full[:, :, 2], rtol=0, atol=0)
        torch.testing.assert_close(subset[:, :, 1], full[:, :, 0], rtol=0, atol=0)
        capture_neuron_activations(loaded, ids, mask, layers=[0])
        assert head_calls == []
    finally:
        handle.remove()
    with pytest.raises(AtlasError, match="layers"):
        capture_neuron_activations(loaded, ids, mask, layers=[3])
    with pytest.raises(AtlasError, match="buffer"):
        capture_neuron_activations(loaded, ids, mask, out=torch.empty(2, 40, 1, 96))


def test_attention_probabilities_need_eager_attention(model_dirs, loaded_models, batch):
    ids, mask = batch
    eager = load_model(str(model_dirs["llama"]), attn_implementation="eager")
    with eager.adapter.capture_sublayers(eager.model, attention_probs=True) as sublayers, torch.no_grad():
        eager.model(input_ids=ids, attention_mask=mask)
    assert len(sublayers.attention_probs) == 2
    probs = f64(sublayers.attention_probs[0])
    assert probs.shape == (2, 4, 40, 40)
    first = probs[0]  # the unpadded document: causal rows that sum to one
    np.testing.assert_allclose(first.sum(-1), 1.0, rtol=1e-6)
    assert np.abs(np.triu(first, k=1)).max() == 0.0
    sdpa = loaded_models["llama"]
    if sdpa.model.config._attn_implementation != "eager":
        with pytest.raises(AtlasError, match="eager"), sdpa.adapter.capture_sublayers(sdpa.model, attention_probs=True):
            with torch.no_grad():
                sdpa.model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weights_are_copies(loaded_models, arch):
    loaded = loaded_models[arch]
    block = loaded.adapter.blocks(loaded.model)[0]
    before = loaded.adapter.w_out(block).clone()
    for tensor in (loaded.adapter.w_in(block), loaded.adapter.w_out(block), loaded.adapter.unembedding(loaded.model)[0],
                   loaded.adapter.final_norm_scale(loaded.model)):
        tensor.zero_()
    torch.testing.assert_close(loaded.adapter.w_out(block), before, rtol=0, atol=0)


def test_summary_uses_the_tokenizer_vocabulary(loaded_models):
    neox = model_summary(loaded_models["neox"])
    assert neox == {**neox, "architecture": "neox", "n_layers": 2, "d_model": 48, "d_mlp": 96, "vocab_size": 512}
    assert loaded_models["neox"].model.get_input_embeddings().weight.shape[0] == NEOX_PADDED_VOCAB
    assert {model_summary(m)["architecture"] for m in loaded_models.values()} == set(SUPPORTED)
    assert all(not m.model.training and m.model.config.use_cache is False for m in loaded_models.values())


def test_tokenizer_hash_identifies_the_tokenizer(loaded_models, tmp_path):
    # (not the Qwen2 relative: transformers swaps in Qwen2's own pre-tokenizer and normalizer for it)
    hashes = {tokenizer_hash(loaded_models[arch].tokenizer) for arch in ARCHITECTURES}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 64
    smaller = build_tokenizer(tmp_path / "smaller", vocab_size=400)
    assert tokenizer_hash(smaller) not in hashes


def test_unsupported_architecture_fails_before_reading_weights(tmp_path):
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(AtlasError) as caught:
        adapter_for(config)
    message = str(caught.value)
    assert "'bert'" in message and all(name in message for name in ("gpt2", "gpt_neox", "llama", "phi"))
    assert "\n" not in message
    config.save_pretrained(tmp_path / "bert")  # config only: loading weights would fail differently
    with pytest.raises(AtlasError, match="'bert' is not supported"):
        load_model(str(tmp_path / "bert"))


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(AtlasError, match="no-such-model"):
        load_model(str(missing))


def test_unreachable_hub_fails_fast_with_a_hint(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import
    started = time.monotonic()
    with pytest.raises(AtlasError, match="could not be reached .HF_HUB_OFFLINE is set.*local directory"):
        load_model("atlas-tests/no-such-model")
    assert time.monotonic() - started < 5


def test_unknown_hub_id_is_an_atlas_error_within_seconds():
    """Whatever the network: offline, a probe fails fast; online, the hub answers 'not found'."""
    started = time.monotonic()
    with pytest.raises(AtlasError):
        load_model("atlas-tests-nonexistent-org/no-such-model-3f9c")
    assert time.monotonic() - started < 30
