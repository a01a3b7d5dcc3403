"""Layers: the Stages-of-Inference Figure 1 from the layer_profile view, seeds overlaid."""

from __future__ import annotations

import streamlit as st

from app import charts, connection, guidance
from atlas.read import queries, roles


def render() -> None:
    st.title("Layers")
    engine = connection.engine()
    all_families = queries.family_names(engine)
    if not all_families:
        guidance.show_empty_database()
        return
    families = queries.families_with_layer_profile(engine)
    if not families:
        guidance.show_missing("No layer measurements yet (deletions, swaps, logit lens, attention)",
                              "interventions", "lens", family=all_families[0])
        return
    left, right = st.columns(2)
    family = left.selectbox("Family", families)
    dataset = right.selectbox("Dataset", queries.layer_profile_datasets(engine, family))
    profile = queries.layer_profile(engine, family, dataset)
    st.caption("Each panel against relative depth (layer / (n_layers - 1)); one line per seed. "
               "Deletion and swap rows need `interventions`, the lens rows `lens`.")
    st.altair_chart(charts.layer_profile(profile))
    missing = [(column, step) for column, step in (("delete_kl", "interventions"), ("lens_kl", "lens"))
               if profile[column].isna().all()]
    for column, step in missing:
        guidance.show_missing(f"No {step} results for {family} on {dataset} yet", step, family=family, dataset=dataset)
    with st.expander("Numbers"):
        st.dataframe(profile, hide_index=True)
    _show_role_counts(engine, family)


def _show_role_counts(engine, family: str) -> None:
    st.subheader("Entropy and attention-deactivating neurons by depth")
    counts = roles.role_counts_by_layer(engine, family)
    if counts.empty:
        guidance.show_missing(f"No null-space fractions for {family} yet", "weights", family=family)
        return
    st.caption(f"Entropy neurons: a null-space fraction at least {roles.ENTROPY_NULL_RATIO:g} x what a random "
               f"direction gets. Deactivating neurons: some later head's attention to the first position falls "
               f"with the neuron, z <= {roles.DEACTIVATION_Z:g} against random directions (`attention-roles`).")
    st.altair_chart(charts.role_counts_by_layer(counts))


render()
