"""Entropy neurons: the null space of the processed unembedding, null_frac, and the activation-fixing
intervention, against float64 numpy on tiny real models (and a planted entropy neuron).

The references go around the adapters: raw parameter names (tests/test_weights.py's TransformerLens
processing in numpy, np.linalg.svd), and a plain Hugging Face forward with a hook written here that
sets the activation by hand and reads the final norm's input; entropy, loss and sigma in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.errors import AtlasError
from atlas.metrics.entropy import (GridValue, null_frac, null_frac_random, null_space_basis, null_space_size,
                                   value_grid)
from atlas.metrics.layers import next_token_positions, next_tokens
from atlas.modeling import load_model
from atlas.registry import register_dataset, register_model
from atlas.store.schema import EntropyIntervention, Job, Neuron
from ingest.entropy import EntropyConfig, choose_neurons, intervene, observe, run
from ingest.next_token import ScoredBatch
from ingest.weights import WeightsConfig, analyse_layer, null_space
from ingest.weights import run as run_weights
from tests.test_interventions import log_softmax64
from tests.test_weights import _params, transformer_lens_processing
from tests.tiny import ARCHITECTURES, docstring_texts, write_docs_jsonl

# Raw module names (the reference does not go through the adapters): down-projection, final norm.
MODULES = {
    "gpt2": ("transformer.h.{}.mlp.c_proj", "transformer.ln_f"),
    "neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers.{}.mlp.down_proj", "model.norm"),
    "phi": ("model.layers.{}.mlp.fc2", "model.final_layernorm"),
}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    return write_docs_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl")


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


# -- (a) null space and null_frac -------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.02, 0.1])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_null_frac_equals_numpy_svd_of_the_processed_unembedding(tiny_models, arch, fraction):
    params, vocab = _params(tiny_models[arch])
    loaded = load_model(str(tiny_models[arch]))
    W_U = transformer_lens_processing(params, arch, 0, vocab)["W_U"]
    U, S, _ = np.linalg.svd(W_U, full_matrices=False)
    d_model = W_U.shape[0]
    k = max(1, round(fraction * d_model))
    centered = loaded.adapter.final_norm_kind == "layernorm"
    if centered:  # the all-ones direction is an exact zero singular direction of the centred W_U: not a slot
        ones = np.abs(U.T @ np.ones(d_model)) / math.sqrt(d_model)
        assert ones.max() > 1 - 1e-9 and S[ones.argmax()] < 1e-9 * S[0]
        U = np.delete(U, ones.argmax(), axis=1)
    U_null = U[:, -k:]
    basis = null_space(loaded, fraction).numpy()
    assert basis.shape == (W_U.shape[0], k) == (loaded.adapter.d_model(loaded.model), null_space_size(W_U.shape[0], fraction))
    np.testing.assert_allclose(basis @ basis.T, U_null @ U_null.T, atol=1e-10)  # the same subspace
    tokens = [""] * vocab
    for layer in range(loaded.adapter.n_layers(loaded.model)):
        w_out = transformer_lens_processing(params, arch, layer, vocab)["w_out"]
        expected = (np.linalg.norm(w_out @ U_null, axis=1) / np.linalg.norm(w_out, axis=1)) ** 2
        columns = analyse_layer(loaded, layer, WeightsConfig(null_space_fraction=fraction, top_k=1), tokens).neurons
        np.testing.assert_allclose(columns["null_frac"], expected, rtol=1e-8, atol=1e-14)
        assert columns["null_frac_random"] == k / (d_model - 1 if centered else d_model)


def test_random_directions_get_k_over_d_model(tiny_models):
    params, vocab = _params(tiny_models["llama"])
    W_U = transformer_lens_processing(params, "llama", 0, vocab)["W_U"]
    basis = null_space_basis(W_U, 0.1)
    directions = np.random.default_rng(0).standard_normal((20000, W_U.shape[0]))
    fractions = null_frac(directions, basis)
    expected = basis.shape[1] / W_U.shape[0]
    assert abs(fractions.mean() - expected) < 4 * fractions.std() / math.sqrt(len(fractions))
    assert np.isnan(null_frac(np.zeros((1, W_U.shape[0])), basis)).all()


def test_centred_random_directions_get_k_over_d_minus_one(tiny_models):
    """A LayerNorm model's w_out is centred: random centred directions get k / (d_model - 1), not k / d_model."""
    params, vocab = _params(tiny_models["gpt2"])
    W_U = transformer_lens_processing(params, "gpt2", 0, vocab)["W_U"]
    d_model = W_U.shape[0]
    basis = null_space_basis(W_U, 0.1, centered=True)
    np.testing.assert_allclose(basis.T @ np.ones(d_model), 0.0, atol=1e-12)  # orthogonal to the ones direction
    directions = np.random.default_rng(0).standard_normal((20000, d_model))
    directions -= directions.mean(axis=1, keepdims=True)
    fractions = null_frac(directions, basis)
    expected = null_frac_random(d_model, 0.1, centered=True)
    assert expected == basis.shape[1] / (d_model - 1)
    assert abs(fractions.mean() - expected) < 4 * fractions.std() / math.sqrt(len(fractions))


def test_null_space_fraction_keeps_existing_weights_jobs_done():
    from ingest.options import hashed_values

    assert "null_space_fraction" not in hashed_values(WeightsConfig())  # done jobs keep their hash
    assert hashed_values(WeightsConfig(null_space_fraction=0.1))["null_space_fraction"] == 0.1
    with pytest.raises(AtlasError, match="null-space-fraction"):
        run_weights(WeightsConfig(null_space_fraction=1.5), None)


def test_value_grid():
    grid = value_grid(-0.2, 3.0, 0.4, grid_size=8)
    assert [g.kind for g in grid].count("grid") == 8 and len(grid) == 10
    assert [g.value for g in grid] == sorted(g.value for g in grid)
    np.testing.assert_allclose([g.value for g in grid if g.kind == "grid"], np.linspace(-0.2, 6.0, 8))
    assert GridValue(0.0, "zero") in grid and GridValue(0.4, "mean") in grid
    relu = value_grid(0.5, 2.0, 1.0)  # the grid starts at min(observed min, 0) = 0: zero first, then the grid's 0
    assert relu[0] == GridValue(0.0, "zero") and relu[1] == GridValue(0.0, "grid") and relu[-1].value == 4.0


# -- (b) the intervention against a hand-written Hugging Face forward --------------------------------

def hand_batch(tokenizer) -> tuple[ScoredBatch, list[np.ndarray]]:
    """Two rows of different lengths, right-padded, led by BOS (a special token: not counted)."""
    bos = tokenizer.bos_token_id
    rows = [np.array([bos] + tokenizer(docstring_texts()[i])["input_ids"][:n]) for i, n in ((4, 40), (9, 25))]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), bos, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    counted = mask.bool() & (ids != bos)
    positions = next_token_positions(mask, counted)
    return ScoredBatch(ids, mask, positions, next_tokens(ids, positions), counted), rows


def reference_row(model, arch, ids: np.ndarray, layer: int, neuron: int, value: float | None) -> dict:
    """One unpadded row: numpy float64 entropy, loss, 1/sigma at the scored positions (t, not special, with a
    next token), with the activation of (layer, neuron) set to value there (None: untouched); the activations
    at the counted positions."""
    down, norm_name = MODULES[arch]
    norm = model.get_submodule(norm_name)
    scored = [t for t in range(len(ids) - 1) if t > 0]
    counted = list(range(1, len(ids)))
    seen = {}

    def set_value(module, args):
        seen["act"] = f64(args[0][0, :, neuron])
        if value is None:
            return None
        act = args[0].clone()
        act[0, scored, neuron] = value
        return (act,)

    def norm_input(module, args):
        seen["hidden"] = f64(args[0][0])

    handles = [model.get_submodule(down.format(layer)).register_forward_pre_hook(set_value),
               norm.register_forward_pre_hook(norm_input)]
    with torch.no_grad():
        logits = f64(model(input_ids=torch.tensor(ids)[None]).logits[0, scored])
    for handle in handles:
        handle.remove()
    log_q = log_softmax64(logits)
    hidden = seen["hidden"][scored]
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if isinstance(norm, torch.nn.LayerNorm):
        sigma = np.sqrt(hidden.var(-1) + eps)
    else:
        sigma = np.sqrt((hidden ** 2).mean(-1) + eps)
    return {"entropy": -(np.exp(log_q) * log_q).sum(-1), "loss": -log_q[np.arange(len(scored)), ids[np.array(scored) + 1]],
            "norm_scale": 1 / sigma, "act": seen["act"][counted]}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_intervention_metrics_equal_a_hand_written_forward(tiny_models, arch):
    directory = tiny_models[arch]
    loaded = load_model(str(directory))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    batch, rows = hand_batch(loaded.tokenizer)
    n_layers = loaded.adapter.n_layers(loaded.model)
    neurons = [(n_layers - 2, 7), (n_layers - 1, 3)]
    activations, base = observe(loaded, [batch], neurons)
    values = [-1.0, 0.0, 2.5]
    grid = [GridValue(v, "grid") for v in values]
    sums = intervene(loaded, [batch], {n: grid for n in neurons}, values_per_pass=2)  # one pass of 2, one of 1

    untouched = [reference_row(model, arch, ids, *neurons[0], None) for ids in rows]
    for name in ("entropy", "loss", "norm_scale"):
        expected = np.concatenate([r[name] for r in untouched])
        assert base.count("untouched", name) == len(expected)
        np.testing.assert_allclose(base.mean("untouched", name), expected.mean(), rtol=1e-5, err_msg=name)
    for column, (layer, neuron) in enumerate(neurons):
        acts = np.concatenate([reference_row(model, arch, ids, layer, neuron, None)["act"] for ids in rows])
        assert activations.count == len(acts)
        np.testing.assert_allclose([activations.min[column], activations.max[column], activations.mean[column]],
                                   [acts.min(), acts.max(), acts.mean()], rtol=1e-5, atol=1e-7)
        for step, value in enumerate(values):
            reference = [reference_row(model, arch, ids, layer, neuron, value) for ids in rows]
            for name in ("entropy", "loss", "norm_scale"):
                expected = np.concatenate([r[name] for r in reference]).mean()
                np.testing.assert_allclose(sums.mean(((layer, neuron), step), name), expected, rtol=1e-5,
                                           err_msg=f"{arch} {layer}.{neuron} v={value} {name}")


# -- (c, d) a planted entropy neuron, through the job and the store -----------------------------------

PLANTED, FRACTION = 32, 0.1  # neuron 32 of the trained tiny GPT-2's last layer fires on every token (~1.8)


@pytest.fixture(scope="module")
def planted_gpt2(trained_tiny_models, tmp_path_factory):
    """Trained tiny GPT-2 whose last-layer neuron PLANTED writes 5 x the bottom non-trivial singular direction
    of the processed W_U (the very bottom one is the all-ones direction that LayerNorm centring removes)."""
    directory = trained_tiny_models["gpt2"]
    params, vocab = _params(directory)
    W_U = transformer_lens_processing(params, "gpt2", 0, vocab)["W_U"]
    U, _, _ = np.linalg.svd(W_U, full_matrices=False)
    assert abs(U[:, -1] @ np.ones(len(U)) / math.sqrt(len(U))) > 1 - 1e-9
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():  # Conv1D [d_mlp, d_model]: row i is w_out of neuron i
        model.transformer.h[-1].mlp.c_proj.weight[PLANTED] = torch.tensor(5 * U[:, -2], dtype=torch.float32)
    target = tmp_path_factory.mktemp("planted") / "planted-gpt2"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(directory).save_pretrained(target)
    return target


def test_planted_neuron_is_the_top_candidate(planted_gpt2):
    loaded = load_model(str(planted_gpt2))
    last = loaded.adapter.n_layers(loaded.model) - 1
    assert choose_neurons(loaded, EntropyConfig(candidates=1, null_space_fraction=FRACTION)) == [(last, PLANTED)]
    chosen = choose_neurons(loaded, EntropyConfig(candidates=3, neurons=f"0.1,{last}.{PLANTED}",
                                                  null_space_fraction=FRACTION))
    assert chosen[0] == (last, PLANTED) and chosen[-1] == (0, 1) and len(chosen) == 4


def test_job_on_the_planted_model(store, planted_gpt2, docs_file, monkeypatch):
    model_row, _ = register_model(store, str(planted_gpt2), family="planted", seed=0, name="planted")
    register_dataset(store, "docs", str(docs_file), n_tokens=1500, ctx_len=96, sample_seed=1)
    last = model_row.n_layers - 1
    run_weights(WeightsConfig(model="planted", null_space_fraction=FRACTION, top_k=2), store)
    config = EntropyConfig(model="planted", dataset="docs", tokens=500, candidates=2, neurons="0.1",
                           null_space_fraction=FRACTION, batch_size=4, values_per_pass=4)
    run(config, store)
    with store.session() as session:
        planted = session.scalars(select(Neuron).where(Neuron.layer == last, Neuron.neuron == PLANTED)).one()
        others = session.scalars(select(Neuron.null_frac).where(Neuron.neuron != PLANTED)).all()
        rows = session.scalars(select(EntropyIntervention).order_by(
            EntropyIntervention.layer, EntropyIntervention.neuron, EntropyIntervention.step)).all()
    assert planted.null_frac > 0.999 and max(others) < 0.5
    assert planted.null_frac_random == null_space_size(model_row.d_model, FRACTION) / (model_row.d_model - 1)
    by_neuron: dict = {}
    for row in rows:
        by_neuron.setdefault((row.layer, row.neuron), []).append(row)
    assert (last, PLANTED) in by_neuron and (0, 1) in by_neuron and len(by_neuron) == 3
    for neuron_rows in by_neuron.values():
        assert [r.step for r in neuron_rows] == list(range(10))
        assert sorted(r.value_kind for r in neuron_rows) == ["grid"] * 8 + ["mean", "zero"]
        assert [r.value for r in neuron_rows] == sorted(r.value for r in neuron_rows)
        assert len({r.n_positions for r in neuron_rows}) == 1 and neuron_rows[0].n_positions > 100
    # the planted neuron: more activation, larger sigma, smaller norm scale, flatter output
    curve = by_neuron[(last, PLANTED)]
    top, zero = curve[-1], next(r for r in curve if r.value_kind == "zero")
    assert top.value > 0 and top.d_entropy > 0.05 and top.d_norm_scale < 0
    assert top.entropy - zero.entropy > 0.1 and top.norm_scale < zero.norm_scale
    for r in curve:  # d_* is value - untouched, with one untouched baseline per job
        assert r.entropy - r.d_entropy == pytest.approx(curve[0].entropy - curve[0].d_entropy, rel=1e-12)
    mean_row = next(r for r in curve if r.value_kind == "mean")
    assert abs(mean_row.d_loss) < abs(top.d_loss)

    monkeypatch.setattr("ingest.entropy.compute", lambda *a: pytest.fail("a done unit was recomputed"))
    run(config, store)  # skipped: done with this config
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(EntropyIntervention)) == 30
        assert session.scalars(select(Job.status).where(Job.kind == "entropy")).all() == ["done"]
    for bad, message in (("3", "not LAYER.NEURON"), ("1.2,x.3", "not LAYER.NEURON"), ("9.1", "not in planted"),
                         (f"0.{model_row.d_mlp}", "not in planted")):
        with pytest.raises(AtlasError, match=message):
            run(EntropyConfig(model="planted", dataset="docs", neurons=bad), store)


# -- (e) every architecture runs the job ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_job_runs_on_every_architecture(store, tiny_models, docs_file, arch):
    model_row, _ = register_model(store, str(tiny_models[arch]), family="tiny", seed=0, name="tiny")
    register_dataset(store, "docs", str(docs_file), n_tokens=1500, ctx_len=64, sample_seed=1)
    run(EntropyConfig(model="tiny", dataset="docs", tokens=200, candidates=2, batch_size=8), store)
    with store.session() as session:
        rows = session.scalars(select(EntropyIntervention)).all()
    assert len(rows) == 20
    assert {r.layer for r in rows} <= {model_row.n_layers - 2, model_row.n_layers - 1}
    assert all(np.isfinite([r.entropy, r.loss, r.norm_scale, r.d_entropy]).all() for r in rows)
