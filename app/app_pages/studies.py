"""Studies: prediction ensembling (Stages of Inference, Figure 10a) from `atlas study ensembling`."""

from __future__ import annotations

import streamlit as st

from app import charts, connection, guidance
from atlas.read import probes, queries


def render() -> None:
    st.title("Studies")
    engine = connection.engine()
    families = queries.family_names(engine)
    if not families:
        guidance.show_empty_database()
        return
    st.subheader("Prediction ensembling")
    runs = probes.probe_runs(engine)
    if runs.empty:
        guidance.show_missing("No prediction-ensembling study yet (it needs the weights job's neuron classes)",
                              "weights", "ensembling", family=families[0])
        return
    left, right = st.columns(2)
    model = left.selectbox("Model", list(dict.fromkeys(runs["model"])))
    of_model = runs[runs["model"] == model]
    labels = [f"{row.feature} on {row.dataset}" for row in of_model.itertuples()]
    run = of_model.iloc[labels.index(right.selectbox("Feature", labels))]
    results = probes.probe_results(engine, int(run["run_id"]))
    st.caption(f"Probes for whether the next token is `{run['feature']}`: logistic regression on single neurons "
               f"(points, coloured by class) and on the top k by single accuracy (line); the dashed rule is the "
               f"model's own accuracy (more than half its probability on those tokens). {run['n_train']} training "
               f"and {run['n_test']} test positions, balanced, seed {run['split_seed']}, at least "
               f"{run['min_context']} tokens of context.")
    st.altair_chart(charts.ensembling_chart(results, float(run["model_accuracy"])))
    with st.expander("Numbers"):
        st.dataframe(results, hide_index=True)
    st.caption("Every run")
    st.dataframe(runs.drop(columns=["run_id"]), hide_index=True)


render()
