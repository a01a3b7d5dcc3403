"""The Python API (`atlas.open`) on the filled atlas, SQLite and PostgreSQL: every method against direct SQL."""

from __future__ import annotations

import html
import json
import subprocess
import sys
import warnings

import pandas as pd
import pytest
from sqlalchemy import text

import atlas
from atlas.api import TruncatedWarning
from atlas.errors import AtlasError
from tests.fixtures_filled import FILLED_DATASET, FILLED_FAMILY

TABLES = ("models", "datasets", "neurons", "neuron_vocab", "activation_stats", "top_examples", "neuron_correlations",
          "jobs")


@pytest.fixture(scope="module")
def api(filled_any_db_url):
    opened = atlas.open(filled_any_db_url)
    yield opened
    opened.close()


def sql(api, query: str, **params) -> pd.DataFrame:
    with api.engine.connect() as conn:
        return pd.read_sql_query(text(query), conn, params=params)


def a_neuron_with_partners(api) -> tuple[str, int, int]:
    row = sql(api, "SELECT m.name, c.layer, c.neuron FROM neuron_correlations c JOIN models m ON m.id = c.model_id "
                   "JOIN top_examples t ON t.model_id = c.model_id AND t.layer = c.layer AND t.neuron = c.neuron "
                   "WHERE c.partner_layer IS NOT NULL ORDER BY m.name, c.layer DESC, c.neuron LIMIT 1").iloc[0]
    return str(row["name"]), int(row["layer"]), int(row["neuron"])


def test_open_and_import_do_not_load_torch(filled_db_url):
    code = ("import sys, atlas; a = atlas.open(sys.argv[1]); a.neurons(limit=5); a.card(a.models().name[0], 0, 0); "
            "print(sorted(m for m in ('torch', 'transformers', 'streamlit') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, filled_db_url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_open_refuses_a_missing_sqlite_file(tmp_path):
    with pytest.raises(AtlasError, match="no atlas at"):
        atlas.open(f"sqlite:///{tmp_path / 'nowhere.db'}")
    assert not (tmp_path / "nowhere.db").exists()


def test_models_and_datasets(api):
    expected = sql(api, "SELECT name, family, seed, n_layers, d_mlp FROM models ORDER BY family, seed")
    models = api.models()
    pd.testing.assert_frame_equal(models[expected.columns].reset_index(drop=True), expected)
    assert api.models(family=FILLED_FAMILY)["name"].tolist() == expected["name"].tolist()
    assert api.datasets()["name"].tolist() == [FILLED_DATASET]


def test_neurons_are_the_neuron_atlas_rows_with_their_hook(api):
    everything = api.neurons()
    assert len(everything) == int(sql(api, "SELECT COUNT(*) AS n FROM neuron_atlas")["n"][0])
    assert (everything["hook_name"] == "blocks." + everything["layer"].astype(str) + ".mlp.hook_post").all()
    assert str(everything["is_universal"].dtype) == "boolean"

    model = api.models()["name"][1]
    chosen = api.neurons(model=model, layer=1, dataset=FILLED_DATASET)
    expected = sql(api, "SELECT neuron, vocab_class, vocab_kurt, act_max, excess_corr FROM neuron_atlas "
                        "WHERE model = :model AND layer = 1 AND dataset = :dataset ORDER BY neuron",
                   model=model, dataset=FILLED_DATASET)
    assert len(expected) > 0
    pd.testing.assert_frame_equal(chosen[expected.columns].reset_index(drop=True), expected)
    assert set(chosen["model"]) == {model} and set(chosen["family"]) == {FILLED_FAMILY}


def test_neurons_filters(api):
    family = api.neurons(family=FILLED_FAMILY, dataset=FILLED_DATASET)
    universal = api.neurons(family=FILLED_FAMILY, dataset=FILLED_DATASET, universal=True)
    not_universal = api.neurons(family=FILLED_FAMILY, dataset=FILLED_DATASET, universal=False)
    flags = sql(api, "SELECT is_universal FROM neuron_atlas WHERE family = :f AND dataset = :d",
                f=FILLED_FAMILY, d=FILLED_DATASET)["is_universal"]
    assert len(universal) == int((flags == 1).sum()) and universal["is_universal"].all()
    assert len(not_universal) == int((flags == 0).sum()) and not not_universal["is_universal"].any()
    assert len(universal) + len(not_universal) == int(flags.notna().sum()) <= len(family)

    classes = sorted(set(family["vocab_class"]))
    for vocab_class in classes:
        picked = api.neurons(family=FILLED_FAMILY, vocab_class=vocab_class, dataset=FILLED_DATASET)
        assert len(picked) == int((family["vocab_class"] == vocab_class).sum())
    assert len(api.neurons(family=FILLED_FAMILY, vocab_class=classes, dataset=FILLED_DATASET)) == len(family)
    assert set(api.neurons(layer=[0, 2])["layer"]) == {0, 2}
    assert len(api.neurons(limit=7)) == 7


def test_correlations_are_the_table_with_names(api):
    model, layer, neuron = a_neuron_with_partners(api)
    found = api.correlations(model=model, layer=layer, neuron=neuron)
    expected = sql(api, """
        SELECT o.name AS other_model, c.max_corr, c.baseline_max_corr, c.partner_layer, c.partner_neuron
        FROM neuron_correlations c JOIN models m ON m.id = c.model_id JOIN models o ON o.id = c.other_model_id
        WHERE m.name = :model AND c.layer = :layer AND c.neuron = :neuron ORDER BY o.seed""",
                   model=model, layer=layer, neuron=neuron)
    assert len(expected) == 2  # the two other seeds
    pd.testing.assert_frame_equal(found[expected.columns].reset_index(drop=True), expected)
    assert set(found["dataset"]) == {FILLED_DATASET}
    everything = api.correlations(family=FILLED_FAMILY, dataset=FILLED_DATASET)
    assert len(everything) == int(sql(api, "SELECT COUNT(*) AS n FROM neuron_correlations")["n"][0])


def test_layers_are_the_layer_profile(api):
    expected = sql(api, "SELECT model, layer, delete_kl, lens_kl FROM layer_profile WHERE family = :f "
                        "ORDER BY seed, layer", f=FILLED_FAMILY)
    assert len(expected) > 0
    profile = api.layers(FILLED_FAMILY, dataset=FILLED_DATASET)
    pd.testing.assert_frame_equal(profile[expected.columns].reset_index(drop=True), expected)
    model = api.models()["name"][0]
    assert set(api.layers(model)["model"]) == {model}


@pytest.mark.parametrize("call", [
    lambda a: a.neurons(model="nowhere"),
    lambda a: a.neurons(family="nowhere"),
    lambda a: a.correlations(dataset="nowhere"),
    lambda a: a.layers("nowhere"),
    lambda a: a.card("nowhere", 0, 0),
    lambda a: a.card(a.models()["name"][0], 99, 0),
    lambda a: a.card(a.models()["name"][0], 0, -1),
], ids=["model", "family", "dataset", "layers", "card-model", "card-layer", "card-neuron"])
def test_unknown_names_are_errors_not_empty_frames(api, call):
    with pytest.raises(AtlasError, match="no (model|family|dataset|model or family) named|out of range"):
        call(api)


def test_sql_reads_with_a_row_limit_and_says_when_it_cut(api):
    names = api.sql("SELECT name FROM models ORDER BY name")
    assert names["name"].tolist() == sorted(api.models()["name"]) and names.attrs["truncated"] is False
    with pytest.warns(TruncatedWarning, match="row limit of 5 rows"):
        cut = api.sql("SELECT layer, neuron FROM neurons", row_limit=5)
    assert len(cut) == 5 and cut.attrs["truncated"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(api.sql("SELECT * FROM neurons")) == int(sql(api, "SELECT COUNT(*) AS n FROM neurons")["n"][0])


def _state(api) -> list:
    return [sql(api, f"SELECT COUNT(*) AS n FROM {table}")["n"][0] for table in TABLES] + \
        [sql(api, "SELECT name, seed FROM models ORDER BY name").values.tolist()]


@pytest.mark.parametrize("statement", [
    "DELETE FROM models",
    "DROP TABLE neurons",
    "UPDATE models SET seed = 99",
    "INSERT INTO datasets (name, source, split, text_field, n_tokens, ctx_len, sample_seed, content_hash) "
    "VALUES ('x', 'x', 'train', 'text', 1, 1, 0, 'x')",
    "CREATE TABLE scratch (a INTEGER)",
    "SELECT 1; DELETE FROM models",
    "EXPLAIN ANALYZE DELETE FROM models",
])
def test_sql_refuses_writes_and_leaves_the_data_unchanged(api, statement):
    before = _state(api)
    with pytest.raises(AtlasError, match="^(refused|query failed): "):
        api.sql(statement)
    assert _state(api) == before


def test_card_holds_the_data_and_renders_it(api):
    model, layer, neuron = a_neuron_with_partners(api)
    card = api.card(model, layer, neuron)
    assert (card.model, card.layer, card.neuron, card.family) == (model, layer, neuron, FILLED_FAMILY)
    assert card.hook_name == f"blocks.{layer}.mlp.hook_post"
    vocab = sql(api, "SELECT v.direction, v.rank, v.token FROM neuron_vocab v JOIN models m ON m.id = v.model_id "
                     "WHERE m.name = :m AND v.layer = :l AND v.neuron = :n ORDER BY v.direction DESC, v.rank",
                m=model, l=layer, n=neuron)
    assert card.vocab[["direction", "rank", "token"]].values.tolist() == vocab.values.tolist()
    examples = sql(api, "SELECT t.rank, t.activation, t.context_tokens, t.highlight_index FROM top_examples t "
                        "JOIN models m ON m.id = t.model_id WHERE m.name = :m AND t.layer = :l AND t.neuron = :n "
                        "ORDER BY t.rank LIMIT 10", m=model, l=layer, n=neuron)
    assert card.examples["rank"].tolist() == examples["rank"].tolist() and len(examples) > 0
    assert card.examples["activation"].tolist() == examples["activation"].tolist()
    assert len(card.partners) == 2 and card.partners["partner_neuron"].notna().all()
    assert card.weights["vocab_class"] == card.vocab_class

    assert {"weights", "activations", "correlations", "labels"} <= set(card.provenance["result"])
    labels = sql(api, "SELECT l.source, l.rank, l.feature, l.score FROM neuron_labels l JOIN models m "
                      "ON m.id = l.model_id WHERE m.name = :m AND l.layer = :l AND l.neuron = :n",
                 m=model, l=layer, n=neuron)
    assert len(card.labels) == len(labels) > 0
    assert sorted(zip(card.labels["source"], card.labels["rank"], card.labels["feature"])) == \
        sorted(zip(labels["source"], labels["rank"], labels["feature"]))
    assert card.provenance["model_revision"].str.startswith("sha256:").all()

    page = card._repr_html_()
    assert "Provenance" in page and card.provenance["torch_version"][0] in page
    tokens = examples["context_tokens"][0]
    tokens = json.loads(tokens) if isinstance(tokens, str) else tokens
    firing = tokens[int(examples["highlight_index"][0])]
    boxed = [span for span in page.split("<span ")[1:] if "outline:2px solid" in span]
    assert len(boxed) == len(examples)  # one firing token per example
    assert html.escape(firing.replace("\n", "⏎\n") or "∅") in boxed[0]
    assert page.count('class="atlas-example"') == len(examples)
    from atlas.read.html import visible_token

    for token in vocab["token"]:
        assert f"<code>{html.escape(visible_token(token))}</code>" in page
    assert "Best partners in the other seeds" in page and repr(card).startswith(f"NeuronCard({model}")


def test_numpy_values_from_a_frame_are_accepted(api):
    row = api.neurons(limit=1).iloc[0]
    assert api.card(row["model"], row["layer"], row["neuron"]).neuron == int(row["neuron"])
    assert len(api.neurons(model=row["model"], layer=row["layer"])) > 0


def test_every_job_carries_its_provenance(api):
    import torch
    import transformers

    jobs = api.jobs(limit=10_000)
    models = api.models().set_index("name")
    assert len(jobs) == int(sql(api, "SELECT COUNT(*) AS n FROM jobs")["n"][0]) > 0
    assert (jobs["torch_version"] == torch.__version__).all()
    assert (jobs["transformers_version"] == transformers.__version__).all()
    with_model = jobs[jobs["model"].notna()]
    assert (with_model["model_source"] == with_model["model"].map(models["source"])).all()
    assert with_model["model_revision"].str.startswith("sha256:").all()  # local directories: content hashes
    assert with_model["tokenizer_hash"].notna().all()
    with_dataset = jobs[jobs["dataset"].notna()]
    assert len(with_dataset) > 0 and with_dataset["dataset_revision"].str.startswith("sha256:").all()
    pairs = jobs[jobs["other_model"].notna()]
    assert len(pairs) > 0 and pairs["other_model_revision"].str.startswith("sha256:").all()
    # Every result row names a job of the ledger.
    orphans = sql(api, "SELECT COUNT(*) AS n FROM neurons n LEFT JOIN jobs j ON j.id = n.job_id WHERE j.id IS NULL")
    assert int(orphans["n"][0]) == 0


def test_labels_filters_and_refuses_an_unknown_source(api):
    every = api.labels(family=FILLED_FAMILY)
    assert set(every["source"]) == {"vocab", "current_token", "next_token"}
    assert every.loc[every["source"] == "vocab", "dataset"].isna().all()
    feature = every.loc[(every["source"] == "vocab") & (every["rank"] == 0), "feature"].iloc[0]
    chosen = api.labels(family=FILLED_FAMILY, source="vocab", feature=feature, max_rank=0)
    assert len(chosen) > 0 and set(chosen["feature"]) == {feature} and set(chosen["rank"]) == {0}
    with pytest.raises(AtlasError, match="no label source 'vocabulary'"):
        api.labels(source="vocabulary")


def test_roles_reach_the_card_and_the_api(api):
    """The filled atlas's entropy candidates and head scores come back through the API and the neuron card."""
    entropy = api.entropy(family=FILLED_FAMILY)
    assert len(entropy) > 0 and (entropy.groupby(["model", "layer", "neuron"]).size() == 10).all()
    assert entropy["null_frac"].notna().all()
    row = entropy.iloc[0]
    card = api.card(row["model"], int(row["layer"]), int(row["neuron"]))
    assert len(card.entropy) == 10 and card.entropy["value"].is_monotonic_increasing
    assert "Entropy intervention" in card._repr_html_() and "entropy" in set(card.provenance["result"])
    heads = api.head_scores(family=FILLED_FAMILY)
    assert len(heads) > 0 and (heads["head_layer"] > heads["layer"]).all()
    assert heads["z"].is_monotonic_increasing  # the most deactivating first
    strongest = heads.iloc[0]
    card = api.card(strongest["model"], int(strongest["layer"]), int(strongest["neuron"]))
    assert len(card.heads) > 0 and "attention roles" in set(card.provenance["result"])


def test_label_and_role_counts_are_the_summaries(api):
    """label_counts and role_counts answer from the summaries and agree with the rows behind them."""
    labels = api.labels(family=FILLED_FAMILY, source="current_token", max_rank=0)
    counts = api.label_counts(FILLED_FAMILY, "current_token")
    assert set(counts.columns) == {"seed", "feature", "n_neurons"}
    expected = labels.groupby(["seed", "feature"]).size()
    assert counts.set_index(["seed", "feature"])["n_neurons"].astype(int).sort_index().to_dict() == expected.to_dict()
    roles = api.role_counts(FILLED_FAMILY)
    assert {"model", "layer", "n_entropy", "n_deactivating", "max_null_frac"} <= set(roles.columns)
    deactivating = api.head_scores(family=FILLED_FAMILY, max_z=-3.0)
    deactivating = deactivating[deactivating["score"] < 0].groupby(["model", "layer"])["neuron"].nunique()
    got = roles.set_index(["model", "layer"])["n_deactivating"]
    assert got[got > 0].astype(int).to_dict() == deactivating.to_dict()
    with pytest.raises(AtlasError, match="no label source"):
        api.label_counts(FILLED_FAMILY, "tokens")
    with pytest.raises(AtlasError, match="no model or family named"):
        api.role_counts("nowhere")
