"""Streaming access to a Hugging Face checkpoint, one tensor at a time.

Safetensors shards are indexed from their JSON header (numpy has no bfloat16, so tensors are
typed through ml_dtypes) and each tensor is read with pread into its own buffer when asked for:
nothing is mapped or cached, so peak memory follows the tensors in use, not the model.
Only the files the checkpoint declares are read (`declared_weights`), headers are checked
against the file before any tensor is, and every float read is checked to be finite.
"""

from __future__ import annotations

import json
import math
import os
import re
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

HUB_FILE_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors shard."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _header_error(path: Path, what: str) -> LowbitError:
    return LowbitError(f"{path.name}: corrupt safetensors header ({what})")


def _parse_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, after checking its header against the file: known dtypes,
    shapes of non-negative ints, byte ranges that match the shapes and tile the data without gaps or overlaps."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LowbitError(f"{path.name}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise LowbitError(f"{path.name}: truncated safetensors file (header runs past the end)")
            raw = f.read(header_len)
    except OSError as e:
        raise LowbitError(f"{path.name}: cannot read ({e.strerror or e.__class__.__name__})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise _header_error(path, e.__class__.__name__) from None
    if not isinstance(header, dict):
        raise _header_error(path, "not a JSON object")
    base = 8 + header_len
    data_size = size - base
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _header_error(path, f"entry {name} is not an object")
        dtype_name = info.get("dtype")
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise LowbitError(f"{path.name}: tensor {name} has unsupported dtype {dtype_name!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _header_error(path, f"tensor {name} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _header_error(path, f"tensor {name} has data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise LowbitError(
                f"{path.name}: truncated safetensors file (tensor {name} ends at byte {base + end}, file has {size})"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise LowbitError(f"{path.name}: tensor {name} size does not match its shape {shape}")
        entries[name] = TensorEntry(path, dtype, tuple(shape), base + begin, base + end)
    position = base  # the spec: the data buffer is fully indexed, no holes, no overlaps
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            raise _header_error(path, "tensor data overlaps or leaves gaps")
        position = entry.end
    if entries and position != size:  # e.g. a wrong header length: every offset would be shifted
        raise _header_error(path, f"{size - position} bytes after the last tensor")
    return entries


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index_files(directory: Path, index_name: str) -> dict[str, Path]:
    """tensor name -> file, from a `*.index.json` weight_map; every named file must exist in `directory`."""
    index = directory / index_name
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as e:
        raise LowbitError(f"{index}: cannot read ({e.__class__.__name__})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LowbitError(f"{index}: no weight_map (an object of tensor name -> file)")
    files = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
            raise LowbitError(f"{index}: tensor {name} maps to {file!r}, not a file in the checkpoint folder")
        path = directory / file
        if not path.is_file():
            raise LowbitError(f"{index}: names shard {file}, which is missing")
        files[name] = path
    return files


_SHARD = re.compile(r"(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>safetensors|bin)")


def _numbered_shards(directory: Path, stem: str, ext: str) -> list[Path]:
    """`{stem}-00001-of-0000N.{ext}` files without an index: all N of them, or an error naming the first missing."""
    shards = {}
    for path in directory.glob(f"{stem}-*-of-*.{ext}"):
        match = _SHARD.fullmatch(path.name)
        if match and match["stem"] == stem:
            shards[path.name] = (int(match["i"]), int(match["n"]), len(match["i"]), len(match["n"]))
    if not shards:
        return []
    counts = {n for _, n, _, _ in shards.values()}
    if len(counts) != 1:
        raise LowbitError(f"{directory}: {stem}-*-of-*.{ext} shards disagree on their count {sorted(counts)}")
    n = counts.pop()
    _, _, wi, wn = next(iter(shards.values()))
    expected = [f"{stem}-{i:0{wi}d}-of-{n:0{wn}d}.{ext}" for i in range(1, n + 1)]
    for name in expected:
        if name not in shards:
            raise LowbitError(f"{directory}: shard {name} is missing")
    return [directory / name for name in expected]


def declared_weights(directory: Path) -> tuple[str, dict[str, Path] | list[Path]]:
    """("safetensors" | "bin", files) that the checkpoint declares, the way transformers picks them: the
    index's weight_map if there is one, else `model.safetensors` or its numbered shards, else the same for
    `pytorch_model*.bin`. Other files (`consolidated.safetensors`, adapters, copies) are never read.
    An index gives {tensor name: file}; otherwise a list of files."""
    for ext, stem, kind in (("safetensors", "model", "safetensors"), ("bin", "pytorch_model", "bin")):
        if (directory / f"{stem}.{ext}.index.json").is_file():
            return kind, _index_files(directory, f"{stem}.{ext}.index.json")
        if (directory / f"{stem}.{ext}").is_file():
            return kind, [directory / f"{stem}.{ext}"]
        shards = _numbered_shards(directory, stem, ext)
        if shards:
            return kind, shards
    raise LowbitError(
        f"{directory}: no weights (model.safetensors, model-*-of-*.safetensors with or without "
        "model.safetensors.index.json, or pytorch_model*.bin)"
    )


def weight_format(directory: Path) -> str | None:
    """"safetensors", "bin" or None, from file names only (cheap; nothing is parsed)."""
    for ext, stem in (("safetensors", "model"), ("bin", "pytorch_model")):
        if (directory / f"{stem}.{ext}.index.json").is_file() or (directory / f"{stem}.{ext}").is_file() or any(
            _SHARD.fullmatch(p.name) for p in directory.glob(f"{stem}-*-of-*.{ext}")
        ):
            return "safetensors" if ext == "safetensors" else "bin"
    return None


class Checkpoint:
    """Read-only, lazy view of a checkpoint's tensors by name (only from the files it declares)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._entries: dict[str, TensorEntry] = {}
        self._files: dict[Path, int] = {}
        self._torch_state: dict | None = None
        kind, files = declared_weights(directory)
        if kind == "bin":
            self._torch_state = _load_torch_bins(files)
            return
        if isinstance(files, dict):  # an index: each tensor from the file it names
            headers = {path: _parse_safetensors_header(path) for path in sorted(set(files.values()))}
            for name, path in files.items():
                if name not in headers[path]:
                    raise LowbitError(f"{path.name}: has no tensor {name}, which the index places there")
                self._entries[name] = headers[path][name]
            return
        for shard in files:
            for name, entry in _parse_safetensors_header(shard).items():
                if name in self._entries:
                    raise LowbitError(f"tensor {name} is in both {self._entries[name].path.name} and {shard.name}")
                self._entries[name] = entry

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

    def is_float(self, name: str) -> bool:
        """Whether the tensor is stored as float64/32/16 or bfloat16 (what a float weight can be read from)."""
        if self._torch_state is not None:
            return str(self._torch_state[name].dtype) in TORCH_FLOAT_DTYPES
        return self._entries[name].dtype in FLOAT_DTYPES

    def dtype_name(self, name: str) -> str:
        if self._torch_state is not None:
            return str(self._torch_state[name].dtype)
        return next(k for k, v in SAFETENSORS_DTYPES.items() if v == self._entries[name].dtype)

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
        """The tensor in float32, after checking that every value is finite (NaN/Inf is an error naming it)."""
        array = np.asarray(self.read(name), dtype=np.float32)
        if not _all_finite(array):
            raise LowbitError(f"tensor {name} holds NaN or Inf values")
        return array


FLOAT_DTYPES = {SAFETENSORS_DTYPES[k] for k in ("F64", "F32", "F16", "BF16")}
TORCH_FLOAT_DTYPES = {"torch.float64", "torch.float32", "torch.float16", "torch.bfloat16"}
_FINITE_CHUNK = 1 << 22  # elements per isfinite() pass: bounds the boolean temporary


def _all_finite(array: np.ndarray) -> bool:
    flat = array.reshape(-1)
    return all(np.isfinite(flat[i:i + _FINITE_CHUNK]).all() for i in range(0, flat.size, _FINITE_CHUNK))


def _load_torch_bins(files: dict[str, Path] | list[Path]) -> dict:
    """The tensors of pytorch_model*.bin files; with an index ({name: file}), each from the file it names."""
    try:
        import torch
    except ImportError:
        raise LowbitError("pytorch_model.bin checkpoints need torch installed (pip install torch)") from None
    paths = sorted(set(files.values())) if isinstance(files, dict) else files
    loaded = {}
    for b in paths:
        try:
            content = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds; the message is what matters
            raise LowbitError(f"{b.name}: cannot read PyTorch checkpoint ({e.__class__.__name__})") from None
        if not isinstance(content, dict):
            raise LowbitError(f"{b.name}: not a state dict (tensor name -> tensor)")
        loaded[b] = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if not isinstance(files, dict):
        return {k: v for b in paths for k, v in loaded[b].items()}
    state = {}
    for name, path in files.items():
        if name not in loaded[path]:
            raise LowbitError(f"{path.name}: has no tensor {name}, which the index places there")
        state[name] = loaded[path][name]
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
