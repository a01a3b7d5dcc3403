"""One neuron's card for notebooks: its data as DataFrames, rendered as HTML by Jupyter.

The same read model as the app's card page (atlas.read.queries) and the same example HTML.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from atlas.read import queries, roles
from atlas.read.html import example_html, number, visible_token

WEIGHT_METRICS = [
    ("w_in_norm", "‖w_in‖"), ("w_out_norm", "‖w_out‖"), ("in_out_cos", "cos(w_in, w_out)"), ("l2_penalty", "L2 penalty"),
    ("b_in", "b_in"), ("w_gate_norm", "‖w_gate‖"), ("vocab_mean", "vocab mean"), ("vocab_var", "vocab variance"),
    ("vocab_skew", "vocab skew"), ("vocab_kurt", "vocab kurtosis"), ("null_frac", "null-space fraction"),
    ("null_frac_random", "null-space fraction of a random direction"),
]


@dataclass(frozen=True)
class NeuronCard:
    """model, layer, neuron and their data; `_repr_html_` draws it in Jupyter."""

    model: str
    family: str
    seed: int
    layer: int
    neuron: int
    hook_name: str
    weights: dict[str, Any] | None  # weight and vocabulary moments and vocab_class; None before `ingest weights`
    vocab: pd.DataFrame  # top and bottom vocabulary tokens (W_U . w_out)
    activation_stats: pd.DataFrame  # one row per dataset
    examples: pd.DataFrame  # top-activating contexts, highlight_index marks the firing token
    partners: pd.DataFrame  # the best-correlated neuron in every other seed
    universality: pd.DataFrame  # excess correlation per dataset
    provenance: pd.DataFrame  # the jobs that wrote these rows: revisions, tokenizer, library versions
    labels: pd.DataFrame  # top token features per source (vocab, current_token, next_token) by variance reduction
    token_sets: pd.DataFrame  # prediction / suppression: activation with the next token in its set or not
    entropy: pd.DataFrame  # entropy, loss and norm scale with the activation fixed to each value of a grid
    heads: pd.DataFrame  # later heads whose attention to the first position it moves, with path ablation

    @property
    def vocab_class(self) -> str | None:
        return None if self.weights is None else self.weights["vocab_class"]

    def __repr__(self) -> str:
        return (f"NeuronCard({self.model}, layer {self.layer}, neuron {self.neuron}: class {self.vocab_class}, "
                f"{len(self.examples)} examples, {len(self.partners)} partners)")

    def _repr_html_(self) -> str:
        sections = [self._header_html(), self._weights_html(), self._vocab_html(), self._activations_html(),
                    self._partners_html(), self._roles_html(), self._provenance_html()]
        return '<div class="atlas-card">' + "".join(sections) + "</div>"

    def _header_html(self) -> str:
        return (f"<h3>{html.escape(self.model)} · layer {self.layer} · neuron {self.neuron}</h3>"
                f"<p>family {html.escape(self.family)} · seed {self.seed} · hook <code>{self.hook_name}</code></p>")

    def _weights_html(self) -> str:
        if self.weights is None:
            return "<p>No weight statistics yet (<code>atlas ingest weights</code>).</p>"
        cells = "".join(f"<td><b>{label}</b><br>{number(self.weights.get(key), '.4g')}</td>"
                        for key, label in WEIGHT_METRICS if self.weights.get(key) is not None)
        return f"<h4>Weights</h4><p>class: <b>{html.escape(str(self.vocab_class))}</b></p><table><tr>{cells}</tr></table>"

    def _vocab_html(self) -> str:
        if self.vocab.empty:
            return ""
        columns = []
        for direction in ("top", "bottom"):
            rows = self.vocab[self.vocab["direction"] == direction]
            items = "".join(f'<tr><td class="atlas-token"><code>{html.escape(visible_token(row.token))}</code></td>'
                            f"<td>{number(row.value, '.4f')}</td></tr>" for row in rows.itertuples())
            columns.append(f"<td style='vertical-align:top'><b>{direction} tokens</b><table>{items}</table></td>")
        return f"<h4>Vocabulary (W_U · w_out)</h4><table><tr>{''.join(columns)}</tr></table>"

    def _activations_html(self) -> str:
        if self.activation_stats.empty:
            return "<p>No activations yet (<code>atlas ingest activations</code>).</p>"
        examples = "".join(
            example_html(row.context_tokens, row.highlight_index, row.context_activations, row.activation)
            for row in self.examples.itertuples())
        return (f"<h4>Activations</h4>{self.activation_stats.to_html(index=False, float_format=_float)}"
                f"<p>Top {len(self.examples)} examples (red positive, blue negative; the firing token is boxed)</p>"
                f"{examples}")

    def _partners_html(self) -> str:
        if self.partners.empty:
            return "<p>No cross-seed correlations yet (<code>atlas ingest correlations</code>).</p>"
        lines = "".join(
            f"<p>Excess correlation on {html.escape(row.dataset)}: <b>{number(row.excess_corr)}</b> (mean max "
            f"{number(row.mean_max_corr)} against baseline {number(row.mean_baseline_corr)}; universal above "
            f"{row.universal_threshold:g})</p>" for row in self.universality.itertuples())
        return (f"<h4>Best partners in the other seeds</h4>{lines}"
                f"{self.partners.to_html(index=False, float_format=_float, na_rep='n/a')}")


    def _roles_html(self) -> str:
        parts = []
        for title, frame in (("Labels (variance of the quantity explained by a token feature)", self.labels),
                             ("Activation when the next token is in its vocabulary set", self.token_sets),
                             ("Entropy intervention (activation fixed to each value)", self.entropy),
                             ("Heads it deactivates (attention to the first position)", self.heads)):
            if not frame.empty:
                parts.append(f"<h4>{title}</h4>{frame.to_html(index=False, float_format=_float, na_rep='')}")
        return "".join(parts)

    def _provenance_html(self) -> str:
        if self.provenance.empty:
            return ""
        return f"<h4>Provenance (the jobs that wrote this card)</h4>{self.provenance.to_html(index=False, na_rep='')}"


def _float(value: float) -> str:
    return format(value, ".4g")


def load_card(engine: Engine, info: dict[str, Any], layer: int, neuron: int, dataset: str | None = None,
              examples: int = 10) -> NeuronCard:
    """info: the model's row (queries.model_info); examples: top examples shown (from `dataset`, or all)."""
    model = info["name"]
    return NeuronCard(
        model=model, family=info["family"], seed=int(info["seed"]), layer=layer, neuron=neuron,
        hook_name=queries.hook_name(layer),
        weights=queries.neuron_weights(engine, model, layer, neuron),
        vocab=queries.neuron_vocab(engine, model, layer, neuron),
        activation_stats=queries.activation_stats(engine, model, layer, neuron),
        examples=queries.top_examples(engine, model, layer, neuron, dataset, limit=examples),
        partners=queries.correlation_partners(engine, model, layer, neuron),
        universality=queries.universal_scores(engine, model, layer, neuron),
        provenance=queries.neuron_provenance(engine, model, layer, neuron),
        labels=roles.neuron_labels(engine, model, layer, neuron),
        token_sets=roles.neuron_token_sets(engine, model, layer, neuron),
        entropy=roles.entropy_curve(engine, model, layer, neuron),
        heads=roles.neuron_heads(engine, model, layer, neuron),
    )
