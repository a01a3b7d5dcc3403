"""Tiny models of every architecture trained for a few steps (see tests.tiny.train_briefly), each built once
per session, when a test first asks for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import train_briefly


class TrainedModels:
    """arch -> directory of the trained tiny model; trains on first access."""

    def __init__(self, root: Path, untrained: dict[str, Path]) -> None:
        self.root, self.untrained, self.built = root, untrained, {}

    def __getitem__(self, arch: str) -> Path:
        if arch not in self.built:
            self.built[arch] = train_briefly(self.untrained[arch], self.root / f"trained-{arch}")
        return self.built[arch]

    def items(self):
        return [(arch, self[arch]) for arch in self.untrained]


@pytest.fixture(scope="session")
def trained_tiny_models(tmp_path_factory, tiny_models) -> TrainedModels:
    return TrainedModels(tmp_path_factory.mktemp("trained-tiny-models"), tiny_models)
