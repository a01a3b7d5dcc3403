"""What exactly a model or dataset is: its weights read from the checkpoint files tensor by tensor,
the hub commit a revision names, and a content revision for local directories.

Registration never builds the model: the weights hash and the non-finite check stream the files,
holding one chunk of one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

import torch

from atlas.errors import AtlasError, first_line

CHUNK_BYTES = 8 << 20
HUB_TIMEOUT_S = 10.0

# (single file, sharded index) per format, in the order transformers prefers them.
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))
# Files left out of a local directory's content revision: weights are covered by the weights hash,
# and reading a second copy (a .bin next to a .safetensors) would double the cost.
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx"}

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}


# -- the weights, streamed ------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightsScan:
    weights_hash: str             # sha256 over name|dtype|shape and bytes of every tensor, in name order
    first_nonfinite: str | None   # the first tensor (in name order) holding a NaN or an infinity


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterator[torch.Tensor]]  # its elements as 1-D chunks, in order


def scan_weights(files: Sequence[Path]) -> WeightsScan:
    """Hash and check the checkpoint's tensors without building the model.

    Each tensor contributes `name|dtype|shape\\n` then its raw bytes, so a checkpoint saved as
    safetensors or as pytorch_model.bin with the same tensors hashes the same.
    """
    digest = hashlib.sha256()
    first_nonfinite = None
    with ExitStack() as open_files:
        for tensor in _tensors_in_name_order(files, open_files):
            digest.update(f"{tensor.name}|{tensor.dtype}|{tensor.shape}\n".encode())
            finite = True
            for piece in tensor.pieces():
                digest.update(memoryview(piece.view(torch.uint8).numpy()))
                finite = finite and _all_finite(piece)
            if not finite and first_nonfinite is None:
                first_nonfinite = tensor.name
    return WeightsScan(digest.hexdigest(), first_nonfinite)


def _all_finite(piece: torch.Tensor) -> bool:
    if not piece.dtype.is_floating_point:
        return True
    if piece.dtype.itemsize == 1:  # float8: torch has no isfinite for every variant
        piece = piece.float()
    return bool(torch.isfinite(piece).all())


def _tensors_in_name_order(files: Sequence[Path], open_files: ExitStack) -> list[_Tensor]:
    by_name: dict[str, _Tensor] = {}
    for file in files:
        read = _safetensors_tensors if file.name.endswith(".safetensors") else _torch_tensors
        for tensor in read(file, open_files):
            if tensor.name in by_name:
                raise AtlasError(f"tensor {tensor.name} is stored twice in the checkpoint ({file.name}): "
                                 "save the model again with save_pretrained")
            by_name[tensor.name] = tensor
    return [by_name[name] for name in sorted(by_name)]


def _safetensors_tensors(file: Path, open_files: ExitStack) -> Iterator[_Tensor]:
    """Read with plain file reads rather than safetensors' safe_open: safe_open memory-maps the file,
    and every page it touches stays in the process's resident set until the file is closed."""
    handle = open_files.enter_context(file.open("rb"))
    header, data_start = _safetensors_header(file, handle)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise AtlasError(f"{file}: tensor {name} has dtype {entry['dtype']}, which the atlas cannot read: "
                             "save the model in a float or integer dtype")
        begin, end = entry["data_offsets"]
        yield _Tensor(name, dtype, tuple(entry["shape"]),
                      partial(_file_pieces, handle, file, data_start + begin, end - begin, dtype))


def _safetensors_header(file: Path, handle: IO[bytes]) -> tuple[dict, int]:
    try:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size)), 8 + size
    except (ValueError, UnicodeDecodeError) as error:
        raise AtlasError(f"{file} is not a safetensors file ({first_line(error)}): "
                         "save the model again with save_pretrained") from None


def _file_pieces(handle: IO[bytes], file: Path, offset: int, length: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """One reused buffer of at most CHUNK_BYTES: a consumer must be done with a piece before the next."""
    if length == 0:
        return
    buffer = bytearray(min(CHUNK_BYTES, length))
    handle.seek(offset)
    while length > 0:
        want = min(len(buffer), length)
        if handle.readinto(memoryview(buffer)[:want]) != want:
            raise AtlasError(f"{file} is truncated (a tensor ends past the end of the file): download or save it again")
        yield torch.frombuffer(buffer, dtype=dtype, count=want // dtype.itemsize)
        length -= want


def _torch_tensors(file: Path, open_files: ExitStack) -> Iterator[_Tensor]:
    """pytorch_model.bin memory-mapped: a tensor's bytes are read when it is hashed."""
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # unpickling raises many types; the message says which
        raise AtlasError(f"could not read the weights in {file} ({first_line(error)}): "
                         "save the model again with save_pretrained") from None
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            yield _Tensor(name, tensor.dtype, tuple(tensor.shape), partial(_tensor_pieces, tensor))


def _tensor_pieces(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    flat = tensor.detach().reshape(-1).contiguous()  # a copy only for a non-contiguous view
    step = max(1, CHUNK_BYTES // tensor.element_size())
    for start in range(0, flat.numel(), step):
        yield flat[start:start + step]


# -- where the weights are ------------------------------------------------------------------------

def locate_weight_files(fetch: Callable[[str], Path | None], where: str) -> list[Path]:
    """The checkpoint's weight files; fetch(filename) gives the local path of one of its files, or None."""
    for single, index in WEIGHT_FILES:
        found = fetch(single)
        if found is not None:
            return [found]
        index_file = fetch(index)
        if index_file is not None:
            return [_required_shard(fetch, shard, where) for shard in _shard_names(index_file)]
    raise AtlasError(f"{where} has no weights (model.safetensors, pytorch_model.bin or a sharded index of either): "
                     "pass a folder made by save_pretrained")


def local_weight_files(directory: Path) -> list[Path]:
    def fetch(filename: str) -> Path | None:
        path = directory / filename
        return path if path.is_file() else None

    return locate_weight_files(fetch, f"model directory {directory}")


def _shard_names(index_file: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as error:
        raise AtlasError(f"{index_file} is not a shard index ({first_line(error)}): "
                         "save the model again with save_pretrained") from None


def _required_shard(fetch: Callable[[str], Path | None], shard: str, where: str) -> Path:
    found = fetch(shard)
    if found is None:
        raise AtlasError(f"{where} lacks the weight shard {shard} its index names: copy or download it again")
    return found


# -- revisions ------------------------------------------------------------------------------------

def local_revision(directory: Path, weights_hash: str) -> str:
    """"sha256:" + a hash of the directory's top-level non-weight files (names and bytes) and the weights
    hash: it changes when the config, tokenizer or weights change, without reading the weights twice."""
    digest = hashlib.sha256()
    for file in sorted(directory.iterdir()):
        if file.is_file() and not file.name.startswith(".") and file.suffix not in WEIGHT_SUFFIXES:
            digest.update(file.name.encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    digest.update(f"weights:{weights_hash}".encode())
    return f"sha256:{digest.hexdigest()}"


def commit_of_cached_file(path: Path) -> str | None:
    """The commit a file of the hub cache belongs to (…/snapshots/<sha>/<file>), or None elsewhere."""
    parts = path.parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


class HubUnreachable(Exception):
    """Offline (HF_HUB_OFFLINE) or the hub did not answer; the message says which."""


def hub_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The commit SHA a revision of a hub repo names, in one request with a timeout and no retries.

    Raises HubUnreachable when offline or the hub does not answer, and huggingface_hub's
    RepositoryNotFoundError / RevisionNotFoundError when it answers that they do not exist.
    The request goes through huggingface_hub, so proxies and tokens are respected.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable("HF_HUB_OFFLINE is set")
    try:
        info = HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception as error:  # connection, proxy, timeout and server errors alike mean "not answered"
        raise HubUnreachable(first_line(error)) from None
    if not info.sha:
        raise HubUnreachable(f"the hub gave no commit for {repo_id}")
    return info.sha

