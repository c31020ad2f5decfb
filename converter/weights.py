"""Logical weights of a decoder (by `WeightMap`) as lazy tensors read from a `Checkpoint`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lowbit.converter.architectures.base import WeightMap
from lowbit.converter.checkpoint import Checkpoint
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class LinearWeights:
    """A (possibly fused) linear layer: `in_out()` gives the [in, out] matrix MatMul consumes,
    `out_in()` the checkpoint's own [out, in] layout (contiguous rows, what quantizers want)."""

    in_features: int
    out_features: int
    in_out: Callable[[], np.ndarray]
    out_in: Callable[[], np.ndarray]
    bias: Callable[[], np.ndarray] | None


class WeightSource:
    def __init__(self, checkpoint: Checkpoint, names: WeightMap):
        self.checkpoint = checkpoint
        self.names = names

    def resolve(self, name: str, required: bool = True) -> str | None:
        """The checkpoint's own spelling of `name`, with or without a `model.`-like prefix."""
        if name in self.checkpoint:
            return name
        for prefix in self.names.strip_prefixes:
            if name.startswith(prefix) and name[len(prefix):] in self.checkpoint:
                return name[len(prefix):]
            if prefix + name in self.checkpoint:
                return prefix + name
        if required:
            raise LowbitError(f"checkpoint has no tensor '{name}'")
        return None

    def has(self, prefix: str) -> bool:
        return self.resolve(f"{prefix}.weight", required=False) is not None

    def tensor(self, name: str) -> tuple[tuple[int, ...], Callable[[], np.ndarray]]:
        """Shape and float32 loader of one checkpoint tensor."""
        real = self.resolve(name)
        return self.checkpoint.shape(real), lambda: self.checkpoint.read_float32(real)

    def linear(self, prefixes: tuple[str, ...] | str, layer: int | None = None) -> LinearWeights:
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        prefixes = tuple(p.format(i=layer) for p in prefixes)
        weights = [self.resolve(f"{p}.weight") for p in prefixes]
        biases = [self.resolve(f"{p}.bias", required=False) for p in prefixes]
        shapes = [self.checkpoint.shape(w) for w in weights]
        conv1d = self.names.conv1d
        outs = [s[1] if conv1d else s[0] for s in shapes]
        ins = {s[0] if conv1d else s[1] for s in shapes}
        if len(ins) != 1:
            raise LowbitError(f"{prefixes}: fused projections disagree on input size {sorted(ins)}")
        read = self.checkpoint.read_float32

        def in_out():
            parts = [read(w) if conv1d else read(w).T for w in weights]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

        def out_in():
            parts = [read(w).T if conv1d else read(w) for w in weights]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

        bias = None
        if any(biases):

            def bias():
                return np.concatenate(
                    [read(b) if b else np.zeros(n, np.float32) for b, n in zip(biases, outs)]
                )

        return LinearWeights(ins.pop(), sum(outs), in_out, out_in, bias)

    def norm(self, prefix: str, layer: int | None = None, offset: float = 0.0):
        """(weight loader, bias loader or None, size) of a norm; `offset` is added to the weight."""
        prefix = prefix.format(i=layer)
        shape, weight = self.tensor(f"{prefix}.weight")
        bias_name = self.resolve(f"{prefix}.bias", required=False)
        bias = (lambda: self.checkpoint.read_float32(bias_name)) if bias_name else None
        if offset:
            return (lambda: weight() + np.float32(offset)), bias, shape[0]
        return weight, bias, shape[0]
