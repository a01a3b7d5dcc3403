"""Altair charts for the pages. Input: DataFrames from the read model (atlas.read.queries).

The HTML of a top example and the number format live in the library (atlas.read.html), shared with
the notebook card; the pages reach them through this module.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from atlas.read.html import example_html, number, visible_token  # noqa: F401 (pages use charts.example_html, ...)

CLASS_COLORS = alt.Scale(
    domain=["prediction", "suppression", "partition", "none"],
    range=["#d62728", "#1f77b4", "#2ca02c", "#bbbbbb"],
)
MAX_SCATTER_POINTS = 5000  # the browser stays responsive; classed neurons are always kept

LAYER_METRICS: dict[str, str] = {
    "delete_kl": "Deletion KL (nats)",
    "swap_kl": "Swap KL (nats)",
    "delete_retention": "Deletion accuracy retention",
    "swap_retention": "Swap accuracy retention",
    "lens_kl": "Logit-lens KL to final (nats)",
    "lens_entropy_bits": "Logit-lens entropy (bits)",
    "attn_prev5": "Attention to previous 5 tokens",
    "mlp_out_norm": "MLP output norm",
    "n_prediction": "Prediction neurons",
    "n_suppression": "Suppression neurons",
}


def _seed_color() -> alt.Color:
    return alt.Color("seed:N", title="seed")


def vocab_skew_kurtosis(frame: pd.DataFrame) -> alt.Chart:
    return (
        alt.Chart(frame)
        .mark_circle(size=18, opacity=0.6)
        .encode(
            x=alt.X("vocab_skew:Q", title="vocabulary skew"),
            y=alt.Y("vocab_kurt:Q", title="vocabulary kurtosis", scale=alt.Scale(type="log")),
            color=alt.Color("vocab_class:N", title="class", scale=CLASS_COLORS),
            tooltip=["model", "seed", "layer", "neuron", "vocab_class",
                     alt.Tooltip("vocab_skew:Q", format=".3f"), alt.Tooltip("vocab_kurt:Q", format=".2f")],
        )
        .properties(height=360)
        .interactive()
    )


def class_counts_by_depth(frame: pd.DataFrame) -> alt.Chart:
    long = frame.melt(
        id_vars=["seed", "layer", "rel_depth"], value_vars=["n_prediction", "n_suppression"],
        var_name="class", value_name="neurons",
    )
    long["class"] = long["class"].str.removeprefix("n_")
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("rel_depth:Q", title="relative depth", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("neurons:Q", title="neurons"),
            color=_seed_color(),
            column=alt.Column("class:N", title=None),
            tooltip=["seed", "layer", "class", "neurons"],
        )
        .properties(width=280, height=220)
    )


def universal_fraction_by_layer(frame: pd.DataFrame) -> alt.Chart:
    return (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("rel_depth:Q", title="relative depth", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("universal_fraction:Q", title="fraction above threshold", axis=alt.Axis(format="%")),
            color=_seed_color(),
            tooltip=["seed", "layer", "n_universal", "n_neurons", alt.Tooltip("universal_fraction:Q", format=".2%")],
        )
        .properties(height=260)
    )


def universality_over_training(frame: pd.DataFrame) -> alt.Chart:
    """Fraction of neurons whose excess correlation passes 0.5 (the paper's bar) and 0.3, per training step."""
    long = frame.melt(id_vars=["step"], value_vars=["universal_fraction_05", "universal_fraction_03"],
                      var_name="bar", value_name="fraction")
    long["bar"] = long["bar"].map({"universal_fraction_05": "excess > 0.5", "universal_fraction_03": "excess > 0.3"})
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="training step"),
            y=alt.Y("fraction:Q", title="fraction of neurons", axis=alt.Axis(format="%")),
            color=alt.Color("bar:N", title=None),
            tooltip=["step", "bar", alt.Tooltip("fraction:Q", format=".2%")],
        )
        .properties(height=260)
    )


def vocab_bars(frame: pd.DataFrame) -> alt.Chart:
    """Top and bottom vocabulary tokens of a neuron: W_U . w_out, one bar per token."""
    data = frame.assign(label=frame["token"].map(visible_token) + "  #" + frame["rank"].astype(str))
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("value:Q", title="W_U · w_out"),
            y=alt.Y("label:N", sort="-x", title=None),
            color=alt.Color("direction:N", scale=alt.Scale(domain=["top", "bottom"], range=["#d62728", "#1f77b4"])),
            tooltip=["direction", "rank", "token_id", "token", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(height=max(200, 14 * len(data)))
    )


def correlation_histogram(frame: pd.DataFrame, threshold_line: float | None = None) -> alt.Chart:
    bars = (
        alt.Chart(frame)
        .mark_bar(opacity=0.55, binSpacing=0)
        .encode(
            x=alt.X("bin_start:Q", bin="binned", title="max correlation, averaged over the other seeds"),
            x2="bin_end:Q",
            y=alt.Y("count:Q", stack=None, title="neurons"),
            color=alt.Color("series:N", title=None,
                            scale=alt.Scale(domain=["max correlation", "rotation baseline"],
                                            range=["#d62728", "#7f7f7f"])),
            tooltip=["series", alt.Tooltip("bin_start:Q", format=".2f"), alt.Tooltip("bin_end:Q", format=".2f"),
                     "count"],
        )
        .properties(height=260)
    )
    return bars


def layer_profile(frame: pd.DataFrame) -> alt.Chart:
    """The Stages-of-Inference Figure 1: every layer measurement against relative depth, seeds overlaid."""
    present = [column for column in LAYER_METRICS if column in frame and frame[column].notna().any()]
    long = frame.melt(id_vars=["seed", "model", "layer", "rel_depth"], value_vars=present,
                      var_name="metric", value_name="value").dropna(subset=["value"])
    long["metric"] = long["metric"].map(LAYER_METRICS)
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("rel_depth:Q", title="relative depth", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("value:Q", title=None),
            color=_seed_color(),
            tooltip=["model", "layer", "metric", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(width=230, height=150)
        .facet(facet=alt.Facet("metric:N", title=None, sort=[LAYER_METRICS[c] for c in present]), columns=3)
        .resolve_scale(y="independent")
    )


def training_curves(frame: pd.DataFrame) -> alt.Chart:
    return (
        alt.Chart(frame)
        .mark_line()
        .encode(
            x=alt.X("step:Q"),
            y=alt.Y("loss:Q", title="loss (nats)", scale=alt.Scale(zero=False)),
            color=_seed_color(),
            strokeDash=alt.StrokeDash("split:N", title=None),
            column=alt.Column("family:N", title=None),
            tooltip=["family", "seed", "split", "step", alt.Tooltip("loss:Q", format=".3f")],
        )
        .properties(width=380, height=240)
    )


def entropy_curve(frame: pd.DataFrame) -> alt.Chart:
    """A neuron's activation fixed to each value: change in next-token entropy and in loss (nats), per dataset."""
    long = frame.melt(id_vars=["dataset", "value", "value_kind"], value_vars=["d_entropy", "d_loss"],
                      var_name="metric", value_name="change")
    long["metric"] = long["metric"].map({"d_entropy": "Δ entropy", "d_loss": "Δ loss"})
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("value:Q", title="activation fixed to"),
            y=alt.Y("change:Q", title="change from the untouched model (nats)"),
            color=alt.Color("metric:N", title=None),
            strokeDash=alt.StrokeDash("dataset:N"),
            tooltip=["dataset", "value_kind", alt.Tooltip("value:Q", format=".4g"), "metric",
                     alt.Tooltip("change:Q", format=".4g")],
        )
        .properties(height=240)
    )


def label_counts(frame: pd.DataFrame) -> alt.Chart:
    """Neurons per rank-0 label, one bar per seed."""
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("n_neurons:Q", title="neurons (rank-0 label)"),
            y=alt.Y("feature:N", sort="-x", title=None),
            color=_seed_color(),
            yOffset="seed:N",
            tooltip=["seed", "feature", "n_neurons"],
        )
        .properties(height=max(160, 22 * frame["feature"].nunique()))
    )


def role_counts_by_layer(frame: pd.DataFrame) -> alt.Chart:
    """Entropy and deactivating neurons per layer against relative depth, seeds overlaid."""
    long = frame.melt(id_vars=["seed", "model", "layer", "rel_depth"], value_vars=["n_entropy", "n_deactivating"],
                      var_name="role", value_name="neurons")
    long["role"] = long["role"].map({"n_entropy": "Entropy neurons", "n_deactivating": "Deactivating neurons"})
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("rel_depth:Q", title="relative depth", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("neurons:Q", title=None),
            color=_seed_color(),
            tooltip=["model", "layer", "role", "neurons"],
        )
        .properties(width=300, height=160)
        .facet(facet=alt.Facet("role:N", title=None), columns=2)
        .resolve_scale(y="independent")
    )


# --- the four-stage profile (Stages of Inference, Figure 1) and the heads' statistics ------------

STAGE_METRICS: dict[str, str] = {
    "delete_kl": "Deletion KL (nats)",
    "attn_prev5": "Attention to previous 5 tokens",
    "n_prediction": "Prediction neurons",
    "n_suppression": "Suppression neurons",
    "lens_kl": "Logit-lens KL to final (nats)",
    "lens_entropy_nats": "Logit-lens entropy (nats)",
    "mlp_out_norm": "MLP output norm",
    "attn_out_norm": "Attention output norm",
}
HEAD_METRICS: dict[str, str] = {
    "subjoiner": "Subjoiner score",
    "attn_first": "Attention to the first position",
    "attn_prev": "Attention to the previous token",
}


def _stage_facets(frame: pd.DataFrame, keys: list[str], color: alt.Color, detail: str | None) -> alt.Chart:
    present = [column for column in STAGE_METRICS if column in frame and frame[column].notna().any()]
    long = frame.melt(id_vars=keys, value_vars=present, var_name="metric", value_name="value").dropna(
        subset=["value"])
    long["metric"] = long["metric"].map(STAGE_METRICS)
    encoding = dict(
        x=alt.X("rel_depth:Q", title="relative depth", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("value:Q", title=None),
        color=color,
        tooltip=["model", "layer", "metric", alt.Tooltip("value:Q", format=".4g")],
    )
    if detail is not None:
        encoding["detail"] = f"{detail}:N"
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(**encoding)
        .properties(width=200, height=150)
        .facet(facet=alt.Facet("metric:N", title=None, sort=[STAGE_METRICS[c] for c in present]), columns=4)
        .resolve_scale(y="independent")
    )


def stage_profile(frame: pd.DataFrame) -> alt.Chart:
    """The four-stage profile of a family (stage_profile view): one facet per curve of the paper's Figure 1
    against relative depth, one line per model (seed or checkpoint), coloured by seed."""
    return _stage_facets(frame, ["seed", "model", "layer", "rel_depth"], _seed_color(), detail="model")


def stage_profile_overlay(frame: pd.DataFrame) -> alt.Chart:
    """Several models or families on one relative-depth axis (stages.stage_profile_models): one colour per
    model or family asked for, one line per model."""
    return _stage_facets(frame, ["group", "model", "layer", "rel_depth"], alt.Color("group:N", title=None),
                         detail="model")


def head_stats_by_layer(frame: pd.DataFrame) -> alt.Chart:
    """Every head as a point per layer: its subjoiner score and its attention to the first / previous token."""
    present = [column for column in HEAD_METRICS if frame[column].notna().any()]
    long = frame.melt(id_vars=["seed", "model", "layer", "head"], value_vars=present, var_name="metric",
                      value_name="value").dropna(subset=["value"])
    long["metric"] = long["metric"].map(HEAD_METRICS)
    return (
        alt.Chart(long)
        .mark_circle(size=40, opacity=0.7)
        .encode(
            x=alt.X("layer:O", title="layer"),
            y=alt.Y("value:Q", title=None),
            color=_seed_color(),
            xOffset="seed:N",
            tooltip=["model", "layer", "head", "metric", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(width=260, height=180)
        .facet(facet=alt.Facet("metric:N", title=None, sort=[HEAD_METRICS[c] for c in present]), columns=3)
        .resolve_scale(y="independent")
    )


def ensembling_chart(results: pd.DataFrame, model_accuracy: float) -> alt.LayerChart:
    """Individual probes as points (coloured by class) at their rank by test accuracy, the top-k line against k,
    the model's own accuracy as a dashed rule."""
    individual = results[results["kind"] == "individual"].sort_values("accuracy", ascending=False, kind="stable")
    individual = individual.assign(k=range(1, len(individual) + 1))
    topk = results[results["kind"] == "topk"].assign(k=lambda f: f["rank"] + 1)
    x = alt.X("k:Q", title="rank by individual accuracy / k neurons", scale=alt.Scale(domainMin=1))
    y = alt.Y("accuracy:Q", title="test accuracy", scale=alt.Scale(zero=False))
    points = alt.Chart(individual).mark_point(filled=True, size=60).encode(
        x=x, y=y, color=alt.Color("vocab_class:N", title="single neuron", scale=CLASS_COLORS),
        tooltip=["layer", "neuron", "vocab_class", alt.Tooltip("score:Q", format=".3g"),
                 alt.Tooltip("accuracy:Q", format=".3f")])
    line = alt.Chart(topk.assign(probe="top-k neurons")).mark_line(point=True, color="black").encode(
        x=x, y=y, tooltip=["k", "layer", "neuron", alt.Tooltip("accuracy:Q", format=".3f")])
    rule = alt.Chart(pd.DataFrame({"accuracy": [model_accuracy], "label": ["model"]})).mark_rule(
        strokeDash=[6, 4], color="gray").encode(y="accuracy:Q", tooltip=[alt.Tooltip("accuracy:Q", format=".3f")])
    return alt.layer(points, line, rule).properties(height=360)
