"""The four-stage profile (Stages of Inference, Figure 1): the stage_profile view against the tables it joins,
the head statistics read model, `atlas report`, the API and the Layers page."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text
from streamlit.testing.v1 import AppTest

import atlas
from atlas.cli import main
from atlas.errors import AtlasError
from atlas.read import stages
from atlas.registry import register_dataset, register_model
from atlas.store import Store
from atlas.store.bulk import bulk_insert
from atlas.store.schema import HeadStat, LayerStat
from tests.fixtures_filled import FILLED_DATASET, FILLED_FAMILY, FILLED_SEEDS
from tests.tiny import N_HEADS

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
PROFILE_COLUMNS = ["delete_kl", "attn_prev5", "n_prediction", "n_suppression", "lens_kl", "lens_entropy_nats",
                   "mlp_out_norm", "attn_out_norm", "max_subjoiner", "mean_attn_first", "mean_attn_prev"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _table(engine, name: str) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql_query(f"SELECT * FROM {name}", conn)


def expected_profile(engine) -> pd.DataFrame:
    """The stage_profile view recomputed in pandas from the tables: one row per (model, dataset, layer) that has
    layer statistics or a deletion, with the layer's class counts, its lens row (residual state layer + 1), its
    deletion and the heads' max subjoiner / mean attention."""
    models = _table(engine, "models").rename(columns={"id": "model_id", "name": "model"})
    datasets = _table(engine, "datasets").rename(columns={"id": "dataset_id", "name": "dataset"})
    layer_stats = _table(engine, "layer_stats")
    interventions = _table(engine, "layer_interventions")
    deletions = interventions[interventions["kind"] == "delete"].rename(columns={"kl": "delete_kl"})
    keys = pd.concat([layer_stats[["model_id", "dataset_id", "layer"]], deletions[["model_id", "dataset_id", "layer"]]])
    keys = keys.drop_duplicates().astype({"layer": int})
    neurons = _table(engine, "neurons")
    counts = neurons.groupby(["model_id", "layer"]).agg(
        n_prediction=("vocab_class", lambda c: (c == "prediction").sum()),
        n_suppression=("vocab_class", lambda c: (c == "suppression").sum())).reset_index()
    lens = _table(engine, "logit_lens").rename(columns={"kl_to_final": "lens_kl", "entropy_nats": "lens_entropy_nats"})
    lens["layer"] = lens["layer"] - 1
    heads = _table(engine, "head_stats")
    per_layer = heads.groupby(["model_id", "dataset_id", "layer"]).agg(
        max_subjoiner=("subjoiner", "max"), mean_attn_first=("attn_first", "mean"),
        mean_attn_prev=("attn_prev", "mean")).reset_index()
    frame = (keys.merge(models[["model_id", "model", "family", "seed", "n_layers"]], on="model_id")
             .merge(datasets[["dataset_id", "dataset"]], on="dataset_id")
             .merge(counts, on=["model_id", "layer"], how="left")
             .merge(lens[["model_id", "dataset_id", "layer", "lens_kl", "lens_entropy_nats"]],
                    on=["model_id", "dataset_id", "layer"], how="left")
             .merge(deletions[["model_id", "dataset_id", "layer", "delete_kl"]], on=["model_id", "dataset_id", "layer"],
                    how="left")
             .merge(layer_stats[["model_id", "dataset_id", "layer", "attn_prev5", "mlp_out_norm", "attn_out_norm"]],
                    on=["model_id", "dataset_id", "layer"], how="left")
             .merge(per_layer, on=["model_id", "dataset_id", "layer"], how="left"))
    frame["rel_depth"] = np.where(frame["n_layers"] > 1, frame["layer"] / (frame["n_layers"] - 1).clip(lower=1), 0.0)
    return frame


def _compare(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    keys = ["model", "dataset", "layer"]
    columns = keys + ["rel_depth"] + PROFILE_COLUMNS
    actual = actual[columns].sort_values(keys).reset_index(drop=True).astype({c: float for c in columns[2:]})
    expected = expected[columns].sort_values(keys).reset_index(drop=True).astype({c: float for c in columns[2:]})
    pd.testing.assert_frame_equal(actual, expected, rtol=1e-9, atol=0)


def test_stage_profile_is_the_joined_tables_on_the_filled_atlas(filled_any_db_url: str) -> None:
    engine = create_engine(filled_any_db_url)
    try:
        expected = expected_profile(engine)
        profile = stages.stage_profile(engine, FILLED_FAMILY, FILLED_DATASET)
        assert set(profile["seed"]) == set(FILLED_SEEDS)
        assert profile[["delete_kl", "lens_kl", "attn_prev5", "mlp_out_norm", "n_prediction"]].notna().all().all()
        _compare(profile, expected[(expected["family"] == FILLED_FAMILY) & (expected["dataset"] == FILLED_DATASET)])
        one = profile["model"].iloc[0]
        assert stages.stage_profile(engine, one).equals(profile[profile["model"] == one].reset_index(drop=True))
    finally:
        engine.dispose()


@pytest.fixture
def fresh_heads(store: Store, tiny_family, filled_docs_file) -> Store:
    """Two seeds of the tiny GPT-2 on two datasets, layer statistics and realistic head statistics: attention
    probabilities in [0, 1], subjoiner scores in [-1, 1], a head without continuations (NULL score), and one
    model without heads in its last layer."""
    rng = np.random.default_rng(17)
    models = [register_model(store, str(tiny_family[seed]), family="fresh", seed=seed)[0] for seed in (0, 1)]
    datasets = [register_dataset(store, name, str(filled_docs_file), n_tokens=500, ctx_len=32)[0]
                for name in ("docs", "other")]
    layer_rows, head_rows = [], []
    for model in models:
        for dataset in datasets:
            for layer in range(model.n_layers):
                layer_rows.append(dict(model_id=model.id, dataset_id=dataset.id, layer=layer,
                                       attn_prev5=rng.uniform(0.2, 0.9), attn_out_norm=rng.uniform(1, 5),
                                       mlp_out_norm=rng.uniform(1, 10)))
                if model is models[1] and layer == model.n_layers - 1:
                    continue
                for head in range(N_HEADS):
                    attn, base = rng.uniform(0, 1, size=2)
                    missing = layer == 0 and head == 0
                    head_rows.append(dict(
                        model_id=model.id, dataset_id=dataset.id, layer=layer, head=head,
                        subjoiner=None if missing else attn - base, subjoiner_attn=None if missing else attn,
                        subjoiner_baseline=None if missing else base, n_continuations=0 if missing else 40,
                        attn_first=rng.uniform(0, 1), attn_prev=rng.uniform(0, 1)))
    with store.transaction() as session:
        bulk_insert(session, LayerStat, {name: [row[name] for row in layer_rows] for name in layer_rows[0]})
        bulk_insert(session, HeadStat, {name: [row[name] for row in head_rows] for name in head_rows[0]})
    return store


def test_stage_profile_aggregates_the_heads_per_layer(fresh_heads: Store) -> None:
    engine = fresh_heads.engine
    expected = expected_profile(engine)
    profile = stages.stage_profile(engine, "fresh", "docs")
    assert len(profile) == 2 * 3
    _compare(profile, expected[expected["dataset"] == "docs"])
    last = profile[(profile["seed"] == 1) & (profile["layer"] == 2)]
    assert last[["max_subjoiner", "mean_attn_first"]].isna().all().all()  # no heads there: NULL, not 0
    assert list(profile.loc[profile["seed"] == 0, "rel_depth"]) == [0.0, 0.5, 1.0]

    heads = stages.head_stats(engine, "fresh", "docs")
    table = _table(engine, "head_stats")
    docs_id = int(_table(engine, "datasets").set_index("name").loc["docs", "id"])
    assert len(heads) == len(table[table["dataset_id"] == docs_id]) == (3 + 2) * N_HEADS
    assert heads["subjoiner"].isna().sum() == 2  # layer 0, head 0 of each model
    assert np.allclose(heads["subjoiner"].dropna(), (heads["subjoiner_attn"] - heads["subjoiner_baseline"]).dropna())
    assert len(stages.head_stats(engine, "fresh")) == 2 * (3 + 2) * N_HEADS
    seed0 = fresh_heads_model(engine, 0)
    assert set(stages.head_stats(engine, seed0, "other")["model"]) == {seed0}

    both = stages.stage_profile_models(engine, ["fresh", seed0], "docs")
    assert list(both.groupby("group", sort=False).size().items()) == [("fresh", 6), (seed0, 3)]
    assert stages.stage_profile_names(engine, "docs") == ["fresh"] + sorted(_table(engine, "models")["name"])
    assert stages.stage_profile_models(engine, [], "docs").empty


def fresh_heads_model(engine, seed: int) -> str:
    models = _table(engine, "models")
    return str(models.loc[models["seed"] == seed, "name"].iloc[0])


def test_api_reads_stages_and_heads(fresh_heads: Store) -> None:
    with atlas.open(fresh_heads.url) as a:
        assert a.stages("fresh", "docs").equals(stages.stage_profile(fresh_heads.engine, "fresh", "docs"))
        assert len(a.heads("fresh", "other")) == (3 + 2) * N_HEADS
        with pytest.raises(AtlasError, match="no model or family named 'nope'"):
            a.stages("nope")
        with pytest.raises(AtlasError, match="no dataset named 'nowhere'"):
            a.heads("fresh", "nowhere")


# --- atlas report --------------------------------------------------------------------------------


def report(capsys, monkeypatch, url: str, *args: str) -> tuple[int, str, str]:
    """`atlas report ARGS --db URL` through the CLI's entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["atlas", "report", *args, "--db", url])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


FIGURES = ("stage_profile", "class_counts_by_depth", "universal_fraction_by_layer", "max_corr_histogram")


def test_report_writes_png_html_and_csv(filled_db_url: str, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "report"
    code, printed, err = report(capsys, monkeypatch, filled_db_url, "--family", FILLED_FAMILY, "--out", str(out))
    assert code == 0, err
    written = {Path(line).name for line in printed.split()}
    assert written == {f"{name}.{ext}" for name in FIGURES for ext in ("png", "html", "csv")}
    for name in FIGURES:
        assert (out / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE), name
        assert "vegaEmbed" in (out / f"{name}.html").read_text(), name
    assert "Deletion KL (nats)" in (out / "stage_profile.html").read_text()
    numbers = pd.read_csv(out / "stage_profile.csv")
    engine = create_engine(filled_db_url)
    try:
        view = stages.stage_profile(engine, FILLED_FAMILY, FILLED_DATASET)
    finally:
        engine.dispose()
    assert np.allclose(numbers["delete_kl"], view["delete_kl"]) and list(numbers["model"]) == list(view["model"])
    histogram = pd.read_csv(out / "max_corr_histogram.csv")
    assert histogram["model"].nunique() == len(FILLED_SEEDS)

    only_html = tmp_path / "html"
    code, printed, err = report(capsys, monkeypatch, filled_db_url, "--family", FILLED_FAMILY, "--dataset",
                                FILLED_DATASET, "--out", str(only_html), "--format", "html")
    assert code == 0, err
    assert not list(only_html.glob("*.png")) and len(list(only_html.glob("*.html"))) == len(FIGURES)


def test_report_runs_without_torch(filled_db_url: str, tmp_path) -> None:
    script = ("import sys; from atlas.cli import main; sys.argv = ['atlas', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
              "assert 'torch' not in sys.modules, 'atlas report imported torch'")
    done = subprocess.run([sys.executable, "-c", script, "report", "--family", FILLED_FAMILY, "--out",
                           str(tmp_path), "--format", "html", "--db", filled_db_url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(list(tmp_path.glob("*.html"))) == len(FIGURES)


@pytest.mark.parametrize(("args", "message"), [
    (("--family", "nope"), "no family named 'nope': families tiny"),
    (("--family", FILLED_FAMILY, "--dataset", "nowhere"), "no dataset named 'nowhere'"),
    (("--family", FILLED_FAMILY, "--format", "pdf"), "--format 'pdf': give one of png, html, both"),
])
def test_report_fails_in_one_line(filled_db_url: str, tmp_path, capsys, monkeypatch, args, message) -> None:
    code, printed, err = report(capsys, monkeypatch, filled_db_url, *args, "--out", str(tmp_path / "r"))
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


# --- the Layers page -----------------------------------------------------------------------------


def _app(url: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("ATLAS_DATABASE_URL", url)
    return AppTest.from_file(str(MAIN), default_timeout=60).run()


def _open_layers(url: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    app = _app(url, monkeypatch)
    app.switch_page("app_pages/layers.py").run()
    assert not app.exception, [exception.value for exception in app.exception]
    return app


def _chart_specs(app: AppTest) -> list[str]:
    return [element.proto.spec for element in app.get("vega_lite_chart")]


def test_layers_page_leads_with_the_four_stage_profile(filled_db_url: str, monkeypatch) -> None:
    app = _open_layers(filled_db_url, monkeypatch)
    headers = [header.value for header in app.subheader]
    assert headers[0] == "The four-stage profile"
    assert headers[-1] == "Entropy and attention-deactivating neurons by depth"
    specs = _chart_specs(app)
    assert "Deletion KL (nats)" in specs[0] and "Attention output norm" in specs[0]
    # the filled atlas ran `atlas ingest heads`: the heads chart, no command to run
    assert any("Subjoiner score" in spec and "Attention to the first position" in spec for spec in specs)
    assert "atlas ingest heads" not in "\n".join(code.value for code in app.code)
    assert not app.info  # every measurement of the profile is there: no guidance box

    overlay = app.multiselect[0]
    overlay.set_value([FILLED_FAMILY, overlay.options[-1]]).run()
    assert not app.exception
    assert len(_chart_specs(app)) == len(specs) + 1
    assert '"group"' in _chart_specs(app)[1]


def test_layers_page_says_how_to_get_the_heads(filled_db_url: str, tmp_path, monkeypatch) -> None:
    """Without head_stats rows the page shows the command that fills them, and no heads chart."""
    copy = tmp_path / "atlas.db"
    shutil.copy(Path(filled_db_url.removeprefix("sqlite:///")), copy)
    store = Store(f"sqlite:///{copy}")
    try:
        with store.transaction() as session:
            session.execute(text("DELETE FROM head_stats"))
    finally:
        store.dispose()
    app = _open_layers(f"sqlite:///{copy}", monkeypatch)
    assert "atlas ingest heads --family tiny --dataset docs" in "\n".join(code.value for code in app.code)
    assert not any("Subjoiner score" in spec for spec in _chart_specs(app))
