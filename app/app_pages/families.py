"""Neuron families: filters, vocabulary skew against kurtosis, Figure 6 class counts by depth,
universal fraction by layer, and the matching neurons linked to their cards."""

from __future__ import annotations

import streamlit as st

from app import charts, connection, guidance
from app.links import card_url
from atlas.read import queries, roles

SHOWN_NEURONS = 2000


def render() -> None:
    st.title("Neuron families")
    engine = connection.engine()
    families = queries.families(engine)
    if families.empty:
        guidance.show_empty_database()
        return
    family = st.selectbox("Family", families["family"])
    seeds_frame = queries.models(engine, family)
    class_counts = queries.class_counts_by_depth(engine, family)
    if class_counts.empty:
        guidance.show_missing(f"No weight statistics for {family} yet", "weights", family=family)
        return
    n_layers = int(seeds_frame["n_layers"].max())

    left, middle, right = st.columns(3)
    seeds = left.multiselect("Seeds", seeds_frame["seed"].tolist(), default=seeds_frame["seed"].tolist())
    layers = middle.slider("Layers", 0, max(n_layers - 1, 1), (0, max(n_layers - 1, 1))) if n_layers > 1 else (0, 0)
    all_classes = queries.vocab_classes(engine, family)
    classes = right.multiselect("Class", all_classes, default=all_classes)

    datasets = queries.correlation_datasets(engine, family)
    dataset, threshold, universal_only = None, None, False
    if datasets:
        left, middle, right = st.columns(3)
        dataset = left.selectbox("Correlation dataset", datasets)
        stored = queries.stored_universal_threshold(engine, family) or 0.5
        threshold = middle.slider("Universal threshold on excess correlation", 0.0, 1.0, float(stored), 0.01,
                                  help=f"The paper (and the stored jobs) use {stored:g}.")
        universal_only = right.checkbox("Universal only", value=False)
    else:
        guidance.show_missing(f"No cross-seed correlations for {family} yet (no universality)", "correlations",
                              family=family)
    label = _choose_label(engine, family)
    if not seeds or not classes:
        st.warning("Pick at least one seed and one class.")
        return

    chosen = queries.NeuronFilter(family, seeds, layers, classes, dataset, threshold if universal_only else None,
                                  label)
    total = queries.family_neuron_count(engine, chosen)
    _show_charts(engine, family, chosen, total, dataset, threshold, class_counts)
    _show_labels(engine, family, label)
    _show_neuron_list(queries.family_neurons(engine, chosen, limit=SHOWN_NEURONS), total, threshold)


def _choose_label(engine, family: str) -> tuple[str, str] | None:
    """A (source, feature) filter from the labels the family has, or None (all neurons)."""
    left, right = st.columns(2)
    source = left.selectbox("Label source", roles.LABEL_SOURCES, key="families_label_source",
                            help="vocab: what the neuron writes to the vocabulary; current_token / next_token: "
                                 "what its activation tracks on a dataset (`atlas ingest labels`).")
    features = roles.label_features(engine, family, source)
    if features.empty:
        right.caption("No labels from this source yet (`atlas ingest labels`).")
        return None
    options = ["(any)"] + [f"{row.feature} ({row.n_neurons})" for row in features.itertuples()]
    choice = right.selectbox("Rank-0 label (neurons)", options, key="families_label")
    return None if choice == "(any)" else (source, features["feature"].iloc[options.index(choice) - 1])


def _show_labels(engine, family: str, label: tuple[str, str] | None) -> None:
    source = label[0] if label is not None else st.session_state.get("families_label_source", "vocab")
    counts = roles.label_counts_by_seed(engine, family, source)
    if counts.empty:
        return
    st.subheader(f"Neuron families by label ({source}, rank 0; the most frequent labels)")
    st.altair_chart(charts.label_counts(counts))


def _show_charts(engine, family: str, chosen, total: int, dataset: str | None, threshold: float | None,
                 class_counts) -> None:
    st.subheader("Vocabulary skew against kurtosis")
    plotted = queries.family_neuron_sample(engine, chosen, total, size=charts.MAX_SCATTER_POINTS)
    plotted = plotted.dropna(subset=["vocab_skew", "vocab_kurt"])
    if plotted.empty:
        st.caption("No neurons match the filters.")
    else:
        if len(plotted) < total:
            st.caption(f"Showing {len(plotted)} of {total} neurons: every classed neuron and a fixed sample.")
        st.altair_chart(charts.vocab_skew_kurtosis(plotted))

    st.subheader("Prediction and suppression neurons by depth (one line per seed)")
    st.altair_chart(charts.class_counts_by_depth(class_counts))

    if dataset is not None and threshold is not None:
        st.subheader(f"Fraction of neurons with excess correlation > {threshold:g}, by layer")
        st.altair_chart(charts.universal_fraction_by_layer(
            queries.universal_fraction_by_layer(engine, family, dataset, threshold)))


def _show_neuron_list(neurons, total: int, threshold: float | None) -> None:
    st.subheader(f"Matching neurons ({total})")
    shown = neurons.copy()
    if total > len(shown):
        st.caption(f"The first {len(shown)}, by excess correlation: narrow the filters or use the SQL page.")
    shown.insert(0, "card", [card_url(m, l, n) for m, l, n in zip(shown["model"], shown["layer"], shown["neuron"])])
    if threshold is not None:
        st.caption(f"Universal here means excess correlation > {threshold:g}.")
    st.dataframe(
        shown, hide_index=True,
        column_config={"card": st.column_config.LinkColumn("card", display_text="open card")},
    )


render()
