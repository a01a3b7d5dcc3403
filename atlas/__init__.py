"""Neuron Atlas: a database-backed atlas of the MLP neurons of causal language models.

`atlas.open(url)` returns the atlas as an object for notebooks (atlas.api.Atlas). Importing this
package stays light: the API (pandas, SQLAlchemy) loads on the first call, and torch never.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atlas.api import Atlas

__version__ = "0.1.0"


def open(url: str | None = None) -> Atlas:  # noqa: A001 (like the builtin, it opens a resource)
    """The atlas at `url`: any URL the CLI takes (default $ATLAS_DATABASE_URL, else sqlite:///atlas.db)."""
    from atlas.api import Atlas

    return Atlas(url)
