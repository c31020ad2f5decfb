"""Bit packing shared by every storage layout: little-endian bit order (first value lowest)."""

from __future__ import annotations

import numpy as np


def pack_bytes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[..., M] codes (< 2^bits) -> [..., ceil(M * bits / 8)] uint8, value j at bit j*bits of the row."""
    codes = np.asarray(codes, np.uint8)
    if bits in (2, 4, 8) and codes.shape[-1] % (8 // bits) == 0:
        return _pack_aligned(codes, bits)
    rows = codes.reshape(-1, codes.shape[-1])
    bits_le = np.unpackbits(rows[..., None], axis=-1, bitorder="little")[..., :bits]
    flat = bits_le.reshape(rows.shape[0], -1)
    packed = np.packbits(flat, axis=-1, bitorder="little")
    return packed.reshape(*codes.shape[:-1], packed.shape[-1])


def _pack_aligned(codes: np.ndarray, bits: int) -> np.ndarray:
    """Fast path of `pack_bytes` when whole bytes hold whole codes (2, 4, 8 bits)."""
    per = 8 // bits
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = grouped[..., 0].copy()
    for j in range(1, per):
        out |= grouped[..., j] << np.uint8(bits * j)
    return out


def unpack_bytes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bytes`: the first `count` codes of each row."""
    packed = np.asarray(packed, np.uint8)
    if bits in (2, 4, 8):
        return _unpack_aligned(packed, bits)[..., :count]
    rows = packed.reshape(-1, packed.shape[-1])
    flat = np.unpackbits(rows, axis=-1, bitorder="little")[:, : count * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    codes = (flat.reshape(rows.shape[0], count, bits).astype(np.uint16) * weights).sum(-1).astype(np.uint8)
    return codes.reshape(*packed.shape[:-1], count)


def _unpack_aligned(packed: np.ndarray, bits: int) -> np.ndarray:
    """Fast path of `unpack_bytes` when whole bytes hold whole codes: shifts and masks, one byte per code
    (`np.unpackbits` would first spend a byte per bit)."""
    if bits == 8:
        return packed.copy()
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(bits * j)) & mask for j in range(8 // bits)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def values_per_word(bits: int) -> int:
    return 32 // bits


def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """[..., M] codes -> [..., ceil(M / (32 // bits))] uint32, `32 // bits` values per word, value j
    at bit j*bits (MLC-LLM's layout: 3-bit packs 10 values per word, 2 bits unused)."""
    per = values_per_word(bits)
    codes = np.asarray(codes, np.uint32)
    m = codes.shape[-1]
    words = -(-m // per)
    padded = np.zeros((*codes.shape[:-1], words * per), np.uint32)
    padded[..., :m] = codes
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    return np.bitwise_or.reduce(padded.reshape(*codes.shape[:-1], words, per) << shifts, axis=-1).astype(np.uint32)


def unpack_words(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    per = values_per_word(bits)
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    values = (np.asarray(words, np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return values.reshape(*words.shape[:-1], -1)[..., :count].astype(np.uint8)
