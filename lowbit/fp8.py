"""FP8 (float8_e4m3fn, float8_e5m2) symmetric quantization, numpy in and numpy out (no graph code).

A tensor x gets a scale s = max|x| / fp8_max (e4m3: 448, e5m2: 57344), computed in float32 and rounded to
the storage dtype of the scales; each value becomes fp8(clip(x / s, -fp8_max, fp8_max)), the cast rounding to
nearest even as `ml_dtypes` casts, and is read back as fp8 · s. Clipping first is ONNX QuantizeLinear's
`saturate=1` (ml_dtypes itself turns values beyond the range into NaN for e4m3fn and inf for e5m2). The
division is float32 (x and s as float32), as ONNX Runtime's QuantizeLinear computes it.

A scale that would fall below the smallest normal number of its storage dtype (float16: 2^-14, reached by
e5m2 whenever max|x| < 3.5) is raised to it: a subnormal float16 scale keeps only a few bits, and zero would
divide by zero. FP8's relative precision is the same over its whole normal range, so a larger scale than
max|x| / fp8_max only leaves the top of the grid unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Float8:
    name: str  # "e4m3" | "e5m2"
    dtype: np.dtype  # the ml_dtypes type
    max_value: float  # largest finite magnitude


FLOAT8 = {
    "e4m3": Float8("e4m3", np.dtype(ml_dtypes.float8_e4m3fn), 448.0),
    "e5m2": Float8("e5m2", np.dtype(ml_dtypes.float8_e5m2), 57344.0),
}
RULE_FLAVOURS = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}  # lowbit.affine.WeightQuant rules -> flavour


def scale_for(absmax, flavour: str, scale_dtype=np.float32) -> np.ndarray:
    """s = absmax / fp8_max in float32, rounded to `scale_dtype`, at least its smallest normal number."""
    fmt = FLOAT8[flavour]
    scale = np.asarray(np.asarray(absmax, np.float32) / np.float32(fmt.max_value), np.float32)
    tiny = np.float32(np.finfo(scale_dtype).tiny)
    return np.maximum(scale, tiny).astype(scale_dtype)


def to_float8(x: np.ndarray, scale, flavour: str) -> np.ndarray:
    """fp8(clip(x / s, ±fp8_max)) with x and s as float32: the values as the ml_dtypes float8 type."""
    fmt = FLOAT8[flavour]
    scaled = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    np.clip(scaled, -fmt.max_value, fmt.max_value, out=scaled)
    return scaled.astype(fmt.dtype)


def fake_quantize(x: np.ndarray, scale, flavour: str) -> np.ndarray:
    """to_float8(x, s) · s in float32: what DequantizeLinear(QuantizeLinear(x)) gives."""
    return to_float8(x, scale, flavour).astype(np.float32) * np.asarray(scale, np.float32)


def quantize_weight(weight: np.ndarray, flavour: str, per_tensor: bool, scale_dtype=np.float32):
    """W [N, K] -> (fp8 values [N, K], scales [N, 1] in `scale_dtype`): one scale for the whole tensor
    (repeated per row) or one per output row."""
    weight = np.asarray(weight, np.float32)
    absmax = np.abs(weight).max() if per_tensor else np.abs(weight).max(axis=1)
    scales = np.broadcast_to(scale_for(absmax, flavour, scale_dtype), (weight.shape[0],)).reshape(-1, 1)
    return to_float8(weight, scales, flavour), np.ascontiguousarray(scales)
