"""Persistence: schema, views, connections and bulk writes."""

from atlas.store.bulk import bulk_insert, insert_rows
from atlas.store.db import Store, resolve_url

__all__ = ["Store", "bulk_insert", "insert_rows", "resolve_url"]
