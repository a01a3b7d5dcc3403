"""Every command and every option of `atlas` explains itself in --help."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

import click
import pytest
import typer
from typer.testing import CliRunner
from typing_extensions import Doc

from atlas.cli import app
from ingest import JOBS


def walk(command: click.Command, path: str = "atlas"):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, f"{path} {name}")


def test_every_command_and_option_has_help():
    missing = []
    for path, command in walk(typer.main.get_command(app)):
        if not (command.help or command.short_help):
            missing.append(path)
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help" and not param.help:
                missing.append(f"{path} {param.opts[0]}")
    assert not missing, f"without help text: {missing}"


def test_every_ingest_job_is_a_command():
    ingest = typer.main.get_command(app).commands["ingest"]
    assert set(JOBS) <= set(ingest.commands)


def declared_help(config_cls: type) -> dict[str, str | None]:
    """Each field's help as its job declares it: the docstring under the field, or the Doc in its type."""
    helps: dict[str, str | None] = {}
    for cls in reversed(config_cls.__mro__):  # a subclass's docstring wins
        if not dataclasses.is_dataclass(cls):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for field, after in zip(body, body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                helps[field.target.id] = inspect.cleandoc(after.value.value)
    hints = typing.get_type_hints(config_cls, include_extras=True)
    for field in dataclasses.fields(config_cls):
        docs = [meta.documentation for meta in getattr(hints[field.name], "__metadata__", ()) if isinstance(meta, Doc)]
        helps.setdefault(field.name, docs[0] if docs else None)
    return helps


def words(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_help_lists_every_config_field_with_its_help(job):
    config_cls, _ = JOBS[job]
    result = CliRunner().invoke(app, ["ingest", job, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    shown = words(result.output)
    assert words(inspect.cleandoc(config_cls.__doc__)) in shown and "--db URL" in shown
    for name, help_text in declared_help(config_cls).items():
        assert help_text, f"{job}: field {name} has no help text"
        flag = "--" + name.replace("_", "-")
        assert f" {flag}" in shown and words(help_text) in shown, f"{job}: {flag} or its help is missing"
