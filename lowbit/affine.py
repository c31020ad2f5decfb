"""Affine weight quantization, numpy in and numpy out (no graph code).

A weight W [N, K] (output features, input features) is cut along K into groups of
`group_size` (None: one group per row, i.e. per channel). K is zero-padded to a multiple of
the group size. Each group g gets a scale s and a zero point z, and each value an unsigned
code q in [0, 2^bits - 1]; the dequantized value is (q - z) * s. The rules (`RULES`) are
written out in docs/schemes.md. Scales are rounded to the storage dtype *before* codes are
computed, so the codes are exact for the scales that are stored. All arithmetic is float32;
rounding is half-to-even (np.rint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lowbit import nvfp4
from lowbit.fp8 import FLOAT8, RULE_FLAVOURS, quantize_weight

FLOAT8_RULES = RULE_FLAVOURS  # float8 grids (lowbit.fp8): codes are fp8 bit patterns, not affine integers
FLOAT4_RULES = {"nvfp4": nvfp4.ELEMENT}  # FP4 e2m1 codes, FP8 block scales, a global scale (lowbit.nvfp4)


@dataclass(frozen=True)
class WeightQuant:
    """How to quantize one weight: bit width, group size along K (None = per channel), rule."""

    bits: int
    group_size: int | None
    rule: str = "symmetric"
    clip_search: bool = False  # per group, the shrunk range (CLIP_RATIOS) with the least squared error
    per_tensor: bool = False  # one scale for the whole weight (float8 rules only)

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be within 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.rule not in RULES and self.rule not in FLOAT8_RULES and self.rule not in FLOAT4_RULES:
            raise ValueError(f"unknown rule '{self.rule}' (known: {', '.join([*RULES, *FLOAT8_RULES, *FLOAT4_RULES])})")
        if self.rule in FLOAT4_RULES and (self.bits != 4 or self.group_size != nvfp4.GROUP or self.clip_search):
            raise ValueError(f"rule {self.rule} is 4-bit in groups of {nvfp4.GROUP}, without clip search")
        if self.rule in FLOAT8_RULES and (self.bits != 8 or self.group_size is not None or self.clip_search):
            raise ValueError(f"rule {self.rule} is 8-bit, per channel or per tensor, without clip search")
        if self.per_tensor and self.rule not in FLOAT8_RULES:
            raise ValueError(f"per-tensor scales are implemented for the float8 rules only, not {self.rule}")

    @property
    def integer_zero_point(self) -> bool:
        return self.rule in RULES and RULES[self.rule].integer_zero_point

    @property
    def centered(self) -> bool:
        """Zero point 2^(bits-1) for every group: stored without zero points (signed codes in DequantizeLinear)."""
        return self.rule in RULES and RULES[self.rule].centered

    def describe(self) -> str:
        group = "per-tensor" if self.per_tensor else f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{self.bits}-bit {group} {self.rule}" + (" clip-search" if self.clip_search else "")


@dataclass(frozen=True)
class QuantizedWeight:
    codes: np.ndarray  # uint8 [N, K_padded], values in [0, 2^bits - 1]
    scales: np.ndarray  # [N, G] in the storage dtype
    zero_points: np.ndarray  # [N, G]: uint8 for integer rules, storage dtype otherwise
    bits: int
    group_size: int  # the effective group size (K for per-channel)
    k: int  # original K (before padding)
    element: str | None = None  # float8 rules: "e4m3" / "e5m2", codes are its bit patterns and zero points 0
    global_scale: np.float32 | None = None  # nvfp4 (element "e2m1"): values are e2m1 · scale (float8) / global_scale

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def groups(self) -> int:
        return self.scales.shape[1]


@dataclass(frozen=True)
class Rule:
    """scale and zero point per group from the float32 groups [N, G, g]."""

    params: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray | None]]  # (scale, range minimum or None)
    integer_zero_point: bool
    centered: bool = False  # the zero point is always 2^(bits-1) (params return no minimum): no zero-point tensor


def _symmetric_params(groups: np.ndarray, bits: int):
    # s = max|w| / (2^(b-1) - 1); codes centred on z = 2^(b-1) (ORT's default zero point), so
    # q - z = clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1): MLC's q4f16_1 / q3f16_1 values.
    scale = np.abs(groups).max(axis=-1) / np.float32(2 ** (bits - 1) - 1)
    return scale, None


def _symmetric_full_params(groups: np.ndarray, bits: int):
    # the full signed range (ORT's MatMulNBits quantizer, llama.cpp's Q4_0): the value of largest magnitude,
    # sign kept, maps to code 0 = -2^(b-1) around z = 2^(b-1), so s = m / -2^(b-1) (negative when m > 0)
    # and the other side reaches 2^(b-1) - 1; ties take the first such value in the group
    index = np.abs(groups).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(groups, index, axis=-1)[..., 0]
    return extreme / np.float32(-(2 ** (bits - 1))), None


def _asymmetric_params(groups: np.ndarray, bits: int):
    # range widened to include 0, so the integer zero point lies within [0, 2^b - 1]
    lo = np.minimum(groups.min(axis=-1), np.float32(0))
    hi = np.maximum(groups.max(axis=-1), np.float32(0))
    return (hi - lo) / np.float32(2**bits - 1), lo


def _minmax_params(groups: np.ndarray, bits: int):
    # DashInfer CPU uint8 rule: s = (max - min) / (2^b - 1), z = -min / s kept as a float
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)
    return (hi - lo) / np.float32(2**bits - 1), lo


RULES: dict[str, Rule] = {
    "symmetric": Rule(_symmetric_params, True, centered=True),
    "symmetric_full": Rule(_symmetric_full_params, True, centered=True),
    "asymmetric": Rule(_asymmetric_params, True),
    "minmax_float_zp": Rule(_minmax_params, False),
}


def group_size_for(quant: WeightQuant, k: int) -> int:
    return quant.group_size or k


def padded_k(quant: WeightQuant, k: int) -> int:
    g = group_size_for(quant, k)
    return -(-k // g) * g


ROWS_PER_CHUNK = 4096  # bounds the float temporaries of one call, whatever the layer size


def quantize(weight: np.ndarray, quant: WeightQuant, scale_dtype=np.float32) -> QuantizedWeight:
    """Quantize W [N, K] (float) with `quant`; scales (and float zero points) stored as `scale_dtype`."""
    if quant.rule in FLOAT8_RULES:
        return _quantize_float8(weight, quant, scale_dtype)
    if quant.rule in FLOAT4_RULES:
        return _quantize_nvfp4(weight, quant)
    n, k = weight.shape
    g = group_size_for(quant, k)
    kp = padded_k(quant, k)
    rule = RULES[quant.rule]
    codes = np.empty((n, kp), np.uint8)
    scales = np.empty((n, kp // g), scale_dtype)
    zero_points = np.empty((n, kp // g), np.uint8 if rule.integer_zero_point else scale_dtype)
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        codes[rows], scales[rows], zero_points[rows] = _quantize_rows(weight[rows], quant, g, kp, scale_dtype)
    return QuantizedWeight(codes, scales, zero_points, quant.bits, g, k)


# --clip-search: each group's range shrunk by these ratios (AWQ's and llama.cpp's grid), the least squared error wins
CLIP_RATIOS = tuple(1 - i / 20 for i in range(11))  # 1.0, 0.95, ..., 0.5


def _quantize_rows(weight, quant: WeightQuant, g: int, kp: int, scale_dtype):
    weight = np.asarray(weight, dtype=np.float32)
    n, k = weight.shape
    if kp != k:
        weight = np.pad(weight, ((0, 0), (0, kp - k)))
    groups = weight.reshape(n, kp // g, g)
    scale, lo = RULES[quant.rule].params(groups, quant.bits)
    best = _encode(groups, scale, lo, quant, scale_dtype)
    if quant.clip_search:
        best_error = _squared_error(groups, *best)
        for ratio in CLIP_RATIOS[1:]:
            ratio = np.float32(ratio)
            candidate = _encode(groups, scale * ratio, None if lo is None else lo * ratio, quant, scale_dtype)
            error = _squared_error(groups, *candidate)
            better = error < best_error  # strict: ties keep the wider range
            best = tuple(np.where(better[..., None] if c.ndim == 3 else better, c, b) for c, b in zip(candidate, best))
            best_error = np.minimum(error, best_error)
    codes, scale, zero_points = best
    return codes.reshape(n, kp), scale, zero_points


def _encode(groups: np.ndarray, scale: np.ndarray, lo: np.ndarray | None, quant: WeightQuant, scale_dtype):
    """Codes [N, G, g] uint8, scales [N, G] (storage dtype) and zero points for the groups, given float32 scales
    and (asymmetric rules) range minima."""
    qmax = 2**quant.bits - 1
    rule = RULES[quant.rule]
    scale = np.where(scale == 0, np.float32(1), scale).astype(scale_dtype)  # all-equal group: any scale works
    s32 = scale.astype(np.float32)
    if lo is None:  # symmetric rules: zero point 2^(b-1)
        zero = np.full(scale.shape, 2 ** (quant.bits - 1), np.float32)
    elif rule.integer_zero_point:
        zero = np.clip(np.rint(-lo / s32), 0, qmax)
    else:
        zero = (-lo / s32).astype(scale_dtype).astype(np.float32)
    scaled = groups / s32[..., None]
    if rule.integer_zero_point:
        np.rint(scaled, out=scaled)
        scaled += zero[..., None]
        zero_points = zero.astype(np.uint8)
    else:
        scaled += zero[..., None]
        np.rint(scaled, out=scaled)
        zero_points = zero.astype(scale_dtype)
    np.clip(scaled, 0, qmax, out=scaled)
    return scaled.astype(np.uint8), scale, zero_points


def _squared_error(groups: np.ndarray, codes, scale, zero_points) -> np.ndarray:
    values = (codes.astype(np.float32) - zero_points.astype(np.float32)[..., None]) * scale.astype(np.float32)[..., None]
    return np.square(groups - values).sum(axis=-1)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """(q - z) * s in float32, [N, K] (padding dropped); float8 codes: fp8 value * s; nvfp4: e2m1 value * s / gs."""
    if qw.element == nvfp4.ELEMENT:
        return nvfp4.dequantize(qw.codes, qw.scales, qw.global_scale)[:, : qw.k]
    if qw.element is not None:
        values = qw.codes.view(FLOAT8[qw.element].dtype).astype(np.float32)
        return values * qw.scales.astype(np.float32)
    n, g = qw.n, qw.group_size
    codes = qw.codes.reshape(n, -1, g).astype(np.float32)
    values = (codes - qw.zero_points.astype(np.float32)[..., None]) * qw.scales.astype(np.float32)[..., None]
    return values.reshape(n, -1)[:, : qw.k]


def _row_slice(qw: QuantizedWeight, rows: slice) -> QuantizedWeight:
    return QuantizedWeight(qw.codes[rows], qw.scales[rows], qw.zero_points[rows], qw.bits, qw.group_size, qw.k,
                           qw.element, qw.global_scale)


def relative_error(weight: np.ndarray, qw: QuantizedWeight) -> float:
    """max |W - dequant(W)| / max |W|: the per-layer number `lowbit convert` reports."""
    worst, peak = 0.0, 0.0
    for start in range(0, qw.n, ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        chunk = np.asarray(weight[rows], np.float32)
        worst = max(worst, float(np.abs(chunk - dequantize(_row_slice(qw, rows))).max()))
        peak = max(peak, float(np.abs(chunk).max()))
    return worst / (peak or 1.0)


def _quantize_float8(weight: np.ndarray, quant: WeightQuant, scale_dtype) -> QuantizedWeight:
    """Float8 rules (lowbit.fp8): codes = the fp8 bit patterns as uint8 [N, K], scales [N, 1] (per tensor: the one
    scale on every row), zero points 0."""
    values, scales = quantize_weight(weight, FLOAT8_RULES[quant.rule], quant.per_tensor, scale_dtype)
    n, k = values.shape
    return QuantizedWeight(values.view(np.uint8), scales, np.zeros((n, 1), np.uint8), 8, k, k,
                           FLOAT8_RULES[quant.rule])


def _quantize_nvfp4(weight: np.ndarray, quant: WeightQuant) -> QuantizedWeight:
    """NVFP4 (lowbit.nvfp4): codes = e2m1 bit patterns uint8 [N, K_padded], scales float8 e4m3 [N, G], zero points 0,
    one float32 global scale."""
    q = nvfp4.quantize(weight, quant.group_size)
    n, k = np.shape(weight)
    return QuantizedWeight(q.codes, q.scales, np.zeros((n, 1), np.uint8), 4, quant.group_size, k, nvfp4.ELEMENT,
                           q.global_scale)
