"""The atlas from Python and notebooks: `a = atlas.open(url)`; each method returns a pandas DataFrame.

Reads go through the read model the app uses (atlas.read.queries). `a.sql` goes through the app
console's read-only path (atlas.store.read_only): the SQLite file opened read-only, or PostgreSQL
as the atlas_reader role (`atlas db create-reader`), whatever role the URL names.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from atlas.errors import AtlasError
from atlas.read import queries, roles, stages
from atlas.read.card import NeuronCard, load_card
from atlas.store import Store, read_only, resolve_url

SQL_ROW_LIMIT = 100_000
SQL_TIMEOUT_S = 300.0


class TruncatedWarning(UserWarning):
    """a.sql stopped at its row limit: more rows exist."""


class Atlas:
    """An atlas database. Names (model, family, dataset) that do not exist are an AtlasError, not an
    empty frame, so a typo does not read as "no such neurons"."""

    def __init__(self, url: str | None = None):
        self._store = Store(_existing(resolve_url(url)))
        self._reader: Engine | None = None

    def __repr__(self) -> str:
        return f"Atlas({self._store.display_url!r})"

    def __enter__(self) -> Atlas:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        return self._store.engine

    def close(self) -> None:
        self._store.dispose()
        if self._reader is not None:
            self._reader.dispose()

    # --- the registry ----------------------------------------------------------------------------

    def models(self, family: str | None = None) -> pd.DataFrame:
        """One row per model (seed): name, family, seed, architecture and shape."""
        self._check(family=family)
        return queries.models(self.engine, family)

    def datasets(self) -> pd.DataFrame:
        return queries.datasets(self.engine)

    def jobs(self, status: str | None = None, kind: str | None = None, limit: int = 500) -> pd.DataFrame:
        """The jobs ledger, newest first, with each job's provenance: model and dataset source and resolved
        revision, tokenizer hash, atlas / torch / transformers versions. Result rows name their job_id."""
        return queries.jobs(self.engine, limit=limit, status=status, kind=kind)

    def token_shard_units(self) -> pd.DataFrame:
        """Progress of jobs cut into token shards (--token-shards, local or on Ray): per job kind, dataset and
        shard count, the units' ledger rows done, running, failed and abandoned."""
        return queries.token_shard_units(self.engine)

    # --- neurons, correlations, layers -----------------------------------------------------------

    def neurons(self, family: str | None = None, model: str | None = None, universal: bool | None = None,
                layer: int | Sequence[int] | None = None, vocab_class: str | Sequence[str] | None = None,
                dataset: str | None = None, limit: int | None = None) -> pd.DataFrame:
        """The neuron_atlas view (one row per neuron and activation dataset) with each neuron's hook_name.

        universal: True only universal neurons, False measured ones that are not, None all of them.
        """
        self._check(family=family, model=model, dataset=dataset)
        return queries.neurons(self.engine, family=family, model=model, universal=universal, layer=layer,
                               vocab_class=vocab_class, dataset=dataset, limit=limit)

    def correlations(self, model: str | None = None, layer: int | None = None, neuron: int | None = None,
                     dataset: str | None = None, family: str | None = None) -> pd.DataFrame:
        """Each neuron's best partner in every other seed: max_corr, the rotation baseline, the partner."""
        self._check(family=family, model=model, dataset=dataset)
        return queries.correlations(self.engine, model=model, layer=layer, neuron=neuron, dataset=dataset,
                                    family=family)

    def layers(self, model_or_family: str, dataset: str | None = None) -> pd.DataFrame:
        """The layer_profile view: one row per model, dataset and layer."""
        names = self._names()
        if model_or_family not in names["model"] | names["family"]:
            raise AtlasError(f"no model or family named {model_or_family!r}: families {_listed(names['family'])}")
        self._check(dataset=dataset)
        return queries.layer_profile(self.engine, model_or_family, dataset)

    def stages(self, model_or_family: str, dataset: str | None = None) -> pd.DataFrame:
        """The stage_profile view (the four-stage profile of Stages of Inference, Figure 1): one row per model,
        dataset and layer, with the heads' max subjoiner score and mean attention to the first / previous token."""
        self._check_model_or_family(model_or_family, dataset)
        return stages.stage_profile(self.engine, model_or_family, dataset)

    def heads(self, model_or_family: str, dataset: str | None = None) -> pd.DataFrame:
        """head_stats: per attention head, the subjoiner score and attention to the first / previous token."""
        self._check_model_or_family(model_or_family, dataset)
        return stages.head_stats(self.engine, model_or_family, dataset)

    def _check_model_or_family(self, model_or_family: str, dataset: str | None) -> None:
        names = self._names()
        if model_or_family not in names["model"] | names["family"]:
            raise AtlasError(f"no model or family named {model_or_family!r}: families {_listed(names['family'])}")
        self._check(dataset=dataset)

    def card(self, model: str, layer: int, neuron: int, dataset: str | None = None, examples: int = 10) -> NeuronCard:
        """One neuron's card: Jupyter draws it; its attributes hold the DataFrames."""
        self._check(model=model, dataset=dataset)
        info = queries.model_info(self.engine, model)
        layer, neuron = int(layer), int(neuron)
        for what, value, size in (("layer", layer, info["n_layers"]), ("neuron", neuron, info["d_mlp"])):
            if not 0 <= value < size:
                raise AtlasError(f"{what} {value} is out of range for {model}: 0..{int(size) - 1}")
        return load_card(self.engine, info, layer, neuron, dataset, examples)

    # --- functional roles --------------------------------------------------------------------------

    def labels(self, family: str | None = None, model: str | None = None, source: str | None = None,
               feature: str | None = None, layer: int | None = None, max_rank: int | None = None,
               limit: int | None = None) -> pd.DataFrame:
        """Token-feature labels of neurons by variance reduction (neuron_labels): source 'vocab' (what the neuron
        writes to the vocabulary), 'current_token' or 'next_token' (what its activation tracks on a dataset)."""
        self._check(family=family, model=model)
        if source is not None and source not in roles.LABEL_SOURCES:
            raise AtlasError(f"no label source {source!r}: sources {', '.join(roles.LABEL_SOURCES)}")
        return roles.labels(self.engine, family=family, model=model, source=source, feature=feature, layer=layer,
                            max_rank=max_rank, limit=limit)

    def label_counts(self, family: str, source: str = "vocab") -> pd.DataFrame:
        """Per seed and feature, how many neurons have the feature as their rank-0 label from `source` (the
        label_counts summary; the Families page's chart draws the 15 most frequent)."""
        self._check(family=family)
        if source not in roles.LABEL_SOURCES:
            raise AtlasError(f"no label source {source!r}: sources {', '.join(roles.LABEL_SOURCES)}")
        return roles.label_counts_by_seed(self.engine, family, source, top=None)

    def role_counts(self, model_or_family: str) -> pd.DataFrame:
        """Per model and layer: entropy neurons (null_frac >= 10 x a random direction's) and neurons that
        deactivate a later head (z <= -3), with the layer's largest null-space fraction (the Layers page's chart)."""
        self._check_model_or_family(model_or_family, None)
        return roles.role_counts_by_layer(self.engine, model_or_family)

    def entropy(self, family: str | None = None, model: str | None = None) -> pd.DataFrame:
        """Entropy-neuron interventions (one row per neuron and fixed value) with the null-space fraction."""
        self._check(family=family, model=model)
        return roles.entropy_interventions(self.engine, family=family, model=model)

    def head_scores(self, family: str | None = None, model: str | None = None, max_z: float | None = None,
                    limit: int | None = None) -> pd.DataFrame:
        """Attention deactivation: each neuron's top later heads by |z|, with the path ablation where it ran."""
        self._check(family=family, model=model)
        return roles.head_scores(self.engine, family=family, model=model, max_z=max_z, limit=limit)

    def probes(self, model: str | None = None, feature: str | None = None) -> pd.DataFrame:
        """Prediction-ensembling runs (`atlas study ensembling`): per (model, dataset, feature) the split, the
        model's own test accuracy, the best single-neuron probe and the top-k probe on all probed neurons.
        The probes of a run: atlas.read.probes.probe_results(atlas.engine, run_id)."""
        from atlas.read import probes

        self._check(model=model)
        return probes.probe_runs(self.engine, model=model, feature=feature)

    # --- SQL -------------------------------------------------------------------------------------

    def sql(self, query: str, row_limit: int = SQL_ROW_LIMIT, timeout_s: float = SQL_TIMEOUT_S) -> pd.DataFrame:
        """One read-only statement, at most row_limit rows (a TruncatedWarning says when more exist;
        frame.attrs["truncated"] too). A write is refused with an AtlasError."""
        result = read_only.run_console_query(self._reader_engine(), query, row_limit=row_limit, timeout_s=timeout_s)
        frame = result.frame
        frame.attrs["truncated"] = result.truncated
        if result.truncated:
            warnings.warn(f"stopped at the row limit of {row_limit:,} rows and more exist: pass row_limit=..., "
                          "or `atlas export` the query to a file", TruncatedWarning, stacklevel=2)
        return frame

    def _reader_engine(self) -> Engine:
        if self._reader is None:
            self._reader = read_only.console_engine(self._store.url)
        return self._reader

    # --- names -----------------------------------------------------------------------------------

    def _names(self) -> dict[str, set[str]]:
        models = queries.models(self.engine)
        return {"model": set(models["name"]), "family": set(models["family"]),
                "dataset": set(queries.datasets(self.engine)["name"])}

    def _check(self, **given: str | Sequence[str] | None) -> None:
        asked = {kind: [value] if isinstance(value, str) else list(value)
                 for kind, value in given.items() if value is not None}
        if not asked:
            return
        names = self._names()
        for kind, values in asked.items():
            unknown = [value for value in values if value not in names[kind]]
            if unknown:
                raise AtlasError(f"no {kind} named {unknown[0]!r}: {kind}s {_listed(names[kind])}")


def _listed(names: set[str]) -> str:
    return ", ".join(sorted(names)) or "none yet"


def _existing(url: str) -> str:
    """Opening a SQLite file that is not there would create an empty atlas: say so instead."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not Path(parsed.database).exists():
        raise AtlasError(f"no atlas at {parsed.database}: build one with `atlas demo`, or pass the URL of an atlas")
    return url

