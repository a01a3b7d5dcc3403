"""The adapter registry: picks the adapter of a model or config by its config.model_type."""

from __future__ import annotations

from typing import Any

from atlas.adapters.base import Adapter
from atlas.adapters.gpt2 import GPT2Adapter
from atlas.adapters.llama import LlamaAdapter
from atlas.adapters.neox import NeoXAdapter
from atlas.adapters.phi import PhiAdapter
from atlas.errors import AtlasError

ADAPTERS: tuple[type[Adapter], ...] = (GPT2Adapter, NeoXAdapter, LlamaAdapter, PhiAdapter)
SUPPORTED: tuple[str, ...] = tuple(adapter.name for adapter in ADAPTERS)
_BY_MODEL_TYPE: dict[str, type[Adapter]] = {t: a for a in ADAPTERS for t in a.model_types}


def supported_model_types() -> tuple[str, ...]:
    return tuple(_BY_MODEL_TYPE)


def adapter_for(config_or_model: Any) -> Adapter:
    """The adapter of a transformers config or model; AtlasError for an architecture we cannot read."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    adapter = _BY_MODEL_TYPE.get(model_type)
    if adapter is None:
        raise AtlasError(
            f"architecture {model_type!r} is not supported; supported config.model_type values: "
            f"{', '.join(supported_model_types())}"
        )
    return adapter()


__all__ = ["Adapter", "ADAPTERS", "SUPPORTED", "adapter_for", "supported_model_types"]
