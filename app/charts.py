"""Altair charts for the pages, and the HTML of a top example. Input: DataFrames from app.queries."""

from __future__ import annotations

import html
import math
from typing import Sequence

import altair as alt
import pandas as pd

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


def scatter_sample(frame: pd.DataFrame, limit: int = MAX_SCATTER_POINTS, seed: int = 0) -> pd.DataFrame:
    """All classed neurons plus a fixed random sample of the rest, at most `limit` rows in all."""
    if len(frame) <= limit:
        return frame
    classed = frame[frame["vocab_class"] != "none"].head(limit)
    rest = frame[frame["vocab_class"] == "none"]
    room = max(0, limit - len(classed))
    return pd.concat([classed, rest.sample(n=min(room, len(rest)), random_state=seed)])


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
            x=alt.X("bin_start:Q", bin="binned", title="max correlation with the other seed"),
            x2="bin_end:Q",
            y=alt.Y("count:Q", stack=None, title="neurons × other seeds"),
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


# --- top examples as HTML ------------------------------------------------------------------------


def number(value: float | None, spec: str = ".3f") -> str:
    """A database number for text; NULL (None or NaN: a zero-variance neuron, say) reads as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def visible_token(token: str) -> str:
    """Make whitespace tokens visible: a newline shows as ⏎, a tab as →, a leading space as ·."""
    return token.replace("\n", "⏎").replace("\t", "→").replace(" ", "·") if token.strip() == "" else token


def _shade(activation: float | None, scale: float) -> str:
    if activation is None or not math.isfinite(activation) or scale <= 0:
        return "transparent"
    strength = min(1.0, abs(activation) / scale)
    rgb = "214,39,40" if activation > 0 else "31,119,180"
    return f"rgba({rgb},{strength * 0.85:.3f})"


def example_html(tokens: Sequence[str], highlight_index: int, activations: Sequence[float | None] | None,
                 activation: float) -> str:
    """The context as one line of spans, each shaded by the neuron's activation on that token (red
    positive, blue negative, relative to the firing activation); the firing token is boxed and bold."""
    scale = abs(activation) if activation else 0.0
    if activations:
        scale = max([scale] + [abs(a) for a in activations if a is not None and math.isfinite(a)])
    spans = []
    for index, token in enumerate(tokens):
        value = activations[index] if activations and index < len(activations) else None
        if value is None and index == highlight_index:
            value = activation
        style = f"background:{_shade(value, scale)};padding:1px 0;white-space:pre-wrap;"
        if index == highlight_index:
            style += "outline:2px solid #000;font-weight:700;"
        title = "" if value is None else f' title="{value:.4g}"'
        text = html.escape(token.replace("\n", "⏎\n") if token else "∅")
        spans.append(f'<span style="{style}"{title}>{text}</span>')
    body = "".join(spans)
    return (f'<div class="atlas-example" style="font-family:monospace;line-height:1.9;margin:0.2rem 0 0.8rem 0;">'
            f'<b style="margin-right:0.6rem;">{activation:.3f}</b>{body}</div>')
