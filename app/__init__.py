"""Neuron Atlas Streamlit app (run it with `atlas app`)."""
