"""Layers: the four-stage profile (Stages of Inference, Figure 1) first, seeds overlaid, then the heads'
statistics per layer, every layer measurement (layer_profile) and the functional roles by depth."""

from __future__ import annotations

import streamlit as st

from app import charts, connection, guidance
from atlas.read import queries, roles, stages


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
    _show_stage_profile(engine, family, dataset)
    _show_head_stats(engine, family, dataset)
    _show_layer_profile(engine, family, dataset)
    _show_role_counts(engine, family)


def _show_stage_profile(engine, family: str, dataset: str) -> None:
    st.subheader("The four-stage profile")
    profile = stages.stage_profile(engine, family, dataset)
    st.caption("The curves of the Stages-of-Inference paper's Figure 1 against relative depth "
               "(layer / (n_layers - 1)); one line per seed. Deletion KL needs `interventions`, the lens curves "
               "`lens` (with attention and output norms), the neuron counts `weights`.")
    st.altair_chart(charts.stage_profile(profile))
    missing = [(column, step) for column, step in (("delete_kl", "interventions"), ("lens_kl", "lens"))
               if profile[column].isna().all()]
    for column, step in missing:
        guidance.show_missing(f"No {step} results for {family} on {dataset} yet", step, family=family, dataset=dataset)
    with st.expander("Numbers of the profile"):
        st.dataframe(profile, hide_index=True)
    chosen = st.multiselect("Overlay models or families on one relative-depth axis",
                            stages.stage_profile_names(engine, dataset), placeholder="Choose models or families")
    if chosen:
        st.altair_chart(charts.stage_profile_overlay(stages.stage_profile_models(engine, chosen, dataset)))


def _show_head_stats(engine, family: str, dataset: str) -> None:
    st.subheader("Attention heads per layer")
    heads = stages.head_stats(engine, family, dataset)
    if heads.empty:
        # A caption, not an info box: the page's main content is there; only this section waits for a job.
        st.caption(f"No head statistics for {family} on {dataset} yet. Run:")
        st.code(guidance.next_command("heads", family, dataset), language="bash")
        return
    st.caption("Each point is a head. Subjoiner score: attention from a token that continues a word to the "
               "earlier tokens of that word, minus the same-length baseline at word starts.")
    st.altair_chart(charts.head_stats_by_layer(heads))


def _show_layer_profile(engine, family: str, dataset: str) -> None:
    st.subheader("Every layer measurement")
    profile = queries.layer_profile(engine, family, dataset)
    st.caption("Each panel against relative depth (layer / (n_layers - 1)); one line per seed. "
               "Deletion and swap rows need `interventions`, the lens rows `lens`.")
    st.altair_chart(charts.layer_profile(profile))
    with st.expander("Numbers"):
        st.dataframe(profile, hide_index=True)


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
