"""The bulk writer stores exactly what it is given, on SQLite (executemany) and PostgreSQL (binary COPY)."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pytest
from sqlalchemy import select

from atlas.store import bulk_insert, insert_rows
from atlas.store.schema import Dataset, DatasetTokens, Model, Neuron, NeuronCorrelation, NeuronVocab, TopExample

# floats whose shortest exact decimal form needs 17 significant digits, and the extremes of float64
FLOATS = [0.1 + 0.2, 1 / 3, 2 / 3, math.pi, np.nextafter(1.0, 2.0), 5e-324, 2.2250738585072014e-308,
          1.7976931348623157e308, -1.0000000000000002, 123456789.12345679, 0.0, -2.5, math.inf, -math.inf]
TEXTS = ["plain", "tab\there", "new\nline", "cr\rreturn", "back\\slash", "\\x00 literal", "quote ' and \"", "é",
         "日本語", "emoji 🧠", "", " leading space", "trailing space ", "a\x00b", "\\.", "comma, semicolon;"]


@pytest.fixture
def ids(store):
    with store.transaction() as session:
        model = Model(name="m", family="f", seed=0, source="/x", architecture="gpt2", n_layers=2, d_model=4, d_mlp=8,
                      vocab_size=10, tokenizer_hash="h")
        dataset = Dataset(name="d", source="s", n_tokens=1, ctx_len=1, content_hash="h")
        session.add_all([model, dataset])
        session.flush()
        return model.id, dataset.id


def _vocab(store, model_id):
    with store.session() as session:
        return session.execute(select(NeuronVocab.rank, NeuronVocab.token_id, NeuronVocab.token, NeuronVocab.value)
                               .where(NeuronVocab.model_id == model_id).order_by(NeuronVocab.rank)).all()


def test_floats_texts_and_ints_exact(store, ids):
    model_id, _ = ids
    n = len(FLOATS)
    with_nan = np.array(FLOATS[2:] + [np.nan, np.nan])
    neurons = np.array([2**31 - 1, -2**31, *range(n - 2)], dtype=np.int64)
    texts = TEXTS[:n]
    with store.transaction() as session:
        count = bulk_insert(session, Neuron, {
            "model_id": np.int64(model_id), "layer": np.int32(1), "neuron": neurons, "w_in_norm": np.array(FLOATS),
            "w_out_norm": FLOATS, "b_in": with_nan, "l2_penalty": np.float32(0.1), "vocab_class": texts,
            "w_gate_norm": np.full(n, np.nan), "vocab_skew": None, "job_id": None})
    assert count == n
    with store.session() as session:
        rows = session.execute(select(Neuron.neuron, Neuron.w_in_norm, Neuron.w_out_norm, Neuron.b_in,
                                      Neuron.l2_penalty, Neuron.vocab_class, Neuron.w_gate_norm, Neuron.vocab_skew)
                               .order_by(Neuron.layer, Neuron.neuron)).all()
    by_neuron = {r.neuron: r for r in rows}
    rows = [by_neuron[i] for i in neurons.tolist()]
    hexes = [float(v).hex() for v in FLOATS]
    assert [r.w_in_norm.hex() for r in rows] == hexes == [r.w_out_norm.hex() for r in rows]  # bit for bit
    assert [r.b_in for r in rows] == FLOATS[2:] + [None, None]  # NaN is NULL
    assert {r.l2_penalty for r in rows} == {float(np.float32(0.1))}  # a float32 scalar widens exactly
    assert [r.vocab_class for r in rows] == [t.replace("\x00", "\\x00") for t in texts]  # NUL: a visible escape
    assert {(r.w_gate_norm, r.vocab_skew) for r in rows} == {(None, None)}


def test_numpy_str_array_and_nulls(store, ids):
    model_id, dataset_id = ids
    tokens = np.array(TEXTS)  # a numpy str column: encoded without a Python loop, NUL still escaped
    with store.transaction() as session:
        bulk_insert(session, NeuronVocab, {"model_id": model_id, "layer": 0, "neuron": 0, "direction": "bottom",
                                           "rank": np.arange(len(tokens)), "token_id": 1, "token": tokens,
                                           "value": 0.5})
        bulk_insert(session, NeuronCorrelation, {  # None and NaN in int and float columns given as lists
            "model_id": model_id, "other_model_id": model_id, "dataset_id": dataset_id, "layer": 0,
            "neuron": [0, 1, 2], "max_corr": [0.5, None, float("nan")], "partner_layer": [1, None, np.int64(3)],
            "partner_neuron": np.array([4, 5, 6]), "baseline_max_corr": None, "universal_threshold": 0.5})
    assert [r.token for r in _vocab(store, model_id)] == [t.replace("\x00", "\\x00") for t in TEXTS]
    with store.session() as session:
        corr = session.execute(select(NeuronCorrelation.max_corr, NeuronCorrelation.partner_layer,
                                      NeuronCorrelation.partner_neuron, NeuronCorrelation.baseline_max_corr)
                               .order_by(NeuronCorrelation.neuron)).all()
    assert [tuple(r) for r in corr] == [(0.5, 1, 4, None), (None, None, 5, None), (None, 3, 6, None)]


def test_json_columns(store, ids):
    model_id, dataset_id = ids
    ids_column = [[1, 2, 2**40], [], [0]]
    tokens = [["a", "tab\t", "quote\"", "back\\", "é", "🧠", "\x00"], ["x"], []]
    activations = [FLOATS[:-2], None, [np.float64(0.1 + 0.2), np.int64(3)]]  # numpy values inside the lists
    with store.transaction() as session:
        bulk_insert(session, TopExample, {
            "model_id": model_id, "dataset_id": dataset_id, "layer": 0, "neuron": 0, "rank": np.arange(3),
            "doc_index": np.array([5, 6, 7]), "position": np.array([3, 4, 5]), "activation": np.array(FLOATS[:3]),
            "context_token_ids": ids_column, "context_tokens": tokens, "highlight_index": np.zeros(3, np.int64),
            "context_activations": activations})
    with store.session() as session:
        rows = session.scalars(select(TopExample).order_by(TopExample.rank)).all()
    assert [r.context_token_ids for r in rows] == ids_column
    assert [r.context_tokens for r in rows] == tokens
    assert rows[1].context_activations is None
    assert [v.hex() for v in rows[0].context_activations] == [v.hex() for v in map(float, FLOATS[:-2])]
    assert rows[2].context_activations == [0.1 + 0.2, 3]
    assert [r.activation.hex() for r in rows] == [v.hex() for v in FLOATS[:3]]


def test_booleans_timestamps_and_insert_rows(store, ids):
    _, dataset_id = ids
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    with store.transaction() as session:
        bulk_insert(session, DatasetTokens, {"dataset_id": dataset_id, "tokenizer_hash": ["t1", "t2", "t3"],
                                             "n_tokens": np.array([1, 2, 3]), "n_rows": 1, "n_truncated_tokens": 0,
                                             "source_exhausted": np.array([True, False, True])})
        # a timestamp column takes psycopg's row-by-row path on PostgreSQL: same values
        insert_rows(session, DatasetTokens, ["dataset_id", "tokenizer_hash", "n_tokens", "n_rows",
                                             "n_truncated_tokens", "source_exhausted", "created_at"],
                    [(dataset_id, "t4", 4, 1, 0, np.bool_(False), when), (dataset_id, "t5", 5, 1, 0, True, when)])
    with store.session() as session:
        rows = session.execute(select(DatasetTokens.tokenizer_hash, DatasetTokens.n_tokens,
                                      DatasetTokens.source_exhausted, DatasetTokens.created_at)
                               .order_by(DatasetTokens.tokenizer_hash)).all()
    assert [(r[0], r[1], r[2]) for r in rows] == [("t1", 1, True), ("t2", 2, False), ("t3", 3, True),
                                                  ("t4", 4, False), ("t5", 5, True)]
    assert all(r[3].replace(tzinfo=timezone.utc) == when for r in rows[3:])


def test_many_rows_in_chunks(store, ids):
    """Thousands of rows with text of very different lengths (one long outlier): chunks and padding."""
    model_id, _ = ids
    rng = np.random.default_rng(0)
    n = 6000
    tokens = ["é" * int(k) + "\t" for k in rng.integers(0, 40, n)]
    tokens[1234] = "long " * 50_000
    values = rng.normal(size=n)
    with store.transaction() as session:
        bulk_insert(session, NeuronVocab, {"model_id": model_id, "layer": 0, "neuron": 0, "direction": "top",
                                           "rank": np.arange(n), "token_id": rng.integers(-5, 5, n),
                                           "token": tokens, "value": values})
    rows = _vocab(store, model_id)
    assert [r.token for r in rows] == tokens
    assert [r.value for r in rows] == values.tolist()


def test_bad_columns(store, ids):
    model_id, _ = ids
    base = {"model_id": model_id, "layer": 0, "neuron": 0, "direction": "top", "token_id": 1, "token": "t",
            "value": 1.0}
    with pytest.raises(ValueError, match="different lengths"):
        with store.transaction() as session:
            bulk_insert(session, NeuronVocab, {**base, "rank": np.arange(3), "token": ["a", "b"]})
    with pytest.raises(ValueError, match="no column nope"):
        with store.transaction() as session:
            bulk_insert(session, NeuronVocab, {**base, "rank": np.arange(3), "nope": 1})
    with store.transaction() as session:
        assert bulk_insert(session, NeuronVocab, {**base, "rank": np.arange(0)}) == 0
    assert _vocab(store, model_id) == []


def test_out_of_range_integer_is_refused_on_postgresql(store, ids):
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite integers are 64-bit")
    model_id, _ = ids
    with pytest.raises(ValueError, match="out of range"):
        with store.transaction() as session:
            bulk_insert(session, NeuronVocab, {"model_id": model_id, "layer": 0, "neuron": 0, "direction": "top",
                                               "rank": np.arange(2), "token_id": np.array([1, 2**31]),
                                               "token": "t", "value": 1.0})
    assert _vocab(store, model_id) == []
