"""Neuron labels: token features, variance reduction against float64 numpy, a planted digit neuron, the job.

Every VR is recomputed here from its definition with explicit group means and np.var (population):
VR = p (1 - p) (mu_1 - mu_0)^2 / Var(x), on real weights and real activations of the tiny models.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.data.features import FEATURES, feature_matrix
from atlas.errors import AtlasError
from atlas.metrics.labels import (StreamingFeatureVariance, StreamingTokenSetRatio, top_features,
                                  vocab_token_sets, vocab_variance_reduction)
from atlas.metrics.weights import process_unembedding, process_w_out
from atlas.modeling import capture_neuron_activations, load_model
from atlas.registry import register_dataset, register_model
from atlas.store import Store
from atlas.store.schema import Job, NeuronLabel, NeuronTokenSet, TokenFeature
from ingest.labels import LabelsConfig, run
from ingest.weights import WeightsConfig
from ingest.weights import run as run_weights
from tests.test_vocab_classes import _plant
from tests.tiny import ARCHITECTURES, docstring_texts, write_docs_jsonl


def vr_by_definition(x: np.ndarray, f: np.ndarray) -> tuple[float, float, float]:
    """(VR, mu_1, mu_0) of the float64 values x by the bool mask f, from the SPEC formula."""
    x = np.asarray(x, dtype=np.float64)
    p = f.mean()
    if f.all() or not f.any() or np.var(x) == 0:
        return 0.0, (x[f].mean() if f.any() else np.nan), (x[~f].mean() if (~f).any() else np.nan)
    mu1, mu0 = x[f].mean(), x[~f].mean()
    return p * (1 - p) * (mu1 - mu0) ** 2 / np.var(x), mu1, mu0


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    return write_docs_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", limit=300)


def token_strings(tokenizer) -> list[str]:
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


# -- (a) the catalogue ----------------------------------------------------------------------------------

def test_catalogue_has_named_documented_features():
    names = [f.name for f in FEATURES]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) and len(n) <= 50 for n in names)
    assert all(f.description and "\n" not in f.description for f in FEATURES)


SPOT_CHECKS = {  # string -> features it must have; 'not:' ones it must not
    " the": ["leading_space", "word_start", "alphabetic", "lowercase", "stopword", "not:capitalized",
             "not:continuation"],
    "ing": ["continuation", "alphabetic", "not:ends_with_ing", "not:leading_space"],
    " running": ["ends_with_ing", "word_start"],
    " walked": ["ends_with_ed"], " quickly": ["ends_with_ly"], " cats": ["ends_with_s"],
    " 7": ["digits", "single_digit", "not:year", "contains_digit"],
    "1999": ["digits", "year", "not:single_digit"], " 2100": ["digits", "not:year"], "999": ["digits", "not:year"],
    "12a": ["contains_digit", "not:digits"], " Seven": ["number_word", "capitalized"],
    " THE": ["all_caps", "capitalized", "stopword"], "A": ["capitalized", "not:all_caps"],
    ".": ["period", "punctuation", "code_like"], ").": ["period", "close_bracket", "code_like"],
    " (": ["open_bracket", "code_like"], ",": ["comma", "not:period"], ":": ["colon"], ";": ["semicolon"],
    "?": ["question_mark"], "!": ["exclamation_mark"], "-": ["hyphen", "not:dash"], " \u2014": ["dash"],
    "...": ["ellipsis", "period"], ' "': ["quote"], "'": ["quote"], " +=": ["math_symbol"],
    "\n": ["newline", "whitespace_only"], "  ": ["whitespace_only", "not:newline"], ".\n": ["newline", "period"],
    " we": ["pronoun_first_person"], " You": ["pronoun_second_person"], " their": ["pronoun_third_person"],
    " January": ["month"], " may": ["not:month", "alphabetic"], " Friday": ["weekday"],
    "foo_bar": ["code_like", "not:alphabetic"], "=": ["code_like", "math_symbol"],
    "\u00e9t\u00e9": ["non_ascii", "alphabetic"], "\ufffd": ["non_ascii"],
}


def test_feature_predicates_on_known_strings():
    names, _, matrix = feature_matrix(list(SPOT_CHECKS))
    column = {name: i for i, name in enumerate(names)}
    for row, (string, expected) in enumerate(SPOT_CHECKS.items()):
        for item in expected:
            negated = item.startswith("not:")
            assert matrix[row, column[item.removeprefix("not:")]] != negated, (string, item)


def test_an_absent_feature_is_listed_and_explains_nothing():
    names, _, matrix = feature_matrix(["a", "b", " c"])
    assert matrix.shape == (3, len(FEATURES)) and matrix[:, names.index("weekday")].sum() == 0
    x = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]])
    split = vocab_variance_reduction(x, torch.eye(3, dtype=torch.float64), matrix)  # x @ I: x itself
    assert np.isfinite(split.score).all() and (split.score[:, names.index("weekday")] == 0).all()
    assert (split.score[1] == 0).all()  # a constant neuron explains nothing
    assert np.isnan(split.mean_with[:, names.index("weekday")]).all()


# -- (b) variance reduction against numpy ----------------------------------------------------------------

def processed_vocab(loaded):
    """Processed W_U [d_model, tokenizer vocab] and each layer's processed w_out, float64 (weights job's rules)."""
    adapter, model = loaded.adapter, loaded.model
    center = adapter.final_norm_kind == "layernorm"
    unembed, _ = adapter.unembedding(model)
    W_U = process_unembedding(unembed[:, :len(loaded.tokenizer)], adapter.final_norm_scale(model), center=center)
    return W_U, [process_w_out(adapter.w_out(block), center=center) for block in adapter.blocks(model)]


def test_vocab_variance_reduction_equals_numpy(tiny_models):
    loaded = load_model(str(tiny_models["neox"]))  # padded vocabulary: 576 rows, 512 tokens
    W_U, w_outs = processed_vocab(loaded)
    names, _, features = feature_matrix(token_strings(loaded.tokenizer))
    split = vocab_variance_reduction(w_outs[1], W_U, features, max_chunk_bytes=7 * 3 * 8 * W_U.shape[1])  # 7 a chunk
    x = (w_outs[1] @ W_U).numpy()
    for neuron in range(0, x.shape[0], 7):
        for k in range(len(names)):
            vr, mu1, mu0 = vr_by_definition(x[neuron], features[:, k])
            np.testing.assert_allclose(split.score[neuron, k], vr, rtol=1e-9, atol=1e-15, err_msg=names[k])
            np.testing.assert_allclose([split.mean_with[neuron, k], split.mean_without[neuron, k]], [mu1, mu0],
                                       rtol=1e-9, atol=1e-15)
    assert split.n_with.tolist() == features.sum(0).tolist()
    assert ((split.score >= 0) & (split.score <= 1 + 1e-12)).all()


def activations_and_tokens(loaded, n_docs: int = 6):
    """Real activations of every layer at the real positions of a few documents, one document at a time."""
    acts, ids = [], []
    for text in docstring_texts()[10:10 + n_docs]:
        row = torch.tensor([loaded.tokenizer(text)["input_ids"][:80]])
        acts.append(capture_neuron_activations(loaded, row)[0])  # [T, L, d_mlp], model dtype
        ids.append(row[0])
    return acts, ids


@pytest.mark.parametrize("offset", [0.0, 1e3])  # 1e3: |mean| >> std, the shift keeps the sums exact
def test_streaming_variance_reduction_equals_numpy_on_concatenated_activations(tiny_models, offset):
    loaded = load_model(str(tiny_models["llama"]))
    names, _, vocab_features = feature_matrix(token_strings(loaded.tokenizer))
    acts, ids = activations_and_tokens(loaded)
    layer = 1
    accumulator = StreamingFeatureVariance(acts[0].shape[-1], len(names))
    for batch_acts, batch_ids in zip(acts, ids):  # batches of different lengths
        accumulator.update(batch_acts[:, layer].double() + offset, vocab_features[batch_ids.numpy()])
    split = accumulator.result()
    x = np.concatenate([a[:, layer].double().numpy() for a in acts]) + offset
    f = vocab_features[np.concatenate([i.numpy() for i in ids])]
    assert split.n == x.shape[0] and split.n_with.tolist() == f.sum(0).tolist()
    for neuron in range(0, x.shape[1], 9):
        for k in range(len(names)):
            vr, mu1, mu0 = vr_by_definition(x[:, neuron], f[:, k])
            # At 1e3 the values themselves are rounded to ~1e-13 (numpy's group means too): a VR of 1e-6
            # carries ~1e-14 of that; 1e-12 absolute on a fraction of variance is still exact for a label.
            np.testing.assert_allclose(split.score[neuron, k], vr, rtol=1e-9, atol=1e-15 if offset == 0 else 1e-12,
                                       err_msg=names[k])
            np.testing.assert_allclose([split.mean_with[neuron, k], split.mean_without[neuron, k]], [mu1, mu0],
                                       rtol=1e-9, atol=1e-12)


def test_token_set_ratio_equals_numpy(tiny_models):
    loaded = load_model(str(tiny_models["gpt2"]))
    W_U, w_outs = processed_vocab(loaded)
    neurons = torch.tensor([3, 17, 40])
    members = vocab_token_sets(w_outs[2][neurons], W_U, 50, largest=False, max_chunk_bytes=2 * 3 * 8 * W_U.shape[1])
    product = (w_outs[2][neurons] @ W_U).numpy()
    for j in range(3):
        assert set(np.flatnonzero(members[:, j].numpy())) == set(np.argsort(product[j])[:50])
    acts, ids = activations_and_tokens(loaded)
    ratio = StreamingTokenSetRatio(members)
    for batch_acts, batch_ids in zip(acts, ids):  # activation at t, next token t+1
        ratio.update(batch_acts[:-1, 2, neurons], batch_ids[1:])
    result = ratio.result()
    x = np.concatenate([a[:-1, 2, neurons].double().numpy() for a in acts])
    following = np.concatenate([i[1:].numpy() for i in ids])
    for j in range(3):
        inside = members[following, j].numpy()
        assert result.n_in[j] == inside.sum() and result.n_out[j] == (~inside).sum()
        if inside.any():
            np.testing.assert_allclose(result.mean_in[j], x[inside, j].mean(), rtol=1e-12)
        np.testing.assert_allclose(result.mean_out[j], x[~inside, j].mean(), rtol=1e-12)
        np.testing.assert_allclose(result.ratio[j], result.mean_in[j] / result.mean_out[j], rtol=1e-12)


def test_top_features_breaks_ties_by_feature_order():
    score = np.array([[0.1, 0.5, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    order, values = top_features(score, 3)
    assert order.tolist() == [[1, 2, 4], [0, 1, 2]] and values.tolist() == [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]


# -- (c) planted structure ---------------------------------------------------------------------------------

def plant_digit_neuron(source, target):
    """The tiny GPT-2 with neuron 0 of its last layer writing along a direction that the digit tokens'
    embeddings (tied to lm_head) share: W_U . w_out is large exactly on the digit tokens."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    names, _, features = feature_matrix(token_strings(tokenizer))
    digits = torch.from_numpy(np.flatnonzero(features[:, names.index("digits")]))
    wte, c_proj = model.transformer.wte.weight, model.transformer.h[-1].mlp.c_proj.weight
    direction = torch.randn(wte.shape[1], generator=torch.Generator().manual_seed(5))
    direction = (direction - direction.mean()) / (direction - direction.mean()).norm()
    with torch.no_grad():
        wte[digits] += 2 * float(wte.norm(dim=1).mean()) * direction
        c_proj[0] = direction * c_proj[0].norm()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target, model.config.n_layer - 1, len(digits)


def test_planted_digit_neuron_gets_the_digits_label(tiny_models, tmp_path):
    directory, last, n_digits = plant_digit_neuron(tiny_models["gpt2"], tmp_path / "digits")
    assert n_digits >= 5
    store = Store(f"sqlite:///{tmp_path / 'atlas.db'}")
    model, _ = register_model(store, str(directory), family="planted", seed=0)
    run_weights(WeightsConfig(model=model.name), store)
    run(LabelsConfig(model=model.name), store)  # no dataset: vocabulary labels only
    with store.session() as session:
        rows = session.scalars(select(NeuronLabel).where(NeuronLabel.layer == last, NeuronLabel.neuron == 0)
                               .order_by(NeuronLabel.rank)).all()
        n_data_rows = session.scalar(select(func.count()).select_from(NeuronLabel)
                                     .where(NeuronLabel.source != "vocab"))
    assert [(r.source, r.dataset_id) for r in rows] == [("vocab", None)] * 3
    assert rows[0].feature == "digits" and rows[0].score > 0.5 and rows[0].mean_with > rows[0].mean_without
    assert n_data_rows == 0
    store.dispose()


# -- (d) the job through the store ------------------------------------------------------------------------

def counted_activations(directory, token_rows, n_rows: int, special: set[int], layer: int) -> tuple:
    """numpy reference: the layer's activations (input of its c_proj) at every non-special position, by Hugging
    Face's model and a hook, one unpadded row at a time, with the token ids there."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    captured = []
    hook = model.transformer.h[layer].mlp.c_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0][0]))
    acts, tokens = [], []
    for row in range(n_rows):
        ids = token_rows.row(row)
        with torch.no_grad():
            model(input_ids=torch.tensor(ids)[None])
        keep = np.array([t not in special for t in ids])
        acts.append(captured.pop().double().numpy()[keep])
        tokens.append(ids[keep])
    hook.remove()
    return np.concatenate(acts), np.concatenate(tokens)


def test_job_fills_the_tables_skips_reruns_and_needs_weights(store, tiny_models, docs_file, tmp_path):
    directory, last = _plant(tiny_models["gpt2"], tmp_path / "planted")  # prediction 0, suppression 1 (last layer)
    model, _ = register_model(store, str(directory), family="planted", seed=0, name="planted")
    dataset, _ = register_dataset(store, "docs", str(docs_file), n_tokens=1200, ctx_len=96, sample_seed=1)
    config = LabelsConfig(model="planted", dataset="docs", batch_size=4)
    with pytest.raises(AtlasError, match=r"atlas ingest weights --model planted"):
        run(config, store)
    run_weights(WeightsConfig(model="planted"), store)
    run(config, store)
    with store.session() as session:
        features = session.scalars(select(TokenFeature)).all()
        labels = session.scalars(select(NeuronLabel)).all()
        sets = session.scalars(select(NeuronTokenSet).order_by(NeuronTokenSet.neuron)).all()
        jobs = session.scalars(select(Job).where(Job.kind == "labels")).all()
    assert len(features) == len(FEATURES) and {f.tokenizer_hash for f in features} == {model.tokenizer_hash}
    assert all(f.n_tokens == len(f.token_ids) for f in features)
    by_source = {s: [r for r in labels if r.source == s] for s in ("vocab", "current_token", "next_token")}
    assert {r.dataset_id for r in by_source["vocab"]} == {None}
    assert {r.dataset_id for s in ("current_token", "next_token") for r in by_source[s]} == {dataset.id}
    for rows in by_source.values():
        assert len(rows) == model.n_layers * model.d_mlp * 3  # every neuron explains something
        assert all(0 < r.score <= 1 for r in rows)
    assert [(s.layer, s.neuron, s.vocab_class, s.set_size) for s in sets] == [
        (last, 0, "prediction", 50), (last, 1, "suppression", 50)]
    assert all(s.n_in_set > 0 and s.n_out_set > 0 for s in sets)
    assert len(jobs) == 1 and jobs[0].status == "done"

    # The current-token labels of the last layer against numpy on Hugging Face's activations.
    from ingest.datasets import tokenize
    tokenizer = AutoTokenizer.from_pretrained(directory)
    token_rows = tokenize(dataset, tokenizer)
    x, tokens = counted_activations(directory, token_rows, token_rows.n_rows, set(tokenizer.all_special_ids), last)
    names, _, vocab_features = feature_matrix(token_strings(tokenizer))
    for row in [r for r in by_source["current_token"] if r.layer == last][:30]:
        vr, mu1, mu0 = vr_by_definition(x[:, row.neuron], vocab_features[tokens, names.index(row.feature)])
        np.testing.assert_allclose([row.score, row.mean_with, row.mean_without], [vr, mu1, mu0], rtol=1e-4)

    run(config, store)  # done already: skipped, nothing new in the ledger
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.kind == "labels")) == 1
        assert session.scalar(select(func.count()).select_from(NeuronLabel)) == len(labels)


# -- (e) every architecture ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_job_runs_on_every_architecture(tiny_models, docs_file, tmp_path, arch):
    store = Store(f"sqlite:///{tmp_path / 'atlas.db'}")
    model, _ = register_model(store, str(tiny_models[arch]), family=arch, seed=0, name=arch)
    register_dataset(store, "docs", str(docs_file), n_tokens=600, ctx_len=64, sample_seed=2)
    run_weights(WeightsConfig(model=arch), store)
    run(LabelsConfig(model=arch, dataset="docs", top_n=2, device="cpu"), store)
    with store.session() as session:
        counts = dict(session.execute(select(NeuronLabel.source, func.count()).group_by(NeuronLabel.source)).all())
        top = session.scalars(select(NeuronLabel).where(NeuronLabel.rank == 0)).all()
    assert counts == {s: model.n_layers * model.d_mlp * 2 for s in ("vocab", "current_token", "next_token")}
    assert all(0 < r.score <= 1 for r in top)
    store.dispose()
