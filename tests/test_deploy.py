"""The compose file and the Dockerfile (no Docker daemon in CI): what they promise, read from the files."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_ports_are_published_on_localhost_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_postgres_keeps_its_data_in_a_named_volume_and_has_a_healthcheck():
    services = compose()
    postgres = services["services"]["postgres"]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in services["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert services["services"]["app"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_app_image_is_built_once_and_migrates_before_serving():
    app = compose()["services"]["app"]
    assert app["build"] == "."  # from the Dockerfile, not pip-installed at every start
    start = " ".join(app["entrypoint"])
    assert "pip" not in start
    assert start.index("atlas db upgrade") < start.index("atlas db create-reader") < start.index("atlas app")
    assert app["environment"]["ATLAS_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_the_dockerfile_installs_the_project_and_every_package_it_names():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {name.rstrip("*") for name in packages} <= copied
    assert 'ENTRYPOINT ["atlas"]' in dockerfile
