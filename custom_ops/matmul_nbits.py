"""`com.microsoft.MatMulNBits` (ONNX Runtime contrib op): layout, packing, reference kernel.

Y[M, N] = A[M, K] @ dequant(B).T with
- B: uint8 [N, k_blocks, block_size * bits / 8], codes packed low bits first;
- scales: [N * k_blocks] (A's dtype); dequant = (q - zp) * scale per block;
- zero_points: uint8 [N * ceil(k_blocks * bits / 8)] packed the same way, each row padded to a
  whole byte; absent = 2^(bits - 1);
- attributes K, N, bits (ORT's CPU kernel: 2, 4, 8), block_size (16, 32, 64, 128, 256),
  accuracy_level (0: float compute; 4: int8 activations).

A per-channel weight (one scale and zero point per output row) is the same weight with its
scale and zero point repeated over every block of the row, so it is stored here bit for bit in
blocks of `PER_CHANNEL_BLOCK` (the fastest block size of ORT's CPU kernel at int8 compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.affine import QuantizedWeight
from lowbit.custom_ops.bitpack import pack_bytes, unpack_bytes

DOMAIN = "com.microsoft"
BITS = (2, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
PER_CHANNEL_BLOCK = 128


@dataclass(frozen=True)
class MatMulNBitsArrays:
    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int
    block_size: int


def unsupported_reason(bits: int, group_size: int | None, integer_zero_point: bool) -> str | None:
    if bits not in BITS:
        return f"MatMulNBits takes {BITS} bits, not {bits}"
    if group_size is not None and group_size not in BLOCK_SIZES:
        return f"MatMulNBits takes block sizes {BLOCK_SIZES} (or per-channel), not {group_size}"
    if not integer_zero_point:
        return "MatMulNBits needs integer zero points"
    return None


def block_layout(group_size: int | None, k: int) -> tuple[int, int]:
    """(block_size, blocks per row) that store a weight quantized with `group_size` (None: per channel)."""
    block = group_size or min(PER_CHANNEL_BLOCK, max(BLOCK_SIZES[0], 1 << (k - 1).bit_length()))
    return block, -(-k // block)


def as_blocks(qw: QuantizedWeight, block_size: int) -> QuantizedWeight:
    """A per-channel weight as the identical weight in blocks: scale and zero point repeated per block, codes
    padded with the zero point (so padding dequantizes to exactly 0)."""
    if qw.group_size == block_size:
        return qw
    assert qw.groups == 1, "only per-channel weights are regrouped"
    blocks = -(-qw.k // block_size)
    codes = np.empty((qw.n, blocks * block_size), np.uint8)
    codes[:, : qw.k] = qw.codes[:, : qw.k]
    codes[:, qw.k:] = qw.zero_points
    return QuantizedWeight(codes, np.repeat(qw.scales, blocks, axis=1), np.repeat(qw.zero_points, blocks, axis=1),
                           qw.bits, block_size, qw.k)


def pack(qw: QuantizedWeight, symmetric: bool, block_size: int | None = None) -> MatMulNBitsArrays:
    """`symmetric`: zero points all equal 2^(bits-1), so the input is left out. `block_size`: store a
    per-channel weight in blocks of this size (default: the weight's own group size)."""
    qw = as_blocks(qw, block_size or qw.group_size)
    n, blocks, bs = qw.n, qw.groups, qw.group_size
    b = pack_bytes(qw.codes.reshape(n, blocks, bs), qw.bits)
    zp = None if symmetric else pack_bytes(qw.zero_points, qw.bits).reshape(-1)
    return MatMulNBitsArrays(b, qw.scales.reshape(-1), zp, qw.k, n, qw.bits, bs)


def unpack(arrays: MatMulNBitsArrays) -> QuantizedWeight:
    n, bits, bs = arrays.n, arrays.bits, arrays.block_size
    blocks = arrays.b.shape[1]
    codes = unpack_bytes(arrays.b, bits, bs).reshape(n, blocks * bs)
    if arrays.zero_points is None:
        zp = np.full((n, blocks), 2 ** (bits - 1), np.uint8)
    else:
        zp = unpack_bytes(arrays.zero_points.reshape(n, -1), bits, blocks)
    return QuantizedWeight(codes, arrays.scales.reshape(n, blocks), zp, bits, bs, arrays.k)


def reference(a: np.ndarray, arrays: MatMulNBitsArrays) -> np.ndarray:
    """Numpy kernel: dequantize B in float32 and multiply."""
    from lowbit.affine import dequantize

    w = dequantize(unpack(arrays))  # [N, K]
    return (a.astype(np.float32) @ w.T).astype(a.dtype)



def widen(arrays: MatMulNBitsArrays, bits: int = 4) -> MatMulNBitsArrays:
    """The same weight with `bits`-bit codes: every code and zero point shifted by 2^(bits-1) - 2^(b-1), so
    q - zp and hence the dequantized weight are unchanged (an absent zero point stays absent: both default to
    2^(bits-1)). ORT's CPU kernel runs 2-bit blocks slower than 4-bit ones at M > 1 (docs/targets.md)."""
    shift = np.uint8(2 ** (bits - 1) - 2 ** (arrays.bits - 1))
    n, blocks, bs = arrays.n, arrays.b.shape[1], arrays.block_size
    codes = unpack_bytes(arrays.b, arrays.bits, bs) + shift
    zp = None
    if arrays.zero_points is not None:
        zp = pack_bytes(unpack_bytes(arrays.zero_points.reshape(n, -1), arrays.bits, blocks) + shift, bits)
        zp = zp.reshape(-1)
    return MatMulNBitsArrays(pack_bytes(codes, bits), arrays.scales, zp, arrays.k, n, bits, bs)
