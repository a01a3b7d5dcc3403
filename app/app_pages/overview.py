"""Overview: families, seeds, models, datasets, the jobs ledger, row counts, training curves."""

from __future__ import annotations

import streamlit as st

from app import charts, connection, guidance
from atlas.read import queries


def render() -> None:
    st.title("Neuron Atlas")
    engine = connection.engine()
    filled = queries.tables_with_rows(engine, [table for table, _, _ in STAGES])

    families = queries.families(engine)
    if families.empty:
        guidance.show_empty_database()
    else:
        st.subheader("Families")
        st.dataframe(families, hide_index=True)
        st.subheader("Models (one per seed)")
        st.dataframe(queries.models(engine).drop(columns=["model_id"]), hide_index=True)
        _show_missing_steps(filled, families["family"].iloc[0])

    st.subheader("Datasets")
    datasets = queries.datasets(engine)
    if datasets.empty:
        st.caption("No token datasets yet: the activation, correlation and layer jobs register theirs.")
    else:
        st.dataframe(datasets, hide_index=True)

    _show_training(engine)
    _show_jobs(engine)

    st.subheader("Rows written, by job kind")
    st.caption("From the jobs ledger: the jobs whose results are current (status done).")
    st.dataframe(queries.rows_by_job_kind(engine), hide_index=True, width=420)


# A stage of the pipeline, the table its job fills, and what to say while it is empty.
STAGES = [
    ("neurons", "No weight statistics yet", "weights"),
    ("activation_stats", "No activation statistics or top examples yet", "activations"),
    ("neuron_correlations", "No cross-seed correlations yet", "correlations"),
    ("layer_interventions", "No layer deletions or swaps yet", "interventions"),
    ("logit_lens", "No logit lens yet", "lens"),
    ("neuron_labels", "No token-feature labels yet", "labels"),
]


def _show_missing_steps(filled: set[str], family: str) -> None:
    """Point at the next job when a stage of the pipeline has no rows yet."""
    for table, missing, step in STAGES:
        if table not in filled:
            guidance.show_missing(missing, step, family=family)


def _show_training(engine) -> None:
    runs = queries.training_runs(engine)
    if runs.empty:
        return
    st.subheader("Training runs")
    st.dataframe(runs, hide_index=True)
    curves = queries.training_curves(engine)
    if not curves.empty:
        st.altair_chart(charts.training_curves(curves))


def _show_jobs(engine) -> None:
    st.subheader("Jobs ledger")
    jobs = queries.jobs(engine)
    if jobs.empty:
        st.caption("No jobs have run yet.")
        return
    summary = queries.job_status_counts(engine).pivot(index="kind", columns="status", values="n_jobs")
    st.dataframe(summary.fillna(0).astype(int))
    failed = jobs[jobs["status"] == "failed"]
    if not failed.empty:
        st.warning(f"{len(failed)} failed job(s) among the latest {len(jobs)}: see the error column.")
    st.dataframe(
        jobs, hide_index=True,
        column_config={"duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f")},
    )
    _show_token_shards(engine)


def _show_token_shards(engine) -> None:
    """Jobs cut into token shards (locally or on a Ray cluster): how far their units are."""
    units = queries.token_shard_units(engine)
    if units.empty:
        return
    st.subheader("Token-shard units")
    st.caption("Jobs run with --token-shards (and --executor ray): each unit is a range of the dataset's batches; "
               "its rows are written once all of a pass's units are done. Rerun a job to do the missing units.")
    units = units.assign(progress=units["done"] / units["total"])
    st.dataframe(units, hide_index=True, column_config={
        "progress": st.column_config.ProgressColumn("done", min_value=0.0, max_value=1.0, format="percent")})


render()
