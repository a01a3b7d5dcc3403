"""The model registry: register models, and resolve the --model / --family / --dataset a job names."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from atlas.errors import AtlasError
from atlas.store import Store
from atlas.store.schema import Dataset, Model


def default_model_name(source: str, revision: str | None) -> str:
    """A hub id keeps its name (EleutherAI/pythia-160m); a local directory gives its folder name."""
    path = Path(source)
    name = path.name if path.exists() else source
    return f"{name}@{revision}" if revision else name


def register_model(
    store: Store, source: str, *, family: str, seed: int, name: str | None = None, revision: str | None = None
) -> tuple[Model, bool]:
    """Register a model (loading its config and weights). Returns (model, created)."""
    from atlas.modeling import load_model, model_summary  # torch/transformers are slow to import

    if Path(source).exists():
        source = str(Path(source).resolve())
    name = name or default_model_name(source, revision)
    with store.session() as session:
        existing = session.scalars(select(Model).where(Model.name == name)).first()
        if existing is not None:
            if existing.source == source and existing.revision == revision:
                return existing, False
            raise AtlasError(
                f"model name {name!r} is already registered from {existing.source}"
                f"{'@' + existing.revision if existing.revision else ''}: choose another --name"
            )
        taken = session.scalars(select(Model).where(Model.family == family, Model.seed == seed)).first()
        if taken is not None:
            raise AtlasError(f"family {family!r} already has seed {seed} ({taken.name}): choose another --seed")
    summary = model_summary(load_model(source, revision))
    model = Model(name=name, family=family, seed=seed, source=source, revision=revision, **summary)
    with store.transaction() as session:
        session.add(model)
    return model, True


def list_models(session: Session, family: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.family, Model.seed)
    if family:
        query = query.where(Model.family == family)
    return list(session.scalars(query))


def resolve_models(session: Session, model: str | None, family: str | None) -> list[Model]:
    """The models a job runs on: exactly one of --model NAME or --family F."""
    if bool(model) == bool(family):
        raise AtlasError("name exactly one target: --model NAME or --family F (see `atlas model list`)")
    if model:
        found = session.scalars(select(Model).where(Model.name == model)).first()
        if found is None:
            raise AtlasError(f"model {model!r} is not registered: run `atlas model add SOURCE --family F --seed S`")
        return [found]
    models = list_models(session, family)
    if not models:
        raise AtlasError(f"family {family!r} has no registered models: run `atlas model add SOURCE --family {family} --seed S`")
    return models


def resolve_dataset(session: Session, name: str | None) -> Dataset:
    if not name:
        raise AtlasError("this job needs --dataset NAME (see `atlas dataset list`)")
    found = session.scalars(select(Dataset).where(Dataset.name == name)).first()
    if found is None:
        raise AtlasError(f"dataset {name!r} is not registered: run `atlas dataset add {name} --source SRC`")
    return found


def require_shared_tokenizer(models: list[Model]) -> None:
    """Models compared on the same positions must tokenize text identically."""
    hashes = {m.tokenizer_hash for m in models}
    if len(hashes) > 1:
        names = ", ".join(f"{m.name} ({m.tokenizer_hash[:8]})" for m in models)
        raise AtlasError(f"the models have different tokenizers ({names}): a family must share one tokenizer")


def dataset_content_hash(source: str, split: str, text_field: str) -> str:
    """sha256 of the source's fingerprint: changes when the documents a source yields can change."""
    import hashlib

    from atlas.data import source_fingerprint

    return hashlib.sha256(source_fingerprint(source, split, text_field).encode()).hexdigest()


def _normalized_source(source: str) -> str:
    """Local paths are stored absolute, so a dataset means the same files from any directory."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def register_dataset(
    store: Store, name: str, source: str, split: str = "train", text_field: str = "text",
    n_tokens: int = 200_000, ctx_len: int = 128, sample_seed: int = 0,
) -> tuple[Dataset, bool]:
    """Register a text source and how it is sampled. Returns (dataset, created).

    The source is checked by reading its first document (bad path, unknown builtin, missing text
    field, empty source: one-line AtlasError, nothing written). The same name with the same
    settings is a no-op; with other settings an error.
    """
    from atlas.data import iter_documents

    if n_tokens < 1:
        raise AtlasError(f"--tokens must be at least 1, got {n_tokens}")
    if ctx_len < 2:
        raise AtlasError(f"--ctx must be at least 2 (BOS and one token), got {ctx_len}")
    source = _normalized_source(source)
    settings = dict(source=source, split=split, text_field=text_field, n_tokens=n_tokens, ctx_len=ctx_len,
                    sample_seed=sample_seed)
    with store.session() as session:
        existing = session.scalars(select(Dataset).where(Dataset.name == name)).first()
    if existing is not None:
        differing = [f"{key} {getattr(existing, key)!r} (not {value!r})" for key, value in settings.items()
                     if getattr(existing, key) != value]
        if differing:
            raise AtlasError(f"dataset {name!r} is already registered with {', '.join(differing)}: "
                             "choose another name")
        return existing, False
    next(iter_documents(source, split, text_field))  # fails here, in one line, on a bad source
    dataset = Dataset(name=name, content_hash=dataset_content_hash(source, split, text_field), **settings)
    with store.transaction() as session:
        session.add(dataset)
    return dataset, True


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.name)))
