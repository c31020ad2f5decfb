"""Integers packed into int32 words, as GPTQ, AWQ and compressed-tensors store them (numpy only).

Dense little-endian bitstream: along the packed axis, value i sits at bit i * bits of the line's
bitstream, word 0 holding bits 0..31, word 1 bits 32..63 and so on; a 3-bit value may straddle two
words. For 2, 4 and 8 bits this is simply `32 // bits` values per word, the first in the lowest bits.
"""

from __future__ import annotations

import numpy as np


def unpack_dense(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """uint8 [..., count, ...]: the first `count` values of each line of `words` (int32/uint32) along `axis`."""
    lines = np.moveaxis(np.asarray(words), axis, -1).astype("<i4", copy=False).view("<u4")
    if 32 % bits == 0:
        per = 32 // bits
        shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
        values = (lines[..., None] >> shifts) & np.uint32((1 << bits) - 1)
        values = values.reshape(*lines.shape[:-1], -1)[..., :count].astype(np.uint8)
    else:
        raw = np.ascontiguousarray(lines).view(np.uint8)
        stream = np.unpackbits(raw, axis=-1, bitorder="little")[..., : count * bits]
        stream = stream.reshape(*lines.shape[:-1], count, bits).astype(np.uint8)
        values = np.zeros(stream.shape[:-1], np.uint8)
        for b in range(bits):
            values |= stream[..., b] << np.uint8(b)
    return np.moveaxis(values, -1, axis)


def pack_dense(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Inverse of `unpack_dense`: int32 words, ceil(count * bits / 32) per line (for tests and benchmarks)."""
    lines = np.moveaxis(np.asarray(values, np.uint8), axis, -1)
    count = lines.shape[-1]
    stream = np.unpackbits(lines[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = stream.reshape(*lines.shape[:-1], count * bits)
    words = -(-count * bits // 32)
    stream = np.concatenate([stream, np.zeros((*stream.shape[:-1], words * 32 - count * bits), np.uint8)], axis=-1)
    packed = np.packbits(stream, axis=-1, bitorder="little").view("<u4").view("<i4")
    return np.moveaxis(packed, -1, axis)


def interleave_unpack(words: np.ndarray, order: tuple[int, ...], count: int) -> np.ndarray:
    """uint8 [..., count]: 4-bit values packed 8 to a word along the last axis, nibble j holding column
    `order[j]` of its eight (AWQ's [0, 2, 4, 6, 1, 3, 5, 7])."""
    nibbles = unpack_dense(words, 4, words.shape[-1] * 8, axis=-1)
    nibbles = nibbles.reshape(*words.shape[:-1], words.shape[-1], 8)
    out = np.empty_like(nibbles)
    out[..., list(order)] = nibbles
    return out.reshape(*words.shape[:-1], -1)[..., :count]


def interleave_pack(values: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """Inverse of `interleave_unpack` (for tests and benchmarks)."""
    values = np.asarray(values, np.uint8)
    grouped = values.reshape(*values.shape[:-1], -1, 8)[..., list(order)]
    return pack_dense(grouped.reshape(values.shape), 4, axis=-1)
