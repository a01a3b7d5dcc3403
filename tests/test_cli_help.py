"""Every command and every option of `atlas` explains itself in --help."""

from __future__ import annotations

import click
import typer

from atlas.cli import app


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
    from ingest import JOBS

    ingest = typer.main.get_command(app).commands["ingest"]
    assert set(JOBS) <= set(ingest.commands)
