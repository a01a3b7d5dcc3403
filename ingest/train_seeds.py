"""The train-seeds job: one GPT-2 per seed on a registered dataset's texts, registered and stored.

Layout under <out>/<family>/: tokenizer/ (trained once, shared by every seed), seed-<s>/ (model and
tokenizer in Hugging Face format, plus training.json), heldout.jsonl (the held-out documents, one
JSON object per line, so analysis jobs can run on text no seed trained on), family.json (the
family's data settings). A seed is reused when its training run is stored and its directory holds
a model; a rerun with other settings is refused rather than mixed into the family. The device a seed
trained on is recorded (training_runs.config["device"], training.json) but is no setting of the
family: a seed trained on a GPU is reused by a run on the CPU and the other way round.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import delete, select

from atlas.devices import resolve_device
from atlas.errors import AtlasError
from atlas.registry import register_model, resolve_dataset
from atlas.store import Store
from atlas.store.schema import Dataset, Model, TrainingCurve, TrainingRun
from atlas.training import TrainConfig, TrainResult

log = logging.getLogger(__name__)
DEFAULT_TEXT_BYTES = 16_000_000  # the whole default builtin:docstrings corpus; ~5M tokens


@dataclass(frozen=True)
class TrainSeedsConfig:
    """Train one GPT-2 per seed from scratch on a registered dataset's texts (shared tokenizer)."""

    family: str
    dataset: str
    seeds: tuple[int, ...] = (0, 1, 2)
    train: TrainConfig = field(default_factory=TrainConfig)
    vocab_size: int = 4096
    text_bytes: int = DEFAULT_TEXT_BYTES   # read the dataset's documents up to this many UTF-8 bytes
    heldout_fraction: float = 0.05
    out: str = "atlas-models"
    device: str = "auto"   # auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps


@dataclass(frozen=True)
class SeedOutcome:
    seed: int
    model_name: str
    model_dir: Path
    reused: bool
    heldout_loss: float
    unigram_entropy: float | None


def family_dir(config: TrainSeedsConfig) -> Path:
    return Path(config.out).expanduser().resolve() / config.family


def seed_dir(config: TrainSeedsConfig, seed: int) -> Path:
    return family_dir(config) / f"seed-{seed}"


def heldout_path(config: TrainSeedsConfig) -> Path:
    """Held-out documents of the family as .jsonl (written by run)."""
    return family_dir(config) / "heldout.jsonl"


def model_name(family: str, seed: int) -> str:
    return f"{family}-seed{seed}"


def data_settings(config: TrainSeedsConfig, dataset: Dataset) -> dict[str, Any]:
    """What the shared tokenizer and rows depend on: the same for every seed of the family."""
    return {"dataset": dataset.name, "source": dataset.source, "content_hash": dataset.content_hash,
            "vocab_size": config.vocab_size, "text_bytes": config.text_bytes,
            "heldout_fraction": config.heldout_fraction}


def recipe(config: TrainSeedsConfig, dataset: Dataset) -> dict[str, Any]:
    """Stored as training_runs.config (with the device each seed trained on); a reused seed must have
    been trained with this same recipe."""
    train = json.loads(json.dumps(asdict(config.train)))
    if not train["checkpoints"]:
        del train["checkpoints"]  # recipes stored before checkpoints existed stay equal
    return {"train": train, "data": data_settings(config, dataset)}


def run(config: TrainSeedsConfig, store: Store) -> list[SeedOutcome]:
    """Train (or reuse) every seed, register it and store its run and curve. Returns one outcome per seed."""
    _check_config(config)
    device = resolve_device(config.device)  # before any work: a device this machine lacks fails at once
    with store.session() as session:
        dataset = resolve_dataset(session, config.dataset)
    wanted = recipe(config, dataset)
    _check_family_settings(config, wanted["data"])
    done = _reusable_seeds(config, store, wanted)
    outcomes = {seed: _reuse(config, store, seed) for seed in done}
    pending = [seed for seed in config.seeds if seed not in done]
    if pending:
        outcomes.update(_train_pending(config, store, dataset, wanted, pending, device))
    return [outcomes[seed] for seed in config.seeds]


def _check_config(config: TrainSeedsConfig) -> None:
    if not config.family.strip():
        raise AtlasError("--family must not be empty")
    if not config.seeds:
        raise AtlasError("name at least one seed, e.g. --seeds 0 1 2")
    if len(set(config.seeds)) != len(config.seeds):
        raise AtlasError(f"seeds repeat in {list(config.seeds)}: name each seed once")
    if any(seed < 0 for seed in config.seeds):
        raise AtlasError(f"seeds must be non-negative integers, got {list(config.seeds)}")
    if config.text_bytes < 1:
        raise AtlasError(f"--text-bytes must be positive, got {config.text_bytes}")


def _check_family_settings(config: TrainSeedsConfig, settings: dict[str, Any]) -> None:
    """family.json pins the data settings: seeds of one family must share tokenizer and rows."""
    path = family_dir(config) / "family.json"
    if not path.exists():
        return
    stored = json.loads(path.read_text())
    differing = [f"{key} {stored.get(key)!r} (not {value!r})" for key, value in settings.items()
                 if stored.get(key) != value]
    if differing:
        raise AtlasError(f"family {config.family!r} in {family_dir(config)} was trained with "
                         f"{', '.join(differing)}: use another --family or --out")


def _reusable_seeds(config: TrainSeedsConfig, store: Store, wanted: dict[str, Any]) -> set[int]:
    """Seeds whose run is stored and whose model directory exists; a different recipe is an error."""
    with store.session() as session:
        runs = session.scalars(select(TrainingRun).where(
            TrainingRun.family == config.family, TrainingRun.seed.in_(config.seeds))).all()
    reusable = set()
    for stored in runs:
        if not _saved(Path(stored.out_dir), config.train.checkpoints):
            continue  # the directory (or a checkpoint) is gone: train the seed again
        if _comparable(stored.config) != _comparable(wanted):
            raise AtlasError(f"seed {stored.seed} of family {config.family!r} was trained with other settings "
                             f"({_difference(stored.config, wanted)}): use another --family")
        if stored.steps == config.train.steps:  # a seed a wall-clock cap cut short is trained again
            reusable.add(stored.seed)
    return reusable


def _comparable(recipe_: dict[str, Any]) -> dict[str, Any]:
    """The recipe without what is no setting of the family: the device a seed trained on and whether it had
    bf16 autocast natively, and a wall-clock cap, which left no trace in the model when it never stopped the
    run (the steps say whether it did)."""
    return {**{k: v for k, v in recipe_.items() if k not in ("device", "bf16_autocast")},
            "train": {k: v for k, v in recipe_.get("train", {}).items() if k != "max_seconds"}}


def _saved(directory: Path, checkpoints: tuple[int, ...]) -> bool:
    from atlas.training.train import checkpoint_dir

    return all((path / "config.json").exists() for path in [directory, *(checkpoint_dir(directory, step)
                                                                        for step in checkpoints)])


def _difference(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    pairs = [(f"{group}.{key}", stored.get(group, {}).get(key), value)
             for group, values in wanted.items() for key, value in values.items()]
    return ", ".join(f"{name} {old!r} now {new!r}" for name, old, new in pairs if old != new) or "config format"


def _reuse(config: TrainSeedsConfig, store: Store, seed: int) -> SeedOutcome:
    with store.session() as session:
        stored = session.scalars(select(TrainingRun).where(
            TrainingRun.family == config.family, TrainingRun.seed == seed)).one()
    model = _register_seed(config, store, seed, Path(stored.out_dir), stored.steps)
    if stored.model_id != model.id:
        with store.transaction() as session:
            session.get(TrainingRun, stored.id).model_id = model.id
    return SeedOutcome(seed, model.name, Path(stored.out_dir), True, stored.heldout_loss, stored.unigram_entropy)


def _train_pending(
    config: TrainSeedsConfig, store: Store, dataset: Dataset, wanted: dict[str, Any], seeds: list[int],
    device: torch.device,
) -> dict[int, SeedOutcome]:
    from atlas.training import prepare_corpus, train_seed, unigram_entropy
    from ingest.progress import progress_bar, RateColumn

    texts = read_texts(dataset, config.text_bytes)
    _require_bytes_for_a_batch(config, dataset, texts)
    tokenizer, trained = _family_tokenizer(config, texts)
    corpus = prepare_corpus(texts, tokenizer, config.train.ctx, config.heldout_fraction)
    _require_rows_for_a_batch(config, dataset, corpus)
    _write_family(config, texts, tokenizer if trained else None, wanted["data"])  # only once the data suffices
    bar_entropy = unigram_entropy(corpus.train_rows, corpus.heldout_rows, len(tokenizer))
    outcomes = {}
    tokens_per_step = config.train.batch_size * config.train.ctx
    with progress_bar(RateColumn("tokens")) as progress:
        for seed in seeds:
            task = progress.add_task(f"{config.family} seed {seed}", total=config.train.steps * tokens_per_step)

            def report(step: int, _total: int, loss: float, task=task, seed=seed) -> None:
                progress.update(task, completed=step * tokens_per_step,
                                description=f"{config.family} seed {seed} loss {loss:.3f}")

            result = train_seed(config.train, seed, corpus.train_rows, corpus.heldout_rows,
                                seed_dir(config, seed), tokenizer, progress=report, device=device)
            progress.update(task, completed=config.train.steps * tokens_per_step)
            outcomes[seed] = _store_seed(config, store, wanted, result, bar_entropy)
    return outcomes


def read_texts(dataset: Dataset, max_bytes: int) -> list[str]:
    """The dataset's documents in source order, up to max_bytes of UTF-8 (the document that would pass it is left out)."""
    from atlas.data import iter_documents

    texts, total = [], 0
    for text in iter_documents(dataset.source, dataset.split, dataset.text_field):
        size = len(text.encode("utf-8", "surrogatepass"))
        if total + size > max_bytes:
            break
        texts.append(text)
        total += size
    if not texts:
        raise AtlasError(f"dataset {dataset.name!r} yields no document within --text-bytes {max_bytes}: raise it")
    return texts


def _require_bytes_for_a_batch(config: TrainSeedsConfig, dataset: Dataset, texts: list[str]) -> None:
    """Before the tokenizer is trained: below one batch, the texts' token upper bound means they surely
    cannot fill one."""
    from atlas.data import token_upper_bound

    needed = config.train.batch_size * config.train.ctx
    bound, _ = token_upper_bound(texts, enough=needed)
    if bound < needed:
        raise AtlasError(f"dataset {dataset.name!r} gives at most {bound:,} tokens within --text-bytes "
                         f"{config.text_bytes:,}, fewer than one batch of --batch-size {config.train.batch_size} x "
                         f"--ctx {config.train.ctx} = {needed:,} tokens: add text, or lower --batch-size or --ctx")


def _require_rows_for_a_batch(config: TrainSeedsConfig, dataset: Dataset, corpus: Any) -> None:
    """After tokenization, before any seed trains: the packed training rows fill at least one batch."""
    n_rows = len(corpus.train_rows)
    if n_rows < config.train.batch_size:
        raise AtlasError(f"dataset {dataset.name!r} tokenizes to {n_rows} training rows of --ctx {config.train.ctx} "
                         f"({n_rows * config.train.ctx:,} tokens), fewer than one batch of --batch-size "
                         f"{config.train.batch_size}: add text, or lower --batch-size or --ctx")


def _family_tokenizer(config: TrainSeedsConfig, texts: list[str]) -> tuple[Any, bool]:
    """The family's tokenizer and whether it was trained now (then it is saved by _write_family): loaded
    when an earlier run trained it, else trained on the training split."""
    from transformers import PreTrainedTokenizerFast

    from atlas.training import split_documents, train_bpe_tokenizer

    directory = family_dir(config) / "tokenizer"
    if (directory / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(directory)), False
    train_texts, _ = split_documents(texts, config.heldout_fraction)
    return train_bpe_tokenizer(train_texts, config.vocab_size, None), True


def _write_family(config: TrainSeedsConfig, texts: list[str], new_tokenizer: Any, settings: dict[str, Any]) -> None:
    """The held-out documents, and a newly trained tokenizer with the settings family.json pins."""
    from atlas.training import split_documents

    _write_heldout(config, split_documents(texts, config.heldout_fraction)[1])
    if new_tokenizer is not None:
        new_tokenizer.save_pretrained(str(family_dir(config) / "tokenizer"))
        (family_dir(config) / "family.json").write_text(json.dumps(settings, indent=1))


def _write_heldout(config: TrainSeedsConfig, heldout_texts: list[str]) -> None:
    path = heldout_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".jsonl.tmp")
    with staging.open("w", encoding="utf-8") as lines:
        for text in heldout_texts:
            lines.write(json.dumps({"text": text}) + "\n")
    staging.replace(path)


def _register_seed(config: TrainSeedsConfig, store: Store, seed: int, directory: Path, steps_done: int) -> Model:
    """The trained seed, and its checkpoints as models of the same family and seed at their steps (then
    the final model carries its step too, so that every step of the family lines up)."""
    from atlas.training.train import checkpoint_dir

    name = model_name(config.family, seed)
    for step in config.train.checkpoints:
        register_model(store, str(checkpoint_dir(directory, step)), family=config.family, seed=seed,
                       name=f"{name}-step{step}", step=step)
    final_step = steps_done if config.train.checkpoints else None
    model, _ = register_model(store, str(directory), family=config.family, seed=seed, name=name, step=final_step)
    return model


def checkpoint_steps(fractions: str, steps: int) -> tuple[int, ...]:
    """--checkpoints 0.1,0.25,0.5: the steps at those fractions of --steps (each at least 1, before the end)."""
    try:
        values = [float(part) for part in fractions.replace(",", " ").split()]
    except ValueError:
        raise AtlasError(f"--checkpoints takes fractions of --steps, e.g. 0.1,0.25,0.5; got {fractions!r}") from None
    if any(not 0 < value < 1 for value in values):
        raise AtlasError(f"--checkpoints fractions must lie strictly between 0 and 1 (the end is the model "
                         f"itself); got {fractions!r}")
    chosen = sorted({max(1, round(value * steps)) for value in values} - {steps})
    return tuple(chosen)


def _store_seed(
    config: TrainSeedsConfig, store: Store, wanted: dict[str, Any], result: TrainResult, bar_entropy: float
) -> SeedOutcome:
    directory = seed_dir(config, result.seed)
    model = _register_seed(config, store, result.seed, directory, result.steps_done)
    run_row = TrainingRun(
        family=config.family, seed=result.seed, model_id=model.id, out_dir=str(directory),
        config={**wanted, "device": result.device, "bf16_autocast": result.bf16_autocast},
        steps=result.steps_done, tokens_seen=result.steps_done * config.train.batch_size * config.train.ctx,
        train_loss=result.final_train_loss, heldout_loss=result.heldout_loss, unigram_entropy=bar_entropy,
        seconds=result.seconds,
    )
    with store.transaction() as session:
        session.execute(delete(TrainingRun).where(TrainingRun.family == config.family,
                                                  TrainingRun.seed == result.seed))
        session.add(run_row)
        session.flush()
        session.add_all(TrainingCurve(run_id=run_row.id, step=step, train_loss=train_loss, heldout_loss=heldout)
                        for step, train_loss, heldout in result.curve)
    if result.hit_time_cap:
        log.warning(f"seed {result.seed} stopped at the --max-seconds cap after "
                    f"{result.steps_done} of {config.train.steps} steps")
    return SeedOutcome(result.seed, model.name, directory, False, result.heldout_loss, bar_entropy)
