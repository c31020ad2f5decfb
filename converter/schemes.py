"""Scheme registry: a scheme is a named preset (compute dtype + quantization plan)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from converter.errors import LowbitError


@dataclass(frozen=True)
class Scheme:
    name: str
    dtype: np.dtype  # compute dtype of activations and unquantized weights
    description: str


SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    SCHEMES[scheme.name] = scheme
    return scheme


register_scheme(Scheme("q0f32", np.dtype(np.float32), "no quantization, float32 weights and compute (MLC q0f32)"))
register_scheme(Scheme("q0f16", np.dtype(np.float16), "no quantization, float16 weights and compute (MLC q0f16)"))


def get_scheme(name: str) -> Scheme:
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise LowbitError(f"unknown scheme '{name}' (known: {', '.join(sorted(SCHEMES))})")
    return scheme
