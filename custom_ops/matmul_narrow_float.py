"""`lowbit.cpu.MatMulNarrowFloat`: a matmul over weights kept in their stored width (float16, bfloat16, float8 e4m3fn,
float8 e5m2) and widened to float32 in registers, run by a compiled kernel of our own (custom_ops/kernels/
matmul_narrow_float.c) that ONNX Runtime loads as a custom op library.

ONNX Runtime's CPU provider has no float16 or float8 MatMul on x86: it folds such weights (a Cast of a float16
initializer, a DequantizeLinear of a float8 one) into float32 copies at load, which double (float16) or quadruple
(float8) the bytes every decode step reads; and a float32 weight whose values are all bfloat16 (a bfloat16
checkpoint converted to float32) can be read as its 16 high bits. The node exists only in the graphs the runtime
builds in memory
(runtime/narrow_float_weights.py); files on disk keep their standard nodes, which are its fallback. Arithmetic:

    w[k, n]: bfloat16: the float32 whose high half it is; else the weight as a float16: itself; e5m2: its byte as a
             float16's high byte (the same value); e4m3fn: sign and the other 7 bits shifted into a float16, the
             value / 256 (exact, subnormals included)
    f[n] = scales[n] (or scales[0]) * (256 for e4m3fn, else 1), float32 (w[k, n] * f[n] is the weight
             DequantizeLinear makes; e2m1: f = 1, each w already times its block's step)
    Y[m, n] = acc * f[n] after acc = 0; for k in order: acc = fma(A[m, k], w[k, n], acc) (a fused multiply-add:
             the exact product plus acc, rounded once to float32, `fma32`; the column's factor once on the finished
             sum, not on every weight: a multiply fewer per weight, the same product up to float32 rounding)

With `input_type` 17 or 19 (and a scalar `input_scale` s), A is first fake-quantized as ONNX Runtime's
QuantizeLinear -> DequantizeLinear to that float8 type with zero point 0 does it (`fake_quantize`):
A <- float(float8(clip(A / s, -max, max))) * s, float32 division, round to nearest even, saturating. With
`input_type` 23, A is fake-quantized as NVFP4 activations with the global scale s (`lowbit.NVFP4ActivationQDQ`).

`reference_matmul` computes this in numpy; the kernel's result is equal bit for bit, for every M (each output is
summed in the same order whatever the batch, the prompt or the threads).

Inputs: A float32 [..., K]; B uint8 [N_pad / 16, K, 16 * bytes] (`pack`; bytes = 2 for (b)float16, 1 for float8;
bfloat16 tile rows in the column order BFLOAT16_ORDER);
scales float32 [N_pad] or [1]; input_scale float32 [1] (optional). Attributes: K, N, weight_type (10, 17 or 19,
as onnx.TensorProto), input_type (0, 17, 19 or 23; optional). Output Y float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAIN = "lowbit.cpu"
OP_TYPE = "MatMulNarrowFloat"
TILE = 16  # columns per tile of B
FLOAT16, BFLOAT16, FLOAT8E4M3FN, FLOAT8E5M2, FLOAT4E2M1 = 10, 16, 17, 19, 23  # onnx.TensorProto data types
ROW_BYTES = {FLOAT16: 32, BFLOAT16: 32, FLOAT8E4M3FN: 16, FLOAT8E5M2: 16, FLOAT4E2M1: 8}  # a tile's row, 16 weights
UNIT = {FLOAT16: 1.0, BFLOAT16: 1.0, FLOAT8E4M3FN: 256.0, FLOAT8E5M2: 1.0, FLOAT4E2M1: 1.0}  # w == 1 as stored
FP4_BLOCK = 16  # rows of K per step of a FLOAT4E2M1 weight (NVFP4's block)
# a bfloat16 tile row's columns as stored: the kernel's in-lane unpacks (vpunpcklwd / vpunpckhwd with zeros) then
# give columns 0..7 and 8..15 as float32 in two instructions
BFLOAT16_ORDER = np.array([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)  # code 8: +0
FLOAT8_MAX = {FLOAT8E4M3FN: 448.0, FLOAT8E5M2: 57344.0}


@dataclass(frozen=True)
class NarrowFloatWeight:
    b: np.ndarray  # uint8 [N_pad / 16, K, 16 * bytes]
    scales: np.ndarray  # float32 [N_pad], or [1]
    k: int
    n: int
    weight_type: int


def stored_bits(weights: np.ndarray) -> tuple[np.ndarray, int]:
    """A float16 array, or an ml_dtypes bfloat16 / float8_e4m3fn / float8_e5m2 array -> (its raw bits: uint16 or
    uint8, the onnx data type)."""
    name = np.dtype(weights.dtype).name
    types = {"float16": (np.uint16, FLOAT16), "bfloat16": (np.uint16, BFLOAT16),
             "float8_e4m3fn": (np.uint8, FLOAT8E4M3FN), "float8_e5m2": (np.uint8, FLOAT8E5M2)}
    if name not in types:
        raise ValueError(f"weights of {name}: only float16, bfloat16, float8_e4m3fn and float8_e5m2 are narrow "
                         "floats here")
    bits, weight_type = types[name]
    return np.asarray(weights).view(bits), weight_type


def pack(weights: np.ndarray, scales=None, transposed: bool = False) -> NarrowFloatWeight:
    """weights [K, N] (`transposed`: [N, K], as Gemm's transB reads them) of float16, float8_e4m3fn or float8_e5m2;
    scales: None (1), a scalar, or [N] (one per output column) -> the kernel's arrays."""
    bits, weight_type = stored_bits(weights)
    if bits.ndim != 2:
        raise ValueError(f"weights must be 2-D, got {bits.shape}")
    n, k = bits.shape if transposed else bits.shape[::-1]
    n_pad = -(-n // TILE) * TILE
    columns = np.zeros((n_pad, k), bits.dtype)  # one row per output column
    columns[:n] = bits if transposed else bits.T
    b = columns.reshape(n_pad // TILE, TILE, k).transpose(0, 2, 1)  # [tiles, K, 16]
    if weight_type == BFLOAT16:
        b = b[..., BFLOAT16_ORDER]
    b = np.ascontiguousarray(b)
    scales = np.float32(1) if scales is None else np.asarray(scales, np.float32)
    if scales.size == 1:
        s = scales.reshape(1)
    elif scales.shape == (n,):
        s = np.zeros(n_pad, np.float32)
        s[:n] = scales
    else:
        raise ValueError(f"scales {scales.shape}: expected one scale or [{n}]")
    return NarrowFloatWeight(b.view(np.uint8).reshape(n_pad // TILE, k, -1), np.ascontiguousarray(s), k, n,
                             weight_type)


def exact_bfloat16(weights: np.ndarray) -> np.ndarray | None:
    """float32 weights as ml_dtypes bfloat16 where every value is one (the low 16 bits of each are zero: a bfloat16
    checkpoint converted to float32), else None."""
    import ml_dtypes

    flat = np.asarray(weights).reshape(-1)
    if flat.dtype != np.float32 or np.any(flat[:4096].view(np.uint32) & 0xFFFF):  # most float32 weights stop here
        return None
    bits = np.ascontiguousarray(weights, np.float32).view(np.uint32)
    if np.any(bits & 0xFFFF):
        return None
    return (bits >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)


def pack_e2m1(codes: np.ndarray, steps: np.ndarray) -> NarrowFloatWeight:
    """NVFP4 weights: e2m1 codes [N, K] (0..15, K a multiple of 16) and each block's float32 step [N, K / 16]
    (s / gs: the FP8 block scale over the global scale) -> the kernel's arrays (`weight_type` 23). Tile t, row k:
    8 bytes, byte c holding column c's code (low nibble) and column c + 8's (high nibble); `scales` holds the
    steps tile by tile, [N_pad / 16, K / 16, 16]. The kernel's weight is e2m1(code) * step in float32 (one rounding,
    as the dequantization ORT folds; code 8, -0, gives +0)."""
    codes = np.asarray(codes, np.uint8)
    n, k = codes.shape
    if k % FP4_BLOCK or np.shape(steps) != (n, k // FP4_BLOCK):
        raise ValueError(f"codes {codes.shape}, steps {np.shape(steps)}: K must be a multiple of 16, steps [N, K/16]")
    n_pad = -(-n // TILE) * TILE
    padded = np.zeros((n_pad, k), np.uint8)
    padded[:n] = codes
    rows = padded.reshape(n_pad // TILE, TILE, k).transpose(0, 2, 1)  # [tiles, K, 16 columns]
    b = np.ascontiguousarray(rows[..., :8] | (rows[..., 8:] << 4))
    step = np.zeros((n_pad, k // FP4_BLOCK), np.float32)
    step[:n] = steps
    tiled = np.ascontiguousarray(step.reshape(n_pad // TILE, TILE, -1).transpose(0, 2, 1))
    return NarrowFloatWeight(b, tiled, k, n, FLOAT4E2M1)


def widened(weight: NarrowFloatWeight) -> np.ndarray:
    """w [K, N_pad] float32: the kernel's w[k, n] (for e4m3fn, the value / 256; for e2m1, times its step)."""
    tiles, k, _ = weight.b.shape
    if weight.weight_type == FLOAT4E2M1:
        codes = np.concatenate([weight.b & 0x0F, weight.b >> 4], axis=-1)  # [tiles, K, 16 columns]
        steps = np.repeat(weight.scales, FP4_BLOCK, axis=1)  # [tiles, K, 16]
        return (E2M1_VALUES[codes] * steps).transpose(1, 0, 2).reshape(k, tiles * TILE)
    if weight.weight_type == BFLOAT16:
        high = weight.b.view(np.uint16)[..., BFLOAT16_ORDER].astype(np.uint32) << 16  # the order is its own inverse
        return high.view(np.float32).transpose(1, 0, 2).reshape(k, tiles * TILE)
    raw = weight.b.view(np.uint16) if weight.weight_type == FLOAT16 else weight.b.astype(np.uint16)
    if weight.weight_type == FLOAT8E5M2:
        raw = raw << 8
    elif weight.weight_type == FLOAT8E4M3FN:
        raw = ((raw & 0x80) << 8) | ((raw & 0x7F) << 7)
    return raw.astype(np.uint16).view(np.float16).astype(np.float32).transpose(1, 0, 2).reshape(k, tiles * TILE)


def factors(weight: NarrowFloatWeight) -> np.ndarray:
    """f [N_pad] float32 (ones for e2m1, whose steps are in `widened`)."""
    n_pad = weight.b.shape[0] * TILE
    if weight.weight_type == FLOAT4E2M1:
        return np.ones(n_pad, np.float32)
    return np.broadcast_to(weight.scales * np.float32(UNIT[weight.weight_type]), (n_pad,)).astype(np.float32)


def fake_quantize(a: np.ndarray, scale: float, input_type: int) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear to float8 `input_type` (17 e4m3fn, 19 e5m2) with a scalar scale and zero
    point 0, saturating, as ONNX Runtime computes the pair in float32; with 23 (e2m1), NVFP4 activations with the
    global scale `scale` (`lowbit.nvfp4.fake_quantize_activations`, what lowbit.NVFP4ActivationQDQ computes)."""
    import ml_dtypes

    if input_type == FLOAT4E2M1:
        from lowbit import nvfp4

        return nvfp4.fake_quantize_activations(np.asarray(a, np.float32), np.float32(scale))

    dtype = {FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn, FLOAT8E5M2: ml_dtypes.float8_e5m2}[input_type]
    scale = np.float32(scale)
    limit = np.float32(FLOAT8_MAX[input_type])
    with np.errstate(over="ignore"):
        scaled = np.clip(np.asarray(a, np.float32) / scale, -limit, limit)
    return scaled.astype(dtype).astype(np.float32) * scale


def reference_matmul(a: np.ndarray, weight: NarrowFloatWeight, input_quant: tuple[int, float] | None = None
                     ) -> np.ndarray:
    """Y [..., N] float32, the kernel's arithmetic step for step; `input_quant`: (input_type, input_scale)."""
    a = np.asarray(a, np.float32)
    if input_quant is not None:
        a = fake_quantize(a, input_quant[1], input_quant[0])
    lead = a.shape[:-1]
    a2 = a.reshape(-1, weight.k)
    w = widened(weight)
    acc = np.zeros((a2.shape[0], w.shape[1]), np.float32)
    for k in range(weight.k):
        acc = fma32(a2[:, k:k + 1], w[k], acc)
    return (acc * factors(weight))[:, : weight.n].reshape(*lead, weight.n)


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once, to nearest even, as the CPU's fused multiply-add (finite values): the product
    is exact in float64 (24 + 24 bits), the sum s rounded to float64 with its exact error e (TwoSum); rounding s to
    float32 gives the right result except where s lies exactly halfway between two float32 values and e is not 0:
    then the exact sum lies on e's side of that point."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c64 = np.asarray(c, np.float32).astype(np.float64)
    s = p + c64
    t = s - p
    e = (p - (s - t)) + (c64 - t)
    r = s.astype(np.float32)
    below = np.where(r.astype(np.float64) <= s, r, np.nextafter(r, np.float32(-np.inf)))
    above = np.nextafter(below, np.float32(np.inf))
    halfway = (s == (below.astype(np.float64) + above.astype(np.float64)) / 2) & (e != 0)
    return np.where(halfway, np.where(e > 0, above, below), r).astype(np.float32)
