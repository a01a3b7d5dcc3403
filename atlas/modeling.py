"""Loading a causal LM with its tokenizer and adapter, and capturing its neuron activations.

Loading goes through transformers' Auto*.from_pretrained (the hub code path, which reads a local
directory offline). The config is read first, so an unsupported architecture fails before any
weights are read. Registration (inspect_model) never materializes the weights: shapes come from a
model built on the meta device, and the weights are hashed from the checkpoint files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from atlas.adapters import Adapter, adapter_for
from atlas.data.tokens import tokenizer_hash
from atlas.errors import AtlasError, first_line
from atlas.provenance import (HubUnreachable, commit_of_cached_file, hub_commit, local_weight_files,
                              locate_weight_files)


@dataclass
class LoadedModel:
    model: PreTrainedModel       # eval mode, use_cache off
    tokenizer: Any               # a transformers tokenizer
    adapter: Adapter
    config: PretrainedConfig
    source: str
    revision: str | None


def load_model(
    source: str,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a local directory or a hub id. attn_implementation="eager" exposes attention probabilities."""
    options = _source_options(source, revision)
    config = _load_config(source, options)
    adapter = adapter_for(config)  # before any weights are read
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **options, **extra)
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model, tokenizer, adapter, config, source, revision)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar: a command whose output is one line (or one error line) stays one line."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(source: str, revision: str | None = None) -> Any:
    """Only the tokenizer of a model (no weights): what a job needs to tokenize before it starts."""
    return AutoTokenizer.from_pretrained(source, **_source_options(source, revision))


def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with a separator is meant as a folder."""
    return (os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
            or os.sep != "/" and os.sep in source)


def _source_options(source: str, revision: str | None) -> dict[str, Any]:
    """from_pretrained keyword arguments; AtlasError at once when neither a folder nor the hub can serve.

    Online, the revision is pinned to the commit it names, so config, tokenizer and weights come from
    one commit. Offline (HF_HUB_OFFLINE) or when the hub does not answer, the local hub cache serves.
    """
    if Path(source).expanduser().is_dir():
        return {}
    if _looks_like_path(source) or Path(source).expanduser().exists():
        raise AtlasError(f"model directory {source} does not exist: pass a folder made by save_pretrained "
                         "or a hub id such as EleutherAI/pythia-160m")
    try:
        return {"revision": _hub_model_commit(source, revision)}
    except HubUnreachable as unreachable:
        if not _in_hub_cache(source, revision):
            raise AtlasError(f"{source!r} is not a local directory and the Hugging Face hub could not be reached "
                             f"({unreachable}), and it is not in the local hub cache: pass a local directory made "
                             "by save_pretrained, which works offline") from None
    return {"revision": revision, "local_files_only": True}


def _hub_model_commit(repo_id: str, revision: str | None) -> str:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return hub_commit(repo_id, revision)
    except RevisionNotFoundError:
        raise AtlasError(f"hub model {repo_id!r} has no revision {revision!r}: check --revision") from None
    except RepositoryNotFoundError:
        raise AtlasError(f"hub model {repo_id!r} was not found on the Hugging Face hub (or it is private or gated: "
                         "log in with `hf auth login`): check the id, or pass a local directory made by "
                         "save_pretrained") from None


def _load_config(source: str, options: dict[str, Any]) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, **options)
    except (OSError, ValueError) as error:
        where = "directory" if not options else "hub id"
        reason = first_line(error)
        raise AtlasError(f"could not read the model config of {where} {source!r} ({reason}): check the id or "
                         "revision, or pass a local directory made by save_pretrained") from error


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(found, str)


# -- registration without the weights in memory --------------------------------------------------

@dataclass
class ModelFacts:
    """What registration stores about a model, read without materializing its weights."""

    summary: dict[str, Any]         # the fields of model_summary
    weight_files: list[Path]        # to stream with atlas.provenance.scan_weights
    directory: Path | None          # a local directory; None for a hub id
    commit: str | None              # the hub commit SHA, when known; None for a local directory


def inspect_model(source: str, revision: str | None = None) -> ModelFacts:
    """Config, tokenizer and shapes of a model, and where its weight files are: no weights are loaded."""
    options = _source_options(source, revision)
    config = _load_config(source, options)
    adapter = adapter_for(config)  # before anything else is read
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    with torch.device("meta"):  # parameters with shapes and no storage
        skeleton = AutoModelForCausalLM.from_config(config)
    files = _weight_files(source, options)
    summary = _summary(adapter, skeleton, tokenizer)
    if not options:
        return ModelFacts(summary, files, Path(source).expanduser(), None)
    commit = getattr(config, "_commit_hash", None) or commit_of_cached_file(files[0])
    return ModelFacts(summary, files, None, commit)


def loaded_weight_files(loaded: LoadedModel) -> list[Path]:
    """The weight files `loaded` was read from: for a hub model the commit it was loaded at, not
    wherever its revision points now."""
    commit = getattr(loaded.config, "_commit_hash", None)
    return _weight_files(loaded.source, _source_options(loaded.source, commit or loaded.revision))


def _weight_files(source: str, options: dict[str, Any]) -> list[Path]:
    if not options:
        return local_weight_files(Path(source).expanduser())
    return locate_weight_files(partial(_hub_file, source, options), f"hub model {source!r}")


def _hub_file(repo_id: str, options: dict[str, Any], filename: str) -> Path | None:
    """A file of the hub model in the local hub cache (downloaded when online), or None if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, **options))
    except (EntryNotFoundError, RemoteEntryNotFoundError):  # not in the repo, or offline and not cached
        return None
    except Exception as error:  # network and disk errors: the message says which
        raise AtlasError(f"could not download {filename} of {repo_id!r} from the Hugging Face hub "
                         f"({first_line(error)}): check the network, or pass a local directory made by "
                         "save_pretrained") from None


def model_summary(loaded: LoadedModel) -> dict[str, Any]:
    """The facts stored in the models table. vocab_size is the tokenizer's (Pythia pads its embedding)."""
    return _summary(loaded.adapter, loaded.model, loaded.tokenizer)


def _summary(adapter: Adapter, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    return {
        "architecture": adapter.name,
        "n_layers": adapter.n_layers(model),
        "d_model": adapter.d_model(model),
        "d_mlp": adapter.d_mlp(model),
        "vocab_size": len(tokenizer),
        "tokenizer_hash": tokenizer_hash(tokenizer),
    }


class _EnoughLayers(Exception):
    """Raised from a hook once the last wanted layer is captured: later blocks and the unembedding
    (a large share of the compute for big vocabularies) never run."""


def capture_neuron_activations(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Neuron activations (the down-projection inputs) as [batch, seq, len(layers), d_mlp].

    One copy per layer into `out` (allocated in the model's dtype when not given; pass a buffer of
    the right shape to reuse it across batches). The forward pass stops after the last wanted layer.
    """
    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.blocks(model)
    wanted = list(range(len(blocks))) if layers is None else list(layers)
    if not wanted or any(not 0 <= layer < len(blocks) for layer in wanted):
        raise AtlasError(f"layers {wanted} are not within the model's {len(blocks)} layers: pick from 0..{len(blocks) - 1}")
    batch, seq = input_ids.shape
    shape = (batch, seq, len(wanted), adapter.d_mlp(model))
    if out is None:
        out = torch.empty(shape, dtype=model.dtype, device=input_ids.device)
    elif tuple(out.shape) != shape:
        raise AtlasError(f"activation buffer has shape {tuple(out.shape)}, expected {shape}: allocate it for this batch")
    slot_of = {layer: slot for slot, layer in enumerate(wanted)}
    last = max(wanted)

    def hook_for(layer: int):
        def record(module, args):
            out[:, :, slot_of[layer]].copy_(args[0])
            if layer == last:
                raise _EnoughLayers

        return record

    handles = [adapter.down_proj(blocks[layer]).register_forward_pre_hook(hook_for(layer)) for layer in slot_of]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _EnoughLayers:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return out


# -- forward passes that stop at the residual stream (logit lens, layer interventions) -------------

def run_to_last_block(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """A forward pass that stops once the last block has run: hooks registered before it (captures of the
    residual stream or sub-layers) see every block, and the final norm and unembedding of all positions,
    which callers recompute only where they need them, never run."""
    last = loaded.adapter.blocks(loaded.model)[-1]

    def stop(module, args, output):
        raise _EnoughLayers

    handle = last.register_forward_hook(stop)
    try:
        with torch.inference_mode():
            loaded.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _EnoughLayers:
        pass
    finally:
        handle.remove()


def residual_states(loaded: LoadedModel, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """h_0 (the input of block 0) .. h_L (the last block's output, before the final norm) of the unmodified model."""
    with loaded.adapter.capture_residual_stream(loaded.model) as states:
        run_to_last_block(loaded, input_ids, attention_mask)
    return states


def final_residual(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    order: Sequence[int],
    start_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The last residual state (before the final norm) of the model run with its blocks in `order`.

    With start_state, the first block of `order` reads start_state in place of the embeddings: a
    prefix of blocks shared with another pass (e.g. blocks 0..l-1 of the unmodified model when layer
    l is deleted) is computed once, and `order` lists only the blocks after it. An empty order then
    returns start_state itself.
    """
    order = list(order)
    if not order:
        if start_state is None:
            raise AtlasError("a pass with no blocks needs the residual state to start from")
        return start_state
    adapter, model = loaded.adapter, loaded.model
    with adapter.block_order(model, order):
        first = adapter.blocks(model)[0]
        handle = None
        if start_state is not None:
            handle = first.register_forward_pre_hook(_replace_hidden_states(start_state), with_kwargs=True)
        try:
            with adapter.capture_residual_stream(model) as states:
                run_to_last_block(loaded, input_ids, attention_mask)
        finally:
            if handle is not None:
                handle.remove()
    return states[-1]


def _replace_hidden_states(state: torch.Tensor):
    """A forward pre-hook that hands a block `state` as its input hidden states."""
    def replace(module, args, kwargs):
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

    return replace
