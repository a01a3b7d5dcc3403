"""The `builtin:docstrings` corpus: docstrings of the standard library and installed packages.

It ships with every machine that runs the atlas, so demos and tests work offline.

Order (deterministic): the standard library first, then the interpreter's site-packages, so a
small byte cap gives standard-library prose. Within a root, .py files in sorted relative-path
order; within a file, module, class and function docstrings in source order. Each docstring is
cleaned with inspect.cleandoc (via ast.get_docstring), docstrings shorter than `min_chars` are
skipped, and repeats of an earlier docstring are dropped (first occurrence wins). Test folders
and test files are skipped; files that fail to parse are counted. Collection stops at the first
docstring that would take the total past `max_bytes` (UTF-8), so most files are never read under
a small cap. The result is cached on disk, keyed by the Python version, the installed
distributions and their versions, and the collection options.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from atlas.data.cache import cache_dir, stable_hash

MIN_DOCSTRING_CHARS = 32
CACHE_FORMAT_VERSION = 1
TEST_DIR_NAMES = frozenset({"test", "tests", "testing", "idle_test", "__pycache__"})
# Packages nested in the stdlib folder are walked as site-packages, not twice.
NESTED_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages"})
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass
class DocstringStats:
    n_files: int = 0                # .py files read
    n_parse_failures: int = 0       # files that are not valid Python 3.x source
    n_docstrings: int = 0           # docstrings kept
    n_skipped_short: int = 0        # empty or shorter than min_chars
    n_duplicates: int = 0           # identical to an earlier kept docstring
    n_skipped_unencodable: int = 0  # lone surrogates: not valid UTF-8, tokenizers reject them
    n_bytes: int = 0                # UTF-8 bytes of the kept docstrings
    reached_cap: bool = False       # True if collection stopped at max_bytes


@dataclass
class DocstringCorpus:
    documents: list[str]
    stats: DocstringStats
    key: str                        # cache key: identifies this exact corpus
    from_cache: bool = field(default=False)


def source_roots() -> list[Path]:
    """The standard library, then each distinct site-packages folder of the running interpreter."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    for name in ("purelib", "platlib"):
        root = Path(paths[name])
        if root.is_dir() and root not in roots:
            roots.append(root)
    return roots


def corpus_key(max_bytes: int | None, min_chars: int = MIN_DOCSTRING_CHARS) -> str:
    """Python version + installed distributions and versions + collection options."""
    distributions = sorted(
        f"{dist.metadata['Name']}=={dist.version}" for dist in importlib.metadata.distributions()
    )
    return stable_hash({
        "format": CACHE_FORMAT_VERSION,
        "python": sys.version,
        "distributions": distributions,
        "max_bytes": max_bytes,
        "min_chars": min_chars,
    })


def collect_docstrings(
    max_bytes: int | None = None,
    min_chars: int = MIN_DOCSTRING_CHARS,
    use_cache: bool = True,
) -> DocstringCorpus:
    """The corpus (from the cache when present; collected and cached otherwise)."""
    key = corpus_key(max_bytes, min_chars)
    path = cache_dir("docstrings") / f"docstrings-{key}.jsonl"
    if use_cache and path.exists():
        documents, stats = _read_cache(path)
        return DocstringCorpus(documents, stats, key, from_cache=True)
    stats = DocstringStats()
    documents = list(_collect(source_roots(), max_bytes, min_chars, stats))
    if use_cache:
        _write_cache(path, documents, stats)
    return DocstringCorpus(documents, stats, key)


def _collect(
    roots: list[Path], max_bytes: int | None, min_chars: int, stats: DocstringStats
) -> Iterator[str]:
    seen: set[bytes] = set()
    for path in (file for root in roots for file in python_files(root)):
        for text in file_docstrings(path, stats):
            if len(text) < min_chars:
                stats.n_skipped_short += 1
                continue
            try:
                encoded = text.encode("utf-8")
            except UnicodeEncodeError:
                stats.n_skipped_unencodable += 1
                continue
            digest = hashlib.sha1(encoded).digest()
            if digest in seen:
                stats.n_duplicates += 1
                continue
            if max_bytes is not None and stats.n_bytes + len(encoded) > max_bytes:
                stats.reached_cap = True
                return
            seen.add(digest)
            stats.n_docstrings += 1
            stats.n_bytes += len(encoded)
            yield text


def python_files(root: Path) -> list[Path]:
    """The non-test .py files under root, sorted by relative path."""
    files = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in TEST_DIR_NAMES and d not in NESTED_PACKAGE_DIRS]
        files.extend(Path(folder, name) for name in filenames if _is_source_file(name))
    return sorted(files, key=lambda file: file.relative_to(root).parts)


def _is_source_file(name: str) -> bool:
    if not name.endswith(".py"):
        return False
    return not (name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py")


def file_docstrings(path: Path, stats: DocstringStats) -> list[str]:
    """Module, class and function docstrings of one file in source order (cleaned)."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. in third-party code
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
        stats.n_parse_failures += 1
        return []
    stats.n_files += 1
    docstrings = []
    stack: list[ast.AST] = [tree]
    while stack:  # explicit pre-order walk: deep ASTs would overflow a recursive one
        node = stack.pop()
        if isinstance(node, DOCSTRING_NODES):
            docstrings.append(ast.get_docstring(node, clean=True) or "")
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return docstrings


def _write_cache(path: Path, documents: list[str], stats: DocstringStats) -> None:
    # Write to a temporary file and rename, so a reader never sees a half-written corpus.
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(json.dumps(asdict(stats)) + "\n")
        for text in documents:
            out.write(json.dumps(text) + "\n")
    os.replace(temporary, path)


def _read_cache(path: Path) -> tuple[list[str], DocstringStats]:
    with path.open(encoding="utf-8") as lines:
        stats = DocstringStats(**json.loads(next(lines)))
        return [json.loads(line) for line in lines], stats
