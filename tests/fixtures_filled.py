"""A small atlas filled by the real jobs on tiny models, built once per session and backend.

Family "tiny": three seeds of the tiny GPT-2 (one tokenizer), dataset "docs": stdlib docstrings.
Every job runs through its public run(config, store), as the CLI does. Tests must not write to it.
"""

from __future__ import annotations


import pytest

from atlas.registry import register_dataset, register_model
from atlas.store import Store
from ingest.activations import ActivationsConfig
from ingest.activations import run as run_activations
from ingest.correlations import CorrelationsConfig
from ingest.correlations import run as run_correlations
from ingest.interventions import InterventionsConfig
from ingest.interventions import run as run_interventions
from ingest.attention_roles import AttentionRolesConfig
from ingest.attention_roles import run as run_attention_roles
from ingest.entropy import EntropyConfig
from ingest.entropy import run as run_entropy
from ingest.heads import HeadsConfig
from ingest.heads import run as run_heads
from ingest.labels import LabelsConfig
from ingest.labels import run as run_labels
from ingest.lens import LensConfig
from ingest.lens import run as run_lens
from ingest.weights import WeightsConfig
from ingest.weights import run as run_weights
from tests.tiny import write_docs_jsonl

FILLED_FAMILY, FILLED_DATASET, FILLED_SEEDS, FILLED_TOKENS = "tiny", "docs", (0, 1, 2), 3000


def fill(url: str, model_dirs, docs_file) -> None:
    store = Store(url)
    for seed in FILLED_SEEDS:
        register_model(store, str(model_dirs[seed]), family=FILLED_FAMILY, seed=seed)
    register_dataset(store, FILLED_DATASET, str(docs_file), n_tokens=FILLED_TOKENS, ctx_len=64)
    target = dict(family=FILLED_FAMILY)
    data = dict(dataset=FILLED_DATASET)
    run_weights(WeightsConfig(**target), store)
    run_activations(ActivationsConfig(**target, **data), store)
    run_correlations(CorrelationsConfig(**target, **data), store)
    run_interventions(InterventionsConfig(**target, **data), store)
    run_lens(LensConfig(**target, **data), store)
    run_labels(LabelsConfig(**target, **data), store)
    run_entropy(EntropyConfig(**target, **data, tokens=1000), store)
    run_attention_roles(AttentionRolesConfig(**target, **data), store)
    run_heads(HeadsConfig(**target, **data), store)
    store.dispose()


@pytest.fixture(scope="session")
def filled_docs_file(tmp_path_factory):
    return write_docs_jsonl(tmp_path_factory.mktemp("filled-docs") / "docs.jsonl")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def filled_any_db_url(request, tmp_path_factory, tiny_family, filled_docs_file) -> str:
    """The filled atlas on each backend."""
    if request.param == "sqlite":
        return request.getfixturevalue("filled_db_url")
    server = request.getfixturevalue("pg_server")
    url = server.create_atlas(request.getfixturevalue("pg_template"))
    fill(url, tiny_family, filled_docs_file)
    return url


@pytest.fixture(scope="session")
def filled_db_url(tmp_path_factory, tiny_family, filled_docs_file) -> str:
    """The filled atlas on SQLite (the app's tests and the browser test)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('filled-app') / 'atlas.db'}"
    fill(url, tiny_family, filled_docs_file)
    return url
