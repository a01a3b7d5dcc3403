"""Benchmark: the app's pages and the README's example queries on one SQLite atlas, from the server's side.

Times every page of the app with Streamlit's AppTest (the page's whole script: its queries, frames and
charts, as the server runs it for a visitor) and every SQL example of the README (each statement of its
```sql blocks, fetched in full), --repeat times each, and prints the first run, the median and the fastest.

Run it once per checkout of the code, each on an atlas built by that checkout's own jobs, to see whether
a change made a page or a query slower. The app, the atlas package and the README are read from --root,
so the same script times an older checkout (a git worktree) as well:

    python bench/sqlite_pages.py --db sqlite:///atlas.db
    git worktree add /tmp/atlas-before <commit>
    python bench/sqlite_pages.py --root /tmp/atlas-before --db sqlite:////tmp/before.db --json /tmp/before.json
    python bench/sqlite_pages.py --db sqlite:////tmp/now.db --compare /tmp/before.json

Every figure is wall-clock on this machine: run it on a quiet machine, and compare runs taken one after
the other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True,
                        help="the atlas to time, as a SQLAlchemy URL (sqlite:///relative.db or "
                             "sqlite:////absolute/path.db); it is only read")
    parser.add_argument("--root", type=Path, default=HERE,
                        help="the checkout whose app (app/main.py and app/app_pages/), atlas package and README are "
                             "timed (default: the repository this script is in)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="the README whose ```sql examples are timed (default: ROOT/README.md); another "
                             "checkout's README times its queries on this atlas")
    parser.add_argument("--pages", nargs="*", default=None,
                        help="the pages to time, by file name without .py (default: every page in "
                             "ROOT/app/app_pages)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of each page and each query (default 5); the table shows the first run, the "
                             "median and the fastest")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements to this JSON file")
    parser.add_argument("--compare", type=Path, default=None,
                        help="a JSON file written by an earlier run (--json): print each page and query of both "
                             "runs side by side (median and fastest run), with this run's over the earlier one's")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.root = args.root.resolve()
    if not (args.root / "app" / "main.py").exists():
        parser.error(f"--root {args.root}: no app/main.py there")
    args.readme = (args.readme or args.root / "README.md").resolve()
    return args


def readme_queries(readme: Path) -> list[tuple[str, str]]:
    """(label, statement) for each statement of the README's ```sql blocks; the label is the statement's first
    `-- ` comment line, else its first line."""
    blocks = re.findall(r"```sql\n(.*?)```", readme.read_text(), flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    statements = [s for s in statements if s and not all(line.startswith("--") for line in s.splitlines())]
    return [(next((line[3:] for line in s.splitlines() if line.startswith("-- ")), s.splitlines()[0]), s)
            for s in statements]


def summary(seconds: list[float]) -> dict:
    return {"first": seconds[0], "median": statistics.median(seconds), "min": min(seconds), "runs": seconds}


def time_pages(args: argparse.Namespace) -> list[dict]:
    from streamlit.testing.v1 import AppTest

    pages_dir = args.root / "app" / "app_pages"
    names = args.pages or sorted(p.stem for p in pages_dir.glob("*.py") if p.stem != "__init__")
    os.environ["ATLAS_DATABASE_URL"] = args.db
    app = AppTest.from_file(str(args.root / "app" / "main.py"), default_timeout=600)
    app.run()  # the app's first run: imports and the cached engine, not a page's cost
    rows = []
    for name in names:
        seconds, failed = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            app.switch_page(f"app_pages/{name}.py").run()
            seconds.append(time.perf_counter() - start)
            problems = [element.value for element in [*app.exception, *app.error]]
            if problems or not app.title:
                failed = (problems or ["no title"])[0][:60]
                break
        guidance = [info.value[:60] for info in app.info if getattr(info, "icon", None) == ":material/terminal:"]
        rows.append({"kind": "page", "item": name, **summary(seconds), "failed": failed,
                     "note": f"guidance: {guidance[0]}" if guidance else ""})
    return rows


def time_queries(args: argparse.Namespace) -> list[dict]:
    from sqlalchemy import text

    from atlas.store import Store

    store = Store(args.db, check=False)
    rows = []
    with store.engine.connect() as connection:
        connection.execute(text("SELECT 1")).fetchall()  # the connection's first statement
        for label, query in readme_queries(args.readme):
            seconds, failed, n_rows = [], None, 0
            for _ in range(args.repeat):
                start = time.perf_counter()
                try:
                    n_rows = len(connection.execute(text(query)).fetchall())
                except Exception as error:  # a query this atlas cannot answer (a table it does not have)
                    failed = str(error).splitlines()[0][:60]
                    connection.rollback()
                    break
                seconds.append(time.perf_counter() - start)
            rows.append({"kind": "query", "item": label[:70], **(summary(seconds) if seconds else {}),
                         "failed": failed, "note": "" if failed else f"{n_rows} rows"})
    store.dispose()
    return rows


def commit_of(root: Path) -> str:
    result = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def print_table(rows: list[dict]) -> None:
    width = max(len(row["item"]) for row in rows)
    print(f"\n{'kind':<6} {'item':<{width}} {'first s':>9} {'median s':>9} {'min s':>9}  note")
    for row in rows:
        if row["failed"]:
            print(f"{row['kind']:<6} {row['item']:<{width}} {'FAILED':>9} {'':>9} {'':>9}  {row['failed']}")
            continue
        print(f"{row['kind']:<6} {row['item']:<{width}} {row['first']:>9.4f} {row['median']:>9.4f} "
              f"{row['min']:>9.4f}  {row['note']}")


def print_comparison(rows: list[dict], earlier: dict) -> None:
    """Median and fastest run of both, and now over before for each (the fastest run is the steadier figure on
    a machine doing other work)."""
    before = {(row["kind"], row["item"]): row for row in earlier["rows"]}
    now = {(row["kind"], row["item"]): row for row in rows}
    keys = list(before) + [key for key in now if key not in before]
    width = max(len(item) for _, item in keys)

    def value(row: dict | None, stat: str) -> str:
        return "-" if row is None else "FAILED" if row["failed"] else f"{row[stat]:.4f}"

    def ratio(old: dict | None, new: dict | None, stat: str) -> str:
        usable = old and new and not old["failed"] and not new["failed"] and old[stat] > 0
        return f"{new[stat] / old[stat]:.2f}" if usable else ""

    print(f"\nseconds: before = {earlier['commit']} on {earlier['db']}; now = this run")
    print(f"{'kind':<6} {'item':<{width}} {'before median':>13} {'now median':>10} {'ratio':>6} "
          f"{'before min':>10} {'now min':>8} {'ratio':>6}")
    for key in keys:
        old, new = before.get(key), now.get(key)
        print(f"{key[0]:<6} {key[1]:<{width}} {value(old, 'median'):>13} {value(new, 'median'):>10} "
              f"{ratio(old, new, 'median'):>6} {value(old, 'min'):>10} {value(new, 'min'):>8} "
              f"{ratio(old, new, 'min'):>6}")


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(args.root))  # the app and the atlas of --root, not of an installed checkout
    import atlas

    if Path(atlas.__file__).resolve().parent.parent != args.root:
        raise SystemExit(f"atlas imports from {Path(atlas.__file__).parent}, not from --root {args.root}")
    rows = time_pages(args) + time_queries(args)
    print(f"{commit_of(args.root)} ({args.root}) on {args.db}, README {args.readme}, {args.repeat} runs each")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"commit": commit_of(args.root), "root": str(args.root), "db": args.db,
                                         "readme": str(args.readme), "repeat": args.repeat, "rows": rows}, indent=1))
    if args.compare:
        print_comparison(rows, json.loads(args.compare.read_text()))


if __name__ == "__main__":
    main()
