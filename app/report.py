"""`atlas report`: a family's figures as files for a paper or a notebook, drawn by the app's charts.

The four-stage profile (stage_profile view) and the universal-neuron figures (class counts by depth, universal
fraction by layer, max-correlation histograms), each as PNG (vl-convert) and/or HTML, with a CSV of its numbers.
No Streamlit and no torch: altair, pandas and the read model only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import altair as alt
import pandas as pd
from sqlalchemy import Engine

from app import charts
from atlas.errors import AtlasError
from atlas.read import queries, stages

REPORT_FORMATS = ("png", "html", "both")
PNG_SCALE = 2  # pixels per CSS pixel: sharp enough for print
DEFAULT_THRESHOLD = 0.5  # the universal bar on excess correlation when the family stored none


def write_report(engine: Engine, family: str, dataset: str | None, out_dir: str | Path, fmt: str = "both"
                 ) -> list[Path]:
    """Writes the family's figures and their CSVs into out_dir (created); returns the files written. A figure
    without data is left out; no figure at all is an AtlasError."""
    if fmt not in REPORT_FORMATS:
        raise AtlasError(f"--format {fmt!r}: give one of {', '.join(REPORT_FORMATS)}")
    dataset = _dataset(engine, family, dataset)
    figures = _figures(engine, family, dataset)
    if not figures:
        raise AtlasError(f"no figures for family {family!r} on dataset {dataset!r} yet: run `atlas ingest weights "
                         f"--family {family}`, then interventions, lens and correlations with --dataset {dataset}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (frame, draw) in figures.items():
        written += _save(draw(frame), out / name, fmt)
        frame.to_csv(out / f"{name}.csv", index=False)
        written.append(out / f"{name}.csv")
    return written


def _dataset(engine: Engine, family: str, dataset: str | None) -> str:
    families = queries.family_names(engine)
    if family not in families:
        raise AtlasError(f"no family named {family!r}: families {', '.join(families) or 'none yet'}")
    known = sorted(set(queries.layer_profile_datasets(engine, family)) | set(queries.correlation_datasets(engine, family)))
    if dataset is not None:
        if dataset not in set(queries.datasets(engine)["name"]):
            raise AtlasError(f"no dataset named {dataset!r}: datasets with results for {family}: "
                             f"{', '.join(known) or 'none yet'}")
        return dataset
    if len(known) > 1:
        raise AtlasError(f"family {family!r} has results on several datasets: pass --dataset (one of "
                         f"{', '.join(known)})")
    if not known:
        raise AtlasError(f"no layer or correlation results for family {family!r} yet: run `atlas ingest "
                         f"interventions --family {family} --dataset D` (and lens, correlations)")
    return known[0]


def _figures(engine: Engine, family: str, dataset: str
             ) -> dict[str, tuple[pd.DataFrame, Callable[[pd.DataFrame], alt.TopLevelMixin]]]:
    """name -> (numbers, chart of them), for the figures that have numbers."""
    threshold = queries.stored_universal_threshold(engine, family) or DEFAULT_THRESHOLD
    histograms = [queries.max_corr_histogram(engine, model, dataset).assign(model=model)
                  for model in queries.correlated_models(engine, family, dataset)]
    figures = {
        "stage_profile": (stages.stage_profile(engine, family, dataset), charts.stage_profile),
        "class_counts_by_depth": (queries.class_counts_by_depth(engine, family), charts.class_counts_by_depth),
        "universal_fraction_by_layer": (queries.universal_fraction_by_layer(engine, family, dataset, threshold),
                                        charts.universal_fraction_by_layer),
        "max_corr_histogram": (pd.concat(histograms, ignore_index=True) if histograms else pd.DataFrame(),
                               _histograms),
    }
    return {name: figure for name, figure in figures.items() if not figure[0].empty}


def _histograms(frame: pd.DataFrame) -> alt.VConcatChart:
    """One max-correlation histogram per seed, stacked."""
    return alt.vconcat(*(charts.correlation_histogram(part.drop(columns="model")).properties(title=str(model))
                         for model, part in frame.groupby("model", sort=False)))


def _save(chart: alt.TopLevelMixin, stem: Path, fmt: str) -> list[Path]:
    paths = []
    if fmt in ("png", "both"):
        paths.append(stem.with_suffix(".png"))
        chart.save(str(paths[-1]), format="png", scale_factor=PNG_SCALE)
    if fmt in ("html", "both"):
        paths.append(stem.with_suffix(".html"))
        chart.save(str(paths[-1]), format="html")
    return paths
