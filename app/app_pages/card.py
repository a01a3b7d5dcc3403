"""Neuron card: one neuron of one model, chosen by widgets or by ?model=NAME&layer=L&neuron=N."""

from __future__ import annotations

import math

import streamlit as st

from app import charts, connection, guidance
from app.links import card_page_link
from atlas.read import queries, roles

WEIGHT_METRICS = [
    ("w_in_norm", "‖w_in‖"), ("w_out_norm", "‖w_out‖"), ("in_out_cos", "cos(w_in, w_out)"),
    ("l2_penalty", "L2 penalty"), ("b_in", "b_in"), ("w_gate_norm", "‖w_gate‖"),
    ("vocab_var", "vocab variance"), ("vocab_skew", "vocab skew"), ("vocab_kurt", "vocab kurtosis"),
    ("null_frac", "null-space fraction"),
]
SHOWN_EXAMPLES = 10


def _as_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _apply_query_params(model_names: list[str]) -> None:
    """Arriving by a link (or editing the URL) sets the widgets; afterwards the widgets set the URL."""
    query = (st.query_params.get("model"), st.query_params.get("layer"), st.query_params.get("neuron"))
    if st.session_state.get("card_query") == query:
        return
    model, layer, neuron = query
    if model is not None and model not in model_names:
        st.warning(f"No model named {model!r} in this database; showing {model_names[0]!r}.")
        model = None
    st.session_state["card_model"] = model or st.session_state.get("card_model") or model_names[0]
    st.session_state["card_layer"] = _as_int(layer) or 0 if layer is not None else st.session_state.get("card_layer", 0)
    st.session_state["card_neuron"] = _as_int(neuron) or 0 if neuron is not None else st.session_state.get("card_neuron", 0)


def _clamp(key: str, upper: int) -> None:
    value = st.session_state.get(key, 0)
    if not 0 <= value <= upper:
        st.warning(f"{key.removeprefix('card_')} {value} is out of range 0..{upper}; showing {min(max(value, 0), upper)}.")
        st.session_state[key] = min(max(value, 0), upper)


def _choose_neuron(engine, model_names: list[str]) -> tuple[dict, int, int]:
    _apply_query_params(model_names)
    left, middle, right = st.columns([2, 1, 1])
    model = left.selectbox("Model", model_names, key="card_model")
    info = queries.model_info(engine, model)
    _clamp("card_layer", int(info["n_layers"]) - 1)
    _clamp("card_neuron", int(info["d_mlp"]) - 1)
    layer = middle.number_input("Layer", 0, int(info["n_layers"]) - 1, step=1, key="card_layer")
    neuron = right.number_input("Neuron", 0, int(info["d_mlp"]) - 1, step=1, key="card_neuron")
    st.query_params.update({"model": model, "layer": str(layer), "neuron": str(neuron)})
    st.session_state["card_query"] = (model, str(layer), str(neuron))
    return info, int(layer), int(neuron)


def render() -> None:
    st.title("Neuron card")
    engine = connection.engine()
    model_names = queries.models(engine)["name"].tolist()
    if not model_names:
        guidance.show_empty_database()
        return
    info, layer, neuron = _choose_neuron(engine, model_names)
    model = info["name"]
    st.caption(f"{model} · family {info['family']} · seed {info['seed']} · {info['architecture']} · "
               f"layer {layer} of 0–{info['n_layers'] - 1} · neuron {neuron} of 0–{info['d_mlp'] - 1}")
    _show_weights(engine, info, layer, neuron)
    _show_activations(engine, info, layer, neuron)
    _show_partners(engine, info, layer, neuron)
    _show_roles(engine, info, layer, neuron)
    _show_provenance(engine, info, layer, neuron)


def _show_weights(engine, info: dict, layer: int, neuron: int) -> None:
    st.subheader("Weights")
    weights = queries.neuron_weights(engine, info["name"], layer, neuron)
    if weights is None:
        guidance.show_missing(f"No weight statistics for {info['name']} yet", "weights", family=info["family"])
        return
    st.markdown(f"Class: **{weights['vocab_class']}**")
    if weights.get("null_frac_random") is not None:
        st.caption(f"Null-space fraction: the share of ‖w_out‖² in the unembedding's bottom singular directions "
                   f"(a random direction gets {charts.number(weights['null_frac_random'], '.3g')}).")
    shown = [(label, weights[key]) for key, label in WEIGHT_METRICS
             if weights[key] is not None and not (isinstance(weights[key], float) and math.isnan(weights[key]))]
    per_row = 4  # eight metrics in one row truncate their values
    for start in range(0, len(shown), per_row):
        for column, (label, value) in zip(st.columns(per_row), shown[start:start + per_row]):
            column.metric(label, charts.number(value, ".4g"))
    vocab = queries.neuron_vocab(engine, info["name"], layer, neuron)
    if not vocab.empty:
        st.markdown("Top and bottom vocabulary tokens (W_U · w_out)")
        st.altair_chart(charts.vocab_bars(vocab))


def _show_activations(engine, info: dict, layer: int, neuron: int) -> None:
    st.subheader("Activations")
    stats = queries.activation_stats(engine, info["name"], layer, neuron)
    if stats.empty:
        guidance.show_missing(f"No activation statistics for {info['name']} yet", "activations",
                              family=info["family"])
        return
    st.dataframe(stats, hide_index=True)
    datasets = stats["dataset"].tolist()
    dataset = st.selectbox("Examples from dataset", datasets) if len(datasets) > 1 else datasets[0]
    examples = queries.top_examples(engine, info["name"], layer, neuron, dataset, limit=SHOWN_EXAMPLES)
    if examples.empty:
        st.caption("No top examples stored for this neuron.")
        return
    st.markdown(f"Top {len(examples)} examples (red: positive activation, blue: negative; the firing token is boxed)")
    st.html("".join(
        charts.example_html(row.context_tokens, row.highlight_index, row.context_activations, row.activation)
        for row in examples.itertuples()
    ))


def _show_partners(engine, info: dict, layer: int, neuron: int) -> None:
    st.subheader("Correlation partners in the other seeds")
    partners = queries.correlation_partners(engine, info["name"], layer, neuron)
    if partners.empty:
        guidance.show_missing(f"No cross-seed correlations for {info['name']} yet", "correlations",
                              family=info["family"])
        return
    scores = queries.universal_scores(engine, info["name"], layer, neuron)
    for score in scores.itertuples():
        st.markdown(f"Excess correlation on {score.dataset}: **{charts.number(score.excess_corr)}** "
                    f"(mean max {charts.number(score.mean_max_corr)} against baseline "
                    f"{charts.number(score.mean_baseline_corr)}; universal above {score.universal_threshold:g})")
    st.dataframe(partners, hide_index=True)
    for row in partners.dropna(subset=["partner_layer", "partner_neuron"]).itertuples():
        card_page_link(
            f"{row.other_model}: layer {int(row.partner_layer)}, neuron {int(row.partner_neuron)} "
            f"(ρ = {charts.number(row.max_corr)}, {row.partner_class or 'no weights'})",
            row.other_model, row.partner_layer, row.partner_neuron,
        )


def _show_roles(engine, info: dict, layer: int, neuron: int) -> None:
    st.subheader("Functional roles")
    labels = roles.neuron_labels(engine, info["name"], layer, neuron)
    entropy = roles.entropy_curve(engine, info["name"], layer, neuron)
    heads = roles.neuron_heads(engine, info["name"], layer, neuron)
    if labels.empty and entropy.empty and heads.empty:
        guidance.show_missing(f"No functional roles for {info['name']} yet", "labels", "entropy", "attention-roles",
                              family=info["family"])
        return
    if not labels.empty:
        st.markdown("Labels: the token features that explain most of the variance of its vocabulary effect (vocab), "
                    "of its activation by the current token, and by the next token")
        st.dataframe(labels, hide_index=True)
    token_sets = roles.neuron_token_sets(engine, info["name"], layer, neuron)
    for row in token_sets.itertuples():
        st.markdown(f"On {row.dataset}, as a {row.vocab_class} neuron: mean activation "
                    f"**{charts.number(row.mean_in_set)}** when the next token is in its {row.set_size}-token set "
                    f"({row.n_in_set} positions) against {charts.number(row.mean_out_set)} otherwise "
                    f"(ratio {charts.number(row.ratio)}).")
    if not entropy.empty:
        st.markdown("Entropy intervention: the activation fixed to each value at every scored position")
        st.altair_chart(charts.entropy_curve(entropy))
        with st.expander("Entropy intervention values"):
            st.dataframe(entropy, hide_index=True)
    if not heads.empty:
        st.markdown("Later heads whose attention to the first position it moves most (score: direct effect on the "
                    "attention logit; z against random directions of the same norm; ablated: without its path "
                    "into the head's query)")
        st.dataframe(heads, hide_index=True)


def _show_provenance(engine, info: dict, layer: int, neuron: int) -> None:
    provenance = queries.neuron_provenance(engine, info["name"], layer, neuron)
    if provenance.empty:
        return
    with st.expander("Provenance: the jobs that wrote this card"):
        st.caption("Model and dataset revisions (hub commit, or sha256 of local files), tokenizer hash and library "
                   "versions, as each job recorded them when it ran.")
        st.dataframe(provenance, hide_index=True)


render()
