"""`com.microsoft.GatherBlockQuantized` (ONNX Runtime contrib op) for quantized embeddings.

Y = dequant(data)[indices] with data uint8 [V, K * bits / 8] (bits 4: two codes a byte, low
nibble first; bits 8: one), scales [V, K / block_size], zero_points uint8 packed like data
([V, ceil(blocks * bits / 8)]), gather_axis 0, quantize_axis 1, block_size a power of two >= 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.affine import QuantizedWeight, dequantize
from lowbit.custom_ops.bitpack import pack_bytes, unpack_bytes

DOMAIN = "com.microsoft"
BITS = (4, 8)


@dataclass(frozen=True)
class GatherArrays:
    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int


def unsupported_reason(bits: int, group_size: int | None, integer_zero_point: bool, k: int) -> str | None:
    if bits not in BITS:
        return f"GatherBlockQuantized takes {BITS} bits, not {bits}"
    if group_size is None or group_size < 16 or group_size & (group_size - 1):
        return f"GatherBlockQuantized takes power-of-two blocks >= 16, not {group_size or 'per-channel'}"
    if k % group_size:
        return f"GatherBlockQuantized needs K ({k}) to be a multiple of the block ({group_size})"
    if not integer_zero_point:
        return "GatherBlockQuantized needs integer zero points"
    return None


def pack(qw: QuantizedWeight) -> GatherArrays:
    return GatherArrays(
        pack_bytes(qw.codes, qw.bits), qw.scales, pack_bytes(qw.zero_points, qw.bits), qw.bits, qw.group_size
    )


def unpack(arrays: GatherArrays) -> QuantizedWeight:
    k = arrays.data.shape[1] * 8 // arrays.bits
    blocks = arrays.scales.shape[1]
    codes = unpack_bytes(arrays.data, arrays.bits, k)
    zp = unpack_bytes(arrays.zero_points, arrays.bits, blocks)
    return QuantizedWeight(codes, arrays.scales, zp, arrays.bits, arrays.block_size, k)


def reference(indices: np.ndarray, arrays: GatherArrays) -> np.ndarray:
    return dequantize(unpack(arrays)).astype(arrays.scales.dtype)[indices]

