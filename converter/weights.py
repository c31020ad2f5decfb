"""Logical weights of a decoder (by `WeightMap`) as lazy tensors read from a `Checkpoint`.

`WeightSource.check(spec)` compares every tensor the graph will read with the shape the config
implies (from the checkpoint's headers, before anything is built or written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lowbit.converter.architectures.base import DecoderSpec, WeightMap
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

    # ------------------------------------------------------------------ checks against the config

    def check(self, spec: DecoderSpec) -> None:
        """Every tensor the decoder reads: present, floating point, and of the shape `spec` implies; and no
        layers beyond `spec.num_layers`. Raises LowbitError naming the tensor (and both shapes)."""
        self._check_layer_count(spec.num_layers)
        for name, shape, required in self._expected(spec):
            real = self.resolve(name, required)
            if real is None:
                continue
            found = tuple(self.checkpoint.shape(real))
            if found != shape:
                origin = getattr(self.checkpoint, "origin", lambda name: name)(real)  # an imported weight's tensor
                raise LowbitError(
                    f"tensor {origin}: shape {list(found)} does not match config.json (expected {list(shape)})"
                )
            if not self.checkpoint.is_float(real):
                raise LowbitError(f"tensor {real}: dtype {self.checkpoint.dtype_name(real)} is not a float weight "
                                  "(quantized checkpoints are not supported; convert from float weights)")

    def _expected(self, spec: DecoderSpec):
        """(name, shape, required) of each tensor the decoder reads."""
        n, s = self.names, spec
        h, d = s.hidden_size, s.head_dim
        yield f"{n.embed}.weight", (s.vocab_size, h), True
        if n.position_embed:
            yield f"{n.position_embed}.weight", (s.max_position_embeddings, h), True
        yield from self._norm_shapes(n.final_norm, h)
        if not s.tie_word_embeddings and n.lm_head:
            yield from self._linear_shapes((n.lm_head,), h, (s.vocab_size,), required=False)
        qkv_parts = (s.num_heads * d, s.num_kv_heads * d, s.num_kv_heads * d)
        up_parts = (s.intermediate_size, s.intermediate_size) if s.gated_mlp else (s.intermediate_size,)
        for i in range(s.num_layers):
            yield from self._norm_shapes(n.attn_norm.format(i=i), h)
            yield from self._norm_shapes(n.mlp_norm.format(i=i), h)
            yield from self._linear_shapes(tuple(p.format(i=i) for p in n.qkv), h, qkv_parts)
            yield from self._linear_shapes((n.o.format(i=i),), s.num_heads * d, (h,))
            yield from self._linear_shapes(tuple(p.format(i=i) for p in n.up), h, up_parts)
            yield from self._linear_shapes((n.down.format(i=i),), s.intermediate_size, (h,))
            if s.qk_norm:
                yield from self._norm_shapes(n.q_norm.format(i=i), d)
                yield from self._norm_shapes(n.k_norm.format(i=i), d)
            if s.sandwich_norm:
                yield from self._norm_shapes(n.post_attn_norm.format(i=i), h)
                yield from self._norm_shapes(n.post_mlp_norm.format(i=i), h)

    @staticmethod
    def _norm_shapes(prefix: str, size: int):
        yield f"{prefix}.weight", (size,), True
        yield f"{prefix}.bias", (size,), False

    def _linear_shapes(self, prefixes: tuple[str, ...], in_features: int, parts: tuple[int, ...], required=True):
        """Shapes of a (possibly fused) linear stored as `prefixes`: one tensor per logical part, or one for all."""
        if len(prefixes) != len(parts):
            if len(prefixes) != 1:
                raise LowbitError(f"{prefixes}: cannot split {len(parts)} projections over {len(prefixes)} tensors")
            parts = (sum(parts),)
        for prefix, out in zip(prefixes, parts):
            yield f"{prefix}.weight", ((in_features, out) if self.names.conv1d else (out, in_features)), required
            yield f"{prefix}.bias", (out,), False

    def _check_layer_count(self, num_layers: int) -> None:
        """Weights of layers >= num_layers mean config.json describes a different (shallower) model."""
        templates = {t.split("{i}")[0] for t in _layer_templates(self.names)}
        starts = templates | {t[len(p):] for t in templates for p in self.names.strip_prefixes if t.startswith(p)}
        for name in self.checkpoint.names():
            for start in starts:
                index = name[len(start):].split(".", 1)[0] if name.startswith(start) else ""
                if index.isdigit() and int(index) >= num_layers:
                    raise LowbitError(f"tensor {name} belongs to layer {index}, but config.json has "
                                      f"num_hidden_layers = {num_layers}")


def _layer_templates(names: WeightMap) -> list[str]:
    values = [getattr(names, f) for f in names.__dataclass_fields__]
    flat = [v for value in values for v in (value if isinstance(value, tuple) else (value,))]
    return [v for v in flat if isinstance(v, str) and "{i}" in v]
