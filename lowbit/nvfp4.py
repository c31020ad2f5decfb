"""NVFP4 weights, numpy in and numpy out (no graph code): FP4 e2m1 values in blocks of 16 along K, one FP8 e4m3
scale per block, one float32 global scale per tensor, as compressed-tensors computes them (`NVFP4A16`: num_bits 4,
type float, strategy tensor_group, group_size 16, symmetric).

For W [N, K] in float32 (K zero-padded to a multiple of 16; zeros change no maximum):

- global scale gs = 448 · 6 / max|W| in float32 (`generate_gparam`), computed as torch computes a number over a
  tensor: (1 / max|W|) · 2688, two roundings; gs = 1 where that is not finite (an all-zero weight);
- block scale s = fp8_e4m3(clip(gs · (max|w_block| / 6), ±448)) (`calculate_qparams` with the global scale, then
  `round_to_quantized_type_dtype`: ml_dtypes' round-to-nearest-even cast); a block scale of 0 becomes 0.125, the
  e4m3 epsilon compressed-tensors substitutes;
- values w / (s / gs) in float32, clipped to ±6 and rounded to the e2m1 grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}
  (`cast_to_fp4`: ties to the even mantissa, 0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4);
- codes: the e2m1 bit pattern, sign bit 8 (set for every negative input, also those that round to zero: -0.0),
  magnitude index 0..7 below it; packed two to a byte, even column in the low nibble (`pack_fp4_to_uint8`; the
  same bytes as ONNX's FLOAT4E2M1 tensors and TensorRT's 4-bit packing);
- dequantized value e2m1(code) · (s / gs) in float32 (compressed-tensors' `dequantize`).

Input activations of the `NVFP4` preset (W4A4: num_bits 4, type float, strategy tensor_group, group_size 16,
dynamic local) take the same steps on x [..., K] (K a multiple of 16) with a static global scale: gs = 448 · 6 /
max|x| over the calibration set (`global_scale_from_absmax`, llm-compressor's `static_minmax` observer and
`generate_gparam`), the block scales computed from each row's blocks on every call (`fake_quantize_activations`:
compressed-tensors' `forward_quantize` → `compute_dynamic_scales_and_zp` → `fake_quantize`, bit for bit on float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

ELEMENT = "e2m1"
GROUP = 16  # NVFP4's block along K
FP4_MAX = np.float32(6.0)
FP8_MAX = np.float32(448.0)
SCALE_EPS = np.float32(0.125)  # compressed-tensors' replacement of a zero FP8 block scale
SCALE_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
E2M1 = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)  # code -> value (8: -0.0)
# |x| at or above each bound takes the next magnitude index (0.5 ... 6); strict bounds where the tie goes down
_UP_AT = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
_TIE_DOWN = np.array([True, False, True, False, True, False, True])  # ties at 0.25, 1.25, 2.5, 5 keep the lower value


@dataclass(frozen=True)
class NVFP4Weight:
    codes: np.ndarray  # uint8 [N, K_padded], e2m1 bit patterns 0..15
    scales: np.ndarray  # float8_e4m3fn [N, K_padded / 16]
    global_scale: np.float32  # gs: values are e2m1 · scale / gs


def global_scale(weight: np.ndarray) -> np.float32:
    """gs = (1 / max|W|) · (448 · 6) in float32 (max|W| at least float32's smallest normal); 1 where not finite."""
    return global_scale_from_absmax(np.abs(np.asarray(weight, np.float32)).max(initial=0))


def global_scale_from_absmax(absmax) -> np.float32:
    """`generate_gparam` of a range whose larger magnitude is `absmax` (rounded to float32 first): (1 / absmax) ·
    2688 in float32, absmax at least float32's smallest normal; 1 where not finite."""
    amax = np.maximum(np.float32(absmax), np.float32(np.finfo(np.float32).tiny))
    with np.errstate(over="ignore", divide="ignore"):
        gs = (np.float32(1) / amax) * np.float32(FP8_MAX * FP4_MAX)  # torch's `2688.0 / amax`: reciprocal, product
    return gs if np.isfinite(gs) else np.float32(1.0)


def block_scales(blocks: np.ndarray, gs: np.float32) -> np.ndarray:
    """FP8 e4m3 scales [..., G] for float32 blocks [..., G, 16]: fp8(clip(gs · (max|w| / 6), ±448)), 0 → 0.125."""
    scale = np.float32(gs) * (np.abs(blocks).max(axis=-1) / FP4_MAX)
    scale = np.clip(scale, -FP8_MAX, FP8_MAX).astype(SCALE_DTYPE)
    return np.where(scale.astype(np.float32) == 0, SCALE_EPS, scale.astype(np.float32)).astype(SCALE_DTYPE)


def to_e2m1_codes(x: np.ndarray) -> np.ndarray:
    """e2m1 codes (uint8 0..15) of float32 x, clipped to ±6 and rounded as compressed-tensors' `cast_to_fp4`."""
    x = np.asarray(x, np.float32)
    magnitude = np.minimum(np.abs(x), FP4_MAX)
    index = np.zeros(x.shape, np.uint8)
    for bound, tie_down in zip(_UP_AT, _TIE_DOWN):
        index += (magnitude > bound) if tie_down else (magnitude >= bound)
    return index | np.where(x < 0, np.uint8(8), np.uint8(0))


ROWS_PER_CHUNK = 4096  # bounds the float temporaries of one call, whatever the layer size


def quantize(weight: np.ndarray, group_size: int = GROUP) -> NVFP4Weight:
    """W [N, K] -> NVFP4Weight (K zero-padded to a multiple of `group_size`)."""
    n, k = weight.shape
    kp = -(-k // group_size) * group_size
    gs = global_scale(weight)
    codes = np.empty((n, kp), np.uint8)
    scales = np.empty((n, kp // group_size), SCALE_DTYPE)
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = np.asarray(weight[start:start + ROWS_PER_CHUNK], np.float32)
        if kp != k:
            rows = np.pad(rows, ((0, 0), (0, kp - k)))
        blocks = rows.reshape(len(rows), kp // group_size, group_size)
        chunk = scales[start:start + len(rows)] = block_scales(blocks, gs)
        step = chunk.astype(np.float32) / gs  # compressed-tensors' effective scale, s / gs in float32
        codes[start:start + len(rows)] = to_e2m1_codes(blocks / step[..., None]).reshape(len(rows), kp)
    return NVFP4Weight(codes, scales, gs)


def dequantize(codes: np.ndarray, scales: np.ndarray, gs) -> np.ndarray:
    """e2m1(code) · (s / gs) in float32, [N, K_padded] (compressed-tensors' dequantize, bit for bit)."""
    n, kp = codes.shape
    step = np.asarray(scales).astype(np.float32) / np.float32(gs)
    values = E2M1[codes].reshape(n, step.shape[1], -1) * step[..., None]
    return values.reshape(n, kp)


def inverse_global_scale(gs) -> np.float32:
    """1 / gs in float32: the scale of the DequantizeLinear that multiplies the FP8 block scales (TensorRT form)."""
    return np.float32(1) / np.float32(gs)


def dequantize_two_level(codes: np.ndarray, scales: np.ndarray, gs, dtype=np.float32) -> np.ndarray:
    """e2m1(code) · dtype(s · (1 / gs)): what DequantizeLinear(codes, DequantizeLinear(s, 1 / gs)) computes (the
    TensorRT form). It can differ from `dequantize` by a unit in the last place (a product, not a quotient)."""
    n, kp = codes.shape
    step = (np.asarray(scales).astype(np.float32) * inverse_global_scale(gs)).astype(dtype)
    values = E2M1[codes].astype(dtype).reshape(n, step.shape[1], -1) * step[..., None]
    return values.reshape(n, kp)


def pack(codes: np.ndarray) -> np.ndarray:
    """[N, K] codes (K even) -> uint8 [N, K / 2], column 2j in the low nibble, 2j + 1 in the high one."""
    codes = np.asarray(codes, np.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack`: uint8 [N, K / 2] -> codes [N, K]."""
    packed = np.asarray(packed, np.uint8)
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def quantize_activations(x: np.ndarray, gs) -> tuple[np.ndarray, np.ndarray]:
    """NVFP4 input activations: x [..., K] float32 (K a multiple of 16) in blocks of 16 along K -> the e2m1 codes
    [..., K / 16, 16] of x / step and each block's float32 step [..., K / 16], s / gs with the block scale
    s = fp8(gs · (max|x_block| / 6)) computed here (0 → 0.125)."""
    x = np.asarray(x, np.float32)
    if x.shape[-1] % GROUP:
        raise ValueError(f"FP4 activation blocks need K divisible by {GROUP}, got K = {x.shape[-1]}")
    blocks = x.reshape(*x.shape[:-1], -1, GROUP)
    step = block_scales(blocks, np.float32(gs)).astype(np.float32) / np.float32(gs)
    return to_e2m1_codes(blocks / step[..., None]), step


def fake_quantize_activations(x: np.ndarray, gs) -> np.ndarray:
    """NVFP4 input activations, quantized (`quantize_activations`) and dequantized: values e2m1(x / (s / gs)) ·
    (s / gs) in float32 (compressed-tensors' `fake_quantize` for tensor_group with dynamic local, bit for bit; a
    negative value that rounds to zero gives −0.0)."""
    codes, step = quantize_activations(x, gs)
    return (E2M1[codes] * step[..., None]).reshape(np.shape(x))
