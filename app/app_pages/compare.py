"""Compare seeds: a neuron next to its best partner in every other seed, and the distribution of
max correlations against the rotation baseline."""

from __future__ import annotations

import streamlit as st

from app import charts, connection, guidance
from app.links import card_page_link
from atlas.read import queries

RANKED = 200
TOKENS_SHOWN = 10
EXAMPLES_SHOWN = 3


def render() -> None:
    st.title("Compare seeds")
    engine = connection.engine()
    if queries.families(engine).empty:
        guidance.show_empty_database()
        return
    families = queries.families_with_correlations(engine)
    if not families:
        guidance.show_missing("No cross-seed correlations yet: they need a family with two seeds or more",
                              "correlations", family=queries.family_names(engine)[0])
        return
    left, middle, right = st.columns(3)
    family = left.selectbox("Family", families)
    dataset = middle.selectbox("Dataset", queries.correlation_datasets(engine, family))
    model = right.selectbox("Reference seed", queries.correlated_models(engine, family, dataset))

    stored = queries.stored_universal_threshold(engine, family) or 0.5
    threshold = st.slider("Threshold on excess correlation", 0.0, 1.0, float(stored), 0.01,
                          help=f"The paper uses {stored:g}; demo-scale models rarely pass it, so pick lower "
                               "or rank by excess correlation.")
    n_above, n_total = queries.count_above_threshold(engine, model, dataset, threshold)
    st.markdown(f"**{n_above}** of {n_total} neurons of {model} have excess correlation > **{threshold:g}** "
                f"(the stored universal threshold is {stored:g}).")

    by_step = queries.universality_by_step(engine, family, dataset)
    if not by_step.empty:
        st.subheader("Universality over training")
        st.caption("Seeds compared checkpoint by checkpoint (models registered with a step).")
        st.altair_chart(charts.universality_over_training(by_step))

    st.subheader("Max correlation against the rotation baseline")
    st.altair_chart(charts.correlation_histogram(queries.max_corr_histogram(engine, model, dataset)))

    ranked = queries.ranked_by_excess(engine, model, dataset, limit=RANKED)
    if ranked.empty:
        st.info("No neuron of this model has a defined excess correlation (all zero-variance?).")
        return
    labels = [f"layer {r.layer}, neuron {r.neuron}: excess {r.excess_corr:.3f}"
              + (" (above threshold)" if r.excess_corr > threshold else "") for r in ranked.itertuples()]
    choice = st.selectbox(f"Neuron (the top {len(ranked)} by excess correlation)", range(len(ranked)),
                          format_func=labels.__getitem__)
    chosen = ranked.iloc[choice]
    _side_by_side(engine, model, int(chosen["layer"]), int(chosen["neuron"]), dataset)


def _neuron_column(engine, title: str, model: str, layer: int, neuron: int, dataset: str, note: str) -> None:
    st.markdown(f"**{title}**  \n{note}")
    card_page_link(f"layer {layer}, neuron {neuron}", model, layer, neuron)
    weights = queries.neuron_weights(engine, model, layer, neuron)
    st.markdown(f"class: **{weights['vocab_class'] if weights else 'no weights ingested'}**")
    vocab = queries.neuron_vocab(engine, model, layer, neuron, per_direction=TOKENS_SHOWN)
    top = vocab[vocab["direction"] == "top"]
    if not top.empty:
        st.markdown("top tokens: " + " ".join(f"`{charts.visible_token(t)}`" for t in top["token"]))
    examples = queries.top_examples(engine, model, layer, neuron, dataset, limit=EXAMPLES_SHOWN)
    if examples.empty:
        st.caption("no top examples for this dataset")
    else:
        st.html("".join(charts.example_html(r.context_tokens, r.highlight_index, r.context_activations, r.activation)
                        for r in examples.itertuples()))


def _side_by_side(engine, model: str, layer: int, neuron: int, dataset: str) -> None:
    partners = queries.correlation_partners(engine, model, layer, neuron)
    partners = partners[(partners["dataset"] == dataset)].dropna(subset=["partner_layer", "partner_neuron"])
    columns = st.columns(1 + len(partners))
    with columns[0]:
        _neuron_column(engine, model, model, layer, neuron, dataset, "reference")
    for column, row in zip(columns[1:], partners.itertuples()):
        with column:
            _neuron_column(engine, row.other_model, row.other_model, int(row.partner_layer), int(row.partner_neuron),
                           dataset, f"ρ = {charts.number(row.max_corr)} (baseline {charts.number(row.baseline_max_corr)})")
    if partners.empty:
        st.caption("No partner with a defined correlation in the other seeds.")
    guidance_needed = queries.top_examples(engine, model, layer, neuron, dataset, limit=1).empty
    if guidance_needed:
        guidance.show_missing("No top examples on this dataset yet", "activations",
                              family=queries.model_info(engine, model)["family"], dataset=dataset)


render()
