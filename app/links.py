"""Links to a neuron card: ?model=NAME&layer=L&neuron=N on the card page (url path "card")."""

from __future__ import annotations

import urllib.parse

import streamlit as st

CARD_PAGE = "app_pages/card.py"  # relative to app/main.py, as st.page_link expects


def card_query(model: str, layer: int, neuron: int) -> dict[str, str]:
    return {"model": model, "layer": str(int(layer)), "neuron": str(int(neuron))}


def card_url(model: str, layer: int, neuron: int) -> str:
    """A relative URL (no leading slash), so it also works under a server base path."""
    return "card?" + urllib.parse.urlencode(card_query(model, layer, neuron))


def card_page_link(label: str, model: str, layer: int, neuron: int) -> None:
    st.page_link(CARD_PAGE, label=label, icon=":material/badge:", query_params=card_query(model, layer, neuron))
