"""`lowbit.cpu.MatMulInt8Int8`: a matmul over 8-bit weight codes with int8 activations, run by lowbit's compiled CPU
kernel (custom_ops/kernels/matmul_int4_int8.c, beside `lowbit.cpu.MatMulInt4Int8`).

It is `lowbit.cpu.MatMulInt4Int8` (custom_ops/matmul_int4_int8.py) for codes 0..255: the same arithmetic, per row m
of A [M, K] and group g of `group_size` rows of K,

    amax = max |A[m, k]| over the group; sx = amax / 127; xq = rint(A[m, k] * (127 / amax)) (0 where amax == 0)
    dot[n] = sum of q[k, n] * xq[k] over the group (integers); xsum = sum of the group's xq
    Y[m, n] = sum over g, in order, of float32(dot[n] - z[g, n] * xsum) * (s[g, n] * sx)  (float32, no fused add)

which is how ONNX Runtime's 8-bit MatMulNBits computes at accuracy level 4 (int8 activations per block of K), and
`reference_matmul` computes it in numpy (equal bit for bit). The kernel widens each pair of rows' codes to int16
and multiplies them with the pair's activations in one `vpmaddwd` (int32 sums, exact).

Like its 4-bit sibling, the node exists only in graphs the runtime builds in memory (runtime/fast_paths.py, from
8-bit MatMulNBits at accuracy level 4); the folder keeps the node it replaces, which is its fallback.

Inputs: A float32 [..., K]; B uint8 [N_pad / 16, groups, group_size / 2, 32] (`pack`: pair p of group g of tile t
holds q[g * group_size + 2p + h, 16t + c] at byte 8 * CHUNK_ORDER[c // 4] + 2 (c % 4) + h); scales float32 and
zero_points uint8 [N_pad / 16, groups, 16], or zero_points [1] where all are equal (as MatMulInt4Int8's).
Attributes: K, N, group_size (even), activation (optional: 1 NVFP4 activations, input 4 the global scale, as
MatMulInt4Int8's; 2 uint8 activations per tensor as DynamicQuantizeLinear makes them; 3 uint8 with input 4 as the
scale and input_zero_point, as QuantizeLinear: `uint8_activations`), float_zero_points (optional, as
MatMulInt4Int8's). Output: Y float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.custom_ops.matmul_int4_int8 import (TILE, activation_quantizer, reference_from_codes, tile_codes,
                                                  tile_scales_and_zero_points)

DOMAIN = "lowbit.cpu"
OP_TYPE = "MatMulInt8Int8"
MAX_CODE = 255
# the order of a pair's four 8-byte quarters (columns 0-3, 4-7, 8-11, 12-15) in B: the kernel's in-lane unpacks
# with zeros (vpunpcklbw / vpunpckhbw) then give columns 0..7 and 8..15 as int16; the order is its own inverse
CHUNK_ORDER = [0, 2, 1, 3]


@dataclass(frozen=True)
class Int8Int8Weight:
    b: np.ndarray  # uint8 [N_pad / 16, groups, group_size / 2, 32]
    scales: np.ndarray  # float32 [N_pad / 16, groups, 16]
    zero_points: np.ndarray  # uint8 [N_pad / 16, groups, 16], or [1] where all are equal
    k: int
    n: int
    group_size: int
    float_zero_points: np.ndarray | None = None  # float32 [N_pad / 16, groups, 16] (matmul_int4_int8's
    # `with_float_zero_points`)

    @property
    def groups(self) -> int:
        return self.scales.shape[1]


def supports(group_size: int) -> bool:
    return group_size >= 2 and group_size % 2 == 0


def pack(codes: np.ndarray, scales: np.ndarray, zero_points, group_size: int) -> Int8Int8Weight:
    """codes: integers 0..255, [N, K] (one row per output column, as MatMulNBits stores them); scales [groups, N];
    zero_points [groups, N] (integers 0..255) or a scalar -> the kernel's arrays."""
    n, k = codes.shape
    return pack_rows(lambda start, stop: codes[start:stop], n, k, scales, zero_points, group_size)


def pack_rows(read_codes, n: int, k: int, scales: np.ndarray, zero_points, group_size: int,
              rows_per_chunk: int = 4096) -> Int8Int8Weight:
    """`pack`, reading the codes `rows_per_chunk` output columns at a time: `read_codes(start, stop)` -> integers
    [stop - start, >= K] (columns past K are ignored). Only one chunk is unpacked at once."""
    if not supports(group_size):
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    groups = -(-k // group_size)
    if np.shape(scales) != (groups, n):
        raise ValueError(f"scales {np.shape(scales)} != ({groups}, {n})")
    pairs = group_size // 2

    def arrange(padded: np.ndarray, tiles: int) -> np.ndarray:
        # [tiles, 16 columns, groups, pairs, 2 rows] -> [tiles, groups, pairs, 16 columns, 2 rows], then the
        # 8-byte quarters (4 columns each) in the order CHUNK_ORDER
        rows = padded.reshape(tiles, TILE, groups, pairs, 2).transpose(0, 2, 3, 1, 4)
        return rows.reshape(tiles, groups, pairs, 4, 8)[:, :, :, CHUNK_ORDER]

    b = tile_codes(read_codes, n, k, group_size, MAX_CODE, pairs, arrange, rows_per_chunk)
    return Int8Int8Weight(b, *tile_scales_and_zero_points(scales, zero_points, n), k, n, group_size)


def unpack_codes(weight: Int8Int8Weight) -> np.ndarray:
    """The codes [N, K] `weight` holds (inverse of `pack`)."""
    tiles, groups, pairs, _ = weight.b.shape
    rows = weight.b.reshape(tiles, groups, pairs, 4, 8)[:, :, :, CHUNK_ORDER].reshape(tiles, groups, pairs, TILE, 2)
    codes = rows.transpose(0, 3, 1, 2, 4).reshape(tiles * TILE, groups * pairs * 2)
    return codes[: weight.n, : weight.k]


def reference_matmul(a: np.ndarray, weight: Int8Int8Weight, nvfp4_global_scale=None, activation: int = 0,
                     input_scale=None, input_zero_point=None) -> np.ndarray:
    """Y [..., N] float32, the kernel's arithmetic step for step; with `nvfp4_global_scale`, the node's
    activation 1 (NVFP4 activations, matmul_int4_int8's `nvfp4_activations`); `activation` 2 or 3, uint8
    activations per tensor (`uint8_activations`; 3 with `input_scale` and `input_zero_point`)."""
    quantize = activation_quantizer(nvfp4_global_scale) if activation not in (2, 3) else \
        (lambda a2, group_size: uint8_activations(a2, group_size, input_scale, input_zero_point))
    return reference_from_codes(a, unpack_codes(weight), weight.scales, weight.zero_points, weight.group_size,
                                quantize, weight.float_zero_points)


def uint8_activations(a: np.ndarray, group_size: int, scale=None, zero_point=None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations 2 and 3: a float32 [M, K] quantized to uint8 with one scale and zero point z for the whole
    tensor, codes clip(rint(a / scale) + z, 0, 255) (half to even), as QuantizeLinear does; without `scale` (2) the
    scale and zero point DynamicQuantizeLinear takes: lo = min(0, min a), hi = max(0, max a), scale (hi - lo) / 255
    (1 where hi == lo), z = rint(clip(-lo / scale, 0, 255)). Returned as `quantize_activations` returns int8 ones:
    xq [M, groups, group_size] the codes minus z (0 past K), sx [M, groups] the scale, xsum [M, groups]."""
    a = np.asarray(a, np.float32)
    m, k = a.shape
    if scale is None:
        lo, hi = np.minimum(a.min(initial=0), np.float32(0)), np.maximum(a.max(initial=0), np.float32(0))
        scale = np.float32(1) if hi == lo else np.float32((hi - lo) / np.float32(255))
        zero = np.rint(np.clip(-lo / scale, 0, 255)).astype(np.float32)
    else:
        scale, zero = np.float32(scale), np.float32(zero_point)
    codes = np.clip(np.rint(a / scale) + zero, 0, 255)
    groups = -(-k // group_size)
    xq = np.zeros((m, groups * group_size), np.int32)
    xq[:, :k] = (codes - zero).astype(np.int32)
    xq = xq.reshape(m, groups, group_size)
    return xq, np.full((m, groups), scale, np.float32), xq.sum(axis=-1, dtype=np.int64)
