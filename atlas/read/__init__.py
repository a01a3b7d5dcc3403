"""Reading the atlas: the read model (queries), HTML of neurons (html, card) and exports.

One read model serves the app, the Python API (atlas.api) and the exports; nothing here imports
Streamlit, torch, app/ or ingest/.
"""
