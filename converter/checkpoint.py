"""Streaming access to a Hugging Face checkpoint, one tensor at a time.

Safetensors shards are indexed from their JSON header (numpy has no bfloat16, so tensors are
typed through ml_dtypes) and each tensor is read with pread into its own buffer when asked for:
nothing is mapped or cached, so peak memory follows the tensors in use, not the model.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from lowbit.errors import LowbitError

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors shard."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _parse_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LowbitError(f"{path.name}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise LowbitError(f"{path.name}: truncated safetensors file (header runs past the end)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LowbitError(f"{path.name}: corrupt safetensors header ({e.__class__.__name__})") from None
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise LowbitError(f"{path.name}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if base + end > size:
            raise LowbitError(
                f"{path.name}: truncated safetensors file (tensor {name} ends at byte {base + end}, "
                f"file has {size})"
            )
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise LowbitError(f"{path.name}: tensor {name} size does not match its shape")
        entries[name] = TensorEntry(path, dtype, shape, base + begin, base + end)
    return entries


class Checkpoint:
    """Read-only, lazy view of a checkpoint's tensors by name."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._entries: dict[str, TensorEntry] = {}
        self._files: dict[Path, int] = {}
        self._torch_state: dict | None = None
        shards = sorted(directory.glob("*.safetensors"))
        if shards:
            for shard in shards:
                self._entries.update(_parse_safetensors_header(shard))
        else:
            bins = sorted(directory.glob("pytorch_model*.bin"))
            if not bins:
                raise LowbitError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
            self._torch_state = _load_torch_bins(bins)

    def names(self) -> list[str]:
        if self._torch_state is not None:
            return list(self._torch_state)
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        if self._torch_state is not None:
            return name in self._torch_state
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        if self._torch_state is not None:
            return tuple(self._torch_state[name].shape)
        return self._entries[name].shape

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh numpy array."""
        if self._torch_state is not None:
            return _torch_to_numpy(self._torch_state[name])
        entry = self._entries[name]
        fd = self._files.get(entry.path)
        if fd is None:
            fd = self._files[entry.path] = os.open(entry.path, os.O_RDONLY)
        array = np.empty(entry.shape, entry.dtype)
        view = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):  # pread may return less than asked for large reads
            n = os.preadv(fd, [view[done:]], entry.start + done)
            if n == 0:
                raise LowbitError(f"{entry.path.name}: truncated while reading {name}")
            done += n
        return array

    def read_float32(self, name: str) -> np.ndarray:
        return np.asarray(self.read(name), dtype=np.float32)


def _load_torch_bins(bins: list[Path]) -> dict:
    try:
        import torch
    except ImportError:
        raise LowbitError("pytorch_model.bin checkpoints need torch installed (pip install torch)") from None
    state = {}
    for b in bins:
        try:
            state.update(torch.load(b, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # noqa: BLE001 - torch raises many kinds; the message is what matters
            raise LowbitError(f"{b.name}: cannot read PyTorch checkpoint ({e.__class__.__name__})") from None
    return state


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def resolve_model_dir(model: str) -> Path:
    """A local directory, or a hub id fetched with huggingface_hub (only the files needed)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LowbitError(f"{model}: no config.json in this directory")
        return path
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/")) and not path.exists()
    if not looks_like_hub_id:
        raise LowbitError(f"{model}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, allow_patterns=HUB_FILE_PATTERNS)
    except Exception as e:  # noqa: BLE001 - network/auth/not-found all end the same way for the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise LowbitError(f"{model}: not a local directory and cannot be fetched from the hub ({first_line})") from None
    return Path(local)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
