"""Layer interventions on all four architectures, against models whose weights are rearranged by hand.

The reference for "delete layer l" is a fresh model built from the config with one layer fewer and
the kept blocks' weights copied in; for "swap l, l+1" the same model with the two blocks' weights
exchanged. Neither uses hooks or the adapters. Metrics are recomputed in float64 numpy from those
models' logits, one unpadded row at a time, on positions chosen by a plain loop in this file.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from sqlalchemy import select, text
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from atlas.errors import AtlasError
from atlas.metrics.layers import next_token_positions, next_tokens
from atlas.modeling import final_residual, load_model, residual_states
from atlas.registry import register_dataset, register_model
from atlas.store.schema import Dataset, LayerIntervention, Model
from ingest.datasets import tokenize
from ingest.interventions import InterventionsConfig, interventions, measure, run
from ingest.next_token import ScoredBatch
from tests.tiny import ARCHITECTURES, CONTEXT, docstring_texts

# The blocks' module list, written out here so the reference does not depend on the adapters.
BLOCKS = {"gpt2": "transformer.h", "neox": "gpt_neox.layers", "llama": "model.layers", "phi": "model.layers"}
N_TOKENS, CTX = 1500, CONTEXT + 64  # rows longer than the tiny models' context: the jobs must cut them


# -- references ------------------------------------------------------------------------------------

def rearranged_model(directory, arch: str, order: list[int]) -> torch.nn.Module:
    """A model built from the config with len(order) blocks, block i holding the weights of block order[i]."""
    source = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = len(order)
    target = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prefix = BLOCKS[arch] + "."
    weights = source.state_dict()
    state = {key: value for key, value in weights.items() if not key.startswith(prefix)}
    for new, old in enumerate(order):
        old_prefix = f"{prefix}{old}."
        state.update({f"{prefix}{new}.{key[len(old_prefix):]}": value
                      for key, value in weights.items() if key.startswith(old_prefix)})
    target.load_state_dict(state, strict=True)
    return target.eval()


def reference_orders(n_layers: int) -> dict[tuple[str, int | None], list[int]]:
    orders: dict[tuple[str, int | None], list[int]] = {("none", None): list(range(n_layers))}
    for layer in range(n_layers):
        orders["delete", layer] = [i for i in range(n_layers) if i != layer]
    for layer in range(n_layers - 1):
        order = list(range(n_layers))
        order[layer], order[layer + 1] = layer + 1, layer
        orders["swap", layer] = order
    return orders


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def per_position_reference(logits: np.ndarray, targets: np.ndarray, original: np.ndarray) -> dict[str, np.ndarray]:
    log_q, log_p = log_softmax64(logits), log_softmax64(original)
    p, q = np.exp(log_p), np.exp(log_q)
    return {
        "kl": (p * (log_p - log_q)).sum(-1),
        "top1_agreement": (logits.argmax(-1) == original.argmax(-1)).astype(float),
        "accuracy": (logits.argmax(-1) == targets).astype(float),
        "loss": -log_q[np.arange(len(targets)), targets],
        "entropy": -(q * log_q).sum(-1),
    }


def scored_positions(ids: np.ndarray, special: set[int], limit: int, exclude_special: bool = True) -> list[int]:
    """Positions t scored against token t+1, by a plain loop: t fed (t < limit), t+1 exists, t not special."""
    return [t for t in range(min(len(ids), limit)) if t + 1 < len(ids) and not (exclude_special and ids[t] in special)]


def reference_rows(directory, arch: str, token_rows, n_rows: int, special: set[int]) -> dict:
    """Expected table rows: key -> mean metrics, from the rearranged models, one unpadded row at a time."""
    n_layers = AutoModelForCausalLM.from_pretrained(directory).config.num_hidden_layers
    models = {key: rearranged_model(directory, arch, order) for key, order in reference_orders(n_layers).items()}
    values: dict = {key: {name: [] for name in ("kl", "top1_agreement", "accuracy", "loss", "entropy")} for key in models}
    for row in range(n_rows):
        ids = token_rows.row(row)
        positions = scored_positions(ids, special, CONTEXT)
        if not positions:
            continue
        fed = torch.tensor(ids[: min(len(ids), CONTEXT)])[None]
        targets = ids[np.array(positions) + 1]
        with torch.no_grad():
            logits = {key: model(input_ids=fed).logits[0, positions].numpy() for key, model in models.items()}
        for key in models:
            for name, array in per_position_reference(logits[key], targets, logits["none", None]).items():
                values[key][name].append(array)
    return {key: {name: np.concatenate(arrays) for name, arrays in metrics.items()} for key, metrics in values.items()}


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def loaded_models(trained_tiny_models):
    """arch -> the loaded trained model, loaded (and trained) when first used."""
    class Loaded(dict):
        def __missing__(self, arch):
            self[arch] = load_model(str(trained_tiny_models[arch]))
            return self[arch]

    return Loaded()


@pytest.fixture(scope="module")
def batch(loaded_models):
    """Two right-padded documents that start with BOS, like the dataset's rows: ids [2, 40] and mask."""
    tokenizer = loaded_models["gpt2"].tokenizer
    rows = [[tokenizer.bos_token_id] + tokenizer(text)["input_ids"][: length - 1]
            for text, length in zip(docstring_texts()[3:5], (40, 27))]
    ids = torch.full((2, 40), tokenizer.pad_token_id)
    mask = torch.zeros((2, 40), dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t.strip()}) + "\n" for t in docstring_texts() if t.strip()))
    return path


def registered(store, directory, docs_file, name="tiny") -> tuple[Model, Dataset]:
    model, _ = register_model(store, str(directory), family=name, seed=0, name=name)
    dataset, _ = register_dataset(store, "docs", str(docs_file), n_tokens=N_TOKENS, ctx_len=CTX, sample_seed=1)
    return model, dataset


def stored_rows(store, model_id: int) -> dict:
    with store.session() as session:
        rows = session.scalars(select(LayerIntervention).where(LayerIntervention.model_id == model_id)).all()
        return {(r.kind, r.layer): r for r in rows}


# -- interventions equal rearranged models ---------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_deletions_and_swaps_equal_models_with_rearranged_blocks(trained_tiny_models, loaded_models, batch, arch):
    loaded = loaded_models[arch]
    ids, mask = batch
    n_layers = loaded.adapter.n_layers(loaded.model)
    orders = reference_orders(n_layers)
    real = mask.bool()
    with torch.inference_mode():
        states = residual_states(loaded, ids, mask)
        for step in interventions(n_layers):
            final = final_residual(loaded, ids, mask, step.order, states[step.start])
            logits = loaded.adapter.logits_from_residual(loaded.model, final)
            expected = rearranged_model(trained_tiny_models[arch], arch, orders[step.key])(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5, msg=str(step))
            # and the same pass without the shared prefix: the whole model in the new order
            whole = final_residual(loaded, ids, mask, list(orders[step.key]))
            torch.testing.assert_close(whole[real], final[real], rtol=1e-5, atol=1e-5)
    assert len(interventions(n_layers)) == 2 * n_layers - 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_measured_means_equal_numpy_float64_on_reference_logits(trained_tiny_models, loaded_models, batch, arch):
    loaded = loaded_models[arch]
    ids, mask = batch
    n_layers = loaded.adapter.n_layers(loaded.model)
    stat_mask = mask.bool() & (ids != loaded.tokenizer.bos_token_id)
    positions = next_token_positions(mask, stat_mask)
    sums = measure(loaded, [ScoredBatch(ids, mask, positions, next_tokens(ids, positions))], n_layers)
    special = {loaded.tokenizer.bos_token_id}
    with torch.no_grad():
        logits = {key: rearranged_model(trained_tiny_models[arch], arch, order)(input_ids=ids, attention_mask=mask).logits
                  for key, order in reference_orders(n_layers).items()}
    for key in logits:
        chunks = []
        for row in range(2):
            row_ids = ids[row, : int(mask[row].sum())].numpy()
            kept = scored_positions(row_ids, special, CONTEXT)
            chunks.append(per_position_reference(logits[key][row, kept].numpy(), row_ids[np.array(kept) + 1],
                                                 logits["none", None][row, kept].numpy()))
        for name in ("kl", "top1_agreement", "accuracy", "loss", "entropy"):
            expected = np.concatenate([c[name] for c in chunks])
            assert sums.count(key, "loss") == len(expected)
            if key == ("none", None) and name in ("kl", "top1_agreement"):
                continue  # the unmodified model is not compared with itself
            np.testing.assert_allclose(sums.mean(key, name), expected.mean(), rtol=1e-5, atol=1e-6, err_msg=f"{key} {name}")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_is_aligned_with_hugging_face_shifted_labels(loaded_models, batch, arch):
    """Prediction t is scored against token t+1: the unmodified loss equals HF's own shifted-label loss."""
    loaded = loaded_models[arch]
    ids, mask = batch
    positions = next_token_positions(mask, mask.bool() & (ids != loaded.tokenizer.bos_token_id))
    sums = measure(loaded, [ScoredBatch(ids, mask, positions, next_tokens(ids, positions))],
                   loaded.adapter.n_layers(loaded.model))
    labels = torch.full_like(ids, -100)
    labels[:, 1:][positions[:, :-1]] = ids[:, 1:][positions[:, :-1]]  # label t+1 <=> position t is scored
    with torch.no_grad():
        hf_loss = loaded.model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    np.testing.assert_allclose(sums.mean(("none", None), "loss"), hf_loss, rtol=1e-5)


def test_positions_exclude_padding_special_inputs_and_the_cut():
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [0, 3, 4, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    counted = mask.bool() & (ids != 0)
    positions = next_token_positions(mask, counted)
    assert positions.tolist() == [[False, True, True, True, True, False], [False, True, False, False, False, False]]
    assert next_tokens(ids, positions).tolist() == [6, 7, 8, 9, 4]
    everything = next_token_positions(mask)  # BOS as input counts
    assert next_tokens(ids, everything).tolist() == [5, 6, 7, 8, 9, 3, 4]
    cut = next_token_positions(mask, counted, max_positions=4)  # fed tokens 0..3; token 4 is read as a target
    assert cut.shape == (2, 4)
    assert next_tokens(ids, cut).tolist() == [6, 7, 8, 4]


# -- the job through the store (SQLite and PostgreSQL) ---------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_job_rows_equal_the_reference_on_cut_rows(store, trained_tiny_models, docs_file, arch):
    model, dataset = registered(store, trained_tiny_models[arch], docs_file)
    run(InterventionsConfig(model=model.name, dataset="docs", batch_size=5), store)
    rows = stored_rows(store, model.id)
    assert len(rows) == 2 * model.n_layers  # 2 L - 1 interventions and the unmodified model
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_models[arch])
    token_rows = tokenize(dataset, tokenizer)
    assert int(token_rows.lengths.max()) > CONTEXT  # some rows were cut, none crashed
    expected = reference_rows(trained_tiny_models[arch], arch, token_rows, token_rows.n_rows, set(tokenizer.all_special_ids))
    base = expected["none", None]
    assert base["accuracy"].mean() > 0  # the retention ratio is defined
    for key, row in rows.items():
        values = expected[key]
        assert row.n_positions == len(values["loss"])
        for name in ("accuracy", "loss", "entropy"):
            np.testing.assert_allclose(getattr(row, name), values[name].mean(), rtol=1e-5, atol=1e-6, err_msg=f"{key} {name}")
        if key == ("none", None):
            assert row.kl is None and row.top1_agreement is None and row.accuracy_retention is None and row.loss_delta is None
            continue
        np.testing.assert_allclose(row.kl, values["kl"].mean(), rtol=1e-4, atol=1e-6, err_msg=f"{key} kl")
        np.testing.assert_allclose(row.top1_agreement, values["top1_agreement"].mean(), atol=1e-12)
        np.testing.assert_allclose(row.accuracy_retention, values["accuracy"].mean() / base["accuracy"].mean(), rtol=1e-9)
        np.testing.assert_allclose(row.loss_delta, values["loss"].mean() - base["loss"].mean(), rtol=1e-5, atol=1e-6)


def test_cli_skip_overwrite_and_tokens_option(store, db_url, trained_tiny_models, docs_file):
    from atlas.cli import app

    model, _ = registered(store, trained_tiny_models["gpt2"], docs_file)
    runner = CliRunner()
    arguments = ["ingest", "interventions", "--model", model.name, "--dataset", "docs", "--tokens", "400", "--db", db_url]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    with store.session() as session:
        before = session.execute(text("SELECT COUNT(*), MIN(n_positions) FROM layer_interventions")).one()
    assert before[0] == 2 * model.n_layers and 0 < before[1] < 400
    again = runner.invoke(app, arguments)
    assert again.exit_code == 0 and "skipped" in again.output
    replaced = runner.invoke(app, arguments + ["--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    with store.session() as session:
        assert session.execute(text("SELECT COUNT(*) FROM layer_interventions")).scalar() == 2 * model.n_layers
    too_many = runner.invoke(app, ["ingest", "interventions", "--model", model.name, "--dataset", "docs",
                                   "--tokens", str(10 * N_TOKENS), "--db", db_url])
    assert isinstance(too_many.exception, AtlasError) and "exceeds" in str(too_many.exception)


def test_bad_options_are_atlas_errors(store, trained_tiny_models, docs_file):
    model, _ = registered(store, trained_tiny_models["gpt2"], docs_file)
    with pytest.raises(AtlasError, match="batch-size"):
        run(InterventionsConfig(model=model.name, dataset="docs", batch_size=0), store)
    with pytest.raises(AtlasError, match="not registered"):
        run(InterventionsConfig(model=model.name, dataset="missing"), store)
