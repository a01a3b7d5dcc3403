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
