"""Symmetric quantize-dequantize of values for a clip range [-clip, clip], numpy in and out.

An element type is the grid a value lands on once divided by its scale: integers in
[-(2^(b-1) - 1), 2^(b-1) - 1] (`int2` … `int8`, the `symmetric` rule of lowbit.affine) or the
FP8 values of `float8_e4m3fn` (|v| <= 448) and `float8_e5m2` (|v| <= 57344) via ml_dtypes. The
scale is clip / max_value, so the clip value maps onto the largest representable value and values
beyond it saturate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class ElementType:
    name: str
    max_value: float  # the largest representable magnitude
    round: Callable[[np.ndarray], np.ndarray]  # values within [-max_value, max_value] -> nearest representable


def _fp8_rounding(dtype) -> Callable[[np.ndarray], np.ndarray]:
    return lambda v: np.asarray(v, np.float32).astype(dtype).astype(np.float64)


ELEMENT_TYPES: dict[str, ElementType] = {
    **{f"int{b}": ElementType(f"int{b}", float(2 ** (b - 1) - 1), np.rint) for b in range(2, 9)},
    "fp8_e4m3": ElementType("fp8_e4m3", 448.0, _fp8_rounding(ml_dtypes.float8_e4m3fn)),
    "fp8_e5m2": ElementType("fp8_e5m2", 57344.0, _fp8_rounding(ml_dtypes.float8_e5m2)),
}


def fake_quantize(values: np.ndarray, clip: float, element: ElementType) -> np.ndarray:
    """values (float64) rounded onto the grid of `element` scaled to [-clip, clip], back in float64."""
    values = np.asarray(values, dtype=np.float64)
    if clip <= 0.0:
        return np.zeros_like(values)
    scale = clip / element.max_value
    return element.round(np.clip(values / scale, -element.max_value, element.max_value)) * scale


def squared_error(values: np.ndarray, weights: np.ndarray, clip: float, element: ElementType) -> float:
    """Σ weight · (v − fake_quantize(v))²."""
    return float(np.sum(weights * (values - fake_quantize(values, clip, element)) ** 2))


def best_clip(values: np.ndarray, weights: np.ndarray, absmax: float, ratios, element: ElementType) -> float:
    """absmax · r for the ratio r of `ratios` with the least weighted squared error (ties: the first ratio)."""
    errors = [squared_error(values, weights, absmax * r, element) for r in ratios]
    return absmax * ratios[int(np.argmin(errors))]
