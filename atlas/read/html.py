"""HTML of a neuron's top examples and numbers, shared by the app and the notebook card."""

from __future__ import annotations

import html
import math
from typing import Sequence


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
