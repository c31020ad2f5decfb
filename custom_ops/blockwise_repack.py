"""`lowbit.MatMulBlockwise` weights as `com.microsoft.MatMulNBits` weights: numpy in, numpy out.

The runtime's load-time fast path (runtime/fast_paths.py) runs every MatMulBlockwise node as ORT's MatMulNBits
kernel (2/4/8 bits, power-of-two blocks of 16..256). The file keeps the blockwise layout; this module computes,
from its arrays, MatMulNBits arrays that hold the **same integer codes and the same scales**:

- codes: `bits` <= 4 become 4-bit codes, 5..8 become 8-bit codes (the same integers).
- groups: per-channel weights (one group per row) and groups that are multiples of 16 keep K's order, in blocks
  of the largest power of two (<= 128) dividing the group. Any other group of g rows becomes `padded_group`
  rows, whole blocks of one size chosen for the fewest bytes in ORT's packed form (`padded_group_and_block`:
  MLC's 40 -> 64 rows, one block of 64, at 4 bits). Each block carries its group's scale and zero point;
  padding rows hold the code that dequantizes to exactly 0.
- activations: where groups are padded, row p of the new layout reads x[..., `positions`[p]] (-1: padding). The
  runtime moves whole chunks of rows (`chunk` divides the group, K and 16: 8 for groups of 40), and a padding
  chunk repeats a real chunk of its own block (`chunk_index`), so ORT's per-block int8 quantization of the
  activations sees the same block maximum. Padding rows meet zero weights: the product is unchanged.
- integer zero points (symmetric, asymmetric rules): uint8 zero points (omitted when all equal 2^(nbits-1),
  MatMulNBits' default). Exact: the dequantized weights are equal bit for bit.
- float zero points (`minmax_float_zp`): (q - z)s = (q - c)s - (z - c)s with c = 2^(nbits-1). MatMulNBits with
  its default zero point c computes x (q - c)sᵀ, and `correction` [G, N] = (z - c)s is subtracted as
  groupsum(x) @ correction, groupsum(x) [..., G] being x summed over each group's K positions. Exact up to
  float rounding (centring on c keeps both terms small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lowbit.affine import dequantize
from lowbit.custom_ops import matmul_nbits
from lowbit.custom_ops.bitpack import pack_bytes, unpack_words

# Inputs are `blockwise.BlockwiseArrays` (or anything with its fields: words, scales, zero_points, bits, group_size,
# k). This module does not import blockwise.py, whose function bodies pull in onnx_ir (~40 MB): the runtime's
# fast path imports only this.

BLOCK_SIZES = matmul_nbits.BLOCK_SIZES[:-1]  # 16..128 (256 is never the cheaper choice below)
MAX_BLOCK = matmul_nbits.PER_CHANNEL_BLOCK  # 128: ORT's fastest block at int8 compute
BLOCK_OVERHEAD = 8  # bytes ORT's CPU kernel keeps per block besides the codes (float32 scale and block sum)
ROWS_PER_CHUNK = 512  # rows repacked at a time: bounds the unpacked temporaries


def target_bits(bits: int) -> int:
    return 4 if bits <= 4 else 8


def padded_group_and_block(bits: int, group_size: int, groups: int, k: int) -> tuple[int, int]:
    """(rows per group in the MatMulNBits layout, block size). One group per row or groups that are whole
    multiples of 16 keep K's order; any other group is padded to whole blocks of one size, the size that
    costs the fewest bytes in ORT's packed form (codes + BLOCK_OVERHEAD per block; ties: fewer rows).
    MLC's 40 at 4-bit: 64 rows in one block of 64 (40 bytes) rather than 48 in three of 16 (48 bytes)."""
    if groups == 1:
        return group_size, matmul_nbits.block_layout(None, k)[0]
    if group_size % BLOCK_SIZES[0] == 0:
        return group_size, min(group_size & -group_size, MAX_BLOCK)
    nbits = target_bits(bits)

    def cost(block):
        rows = -(-group_size // block) * block
        return rows * nbits // 8 + BLOCK_OVERHEAD * rows // block, rows

    block = min(BLOCK_SIZES, key=cost)
    return cost(block)[1], block


@dataclass(frozen=True)
class Layout:
    """Where a blockwise weight's K rows go in the MatMulNBits layout."""

    bits: int  # the blockwise code width
    group_size: int
    groups: int
    k: int

    @property
    def nbits(self) -> int:
        return target_bits(self.bits)

    @property
    def padded_group(self) -> int:
        return padded_group_and_block(self.bits, self.group_size, self.groups, self.k)[0]

    @property
    def block_size(self) -> int:
        return padded_group_and_block(self.bits, self.group_size, self.groups, self.k)[1]

    @property
    def relaid(self) -> bool:
        """True when the activations must be laid out again (groups padded inside K)."""
        return self.padded_group != self.group_size

    @property
    def k_out(self) -> int:
        """MatMulNBits' K: the length of the activations it reads. Relaid: every group but the last padded, the
        last one (rows up to K) not, its block left partial."""
        if not self.relaid:
            return self.k
        return (self.groups - 1) * (self.padded_group - self.group_size) + self.k

    @property
    def blocks(self) -> int:
        return -(-self.k_out // self.block_size)

    def positions(self) -> np.ndarray:
        """int64 [blocks * block_size]: the K position each MatMulNBits row holds, -1 for padding."""
        rows = np.arange(self.blocks * self.block_size, dtype=np.int64)
        if self.relaid:
            group, offset = np.divmod(rows, self.padded_group)
            source = np.where(offset < self.group_size, group * self.group_size + offset, -1)
        else:
            source = rows
        return np.where((source >= 0) & (source < self.k), source, -1)

    def block_groups(self) -> np.ndarray:
        """int64 [blocks]: the group whose scale and zero point each block carries."""
        starts = np.arange(self.blocks, dtype=np.int64) * self.block_size
        group_len = self.padded_group if self.relaid else self.group_size
        return np.minimum(starts // group_len, self.groups - 1)

    @property
    def chunk(self) -> int:
        """Rows that move together when the activations are laid out again: they divide the group, K and 16."""
        return math.gcd(self.group_size, self.k, BLOCK_SIZES[0])

    def chunk_index(self) -> np.ndarray:
        """int64 [k_out / chunk]: the activation chunk each chunk of MatMulNBits rows reads. A padding chunk repeats
        a real chunk of its own block (else of its group, else chunk 0): ORT's int8 compute quantizes activations
        per block, and a repeated value leaves the block's maximum as it is."""
        c = self.chunk
        index = self.positions()[: self.k_out : c] // c  # padding: -1 stays -1
        count, none = index.size, np.iinfo(np.int64).max
        for unit in (self.block_size // c, self.padded_group // c):
            padded = np.full(-(-count // unit) * unit, -1, np.int64)
            padded[:count] = index
            chunks = padded.reshape(-1, unit)  # a view: filled in place
            missing = chunks < 0
            first = np.where(missing, none, chunks).min(axis=1, keepdims=True)
            np.copyto(chunks, np.broadcast_to(first, chunks.shape), where=missing & (first != none))
            index = padded[:count]
        index[index < 0] = 0
        return index

    def gather_index(self) -> np.ndarray:
        """int64 [k_out]: the activation index each MatMulNBits row reads (`chunk_index` row by row)."""
        c = self.chunk
        return (self.chunk_index()[:, None] * c + np.arange(c)).reshape(-1)

    def group_matrix(self, dtype) -> np.ndarray:
        """[K, G] 0/1: x @ it sums x over each group's positions."""
        e = np.zeros((self.k, self.groups), dtype)
        e[np.arange(self.k), np.arange(self.k) // self.group_size] = 1
        return e


def layout_of(arrays) -> Layout:
    return Layout(arrays.bits, arrays.group_size, arrays.scales.shape[1], arrays.k)


def has_integer_zero_points(zero_points: np.ndarray, bits: int) -> bool:
    z = np.asarray(zero_points, np.float32)
    return bool(np.all((z == np.rint(z)) & (z >= 0) & (z <= 2**bits - 1)))


@dataclass(frozen=True)
class Repacked:
    weight: matmul_nbits.MatMulNBitsArrays  # in `layout` order; k = layout.k_out
    layout: Layout
    correction: np.ndarray | None  # float zero points: [G, N] (z - c) * s, in the scales' dtype


def repack(arrays, rows_per_chunk: int = ROWS_PER_CHUNK) -> Repacked:
    """The MatMulNBits arrays (and float-zero-point correction) of a blockwise weight, `rows_per_chunk`
    output rows at a time (`arrays.words` may be a memory map: only one chunk is unpacked at once)."""
    layout = layout_of(arrays)
    n = arrays.words.shape[0]
    nb, bs, blocks = layout.nbits, layout.block_size, layout.blocks
    centre = 2 ** (nb - 1)
    zero_points = np.broadcast_to(np.asarray(arrays.zero_points), np.shape(arrays.scales))  # [1, 1]: every group's
    integer = has_integer_zero_points(arrays.zero_points, arrays.bits)
    zp_int = zero_points.astype(np.float32).astype(np.uint8) if integer else None
    keep_zp = integer and bool(np.any(zp_int != centre))
    positions = layout.positions()
    real = positions >= 0
    source = positions[real]
    block_of = layout.block_groups()
    row_block = np.repeat(block_of, bs)  # group of each MatMulNBits row
    kp = layout.groups * layout.group_size

    b = np.empty((n, blocks, bs * nb // 8), np.uint8)
    zp_bytes = -(-blocks * nb // 8)
    packed_zp = np.empty((n, zp_bytes), np.uint8) if keep_zp else None
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(n, start + rows_per_chunk))
        codes = unpack_words(np.asarray(arrays.words[rows]), arrays.bits, kp)
        # padding rows hold their group's zero point (float zero points: MatMulNBits' default c): weight 0
        out = zp_int[rows][:, row_block] if integer else np.full((codes.shape[0], row_block.size), centre, np.uint8)
        out[:, real] = codes[:, source]
        b[rows] = pack_bytes(out.reshape(-1, blocks, bs), nb)
        if keep_zp:
            packed_zp[rows] = pack_bytes(zp_int[rows][:, block_of], nb)
    scales = np.ascontiguousarray(np.asarray(arrays.scales)[:, block_of]).reshape(-1)
    correction = None
    if not integer:
        z = zero_points.astype(np.float32)
        s = np.asarray(arrays.scales, np.float32)
        correction = ((z - np.float32(centre)) * s).T.astype(arrays.scales.dtype)
    weight = matmul_nbits.MatMulNBitsArrays(
        b, scales, None if packed_zp is None else packed_zp.reshape(-1), layout.k_out, n, nb, bs)
    return Repacked(weight, layout, correction)


# ------------------------------------------------------------------------------ references (tests)


def dequantize_relaid(repacked: Repacked) -> np.ndarray:
    """(q - zp) * s of the MatMulNBits arrays, float32 [N, k_out], in the new row order (no correction)."""
    return dequantize(matmul_nbits.unpack(repacked.weight))


def dequantize_original_order(repacked: Repacked) -> np.ndarray:
    """The weight the repacked arrays compute, float32 [N, K] in the original order, correction included."""
    layout = repacked.layout
    relaid = dequantize_relaid(repacked)
    positions = layout.positions()[: layout.k_out]
    w = np.zeros((relaid.shape[0], layout.k), np.float32)
    w[:, positions[positions >= 0]] = relaid[:, positions >= 0]
    if repacked.correction is not None:
        w -= repacked.correction.astype(np.float32).T[:, np.arange(layout.k) // layout.group_size]
    return w


def reference_matmul(a: np.ndarray, repacked: Repacked) -> np.ndarray:
    """What the fast-path graph computes, in float32: x[..., gather_index] @ W'ᵀ - groupsum(x) @ correction."""
    layout = repacked.layout
    x = a.astype(np.float32)
    relaid = x[..., layout.gather_index()] if layout.relaid else x
    y = relaid @ dequantize_relaid(repacked).T
    if repacked.correction is not None:
        y -= (x @ layout.group_matrix(np.float32)) @ repacked.correction.astype(np.float32)
    return y.astype(a.dtype)
