"""Alembic migrations of the atlas schema (a package so that installed copies can find them)."""
