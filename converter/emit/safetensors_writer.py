"""A streaming safetensors writer: tensors are added one at a time and never held together in memory.

Each shard's tensor bytes go to a temporary body file as they come; when the shard is full (or at the end) its
header (names, dtypes, shapes, offsets; `__metadata__` {"format": "pt"}, which transformers expects) is written and
the body appended after it. More than one shard adds `model.safetensors.index.json`, as transformers names them.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from lowbit.converter.checkpoint import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_SHARD_BYTES = 5 << 30


class SafetensorsWriter:
    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self._shards: list[Path] = []
        self._weight_map: dict[str, int] = {}
        self._open_shard()

    def _open_shard(self) -> None:
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._body_path = self.folder / f".body-{len(self._shards)}"
        self._body = open(self._body_path, "wb")

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {array.dtype} has no safetensors name")
        if name in self._weight_map or name in self._header:
            raise ValueError(f"{name}: written twice")
        if self._header and self._offset + array.nbytes > self.max_shard_bytes:
            self._close_shard()
            self._open_shard()
        self._body.write(array.tobytes())  # one tensor's bytes at a time
        end = self._offset + array.nbytes
        self._header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                              "data_offsets": [self._offset, end]}
        self._offset = end

    def _close_shard(self) -> None:
        self._body.close()
        index = len(self._shards)
        path = self.folder / f".shard-{index}"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(path, "wb") as out, open(self._body_path, "rb") as body:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(body, out, 16 << 20)
        self._body_path.unlink()
        self._weight_map.update(dict.fromkeys(self._header, index))
        self._shards.append(path)

    def close(self) -> list[str]:
        """Finishes the last shard and names the files; returns their names."""
        self._close_shard()
        count = len(self._shards)
        names = ["model.safetensors"] if count == 1 else \
            [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for path, name in zip(self._shards, names):
            path.rename(self.folder / name)
        if count > 1:
            total = sum((self.folder / name).stat().st_size for name in names)
            index = {"metadata": {"total_size": total},
                     "weight_map": {t: names[i] for t, i in sorted(self._weight_map.items())}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
