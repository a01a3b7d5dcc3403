"""`atlas app`: the argv it becomes (exec), Streamlit options passed on, one-line errors, a light start, and a
real server that a SIGTERM stops with nothing left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlas import cli
from atlas.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'atlas.db'}"
    Store(url).dispose()  # an empty, migrated atlas
    return url


@pytest.fixture
def exec_calls(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    return calls


def test_argv_and_passthrough(sqlite_url, exec_calls):
    result = CliRunner().invoke(cli.app, ["app", "--db", sqlite_url, "--port", "8765", "--address", "127.0.0.1",
                                          "--server.baseUrlPath", "atlas", "--theme.base=dark",
                                          "--browser.serverAddress", "atlas.example"])
    assert result.exit_code == 0, result.output
    [(path, argv, env)] = exec_calls
    assert path == sys.executable == argv[0]
    assert argv[1:5] == ["-m", "streamlit", "run", str(ROOT / "app" / "main.py")]
    options = argv[5:argv.index("--")]
    assert options == ["--server.port", "8765", "--server.headless", "true", "--browser.gatherUsageStats", "false",
                       "--server.address", "127.0.0.1", "--server.baseUrlPath", "atlas", "--theme.base=dark",
                       "--browser.serverAddress", "atlas.example"]  # passed-on options last: they win
    assert argv[argv.index("--"):] == ["--", "--db", sqlite_url]
    assert env["ATLAS_DATABASE_URL"] == sqlite_url
    assert "http://127.0.0.1:8765" in result.output


def test_defaults(sqlite_url, exec_calls, monkeypatch):
    monkeypatch.setenv("ATLAS_DATABASE_URL", sqlite_url)
    assert CliRunner().invoke(cli.app, ["app"]).exit_code == 0
    argv = exec_calls[0][1]
    assert argv[argv.index("--server.port") + 1] == "8501" and "--server.address" not in argv


@pytest.mark.parametrize("args, message", [
    (["--port", "80a"], "--port '80a': give a port number from 1 to 65535"),
    (["--port", "70000"], "--port '70000'"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--server.port"], "--server.port needs a value"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "atlas.cli", "app", *args], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "atlas.db").exists()  # refused before opening a database


def test_help_and_version_import_no_torch():
    script = ("import sys, time\n"
              "start = time.perf_counter()\n"
              "from typer.testing import CliRunner\n"
              "from atlas.cli import app\n"
              "for args in (['--help'], ['app', '--help']):\n"
              "    assert CliRunner().invoke(app, args).exit_code == 0\n"
              "print(time.perf_counter() - start)\n"
              "print(sorted(m for m in ('torch', 'transformers', 'streamlit') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    seconds, heavy = result.stdout.splitlines()
    assert heavy == "[]", result.stdout
    assert float(seconds) < 3  # about 0.2 s on an idle machine; generous for a busy test runner
    start = time.perf_counter()
    version = subprocess.run([sys.executable, "-m", "atlas.cli", "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("atlas ")
    assert time.perf_counter() - start < 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the server's processes")
def test_real_server_stops_on_sigterm(sqlite_url, tmp_path):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "atlas.cli", "app", "--db", sqlite_url, "--port", str(port),
                                "--address", "127.0.0.1"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 25
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the app did not answer its health check in 25 s"
            time.sleep(0.2)
        assert b"streamlit" in Path(f"/proc/{process.pid}/cmdline").read_bytes()  # the same process, exec'd
        children = _children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) is not None
        time.sleep(0.2)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "a child of the server remains"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
