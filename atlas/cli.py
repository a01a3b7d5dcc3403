"""The `atlas` command. Parses options, calls the library or a job, prints; errors are one line."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Callable, Generic, Optional, TypeVar

import click
import typer
import tyro
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from atlas.errors import AtlasError, first_line

app = typer.Typer(help="Neuron Atlas: an atlas of the MLP neurons of causal language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="Create and migrate the atlas database.", no_args_is_help=True)
model_app = typer.Typer(help="Register, list and remove models.", no_args_is_help=True)


class IngestGroup(TyperGroup):
    """`atlas ingest`: the jobs (and torch with them) are imported when the group's commands are first looked
    at, so that `atlas --help` and `atlas app` start without them."""

    _jobs_loaded = False

    @property
    def commands(self) -> dict[str, click.Command]:
        if not self._jobs_loaded:
            self._jobs_loaded = True
            self._commands.update(typer.main.get_group(_jobs_app()).commands)
        return self._commands

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        self._commands = value


ingest_app = typer.Typer(cls=IngestGroup, help="Batch jobs that compute results into the database.",
                         no_args_is_help=True)
dataset_app = typer.Typer(help="Register and list token datasets.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
app.add_typer(dataset_app, name="dataset")
app.add_typer(ingest_app, name="ingest")

# Piped output (scripts, tests) gets wide tables instead of truncated cells.
out = Console(width=None if sys.stdout.isatty() else 250)
DB_HELP = "Database URL (sqlite:///file.db or postgresql://user@host/db). Default: $ATLAS_DATABASE_URL, else sqlite:///atlas.db."
DbOption = typer.Option(None, "--db", help=DB_HELP, show_default=False)


_store_url: str | None = None  # the database last opened, named by main()'s one-line database error


def open_store(db: str | None, **kwargs):
    from atlas.store import Store, resolve_url

    global _store_url
    _store_url = resolve_url(db)
    return Store(_store_url, **kwargs)


# --- options of every command: verbosity and --version -------------------------------------------


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each message: under a live progress bar rich has swapped it for a
    proxy that prints above the bar (and a test runner may have swapped it too)."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def configure_logging(level: int) -> None:
    """One handler on stderr for the atlas and ingest loggers' progress; other libraries warn as usual."""
    root = logging.getLogger()
    if not any(isinstance(handler, StderrHandler) for handler in root.handlers):  # once per process
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    for name in ("atlas", "ingest"):
        logging.getLogger(name).setLevel(level)
    if level > logging.INFO:  # -q hides the Hugging Face libraries' download and loading bars too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _versions() -> str:
    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    from atlas import __version__

    return f"atlas {__version__} (torch {of('torch')}, transformers {of('transformers')})"


def _print_version(value: bool) -> None:
    if value:
        out.print(_versions(), highlight=False)
        raise typer.Exit()


@app.callback()
def atlas_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print debug messages (claims, timings) on "
                                                                "stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print results only: no progress messages or bars "
                                                            "(warnings and errors still go to stderr)."),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the versions of atlas, torch and transformers, and exit."),
) -> None:
    """Results go to stdout; progress messages and bars to stderr."""
    if verbose and quiet:
        raise AtlasError("-v/--verbose and -q/--quiet contradict each other: pass one of them")
    configure_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


# --- db ------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision."), db: Optional[str] = DbOption) -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    store = open_store(db, check=False)
    store.upgrade(revision)
    out.print(f"{store.display_url} is at revision {store.current_revision()}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision ('base' drops every table)."),
                 db: Optional[str] = DbOption) -> None:
    """Revert migrations down to REVISION."""
    store = open_store(db, check=False)
    store.downgrade(revision)
    out.print(f"{store.display_url} is at revision {store.current_revision() or 'base'}")


@db_app.command("current")
def db_current(db: Optional[str] = DbOption) -> None:
    """Show the database's revision and the revision this atlas needs."""
    from atlas.store.db import head_revision

    store = open_store(db, check=False)
    out.print(f"{store.display_url}: at {store.current_revision() or 'base'}, head is {head_revision()}")


@db_app.command("create-reader")
def db_create_reader(
    db: Optional[str] = typer.Option(None, "--db", help="ADMIN URL of the atlas database (a superuser), e.g. "
                                     "postgresql://postgres@HOST/atlas. Default: $ATLAS_DATABASE_URL.",
                                     show_default=False),
    role: str = typer.Option("atlas_reader", "--role", help="Name of the read-only role the SQL console connects as."),
    password: Optional[str] = typer.Option(None, "--password", envvar="ATLAS_READER_PASSWORD", show_default=False,
                                           help="Password of the role (default: $ATLAS_READER_PASSWORD; none for "
                                                "trust or peer authentication)."),
    timeout: int = typer.Option(60, "--timeout", help="The role's default statement timeout in seconds (the console "
                                                      "sets a shorter one per query)."),
) -> None:
    """Create or update the PostgreSQL role the SQL console connects as: SELECT on the atlas only (idempotent)."""
    from atlas.store.read_only import create_reader

    store = open_store(db, check=False)
    for line in create_reader(store.engine, role, password, timeout):
        out.print(line)
    out.print(f"the app's SQL console connects as {role}; set ATLAS_READER_URL if it must use another URL")


# --- models --------------------------------------------------------------------------------------


@model_app.command("add")
def model_add(
    source: str = typer.Argument(..., help="Hugging Face hub id (e.g. EleutherAI/pythia-160m) or a local directory."),
    family: str = typer.Option(..., "--family", help="Family: models that differ only by training seed."),
    seed: int = typer.Option(..., "--seed", help="The model's training seed within its family."),
    name: Optional[str] = typer.Option(None, "--name", help="Unique name (default: hub id or folder name)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    step: Optional[int] = typer.Option(None, "--step", show_default=False,
                                       help="Training step of this checkpoint (default: N of a stepN revision, as "
                                            "Pythia names them). Seeds at the same step are correlated together."),
    db: Optional[str] = DbOption,
) -> None:
    """Register a model: reads its config and tokenizer and hashes its weight files tensor by tensor
    (the model itself is never loaded)."""
    from atlas.registry import register_model

    model, created = register_model(open_store(db), source, family=family, seed=seed, name=name, revision=revision,
                                    step=step)
    verb = "registered" if created else "already registered"
    at = "" if model.step is None else f", step {model.step}"
    out.print(f"{verb} {model.name}: {model.architecture}, {model.n_layers} layers x {model.d_mlp} neurons "
              f"(family {model.family}, seed {model.seed}{at})")


@model_app.command("list")
def model_list(family: Optional[str] = typer.Option(None, "--family", help="Only this family."),
               db: Optional[str] = DbOption) -> None:
    """List registered models."""
    from atlas.registry import list_models

    with open_store(db).session() as session:
        models = list_models(session, family)
    table = Table("name", "family", "seed", "step", "architecture", "layers", "d_model", "d_mlp", "vocab", "source")
    for m in models:
        table.add_row(m.name, m.family, str(m.seed), "-" if m.step is None else str(m.step), m.architecture,
                      str(m.n_layers), str(m.d_model), str(m.d_mlp), str(m.vocab_size), m.source)
    out.print(table if models else "no models registered: run `atlas model add SOURCE --family F --seed S`")


@model_app.command("remove")
def model_remove(
    name: str = typer.Argument(..., help="Name of the registered model (see `atlas model list`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking for confirmation."),
    db: Optional[str] = DbOption,
) -> None:
    """Remove a model and every row about it (jobs, results, correlations with it) in one transaction."""
    from atlas.registry import remove_model

    store = open_store(db)
    if not yes and not typer.confirm(f"remove model {name} and all its results from {store.display_url}?"):
        out.print("nothing removed")
        raise typer.Exit(1)
    model, deleted = remove_model(store, name)
    rows = ", ".join(f"{count:,} {table}" for table, count in deleted.items()) or "no result rows"
    out.print(f"removed {model.name} (family {model.family}, seed {model.seed}): {rows}")


# --- datasets ------------------------------------------------------------------------------------


@dataset_app.command("add")
def dataset_add(
    name: str = typer.Argument(..., help="Unique dataset name, used as --dataset by the jobs."),
    source: str = typer.Option(..., "--source", help="builtin:docstrings, a .txt/.jsonl/.parquet file or folder, "
                                                     "or a Hugging Face dataset id (owner/name[:config])."),
    split: str = typer.Option("train", "--split", help="Split of a Hugging Face dataset."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text (.jsonl, .parquet, hub)."),
    tokens: int = typer.Option(200_000, "--tokens", help="Tokens to sample (BOS included)."),
    ctx: int = typer.Option(128, "--ctx", help="Context length: documents are cut to it (counted)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the document shuffle."),
    revision: Optional[str] = typer.Option(None, "--revision", show_default=False,
                                           help="Revision (branch, tag or commit) of a Hugging Face dataset; the "
                                                "commit it resolves to is recorded with every job's results."),
    db: Optional[str] = DbOption,
) -> None:
    """Register a text source and how it is sampled (reads its first document to check it)."""
    from atlas.registry import register_dataset

    dataset, created = register_dataset(open_store(db), name, source, split, text_field, tokens, ctx, seed,
                                        revision=revision)
    verb = "registered" if created else "already registered"
    resolved = f", revision {dataset.resolved_revision[:19]}" if dataset.resolved_revision else ""
    out.print(f"{verb} dataset {dataset.name}: {dataset.source} ({dataset.n_tokens:,} tokens, ctx {dataset.ctx_len}, "
              f"seed {dataset.sample_seed}{resolved})")


@dataset_app.command("list")
def dataset_list(db: Optional[str] = DbOption) -> None:
    """List registered datasets."""
    from atlas.registry import dataset_token_counts, list_datasets

    with open_store(db).session() as session:
        datasets = list_datasets(session)
        counts = dataset_token_counts(session)
    table = Table("name", "source", "split", "text field", "tokens", "ctx", "seed", "content hash")
    for d in datasets:
        table.add_row(d.name, d.source, d.split, d.text_field, _token_counts(d, counts.get(d.id, [])), str(d.ctx_len),
                      str(d.sample_seed), d.content_hash[:12])
    out.print(table if datasets else "no datasets registered: run `atlas dataset add NAME --source SRC`")


def _token_counts(dataset: Any, tokenized: list[Any]) -> str:
    """The requested count beside what jobs really got under each tokenizer (a small source gives fewer)."""
    real = [f"{row.n_tokens:,} with tokenizer {row.tokenizer_hash[:8]}" for row in tokenized]
    return "; ".join([f"{dataset.n_tokens:,} requested", *real])


# --- ingest jobs: tyro parses each job's config dataclass ---------------------------------------

C = TypeVar("C")


@dataclasses.dataclass
class JobArguments(Generic[C]):
    """A job's config fields as options (help from their docstrings), and --db."""

    config: Annotated[C, tyro.conf.OmitArgPrefixes, tyro.conf.arg(name="")]
    db: Annotated[Optional[str], tyro.conf.arg(help=DB_HELP, metavar="URL", help_behavior_hint="")] = None


def add_job_command(jobs_app: typer.Typer, name: str, config_cls: type, run: Callable[[Any, Any], None],
                    group: str = "ingest") -> None:
    """`atlas GROUP NAME`: typer passes the raw arguments (--help included) on to tyro."""
    description = inspect.cleandoc(config_cls.__doc__ or "")

    @jobs_app.command(name, help=" ".join(description.split()), add_help_option=False,
                      context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def command(ctx: typer.Context) -> None:
        arguments = tyro.cli(JobArguments[config_cls], args=ctx.args, prog=f"atlas {group} {name}",
                             description=description)
        run(arguments.config, open_store(arguments.db))


def _jobs_app() -> typer.Typer:
    from ingest import JOBS

    jobs_app = typer.Typer()
    for name, (config_cls, run) in JOBS.items():
        add_job_command(jobs_app, name, config_cls, run)
    return jobs_app


class StudyGroup(TyperGroup):
    """`atlas study`: the studies (and torch) are imported when the group's commands are first looked at."""

    _studies_loaded = False

    @property
    def commands(self) -> dict[str, click.Command]:
        if not self._studies_loaded:
            self._studies_loaded = True
            from ingest.studies import STUDIES

            studies_app = typer.Typer()
            for name, (config_cls, run) in STUDIES.items():
                add_job_command(studies_app, name, config_cls, run, group="study")
            self._commands.update(typer.main.get_group(studies_app).commands)
        return self._commands

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        self._commands = value


study_app = typer.Typer(cls=StudyGroup, help="Case studies that compute results into the database (like the "
                        "ingest jobs, through the jobs ledger).", no_args_is_help=True)
app.add_typer(study_app, name="study")


# --- seed families and the demo ------------------------------------------------------------------


def parse_seeds(first: str, extra: list[str]) -> tuple[int, ...]:
    """`--seeds 0 1 2` (the values after the first arrive as extra arguments) or `--seeds 0,1,2`."""
    words = [word for item in [first, *extra] for word in item.replace(",", " ").split()]
    try:
        return tuple(int(word) for word in words)
    except ValueError:
        raise AtlasError(f"--seeds takes integers, e.g. --seeds 0 1 2; got {' '.join(words)!r}") from None


@app.command("train-seeds", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_seeds(
    ctx: typer.Context,
    family: str = typer.Option(..., "--family", help="Family name; models are registered as FAMILY-seedS."),
    seeds: str = typer.Option("0 1 2", "--seeds", help="Training seeds: --seeds 0 1 2 or --seeds 0,1,2."),
    dataset: str = typer.Option(..., "--dataset", help="Registered dataset whose texts are trained on."),
    layers: int = typer.Option(2, "--layers", help="Transformer blocks per model."),
    d_model: int = typer.Option(128, "--d-model", help="Residual stream width."),
    d_mlp: int = typer.Option(512, "--d-mlp", help="MLP neurons per layer (not tied to 4 x d-model)."),
    n_heads: int = typer.Option(4, "--heads", help="Attention heads per block."),
    ctx_len: int = typer.Option(128, "--ctx", help="Training context length (documents are packed)."),
    steps: int = typer.Option(1000, "--steps", help="Optimizer steps per seed (warmup, then cosine decay)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Rows of --ctx tokens per optimizer step."),
    lr: float = typer.Option(3e-3, "--lr", help="Peak AdamW learning rate."),
    max_seconds: Optional[float] = typer.Option(0.0, "--max-seconds",
                                                help="Wall-clock cap per seed; 0 (the default) for none. A cap "
                                                     "stops seeds at different steps and makes runs irreproducible: "
                                                     "choose --steps from a measured rate instead."),
    checkpoints: str = typer.Option("", "--checkpoints",
                                    help="Also save and register each seed at these fractions of --steps, e.g. "
                                         "0.1,0.25,0.5: models FAMILY-seedS-stepN (the final model gets its step "
                                         "too); correlations compare seeds step by step (view "
                                         "universality_by_step)."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Size of the family's byte-level BPE."),
    text_bytes: int = typer.Option(16_000_000, "--text-bytes", help="Read the dataset's documents up to this many bytes."),
    out_dir: str = typer.Option("atlas-models", "--out", help="Folder for FAMILY/seed-S model directories."),
    device: str = typer.Option("auto", "--device",
                               help="Torch device to train on: auto (cuda if available, else mps, else cpu), cpu, "
                                    "cuda, cuda:N or mps. On the CPU a seed repeats bit for bit; on a GPU it trains "
                                    "faster but need not. Recorded with each training run."),
    db: Optional[str] = DbOption,
) -> None:
    """Train one GPT-2 per seed on a registered dataset (shared tokenizer), register them, store the curves."""
    from atlas.training import TrainConfig
    from ingest.train_seeds import TrainSeedsConfig, checkpoint_steps, run

    train = TrainConfig(layers=layers, d_model=d_model, d_mlp=d_mlp, n_heads=n_heads, ctx=ctx_len, steps=steps,
                        batch_size=batch_size, lr=lr, max_seconds=max_seconds or None,
                        checkpoints=checkpoint_steps(checkpoints, steps) if checkpoints.strip() else ())
    config = TrainSeedsConfig(family=family, dataset=dataset, seeds=parse_seeds(seeds, ctx.args), train=train,
                              vocab_size=vocab_size, text_bytes=text_bytes, out=out_dir, device=device)
    for outcome in run(config, open_store(db)):
        verb = "reused" if outcome.reused else "trained"
        bar = f" (unigram entropy {outcome.unigram_entropy:.3f})" if outcome.unigram_entropy is not None else ""
        out.print(f"{verb} {outcome.model_name}: held-out loss {outcome.heldout_loss:.3f}{bar}, {outcome.model_dir}")


@app.command("demo")
def demo(
    db: Optional[str] = DbOption,
    out_dir: str = typer.Option("atlas-models", "--out", help="Folder for the trained models."),
    preset: str = typer.Option("default", "--preset",
                               help="default: ~8 min on 2 CPU cores; quick: ~3 min, shows less; long: ~1 hour, "
                                    "6.7x the training with checkpoints at 10/25/50% (universality over training). "
                                    "Each preset is its own family, so they do not overwrite each other."),
    quick: bool = typer.Option(False, "--quick", help="Same as --preset quick."),
    device: str = typer.Option("auto", "--device",
                               help="Torch device for the training and the ingest jobs: auto (cuda if available, "
                                    "else mps, else cpu), cpu, cuda, cuda:N or mps. The --preset times are the CPU's."),
) -> None:
    """Train a 3-seed family on builtin:docstrings, run every ingest job, print a summary (<= 10 min on 2 cores)."""
    from ingest.demo import DemoConfig, preset_config, run

    config = preset_config("quick" if quick else preset, DemoConfig(out=out_dir, device=device))
    run(config, open_store(db), console=out)


# --- the jobs ledger -----------------------------------------------------------------------------


@app.command("jobs")
def jobs(
    status: Optional[str] = typer.Option(None, "--status", help="Only jobs in this state: running, done, failed, "
                                                                "replaced or abandoned."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only jobs of this kind (weights, activations, "
                                                            "correlations, ...)."),
    limit: int = typer.Option(50, "--limit", min=1, help="Show at most this many jobs, newest first."),
    db: Optional[str] = DbOption,
) -> None:
    """List the jobs ledger, newest first; a running job whose process or heartbeat stopped shows as stale."""
    import pandas as pd

    from atlas.read.queries import jobs as ledger

    frame = ledger(open_store(db).engine, limit=limit, status=status, kind=kind)
    for column in ("heartbeat_at", "started_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="mixed")
    table = Table("id", "kind", "model", "dataset", "other model", "shard", "status", "pid@host", "heartbeat",
                  "started (UTC)", "duration", "rows", "error")
    for row in frame.to_dict("records"):
        table.add_row(*_job_cells({name: None if _is_missing(value) else value for name, value in row.items()}))
    out.print(table if len(frame) else "no jobs match: `atlas jobs` without options lists them all")


def _is_missing(value: Any) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, (list, dict)) and bool(pd.isna(value)))


def _job_cells(job: dict[str, Any]) -> list[str]:
    """One ledger row as table cells; a running claim whose process or heartbeat stopped reads as stale."""
    from ingest.runner import claim_problem, seconds_since

    pid = None if job["pid"] is None else int(job["pid"])
    heartbeat = None if job["heartbeat_at"] is None else job["heartbeat_at"].to_pydatetime()
    running = job["status"] == "running"
    status = "stale (abandoned?)" if running and claim_problem(pid, job["host"], heartbeat) else job["status"]
    # The last beat says whether a claim is alive (running) or when it stopped (abandoned).
    beat = heartbeat is not None and job["status"] in ("running", "abandoned")
    duration = seconds_since(job["started_at"].to_pydatetime()) if running else job["duration_s"]
    error = (job["error"] or "").strip().splitlines()
    return [str(job["id"]), job["kind"], *(job[name] or "" for name in ("model", "dataset", "other_model", "shard")),
            status, "" if pid is None else f"{pid}@{job['host']}",
            f"{_span(seconds_since(heartbeat))} ago" if beat else "",
            job["started_at"].strftime("%Y-%m-%d %H:%M:%S"), "" if duration is None else _span(duration),
            "" if job["n_rows"] is None else f"{int(job['n_rows']):,}", error[0][:120] if error else ""]


def _span(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --- export --------------------------------------------------------------------------------------

EXPORT_FORMATS = ("parquet", "csv", "jsonl", "neuronpedia")


@app.command("export")
def export(
    query_or_table: str = typer.Argument(..., help="A table or view (e.g. neuron_atlas, top_examples) or one "
                                                   "SELECT in quotes; with --format neuronpedia: neurons."),
    fmt: str = typer.Option(..., "--format", help="parquet (column types kept), csv or jsonl; or neuronpedia: one "
                                                  "JSON per neuron of --model in Neuronpedia's shape."),
    out_path: str = typer.Option(..., "--out", help="The file to write; for neuronpedia a new folder "
                                                    "(LAYER/NEURON.json) or a .jsonl file (one line per neuron)."),
    model: Optional[str] = typer.Option(None, "--model", help="neuronpedia: the model whose neurons are exported."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="neuronpedia: the dataset of the top examples "
                                                                  "(default: the model's only one)."),
    batch_rows: int = typer.Option(10_000, "--batch-rows", help="Rows fetched and written at a time; memory holds "
                                                                "one batch, whatever the size of the result."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds the query may run (on PostgreSQL, each "
                                                            "fetch of a batch)."),
    db: Optional[str] = DbOption,
) -> None:
    """Export a table, view or SELECT in batches (read-only, as the SQL console reads), or a model's neurons
    for Neuronpedia. A failed export leaves no file behind."""
    from atlas.read.export import check_format, export_query
    from atlas.store.read_only import console_engine

    check_format(fmt, EXPORT_FORMATS)
    neuronpedia = fmt == "neuronpedia"
    _check_export_options(query_or_table, neuronpedia, model, dataset)
    engine = console_engine(open_store(db).url)
    try:
        if neuronpedia:
            from atlas.read.neuronpedia import export_neuronpedia

            count, used = export_neuronpedia(engine, model, out_path, dataset, batch_rows, timeout)
            out.print(f"wrote {count:,} neurons of {model} (top examples from {used or 'no dataset'}) to {out_path}")
        else:
            result = export_query(engine, query_or_table, fmt, out_path, batch_rows, timeout)
            out.print(f"wrote {result.rows:,} rows in {result.batches:,} batches to {result.path}")
    finally:
        engine.dispose()


def _check_export_options(source: str, neuronpedia: bool, model: str | None, dataset: str | None) -> None:
    if neuronpedia and (source != "neurons" or model is None):
        raise AtlasError("--format neuronpedia exports neurons of one model: atlas export neurons --format "
                         "neuronpedia --model NAME --out DIR")
    if not neuronpedia and (model is not None or dataset is not None):
        raise AtlasError("--model and --dataset go with --format neuronpedia; filter a table with a SELECT instead")


# --- report --------------------------------------------------------------------------------------


@app.command("report")
def report(
    family: str = typer.Option(..., "--family", help="The family (its seeds) whose figures are written."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="The dataset of the layer and correlation "
                                                                  "results (default: the family's only one)."),
    out_dir: str = typer.Option(..., "--out", help="The folder to write into (created if missing)."),
    fmt: str = typer.Option("both", "--format", help="png, html or both."),
    db: Optional[str] = DbOption,
) -> None:
    """Write a family's figures for a paper or a notebook: the four-stage profile (Stages of Inference, Figure
    1) and the universal-neuron figures (class counts by depth, universal fraction by layer, max-correlation
    histograms), as PNG and/or HTML, each with a CSV of its numbers."""
    from app.report import write_report

    for path in write_report(open_store(db).engine, family, dataset, out_dir, fmt):
        out.print(str(path), highlight=False, soft_wrap=True)


# --- app -----------------------------------------------------------------------------------------


STREAMLIT_PREFIXES = ("--server.", "--theme.", "--browser.")  # Streamlit's options that `atlas app` passes on


@app.command("app", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_app(ctx: typer.Context,
            db: Optional[str] = DbOption,
            port: str = typer.Option("8501", "--port", metavar="PORT", help="Port to serve the app on."),
            address: Optional[str] = typer.Option(None, "--address", show_default=False, metavar="ADDRESS",
                                                  help="Address to serve the app on (default: every interface, "
                                                       "as Streamlit does), e.g. 127.0.0.1 for this machine only."),
            reader_db: Optional[str] = typer.Option(
                None, "--reader-db", envvar="ATLAS_READER_URL", show_default=False,
                help="PostgreSQL URL the SQL console connects with (default: the --db URL as user atlas_reader, "
                     "password $ATLAS_READER_PASSWORD). Made by `atlas db create-reader`.")) -> None:
    """Open the atlas app (Streamlit) on the database. Streamlit's own --server.*, --theme.* and --browser.*
    options after the command are passed on (e.g. --server.baseUrlPath atlas --theme.base dark)."""
    from sqlalchemy.engine import make_url

    port_number = _port(port)
    passthrough = _streamlit_options(ctx.args)
    store = open_store(db)  # fail here, in one line, if the database is missing or not migrated
    url = _store_url
    store.dispose()
    env = {**os.environ, "ATLAS_DATABASE_URL": url, **({"ATLAS_READER_URL": reader_db} if reader_db else {})}
    shown = make_url(url).render_as_string(hide_password=True)
    out.print(f"Neuron Atlas app on http://{address or 'localhost'}:{port_number} (database {shown})",
              highlight=False, soft_wrap=True)
    argv = streamlit_argv(url, port_number, address, passthrough)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # this process becomes the server: a signal to it stops the app


def streamlit_argv(url: str, port: int, address: str | None, passthrough: list[str]) -> list[str]:
    """`python -m streamlit run app/main.py` with our options first, so that passed-on ones win."""
    main_py = Path(__file__).resolve().parent.parent / "app" / "main.py"
    ours = ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if address:
        ours += ["--server.address", address]
    return [sys.executable, "-m", "streamlit", "run", str(main_py), *ours, *passthrough, "--", "--db", url]


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise AtlasError(f"--port {value!r}: give a port number from 1 to 65535")
    return port


def _streamlit_options(args: list[str]) -> list[str]:
    """Extra arguments: Streamlit options as `--server.x VALUE` or `--server.x=VALUE`, nothing else."""
    options, rest = [], list(args)
    while rest:
        word = rest.pop(0)
        if not word.startswith(STREAMLIT_PREFIXES):
            raise AtlasError(f"atlas app: unknown argument {word!r}; it takes --db, --port, --address, --reader-db "
                             f"and Streamlit's {', '.join(p + '*' for p in STREAMLIT_PREFIXES)} options")
        if "=" in word:
            options.append(word)
        elif rest and not rest[0].startswith("--"):
            options += [word, rest.pop(0)]
        else:
            raise AtlasError(f"atlas app: {word} needs a value, e.g. {word} VALUE or {word}=VALUE")
    return options


def main() -> None:
    """Entry point: one-line errors and a non-zero exit code for anything a user can cause."""
    try:
        app()
    except AtlasError as error:
        Console(stderr=True).print(f"[red]error:[/] {error}", soft_wrap=True, highlight=False)
        sys.exit(1)
    except _database_errors() as error:  # the database went away (or refused) mid-command: no traceback
        Console(stderr=True).print(f"[red]error:[/] {escape(_database_error_line(error))}", soft_wrap=True,
                                   highlight=False)
        sys.exit(1)


def _database_errors() -> tuple[type[BaseException], ...]:
    """SQLAlchemy's wrapped driver errors, and the drivers' own should one escape unwrapped."""
    import sqlite3

    import psycopg
    from sqlalchemy.exc import DBAPIError

    return DBAPIError, sqlite3.OperationalError, psycopg.OperationalError


def _database_error_line(error: BaseException) -> str:
    from sqlalchemy.engine import make_url

    from atlas.store.db import SQLITE_BUSY_TIMEOUT_S

    reason = first_line(getattr(error, "orig", None) or error)
    where = "the database"
    if _store_url is not None:
        where += f" at {make_url(_store_url).render_as_string(hide_password=True)}"
    resume = "rerun the job (finished units are kept, unfinished ones resume)"
    if "database is locked" in reason:
        return (f"database error: {reason}: another process held the write lock of {where} for over "
                f"{SQLITE_BUSY_TIMEOUT_S:.0f}s; {resume}")
    return f"database error: {reason}: check that {where} is reachable, then {resume}"


if __name__ == "__main__":
    main()
