"""Logit lens and layer statistics on all four architectures, against float64 numpy from Hugging Face outputs.

The reference reads h_0..h_{L-1} from the model's own output_hidden_states, the final distribution
from its logits, the attention probabilities from output_attentions, and the sub-layer writes from
hooks on module names written out here; the final norm is applied with a numpy formula whose
statistics come from each state itself; every metric is recomputed in float64 numpy on positions
chosen by a plain loop, one unpadded row at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sqlalchemy import select, text
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.metrics.layers import next_token_positions, next_tokens, previous_token_attention
from atlas.modeling import load_model
from atlas.registry import register_dataset, register_model
from atlas.store.schema import LayerStat, LogitLens
from ingest.datasets import tokenize
from ingest.interventions import InterventionsConfig
from ingest.interventions import run as run_interventions
from ingest.lens import LensConfig, measure, run
from ingest.next_token import ScoredBatch
from ingest.weights import WeightsConfig
from ingest.weights import run as run_weights
from tests.test_interventions import log_softmax64, scored_positions
from tests.tiny import ARCHITECTURES, CONTEXT, docstring_texts, write_docs_jsonl

# Module names, written out here so the reference does not depend on the adapters.
NAMES = {  # blocks, attention (inside a block), MLP (inside a block), final norm, unembedding
    "gpt2": ("transformer.h", "attn", "mlp", "transformer.ln_f", "lm_head"),
    "neox": ("gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm", "lm_head"),
    "llama": ("model.layers", "self_attn", "mlp", "model.norm", "lm_head"),
    "phi": ("model.layers", "self_attn", "mlp", "model.final_layernorm", "lm_head"),
}
N_TOKENS, CTX = 1500, CONTEXT + 64


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def final_norm_then_unembed(model, arch: str, hidden: np.ndarray) -> np.ndarray:
    """numpy float64: unembed(final_norm(h)) with the norm's mean/variance taken from h itself."""
    norm, head = model.get_submodule(NAMES[arch][3]), model.get_submodule(NAMES[arch][4])
    if isinstance(norm, torch.nn.LayerNorm):
        centred = hidden - hidden.mean(-1, keepdims=True)
        normed = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + norm.eps) * f64(norm.weight) + f64(norm.bias)
    else:  # RMSNorm
        normed = hidden / np.sqrt((hidden**2).mean(-1, keepdims=True) + norm.variance_epsilon) * f64(norm.weight)
    logits = normed @ f64(head.weight).T
    return logits + f64(head.bias) if getattr(head, "bias", None) is not None else logits


def prev5_by_loops(probs: np.ndarray, queries: list[int]) -> list[float]:
    """probs [heads, q, k]: for each query q >= 5, mean over heads of sum_{k=1..5} A[q, q-k]."""
    values = []
    for q in queries:
        if q >= 5:
            values.append(np.mean([sum(probs[h, q, q - k] for k in range(1, 6)) for h in range(probs.shape[0])]))
    return values


def reference_row(model, arch: str, ids: np.ndarray, positions: list[int], counted: list[int]) -> dict[str, list]:
    """Per state on the scored `positions`: kl/entropy/agreement/accuracy arrays; per layer on every counted
    (non-special) position, the last token of the row included: attention and MLP write norms, prev5 values."""
    blocks = model.get_submodule(NAMES[arch][0])
    writes: dict[str, list[torch.Tensor]] = {"attn": [], "mlp": []}
    handles = []
    for block in blocks:
        handles.append(block.get_submodule(NAMES[arch][1]).register_forward_hook(
            lambda m, a, out: writes["attn"].append(out[0] if isinstance(out, tuple) else out)))
        handles.append(block.get_submodule(NAMES[arch][2]).register_forward_hook(
            lambda m, a, out: writes["mlp"].append(out[0] if isinstance(out, tuple) else out)))
    fed = torch.tensor(ids[: min(len(ids), CONTEXT)])[None]
    with torch.no_grad():
        out = model(input_ids=fed, output_hidden_states=True, output_attentions=True)
    for handle in handles:
        handle.remove()
    targets = ids[np.array(positions) + 1]
    final = f64(out.logits[0, positions])
    log_final = log_softmax64(final)
    n_layers = len(blocks)
    states = [final_norm_then_unembed(model, arch, f64(h[0, positions])) for h in out.hidden_states[:n_layers]] + [final]
    lens = []
    for logits in states:
        log_q = log_softmax64(logits)
        lens.append({
            "kl": (np.exp(log_final) * (log_final - log_q)).sum(-1), "entropy": -(np.exp(log_q) * log_q).sum(-1),
            "top1_agreement": (logits.argmax(-1) == final.argmax(-1)), "accuracy": (logits.argmax(-1) == targets),
        })
    stats = [{"attn_out_norm": np.linalg.norm(f64(writes["attn"][l][0, counted]), axis=-1),
              "mlp_out_norm": np.linalg.norm(f64(writes["mlp"][l][0, counted]), axis=-1),
              "attn_prev5": prev5_by_loops(f64(out.attentions[l][0]), counted)} for l in range(n_layers)]
    return {"lens": lens, "stats": stats}


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    return write_docs_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl")


def eager(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


# -- pure parts --------------------------------------------------------------------------------------

def test_previous_token_attention_equals_loops_over_the_weights():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 9, 9, generator=generator), dim=-1).tril()
    result = previous_token_attention(probs)
    assert torch.isnan(result[:, :5]).all()
    for row in range(2):
        np.testing.assert_allclose(result[row, 5:].numpy(), prev5_by_loops(f64(probs[row]), list(range(9))), rtol=1e-12)
    assert torch.isnan(previous_token_attention(probs[:, :, :4, :4])).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lens_at_the_last_state_reproduces_the_model(trained_tiny_models, arch):
    loaded = load_model(str(trained_tiny_models[arch]), attn_implementation="eager")
    tokenizer = loaded.tokenizer
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(docstring_texts()[4])["input_ids"][:40]])
    mask = torch.ones_like(ids)
    positions = next_token_positions(mask, ids != tokenizer.bos_token_id)
    sums = measure(loaded, [ScoredBatch(ids, mask, positions, next_tokens(ids, positions))])
    n_layers = loaded.adapter.n_layers(loaded.model)
    last = ("lens", n_layers)
    assert sums.mean(last, "kl") == pytest.approx(0.0, abs=1e-9)
    assert sums.mean(last, "top1_agreement") == 1.0
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[positions]
    lens = loaded.adapter.logits_from_residual(loaded.model, _last_state(loaded, ids)[positions])
    torch.testing.assert_close(lens, logits, rtol=1e-5, atol=1e-5)


def _last_state(loaded, ids):
    from atlas.modeling import residual_states

    with torch.inference_mode():
        return residual_states(loaded, ids)[-1].clone()


# -- the job through the store (SQLite and PostgreSQL) ---------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_job_rows_equal_float64_numpy_on_cut_rows(store, trained_tiny_models, docs_file, arch):
    model_row, _ = register_model(store, str(trained_tiny_models[arch]), family="tiny", seed=0, name="tiny")
    dataset, _ = register_dataset(store, "docs", str(docs_file), n_tokens=N_TOKENS, ctx_len=CTX, sample_seed=1)
    run(LensConfig(model="tiny", dataset="docs", batch_size=5), store)
    with store.session() as session:
        lens_rows = session.scalars(select(LogitLens).order_by(LogitLens.layer)).all()
        stat_rows = session.scalars(select(LayerStat).order_by(LayerStat.layer)).all()
    n_layers = model_row.n_layers
    assert [r.layer for r in lens_rows] == list(range(n_layers + 1))
    assert [r.layer for r in stat_rows] == list(range(n_layers))

    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_models[arch])
    token_rows = tokenize(dataset, tokenizer)
    assert int(token_rows.lengths.max()) > CONTEXT  # rows were cut to the context, nothing crashed
    model = eager(trained_tiny_models[arch])
    special = set(tokenizer.all_special_ids)
    lens = [{name: [] for name in ("kl", "entropy", "top1_agreement", "accuracy")} for _ in range(n_layers + 1)]
    stats = [{name: [] for name in ("attn_out_norm", "mlp_out_norm", "attn_prev5")} for _ in range(n_layers)]
    for row in range(token_rows.n_rows):
        ids = token_rows.row(row)
        positions = scored_positions(ids, special, CONTEXT)
        counted = [t for t in range(min(len(ids), CONTEXT)) if ids[t] not in special]
        if positions:
            reference = reference_row(model, arch, ids, positions, counted)
            for collected, computed in zip(lens + stats, reference["lens"] + reference["stats"]):
                for name, values in computed.items():
                    collected[name].extend(np.asarray(values, dtype=float))
    for row, expected in zip(lens_rows, lens):
        np.testing.assert_allclose(row.kl_to_final, np.mean(expected["kl"]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(row.entropy_nats, np.mean(expected["entropy"]), rtol=1e-5)
        np.testing.assert_allclose(row.entropy_bits, np.mean(expected["entropy"]) / math.log(2), rtol=1e-5)
        np.testing.assert_allclose(row.top1_agreement, np.mean(expected["top1_agreement"]), atol=1e-12)
        np.testing.assert_allclose(row.accuracy, np.mean(expected["accuracy"]), atol=1e-12)
    assert lens_rows[-1].kl_to_final == pytest.approx(0.0, abs=1e-9) and lens_rows[-1].top1_agreement == 1.0
    assert lens_rows[0].kl_to_final > 0
    for row, expected in zip(stat_rows, stats):
        for name in ("attn_out_norm", "mlp_out_norm", "attn_prev5"):
            np.testing.assert_allclose(getattr(row, name), np.mean(expected[name]), rtol=1e-5, err_msg=name)


def test_layer_profile_has_one_row_per_layer(store, trained_tiny_models, docs_file):
    directory = trained_tiny_models["gpt2"]
    model_row, _ = register_model(store, str(directory), family="tiny", seed=0, name="tiny")
    register_dataset(store, "docs", str(docs_file), n_tokens=N_TOKENS, ctx_len=CTX, sample_seed=1)
    target = dict(model="tiny", dataset="docs", tokens=600)
    run_weights(WeightsConfig(model="tiny"), store)
    run(LensConfig(**target), store)
    with store.session() as session:
        lens_only = session.execute(text("SELECT layer FROM layer_profile ORDER BY layer")).scalars().all()
    assert lens_only == list(range(model_row.n_layers))
    run_interventions(InterventionsConfig(**target), store)
    with store.session() as session:
        profile = session.execute(text("SELECT * FROM layer_profile ORDER BY layer")).mappings().all()
        neurons = session.execute(text("SELECT COUNT(*) FROM neurons")).scalar()
    assert [r["layer"] for r in profile] == list(range(model_row.n_layers))
    assert sum(r["n_neurons"] for r in profile) == neurons
    for row in profile:
        for column in ("rel_depth", "lens_kl", "lens_entropy_nats", "lens_accuracy", "delete_kl", "delete_retention",
                       "attn_prev5", "attn_out_norm", "mlp_out_norm"):
            assert row[column] is not None, column
    assert [r["rel_depth"] for r in profile] == pytest.approx(np.linspace(0, 1, model_row.n_layers).tolist())
    assert profile[-1]["swap_kl"] is None and all(r["swap_kl"] is not None for r in profile[:-1])
