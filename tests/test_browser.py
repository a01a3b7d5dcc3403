"""The app in a real browser: `streamlit run` on a free port, headless Chromium loads every page.

Screenshots of every page go to $ATLAS_SCREENSHOT_DIR (default: the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import text

from atlas.store import Store

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000", "--window-size=1400,2400",
]
PAGES = {  # url path -> page title; the default page (Overview) lives at the root
    "": "Neuron Atlas",
    "sql": "SQL",
    "families": "Neuron families",
    "card": "Neuron card",
    "compare": "Compare seeds",
    "layers": "Layers",
    "studies": "Studies",
}

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: apt-get install -y chromium")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(base: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with {server.returncode}: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer on {base} within {seconds} s")


@pytest.fixture(scope="module")
def app_url(filled_db_url: str, tmp_path_factory: pytest.TempPathFactory):
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    env = {**os.environ, "ATLAS_DATABASE_URL": filled_db_url}
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(MAIN), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false", "--", "--db", filled_db_url],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(base, server)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("ATLAS_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load(url: str, screenshot: Path, profile: Path, title: str, attempts: int = 4) -> str:
    """The page's DOM once its title has rendered; a cold server can need a second load."""
    dom = ""
    for attempt in range(attempts):
        result = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}-{attempt}", f"--screenshot={screenshot}",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )
        dom = result.stdout
        finished = 'data-testid="stStatusWidget"' not in dom  # the "Running..." widget is gone
        if f">{title}</span>" in dom and finished:
            return dom
        time.sleep(2)
    return dom


def _a_neuron_query(url: str) -> str:
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            model, layer, neuron = conn.execute(text(
                "SELECT m.name, n.layer, n.neuron FROM neurons n JOIN models m ON m.id = n.model_id "
                "ORDER BY m.name, n.layer DESC, n.neuron DESC LIMIT 1")).one()
    finally:
        store.dispose()
    return model, f"model={model}&layer={layer}&neuron={neuron}"


def test_every_page_renders_in_chromium(app_url: str, filled_db_url: str, screenshot_dir: Path,
                                        tmp_path: Path) -> None:
    model, card_query = _a_neuron_query(filled_db_url)
    # A cold server on a busy machine can miss the first page's time budget: warm it up once.
    _load(app_url, tmp_path / "warm-up.png", tmp_path / "profile-warm-up", PAGES[""])
    for path, title in PAGES.items():
        url = f"{app_url}/{path}" + (f"?{card_query}" if path == "card" else "")
        name = path or "overview"
        dom = _load(url, screenshot_dir / f"{name}.png", tmp_path / f"profile-{name}", title)
        assert f">{title}</span>" in dom, f"{url}: title {title!r} not rendered"
        assert "Traceback" not in dom and 'data-testid="stException"' not in dom, f"{url}: exception shown"
        assert 'data-testid="stAlertContentError"' not in dom, f"{url}: error shown"
        assert "Page not found" not in dom, f"{url}: Streamlit does not know this page"
        assert (screenshot_dir / f"{name}.png").stat().st_size > 10_000
        if path == "card":
            assert model in dom and "atlas-example" in dom, "the card did not open the linked neuron"
        if path == "layers":  # the four-stage profile and the heads per layer are drawn, not only declared
            assert dom.count('data-testid="stVegaLiteChart"') >= 2, "the layers page drew fewer than two charts"
