"""Overview: families, seeds, models, datasets, the jobs ledger, row counts, training curves."""

from __future__ import annotations

import streamlit as st

from app import charts, connection, guidance
from atlas.read import queries


def render() -> None:
    st.title("Neuron Atlas")
    engine = connection.engine()
    counts = queries.row_counts(engine).set_index("table_name")["n_rows"]

    families = queries.families(engine)
    if families.empty:
        guidance.show_empty_database()
    else:
        st.subheader("Families")
        st.dataframe(families, hide_index=True)
        st.subheader("Models (one per seed)")
        st.dataframe(queries.models(engine).drop(columns=["model_id"]), hide_index=True)
        _show_missing_steps(counts, families["family"].iloc[0])

    st.subheader("Datasets")
    datasets = queries.datasets(engine)
    if datasets.empty:
        st.caption("No token datasets yet: the activation, correlation and layer jobs register theirs.")
    else:
        st.dataframe(datasets, hide_index=True)

    _show_training(engine)
    _show_jobs(engine)

    st.subheader("Rows per table")
    st.dataframe(counts.rename("rows").to_frame(), width=360)


def _show_missing_steps(counts, family: str) -> None:
    """Point at the next job when a stage of the pipeline has no rows yet."""
    stages = [
        ("neurons", "No weight statistics yet", "weights"),
        ("activation_stats", "No activation statistics or top examples yet", "activations"),
        ("neuron_correlations", "No cross-seed correlations yet", "correlations"),
        ("layer_interventions", "No layer deletions or swaps yet", "interventions"),
        ("logit_lens", "No logit lens yet", "lens"),
    ]
    for table, missing, step in stages:
        if counts.get(table, 0) == 0:
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


render()
