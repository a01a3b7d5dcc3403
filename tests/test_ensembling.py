"""Prediction-ensembling probes (`atlas study ensembling`) on a planted tiny GPT-2.

The planted model: token X (" the") owns residual coordinate J and the f-token F (" string", the tiny
vocabulary's one ends_with_ing token) owns coordinate K (every other embedding row is zero there). In
the last layer, neuron PLANTED reads coordinate J (it fires exactly on X) and writes +K (a prediction
neuron for F); in layer 1, neuron SUPPRESSOR writes -K (a suppression neuron) and reads at random. The
dataset's text puts F after X and nowhere else, so the planted neuron carries the class perfectly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.errors import AtlasError
from atlas.metrics import probes
from atlas.registry import register_dataset, register_model
from atlas.store.schema import Job, ProbeResult, ProbeRun
from ingest.ensembling import EnsemblingConfig, compute, neuron_candidates, run
from ingest.weights import WeightsConfig
from ingest.weights import run as run_weights

J, K, PLANTED, SUPPRESSOR = 3, 7, 5, 11
X_WORD, F_WORD = " the", " string"
FILLERS = (" a", " is", " in", " to", " of", " and", " be", " for", " or", " as", " this", " class")
MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_models) -> Path:
    directory = tmp_path_factory.mktemp("planted")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    (x,), (f,) = tokenizer.encode(X_WORD), tokenizer.encode(F_WORD)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        wte = model.transformer.wte.weight  # tied to the unembedding
        wte[:, [J, K]] = 0.0
        wte[x, J], wte[f, K] = 3.0, 1.0
        last, middle = model.transformer.h[2].mlp, model.transformer.h[1].mlp
        last.c_fc.weight[:, PLANTED] = 0.0
        last.c_fc.weight[J, PLANTED] = 3.0
        last.c_fc.bias[PLANTED] = -3.0
        last.c_proj.weight[PLANTED] = 0.0
        last.c_proj.weight[PLANTED, K] = 2.0
        middle.c_fc.weight[:, SUPPRESSOR] = 0.2 * torch.randn(wte.shape[1], generator=generator)
        middle.c_proj.weight[SUPPRESSOR] = 0.0
        middle.c_proj.weight[SUPPRESSOR, K] = -1.5
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, planted) -> Path:
    """Fillers at random, and " the string" now and then: F follows X, and only X."""
    tokenizer = AutoTokenizer.from_pretrained(planted)
    assert all(len(tokenizer.encode(w)) == 1 for w in (X_WORD, F_WORD, *FILLERS))
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(30):
        words = [X_WORD + F_WORD if rng.random() < 0.15 else FILLERS[rng.integers(len(FILLERS))] for _ in range(150)]
        docs.append("".join(words).strip())
    path = tmp_path_factory.mktemp("text") / "planted.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _register(store, planted, text_file):
    model_row, _ = register_model(store, str(planted), family="planted", seed=0, name="planted")
    register_dataset(store, "words", str(text_file), n_tokens=2400, ctx_len=96, sample_seed=0)
    return model_row


def _numpy_scores(planted, feature_mask, layer: int) -> np.ndarray:
    """Float64 numpy SPEC score: diag(gamma) W_U, centred over d_model then over the vocabulary; w_out centred."""
    model = AutoModelForCausalLM.from_pretrained(planted, dtype=torch.float32)
    unembed = model.lm_head.weight.detach().double().numpy().T[:, :len(feature_mask)]
    unembed = model.transformer.ln_f.weight.detach().double().numpy()[:, None] * unembed
    unembed = unembed - unembed.mean(axis=0, keepdims=True)
    unembed = unembed - unembed.mean(axis=1, keepdims=True)
    w_out = model.transformer.h[layer].mlp.c_proj.weight.detach().double().numpy()
    w_out = w_out - w_out.mean(axis=1, keepdims=True)
    product = w_out @ unembed
    return product[:, feature_mask].mean(axis=1) - product[:, ~feature_mask].mean(axis=1)


def test_pure_parts_are_seeded_and_balanced():
    labels = np.array([True] * 30 + [False] * 200)
    chosen = probes.balanced_positions(labels, None, seed=3)
    assert labels[chosen].sum() == 30 and len(chosen) == 60
    np.testing.assert_array_equal(chosen, probes.balanced_positions(labels, None, seed=3))
    assert not np.array_equal(chosen, probes.balanced_positions(labels, None, seed=4))
    assert len(probes.balanced_positions(labels, 10, seed=3)) == 20
    train = probes.train_split(labels[chosen], 0.7, seed=3)
    assert train.sum() == 42 and labels[chosen][train].sum() == 21  # balanced in both splits
    np.testing.assert_array_equal(train, probes.train_split(labels[chosen], 0.7, seed=3))
    picked = probes.choose_neurons(np.array([0, 1, 2, 2, 3]), np.array(["prediction", "suppression", "partition",
                                                                         "prediction", "suppression"], dtype=object),
                                   np.array([9.0, 1.0, 8.0, -3.0, 2.0]), n_layers=4, n_neurons=2)
    assert picked.tolist() == [3, 4]  # layer >= 2, prediction/suppression only, by |score|
    assert probes.model_accuracy(np.array([0.6, 0.4, 0.5, 0.9]), np.array([1, 0, 1, 0], bool)) == 0.5


def test_study_end_to_end(store, planted, text_file, monkeypatch):
    model_row = _register(store, planted, text_file)
    with pytest.raises(AtlasError, match="ingest weights"):
        run(EnsemblingConfig(model="planted", dataset="words"), store)
    run_weights(WeightsConfig(model="planted"), store)
    with pytest.raises(AtlasError, match="no token feature named 'ends_with_xyz'"):
        run(EnsemblingConfig(model="planted", dataset="words", feature="ends_with_xyz"), store)
    with pytest.raises(AtlasError, match="positions whose next token is comma"):
        run(EnsemblingConfig(model="planted", dataset="words", feature="comma", device="cpu"), store)

    config = EnsemblingConfig(model="planted", dataset="words", device="cpu", min_context=24)
    with store.session() as session:
        candidates = neuron_candidates(session, model_row)
    result = compute(model_row, _dataset(store), config, candidates)
    neurons = result.neurons
    top = (int(neurons["layer"][0]), int(neurons["neuron"][0]))
    assert top == (2, PLANTED) and neurons["vocab_class"][0] == "prediction"
    assert (1, SUPPRESSOR, "suppression") in set(zip(neurons["layer"].tolist(), neurons["neuron"].tolist(),
                                                      neurons["vocab_class"].tolist()))
    tokenizer = AutoTokenizer.from_pretrained(planted)
    mask = np.zeros(len(tokenizer), bool)
    mask[tokenizer.encode(F_WORD)] = True
    for layer in (1, 2):
        here = neurons["layer"] == layer
        np.testing.assert_allclose(neurons["score"][here], _numpy_scores(planted, mask, layer)[neurons["neuron"][here]],
                                   rtol=1e-9, atol=1e-12)
    assert result.accuracies.individual_test[0] >= 0.97  # the planted neuron carries the class
    assert result.accuracies.order[0] == 0 and result.accuracies.topk_test[0] == result.accuracies.individual_test[0]
    _check_model_accuracy(planted, store, result, mask)

    run(config, store)
    run(config, store)  # done: skipped
    with store.session() as session:
        runs = session.scalars(select(ProbeRun)).all()
        n_results = session.scalar(select(func.count()).select_from(ProbeResult))
        n_done = session.scalar(select(func.count()).where(Job.kind == "ensembling", Job.status == "done"))
    assert len(runs) == 1 and n_done == 1 and n_results == 2 * len(neurons["layer"])
    assert runs[0].model_accuracy == pytest.approx(result.model_accuracy)
    assert runs[0].n_train + runs[0].n_test == len(result.chosen) and runs[0].split_seed == 0

    monkeypatch.setenv("ATLAS_DATABASE_URL", store.url)
    app = AppTest.from_file(str(MAIN), default_timeout=60).run()
    app.switch_page("app_pages/studies.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert [t.value for t in app.title] == ["Studies"] and not app.info
    assert "ends_with_ing" in app.selectbox[1].value


def _dataset(store):
    from atlas.store.schema import Dataset

    with store.session() as session:
        return session.scalars(select(Dataset)).one()


def _check_model_accuracy(planted, store, result, mask) -> None:
    """The model's test accuracy from Hugging Face logits, softmax by hand in float64 numpy."""
    from atlas.modeling import load_model
    from ingest.datasets import tokenize

    model = AutoModelForCausalLM.from_pretrained(planted, dtype=torch.float32).eval()
    rows = tokenize(_dataset(store), load_model(str(planted)).tokenizer)
    cand = result.candidates
    chosen_test = result.chosen[~result.train]
    correct = []
    for index in chosen_test:
        row, t = int(cand.rows[index]), int(cand.positions[index])
        ids = torch.as_tensor(rows.row(row)[: t + 1])[None]
        with torch.no_grad():
            logits = model(ids).logits[0, t].double().numpy()
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        label = bool(mask[rows.row(row)[t + 1]])
        assert label == cand.labels[index] and t >= 24
        correct.append((probs[: len(mask)][mask].sum() > 0.5) == label)
    assert result.model_accuracy == pytest.approx(np.mean(correct))
