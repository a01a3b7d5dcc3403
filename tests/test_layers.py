"""The layers, read from the sources: the library core (atlas/ but its CLI) imports neither the jobs
(ingest/) nor the app (app/), and the store does not import the migrations, which import the store."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names (relative imports resolved inside atlas/)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the atlas package, never ingest/app/migrations
                names.add("atlas." + (node.module or ""))
            else:
                names.add(node.module or "")
    return names


def offenders(folder: str, forbidden: tuple[str, ...], *, besides: tuple[str, ...] = ()) -> dict[str, set[str]]:
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative in besides:
            continue
        bad = {name for name in imported_modules(path) if name.split(".")[0] in forbidden}
        if bad:
            found[relative] = bad
    return found


def test_library_core_imports_neither_jobs_nor_app():
    assert offenders("atlas", ("ingest", "app"), besides=("atlas/cli.py",)) == {}


def test_store_does_not_import_the_migrations():
    assert offenders("atlas/store", ("migrations",)) == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "late.py"
    source.write_text("def f():\n    import migrations\n    from ingest.runner import run_unit\n")
    assert imported_modules(source) == {"migrations", "ingest.runner"}
