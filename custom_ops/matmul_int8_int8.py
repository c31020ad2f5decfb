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
Attributes: K, N, group_size (even). Output: Y float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.custom_ops.matmul_int4_int8 import (TILE, reference_from_codes, tile_codes,
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


def reference_matmul(a: np.ndarray, weight: Int8Int8Weight, nvfp4_global_scale=None) -> np.ndarray:
    """Y [..., N] float32, the kernel's arithmetic step for step; with `nvfp4_global_scale`, the node's
    activation 1 (NVFP4 activations, `nvfp4_activations`)."""
    quantize = None
    if nvfp4_global_scale is not None:
        def quantize(a2, group_size):
            return nvfp4_activations(a2, nvfp4_global_scale)
    return reference_from_codes(a, unpack_codes(weight), weight.scales, weight.zero_points, weight.group_size,
                                quantize)


# ------------------------------------------------------------------------------ NVFP4 (W4A4) as integers

NVFP4_ZERO_POINT = 12  # twice an e2m1 value (-12..12) plus 12: a code 0..24


def from_nvfp4(codes: np.ndarray, steps: np.ndarray) -> Int8Int8Weight:
    """NVFP4 weights, e2m1 codes [N, K] (K a multiple of 16) and each block's float32 step [N, K / 16] (s / gs), as
    this node's weight: codes twice the e2m1 value plus 12, zero point 12, scales half the steps, groups of 16. With
    NVFP4 activations (activation 1: twice their e2m1 values, scales half their steps) each block's integer dot
    times the two half steps is the block's exact product, e_x s_x e_w s_w summed."""
    from lowbit import nvfp4

    as_byte = (2 * nvfp4.E2M1 + NVFP4_ZERO_POINT).astype(np.uint8)  # e2m1 code -> 2e + 12 (code 8, -0: 12)
    halves = (np.asarray(steps, np.float32) * np.float32(0.5)).T  # [K / 16, N], exact
    return pack(as_byte[np.asarray(codes, np.uint8)], np.ascontiguousarray(halves), NVFP4_ZERO_POINT, nvfp4.GROUP)


def nvfp4_activations(a: np.ndarray, gs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a float32 [M, K] -> NVFP4 activations as `quantize_activations` returns int8 ones: xq [M, K / 16, 16] twice
    the e2m1 values (lowbit.nvfp4.fake_quantize_activations' values times 2 over their step), sx [M, K / 16] half
    the blocks' steps, xsum [M, K / 16]."""
    from lowbit import nvfp4

    codes, step = nvfp4.quantize_activations(a, gs)
    xq = (2 * nvfp4.E2M1[codes]).astype(np.int32)
    return xq, (step * np.float32(0.5)).astype(np.float32), xq.sum(axis=-1, dtype=np.int64)
