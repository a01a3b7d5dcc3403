"""Summary tables equal the aggregations they replace: neuron_universality after a refresh, after migration
0006 fills it from an older atlas and after a partner seed is removed; layer_classes (classes and entropy
neurons) after the weights job and after migrations 0007 and 0008 fill it; label_counts after the labels job and
after migration 0008 fills it; the Layers page's role counts and the Compare page's histogram against
independent pandas / numpy computations on the rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from atlas.registry import remove_model
from atlas.store import Store, bulk_insert
from atlas.store.schema import Model, Neuron, NeuronCorrelation
from atlas.store.summaries import DEACTIVATION_Z, ENTROPY_NULL_RATIO, refresh_universality

N_LAYERS, D_MLP = 2, 5


def _models_and_dataset(store: Store, seeds=(0, 1, 2)) -> tuple[list[int], int]:
    with store.transaction() as session:
        ids = []
        for seed in seeds:
            model = Model(name=f"m{seed}", family="f", seed=seed, source=f"/m{seed}", architecture="gpt2",
                          n_layers=N_LAYERS, d_model=4, d_mlp=D_MLP, vocab_size=10, tokenizer_hash="h")
            session.add(model)
            session.flush()
            ids.append(model.id)
        session.execute(text("INSERT INTO datasets (name, source, split, text_field, n_tokens, ctx_len, sample_seed, "
                             "content_hash, created_at) VALUES ('d', 's', 'train', 'text', 1, 1, 0, 'h', '2026-01-01')"))
        return ids, session.scalar(text("SELECT id FROM datasets"))


def _correlation_rows(rng: np.random.Generator, model_id: int, other_id: int, dataset_id: int) -> dict:
    n = N_LAYERS * D_MLP
    max_corr = rng.uniform(0.0, 1.0, n)
    max_corr[0] = np.nan  # a zero-variance neuron
    return {"model_id": model_id, "other_model_id": other_id, "dataset_id": dataset_id,
            "layer": np.arange(n) // D_MLP, "neuron": np.arange(n) % D_MLP, "max_corr": max_corr,
            "partner_layer": 0, "partner_neuron": 0, "baseline_max_corr": rng.uniform(0.0, 0.4, n),
            "universal_threshold": 0.3}


def _fill_correlations(store: Store, ids: list[int], dataset_id: int) -> None:
    rng = np.random.default_rng(0)
    with store.transaction() as session:
        for a in ids:
            for b in ids:
                if a != b:
                    bulk_insert(session, NeuronCorrelation, _correlation_rows(rng, a, b, dataset_id))


def _expected(store: Store) -> pd.DataFrame:
    """The summary computed independently in pandas from the correlation rows."""
    with store.engine.connect() as conn:
        rows = pd.read_sql(text("SELECT model_id, layer, neuron, max_corr, baseline_max_corr, universal_threshold "
                                "FROM neuron_correlations"), conn)
    grouped = rows.groupby(["model_id", "layer", "neuron"])
    expected = pd.DataFrame({
        "n_other_seeds": grouped["max_corr"].count(),
        "mean_max_corr": grouped["max_corr"].mean(),
        "mean_baseline_corr": grouped["baseline_max_corr"].mean(),
        "threshold": grouped["universal_threshold"].max(),
    })
    expected["excess_corr"] = expected["mean_max_corr"] - expected["mean_baseline_corr"]
    return expected.reset_index().sort_values(["model_id", "layer", "neuron"]).reset_index(drop=True)


def _view(store: Store) -> pd.DataFrame:
    with store.engine.connect() as conn:
        return pd.read_sql(text("SELECT model_id, layer, neuron, n_other_seeds, mean_max_corr, mean_baseline_corr, "
                                "excess_corr, is_universal FROM universal_neurons ORDER BY model_id, layer, neuron"),
                           conn)


def _assert_matches(store: Store) -> None:
    got, expected = _view(store), _expected(store)
    assert len(got) == len(expected) > 0
    assert got["n_other_seeds"].tolist() == expected["n_other_seeds"].tolist()
    for column in ("mean_max_corr", "mean_baseline_corr", "excess_corr"):
        np.testing.assert_allclose(got[column].astype(float), expected[column], rtol=1e-12, equal_nan=True)
    universal = expected["excess_corr"] > expected["threshold"]
    known = expected["excess_corr"].notna()
    assert got.loc[known, "is_universal"].astype(bool).tolist() == universal[known].tolist()
    assert got.loc[~known, "is_universal"].isna().all()


def test_refresh_summarises_the_correlation_rows(store):
    ids, dataset_id = _models_and_dataset(store)
    _fill_correlations(store, ids, dataset_id)
    with store.transaction() as session:
        refresh_universality(session, ids, dataset_id)
    _assert_matches(store)
    with store.transaction() as session:  # a second refresh replaces, never duplicates
        refresh_universality(session, ids[:1], dataset_id)
    _assert_matches(store)


def test_removing_a_seed_refreshes_its_partners(store):
    ids, dataset_id = _models_and_dataset(store)
    _fill_correlations(store, ids, dataset_id)
    with store.transaction() as session:
        refresh_universality(session, ids, dataset_id)
    remove_model(store, "m2")
    _assert_matches(store)
    assert set(_view(store)["n_other_seeds"]) <= {0, 1}


def _store_at(url: str, revision: str):
    """A store migrated only up to `revision`: an atlas an older version of the atlas wrote."""
    store = Store(url, check=False)
    store.upgrade(revision)
    yield store
    store.dispose()


@pytest.fixture
def store_at_0005(empty_db_url):
    yield from _store_at(empty_db_url, "0005")


def test_migration_fills_the_summary_from_an_older_atlas(store_at_0005):
    store = store_at_0005
    ids, dataset_id = _models_and_dataset(store)
    _fill_correlations(store, ids, dataset_id)
    before = _view(store)  # the 0003 view: grouped from the rows on every query
    store.upgrade()
    _assert_matches(store)
    after = _view(store)
    np.testing.assert_allclose(after["excess_corr"].astype(float), before["excess_corr"].astype(float),
                               rtol=1e-12, equal_nan=True)
    store.downgrade("0005")
    np.testing.assert_allclose(_view(store)["excess_corr"].astype(float), before["excess_corr"].astype(float),
                               rtol=1e-12, equal_nan=True)


def test_layer_classes_count_the_neurons_of_each_class(filled_any_db_url):
    """The weights job keeps layer_classes equal to a count of its neurons rows per model, layer and class."""
    store = Store(filled_any_db_url)
    with store.engine.connect() as conn:
        neurons = pd.read_sql(text("SELECT model_id, layer, vocab_class FROM neurons"), conn)
        kept = pd.read_sql(text("SELECT * FROM layer_classes ORDER BY model_id, layer"), conn)
    store.dispose()
    expected = (pd.crosstab([neurons["model_id"], neurons["layer"]], neurons["vocab_class"])
                .reindex(columns=["prediction", "suppression", "partition"], fill_value=0).reset_index())
    expected["n_neurons"] = neurons.groupby(["model_id", "layer"]).size().to_numpy()
    assert len(kept) == len(expected) > 0
    for column in ("model_id", "layer"):
        assert kept[column].tolist() == expected[column].tolist()
    for name in ("prediction", "suppression", "partition"):
        assert kept[f"n_{name}"].tolist() == expected[name].tolist()
    assert kept["n_neurons"].tolist() == expected["n_neurons"].tolist()


def test_migration_fills_layer_classes_from_an_older_atlas(store_at_0005):
    store = store_at_0005
    ids, _ = _models_and_dataset(store)
    rng = np.random.default_rng(1)
    classes = rng.choice(["prediction", "suppression", "partition", "none"], size=N_LAYERS * D_MLP)
    with store.transaction() as session:
        bulk_insert(session, Neuron, {
            "model_id": ids[0], "layer": np.arange(N_LAYERS * D_MLP) // D_MLP, "neuron": np.arange(N_LAYERS * D_MLP) % D_MLP,
            "w_in_norm": 1.0, "w_out_norm": 1.0, "l2_penalty": 2.0, "vocab_class": classes})
    store.upgrade()
    with store.engine.connect() as conn:
        kept = conn.execute(text("SELECT layer, n_neurons, n_prediction, n_suppression, n_partition "
                                 "FROM layer_classes ORDER BY layer")).all()
    for layer, n, prediction, suppression, partition in kept:
        here = classes[layer * D_MLP:(layer + 1) * D_MLP]
        assert (n, prediction, suppression, partition) == (
            D_MLP, (here == "prediction").sum(), (here == "suppression").sum(), (here == "partition").sum())
    assert len(kept) == N_LAYERS


def _entropy_counts(neurons: pd.DataFrame) -> pd.DataFrame:
    """Per model and layer, from neurons rows: entropy neurons, the largest null-space fraction, the random share."""
    neurons = neurons.dropna(subset=["null_frac"]).assign(
        entropy=lambda f: (f["null_frac"] >= ENTROPY_NULL_RATIO * f["null_frac_random"]).astype(int))
    return neurons.groupby(["model_id", "layer"]).agg(
        n_entropy=("entropy", "sum"), max_null_frac=("null_frac", "max"),
        null_frac_random=("null_frac_random", "max")).reset_index()


def test_layer_and_label_summaries_match_the_rows(filled_any_db_url):
    """The weights job's entropy counts, the labels job's rank-0 label counts and the role counts by layer equal
    pandas counts of the rows (SQLite and PostgreSQL)."""
    from atlas.read import roles

    store = Store(filled_any_db_url)
    with store.engine.connect() as conn:
        neurons = pd.read_sql(text("SELECT model_id, layer, null_frac, null_frac_random FROM neurons"), conn)
        kept = pd.read_sql(text("SELECT model_id, layer, n_entropy, max_null_frac, null_frac_random "
                                "FROM layer_classes ORDER BY model_id, layer"), conn)
        labels = pd.read_sql(text("SELECT model_id, source, feature FROM neuron_labels WHERE rank = 0"), conn)
        label_counts = pd.read_sql(text("SELECT model_id, source, feature, n_neurons FROM label_counts "
                                        "ORDER BY model_id, source, feature"), conn)
        scores = pd.read_sql(text("SELECT model_id, layer, neuron, score, z FROM neuron_head_scores"), conn)
        models = pd.read_sql(text("SELECT id AS model_id, name AS model, family FROM models"), conn)
    expected = _entropy_counts(neurons)
    assert len(kept) == len(expected) > 0
    assert kept["n_entropy"].tolist() == expected["n_entropy"].tolist()
    for column in ("max_null_frac", "null_frac_random"):
        np.testing.assert_allclose(kept[column].astype(float), expected[column], rtol=1e-12)

    expected_labels = (labels.groupby(["model_id", "source", "feature"]).size().rename("n_neurons").reset_index()
                       .sort_values(["model_id", "source", "feature"]).reset_index(drop=True))
    assert len(label_counts) == len(expected_labels) > 0
    pd.testing.assert_frame_equal(label_counts, expected_labels, check_dtype=False)

    family = models["family"].iloc[0]
    got = roles.role_counts_by_layer(store.engine, family)
    deactivating = scores[(scores["z"] <= DEACTIVATION_Z) & (scores["score"] < 0)]
    n_deactivating = deactivating.groupby(["model_id", "layer"])["neuron"].nunique().rename("n_deactivating")
    expected_roles = (expected.merge(models, on="model_id").merge(n_deactivating.reset_index(), how="left",
                                                                  on=["model_id", "layer"])
                      .fillna({"n_deactivating": 0}).sort_values(["model", "layer"]).reset_index(drop=True))
    got = got.sort_values(["model", "layer"]).reset_index(drop=True)
    assert got["n_entropy"].tolist() == expected_roles["n_entropy"].tolist()
    assert got["n_deactivating"].tolist() == expected_roles["n_deactivating"].astype(int).tolist()
    assert len(deactivating) > 0, "the filled atlas should have some deactivating scores to count"

    features = roles.label_features(store.engine, family, "vocab")
    by_feature = labels[labels["source"] == "vocab"].groupby("feature").size()
    assert dict(zip(features["feature"], features["n_neurons"].astype(int))) == by_feature.to_dict()
    store.dispose()


def test_histogram_counts_equal_numpy(filled_any_db_url):
    """The Compare page's histogram, counted in SQL, equals np.histogram of the summary's values."""
    from atlas.read import queries

    store = Store(filled_any_db_url)
    with store.engine.connect() as conn:
        model, dataset = conn.execute(text(
            "SELECT m.name, d.name FROM neuron_universality u JOIN models m ON m.id = u.model_id "
            "JOIN datasets d ON d.id = u.dataset_id LIMIT 1")).one()
        values = pd.read_sql(text(
            "SELECT u.mean_max_corr, u.mean_baseline_corr FROM neuron_universality u JOIN models m ON m.id = u.model_id "
            "JOIN datasets d ON d.id = u.dataset_id WHERE m.name = :m AND d.name = :d"), conn,
            params={"m": model, "d": dataset})
    got = queries.max_corr_histogram(store.engine, model, dataset, bins=40)
    store.dispose()
    present = values.stack().dropna().to_numpy(float)
    edges = np.linspace(min(0.0, np.floor(present.min() * 10) / 10), 1.0, 41)
    for series, column in (("max correlation", "mean_max_corr"), ("rotation baseline", "mean_baseline_corr")):
        counts, _ = np.histogram(values[column].dropna().to_numpy(float), bins=edges)
        part = got[got["series"] == series]
        assert part["count"].tolist() == counts.tolist()
        np.testing.assert_allclose(part["bin_start"], edges[:-1])
    assert got["count"].sum() == values.notna().sum().sum() > 0


@pytest.fixture
def store_at_0007(empty_db_url):
    yield from _store_at(empty_db_url, "0007")


def test_migration_0008_fills_entropy_and_label_counts(store_at_0007):
    """An atlas written by the 0007 schema upgrades in place: entropy counts and label counts from its rows."""
    store = store_at_0007
    ids, _ = _models_and_dataset(store)
    rng = np.random.default_rng(2)
    n = N_LAYERS * D_MLP
    null_frac = rng.uniform(0.0, 0.4, n)
    with store.transaction() as session:
        bulk_insert(session, Neuron, {
            "model_id": ids[0], "layer": np.arange(n) // D_MLP, "neuron": np.arange(n) % D_MLP, "w_in_norm": 1.0,
            "w_out_norm": 1.0, "l2_penalty": 2.0, "vocab_class": "none", "null_frac": null_frac,
            "null_frac_random": 0.02})
        session.execute(text("INSERT INTO layer_classes (model_id, layer, n_neurons, n_prediction, n_suppression, "
                             "n_partition) VALUES (:m, 0, 5, 0, 0, 0), (:m, 1, 5, 0, 0, 0)"), {"m": ids[0]})
        for neuron in range(D_MLP):
            for rank, feature in enumerate(("a", "b") if neuron % 2 else ("b", "a")):
                session.execute(text(
                    "INSERT INTO neuron_labels (model_id, dataset_id, layer, neuron, source, rank, feature, score) "
                    "VALUES (:m, NULL, 0, :n, 'vocab', :r, :f, 0.5)"), {"m": ids[1], "n": neuron, "r": rank, "f": feature})
    store.upgrade()
    with store.engine.connect() as conn:
        entropy = conn.execute(text("SELECT layer, n_entropy FROM layer_classes ORDER BY layer")).all()
        counts = conn.execute(text("SELECT model_id, source, feature, n_neurons FROM label_counts "
                                   "ORDER BY feature")).all()
    expected = (null_frac >= ENTROPY_NULL_RATIO * 0.02).reshape(N_LAYERS, D_MLP).sum(axis=1)
    assert [n for _, n in entropy] == expected.tolist()
    assert counts == [(ids[1], "vocab", "a", 2), (ids[1], "vocab", "b", 3)]
    store.downgrade("0007")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM layer_classes")).scalar() == N_LAYERS


def test_family_counts_and_samples_match_pandas(filled_any_db_url):
    """The Families page's counts (the registry, the summary alone, or neurons joined with it) and its scatter
    sample choose the neurons a pandas filter of the rows chooses."""
    from atlas.read import queries

    store = Store(filled_any_db_url)
    with store.engine.connect() as conn:
        rows = pd.read_sql(text(
            "SELECT m.family, m.seed, n.layer, n.neuron, n.vocab_class, u.excess_corr, d.name AS dataset "
            "FROM neurons n JOIN models m ON m.id = n.model_id JOIN neuron_universality u ON u.model_id = n.model_id "
            "AND u.layer = n.layer AND u.neuron = n.neuron JOIN datasets d ON d.id = u.dataset_id"), conn)
    family, dataset = rows["family"].iloc[0], rows["dataset"].iloc[0]
    rows = rows[(rows["family"] == family) & (rows["dataset"] == dataset)]
    seeds = sorted(rows["seed"].unique().tolist())
    classes = list(queries.VOCAB_CLASSES)
    for chosen_seeds, layers, chosen_classes, threshold in (
            (seeds, (0, 1), classes, None), (seeds, (0, 1), classes, 0.0), (seeds[:1], (1, 1), classes, -0.05),
            (seeds, (0, 1), ["partition", "none"], 0.0), (seeds[1:], (0, 0), ["none"], None)):
        chosen = queries.NeuronFilter(family, chosen_seeds, layers, chosen_classes, dataset, threshold)
        expected = rows[rows["seed"].isin(chosen_seeds) & rows["layer"].between(*layers)
                        & rows["vocab_class"].isin(chosen_classes)]
        if threshold is not None:
            expected = expected[expected["excess_corr"] > threshold]
        total = queries.family_neuron_count(store.engine, chosen)
        assert total == len(expected) > 0, (chosen, total, len(expected))
        sample = queries.family_neuron_sample(store.engine, chosen, total, size=50)
        keys = set(zip(expected["seed"], expected["layer"], expected["neuron"]))
        assert 0 < len(sample) <= 50
        assert set(zip(sample["seed"], sample["layer"], sample["neuron"])) <= keys
    store.dispose()
