"""Regenerate the README's screenshots of the app: python docs/make_screenshots.py --db sqlite:///atlas.db

Serves the app on a free port, opens the families page and the card of the neuron with the highest
excess correlation, the layers page and the studies page in headless Chromium, and writes docs/card.png,
docs/families.png, docs/layers.png and docs/studies.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atlas.store import Store  # noqa: E402
from tests.test_browser import CHROMIUM, _free_port, _load, _wait_healthy  # noqa: E402

HERE = Path(__file__).resolve().parent


def most_universal_neuron(url: str) -> str:
    store = Store(url)
    with store.engine.connect() as conn:
        model, layer, neuron = conn.execute(text(
            "SELECT model, layer, neuron FROM universal_neurons WHERE excess_corr IS NOT NULL "
            "ORDER BY excess_corr DESC LIMIT 1")).one()
    store.dispose()
    return f"model={model}&layer={layer}&neuron={neuron}"


def main() -> None:
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default="sqlite:///atlas.db", help="database the app shows")
    args = parser.parse_args()
    if CHROMIUM is None:
        sys.exit("Chromium not found: apt-get install -y chromium")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(HERE.parent / "app" / "main.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--", "--db", args.db], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, server)
        profile = Path(tempfile.mkdtemp())
        pages = {"card": (f"card?{most_universal_neuron(args.db)}", "Neuron card"),
                 "families": ("families", "Neuron families"),
                 "layers": ("layers", "Layers"),
                 "studies": ("studies", "Studies")}
        for name, (path, title) in pages.items():
            _load(f"{base}/{path}", HERE / f"{name}.png", profile / name, title)
            print(f"wrote {HERE / f'{name}.png'}")
        shutil.rmtree(profile, ignore_errors=True)
    finally:
        server.terminate()
        server.wait(timeout=15)


if __name__ == "__main__":
    main()
