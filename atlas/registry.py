"""The model registry: register models, and resolve the --model / --family / --dataset a job names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from atlas.errors import AtlasError
from atlas.store import Store
from atlas.store.schema import Base, Dataset, DatasetTokens, Model, NeuronCorrelation
from atlas.store.summaries import refresh_universality


def default_model_name(source: str, revision: str | None) -> str:
    """A hub id keeps its name (EleutherAI/pythia-160m); a local directory gives its folder name."""
    path = Path(source)
    name = path.name if path.exists() else source
    return f"{name}@{revision}" if revision else name


def step_of_revision(revision: str | None) -> int | None:
    """Pythia and PolyPythia name their checkpoints step1000 etc.: such a revision says the step."""
    match = re.fullmatch(r"step(\d+)", revision or "")
    return int(match.group(1)) if match else None


def register_model(
    store: Store, source: str, *, family: str, seed: int, name: str | None = None, revision: str | None = None,
    step: int | None = None,
) -> tuple[Model, bool]:
    """Register a model (reading its config and tokenizer, and streaming its weight files). Returns (model, created).

    The weights are never loaded as a model: shapes come from a meta-device model, and the weights
    hash and non-finite check read the checkpoint files one tensor at a time.

    step: the training step of a checkpoint (default: read from a stepN revision); the seeds of a
    family at one step are compared with each other.

    Refused, each in one line with nothing written: a name taken by other files or by another
    family/seed, a taken (family, seed), non-finite weights, weights identical to a registered
    model's, and a tokenizer, architecture or shape that differs from the family's.
    """
    from atlas.modeling import inspect_model, quiet_loading
    from atlas.provenance import local_revision, scan_weights

    if Path(source).exists():
        source = str(Path(source).resolve())
    name = name or default_model_name(source, revision)
    step = step if step is not None else step_of_revision(revision)
    if step is not None and step < 0:
        raise AtlasError(f"--step must be a non-negative training step, got {step}")
    with store.session() as session:
        existing = session.scalars(select(Model).where(Model.name == name)).first()
        if existing is not None:
            _require_same_registration(existing, source, revision, family, seed, step)
            return existing, False
        _require_free_seed(session, family, seed, step)
    with quiet_loading():
        facts = inspect_model(source, revision)
    scan = scan_weights(facts.weight_files)
    if scan.first_nonfinite is not None:
        raise AtlasError(f"model {name!r} has non-finite weights (NaN or inf in {scan.first_nonfinite}): "
                         "register a checkpoint whose weights are all finite")
    resolved = facts.commit if facts.directory is None else local_revision(facts.directory, scan.weights_hash)
    model = Model(name=name, family=family, seed=seed, step=step, source=source, revision=revision,
                  weights_hash=scan.weights_hash, resolved_revision=resolved, **facts.summary)
    with store.transaction() as session:  # the family is read again where the row is written
        _require_free_seed(session, family, seed, step)
        _require_family_fit(session, model)
        session.add(model)
    return model, True


def _require_same_registration(existing: Model, source: str, revision: str | None, family: str, seed: int,
                               step: int | None) -> None:
    """Adding a registered name again is a no-op only when it means the very same model."""
    if existing.source != source or existing.revision != revision:
        raise AtlasError(
            f"model name {existing.name!r} is already registered from {existing.source}"
            f"{'@' + existing.revision if existing.revision else ''}: choose another --name"
        )
    if (existing.family, existing.seed, existing.step) != (family, seed, step):
        raise AtlasError(
            f"model {existing.name!r} is already registered as family {existing.family!r} seed {existing.seed}"
            f"{_at(existing.step)}, not family {family!r} seed {seed}{_at(step)}: pass --family {existing.family} "
            f"--seed {existing.seed}{'' if existing.step is None else f' --step {existing.step}'}, "
            f"or `atlas model remove {existing.name}` first"
        )


def _at(step: int | None) -> str:
    return "" if step is None else f" at step {step}"


def _require_free_seed(session: Session, family: str, seed: int, step: int | None = None) -> None:
    same_step = Model.step.is_(None) if step is None else Model.step == step
    taken = session.scalars(select(Model).where(Model.family == family, Model.seed == seed, same_step)).first()
    if taken is not None:
        raise AtlasError(f"family {family!r} already has seed {seed}{_at(step)} ({taken.name}): "
                         "choose another --seed" + (" or --step" if step is not None else ""))


# What every seed of a family shares: jobs compare them position by position and neuron by neuron.
FAMILY_FIELDS = ("tokenizer_hash", "architecture", "n_layers", "d_model", "d_mlp", "vocab_size")


def _require_family_fit(session: Session, model: Model) -> None:
    """A new seed is no copy of a registered model (its correlations would be a fake 1.0) and matches
    the family's tokenizer, architecture and shapes."""
    copy = session.scalars(select(Model).where(Model.weights_hash == model.weights_hash)).first()
    if copy is not None:
        raise AtlasError(f"model {model.name!r} has the same weights as {copy.name} (family {copy.family!r}, "
                         f"seed {copy.seed}): a seed must be trained separately")
    first = session.scalars(select(Model).where(Model.family == model.family).order_by(Model.seed)).first()
    if first is None:
        return
    for field in FAMILY_FIELDS:
        mine, theirs = getattr(model, field), getattr(first, field)
        if mine != theirs:
            shown = (mine[:12], theirs[:12]) if field == "tokenizer_hash" else (mine, theirs)
            raise AtlasError(f"model {model.name!r} has {field} {shown[0]} but family {model.family!r} has "
                             f"{shown[1]} ({first.name}): a family's seeds must share tokenizer, architecture "
                             "and shapes; register it under another --family")


def remove_model(store: Store, name: str) -> tuple[Model, dict[str, int]]:
    """Delete a model and every row about it in one transaction. Returns the model and rows deleted per table.

    Rows are deleted table by table (dependents first) instead of trusting ON DELETE CASCADE alone, so
    the counts are exact; correlation rows and jobs where it is the *other* model go too.
    """
    with store.transaction() as session:
        model = session.scalars(select(Model).where(Model.name == name)).first()
        if model is None:
            raise AtlasError(f"model {name!r} is not registered: see `atlas model list`")
        # The seeds it was compared with: their universality summaries lose its correlations below.
        partners = session.execute(select(NeuronCorrelation.model_id, NeuronCorrelation.dataset_id).distinct()
                                   .where(NeuronCorrelation.other_model_id == model.id)).all()
        deleted = {}
        for table, column in _tables_referencing_models():
            result = session.execute(delete(table).where(column == model.id))
            if result.rowcount:
                deleted[table.name] = deleted.get(table.name, 0) + result.rowcount
        session.execute(delete(Model).where(Model.id == model.id))
        for dataset_id in {dataset_id for _, dataset_id in partners}:
            refresh_universality(session, [m for m, d in partners if d == dataset_id], dataset_id)
        session.expunge(model)
    return model, deleted


def _tables_referencing_models() -> list[tuple[Any, Any]]:
    """(table, column) for every ON DELETE CASCADE foreign key to models.id, dependents before the jobs they cite."""
    found = []
    for table in reversed(Base.metadata.sorted_tables):
        for fk in table.foreign_keys:
            if fk.column.table.name == "models" and (fk.ondelete or "").upper() == "CASCADE":
                found.append((table, fk.parent))
    return found


def verified_weights_hash(store: Store, model: Model, loaded: Any) -> str:
    """The hash of the weight files a job loaded for `model` (computed: files can change after registration).

    The same file-based hash as registration. Checkpoints key on it, so a rerun on changed files never
    resumes stale state; weights that differ from the registered ones are refused, since results would
    be filed under the wrong model. A row without a hash (registered before hashes, or cleared by
    migration 0004 when the definition changed) is given the computed one.
    """
    from atlas.modeling import loaded_weight_files
    from atlas.provenance import scan_weights

    actual = scan_weights(loaded_weight_files(loaded)).weights_hash
    registered = model.weights_hash or _fill_weights_hash(store, model, actual)
    if actual != registered:
        raise AtlasError(f"the weights of model {model.name!r} ({model.source}) changed since it was registered "
                         f"(sha256 {registered[:12]}, now {actual[:12]}): restore them, or "
                         f"`atlas model remove {model.name}` and register the new weights")
    return actual


def _fill_weights_hash(store: Store, model: Model, weights_hash: str) -> str:
    """Store the hash on a row that has none; returns the row's hash (another job may have filled it first)."""
    with store.transaction() as session:
        session.execute(update(Model).where(Model.id == model.id, Model.weights_hash.is_(None))
                        .values(weights_hash=weights_hash))
        model.weights_hash = session.scalar(select(Model.weights_hash).where(Model.id == model.id)) or weights_hash
    return model.weights_hash


def list_models(session: Session, family: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.family, Model.seed, func.coalesce(Model.step, -1))
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


def dataset_content_hash(source: str, split: str, text_field: str, revision: str | None = None) -> str:
    """sha256 of the source's fingerprint: changes when the documents a source yields can change."""
    import hashlib

    from atlas.data import source_fingerprint

    return hashlib.sha256(source_fingerprint(source, split, text_field, revision=revision).encode()).hexdigest()


def _normalized_source(source: str) -> str:
    """Local paths are stored absolute, so a dataset means the same files from any directory."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def register_dataset(
    store: Store, name: str, source: str, split: str = "train", text_field: str = "text",
    n_tokens: int = 200_000, ctx_len: int = 128, sample_seed: int = 0, revision: str | None = None,
) -> tuple[Dataset, bool]:
    """Register a text source and how it is sampled. Returns (dataset, created).

    revision: a hub dataset's revision (branch, tag or commit) to read; its commit SHA is stored as
    resolved_revision when the hub answers. Local files and builtin sources resolve to "sha256:" +
    their content hash.

    The source is checked by reading its first document (bad path, unknown builtin, missing text
    field, empty source: one-line AtlasError, nothing written). The same name with the same
    settings is a no-op; with other settings an error.
    """
    from atlas.data import iter_documents
    from atlas.data.sources import resolved_dataset_revision

    if n_tokens < 1:
        raise AtlasError(f"--tokens must be at least 1, got {n_tokens}")
    if ctx_len < 2:
        raise AtlasError(f"--ctx must be at least 2 (BOS and one token), got {ctx_len}")
    source = _normalized_source(source)
    settings = dict(source=source, split=split, text_field=text_field, n_tokens=n_tokens, ctx_len=ctx_len,
                    sample_seed=sample_seed, revision=revision)
    with store.session() as session:
        existing = session.scalars(select(Dataset).where(Dataset.name == name)).first()
    if existing is not None:
        differing = [f"{key} {getattr(existing, key)!r} (not {value!r})" for key, value in settings.items()
                     if getattr(existing, key) != value]
        if differing:
            raise AtlasError(f"dataset {name!r} is already registered with {', '.join(differing)}: "
                             "choose another name")
        return existing, False
    documents = iter_documents(source, split, text_field, revision=revision)
    _require_one_context(documents, source, ctx_len)  # one line on a bad source
    content_hash = dataset_content_hash(source, split, text_field, revision)
    dataset = Dataset(name=name, content_hash=content_hash,
                      resolved_revision=resolved_dataset_revision(source, revision, content_hash), **settings)
    with store.transaction() as session:
        session.add(dataset)
    return dataset, True


def _require_one_context(documents: Iterable[str], source: str, ctx_len: int) -> None:
    """Refuse a source that cannot fill one context, reading only as far as needed: below ctx_len, its
    token upper bound means fewer tokens than one context. The real count is checked when a job tokenizes."""
    from atlas.data import token_upper_bound

    bound, n_documents = token_upper_bound(documents, enough=ctx_len)
    if bound >= ctx_len:
        return
    raise AtlasError(f"source {source} holds at most {bound} tokens ({n_documents} document(s): UTF-8 bytes and "
                     f"one BOS each), fewer than one context of --ctx {ctx_len}: add text or lower --ctx")


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.name)))


def dataset_token_counts(session: Session) -> dict[int, list[DatasetTokens]]:
    """Dataset id -> what it really gave under each tokenizer a job used (written when jobs tokenize it)."""
    counts: dict[int, list[DatasetTokens]] = {}
    for row in session.scalars(select(DatasetTokens).order_by(DatasetTokens.created_at)):
        counts.setdefault(row.dataset_id, []).append(row)
    return counts
