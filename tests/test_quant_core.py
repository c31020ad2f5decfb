"""Quantization math and packing: bit-exact against straightforward per-group numpy loops."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.custom_ops import blockwise, gather_block_quantized, matmul_nbits
from lowbit.custom_ops.bitpack import pack_bytes, pack_words, unpack_bytes, unpack_words


CLIP_GRID = [1 - i / 20 for i in range(11)]


def reference_group(vals, bits, rule, scale_dtype, ratio=1.0):
    """One group, float32 scalars, the formulas of docs/schemes.md: (codes, scale, zero point, squared error)."""
    f32 = np.float32
    qmax = 2**bits - 1
    lo = None
    if rule == "symmetric":
        s = f32(np.max(np.abs(vals)) / f32(2 ** (bits - 1) - 1))
    elif rule == "symmetric_full":
        m = vals[int(np.argmax(np.abs(vals)))]  # first of the largest magnitude, sign kept
        s = f32(m / f32(-(2 ** (bits - 1))))
    elif rule == "asymmetric":
        lo, hi = min(f32(vals.min()), f32(0)), max(f32(vals.max()), f32(0))
        s = f32((hi - lo) / f32(qmax))
    else:
        lo, hi = f32(vals.min()), f32(vals.max())
        s = f32((hi - lo) / f32(qmax))
    s = f32(s * f32(ratio))
    lo = None if lo is None else f32(lo * f32(ratio))
    s = f32(scale_dtype(1 if s == 0 else s))
    if lo is None:
        z = 2 ** (bits - 1)
    elif rule == "asymmetric":
        z = min(max(np.rint(-lo / s), 0), qmax)
    else:
        z = f32(scale_dtype(-lo / s))
    codes = np.zeros(len(vals), np.uint8)
    error = f32(0)
    for i, v in enumerate(vals):
        if rule == "minmax_float_zp":
            q = min(max(np.rint(f32(f32(v) / s) + z), 0), qmax)
        else:
            q = min(max(np.rint(f32(v) / s) + z, 0), qmax)
        codes[i] = q
        error += f32(f32(v) - (f32(q) - f32(z)) * s) ** 2
    return codes, s, z, error


def reference_quantize(w, bits, group, rule, scale_dtype, clip_search=False):
    """One group at a time; with clip_search, every ratio of the grid and the least squared error (first wins)."""
    n, k = w.shape
    g = group or k
    groups = math.ceil(k / g)
    codes = np.zeros((n, groups * g), np.uint8)
    scales = np.zeros((n, groups), scale_dtype)
    zeros = np.zeros((n, groups), np.uint8 if rule != "minmax_float_zp" else scale_dtype)
    for row in range(n):
        for j in range(groups):
            vals = np.zeros(g, np.float32)
            chunk = w[row, j * g:(j + 1) * g]
            vals[: len(chunk)] = chunk
            best = None
            for ratio in CLIP_GRID if clip_search else [1.0]:
                candidate = reference_group(vals, bits, rule, scale_dtype, ratio)
                if best is None or candidate[3] < best[3]:
                    best = candidate
            codes[row, j * g:(j + 1) * g], scales[row, j], zeros[row, j], _ = best
    return codes, scales, zeros


CASES = [
    (bits, group, rule, dtype)
    for bits in (2, 3, 4, 8)
    for group in (None, 16, 32, 40, 128)
    for rule in ("symmetric", "symmetric_full", "asymmetric", "minmax_float_zp")
    for dtype in (np.float32, np.float16)
]


@pytest.mark.parametrize("bits,group,rule,dtype", CASES)
def test_quantize_equals_reference_loop(bits, group, rule, dtype, rng):
    n, k = 7, 100  # K not a multiple of any group: padding
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    w[0, :] = 0.0  # an all-zero row
    w[1, : (group or k)] = 0.37  # a constant group
    qw = quantize(w, WeightQuant(bits, group, rule), dtype)
    codes, scales, zeros = reference_quantize(w, bits, group, rule, dtype)
    assert np.array_equal(qw.codes, codes)
    assert np.array_equal(qw.scales, scales) and qw.scales.dtype == np.dtype(dtype)
    assert np.array_equal(qw.zero_points, zeros)
    assert qw.codes.max() <= 2**bits - 1
    expected = np.zeros((n, k), np.float32)
    for row in range(n):
        for col in range(k):
            j = col // (group or k)
            expected[row, col] = (np.float32(codes[row, col]) - np.float32(zeros[row, j])) * np.float32(scales[row, j])
    assert np.array_equal(dequantize(qw), expected)


@pytest.mark.parametrize("bits,group,rule,dtype", [
    (4, 32, "symmetric_full", np.float32), (4, 32, "asymmetric", np.float16), (3, 40, "symmetric", np.float16),
    (2, 16, "asymmetric", np.float32), (8, None, "minmax_float_zp", np.float32), (4, None, "symmetric_full", np.float16),
])
def test_clip_search_equals_reference_loop(bits, group, rule, dtype, rng):
    n, k = 5, 100
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    w[0, :] = 0.0
    w[2, 3] = 9.0  # an outlier: clipping it pays off
    quant = WeightQuant(bits, group, rule, clip_search=True)
    qw = quantize(w, quant, dtype)
    codes, scales, zeros = reference_quantize(w, bits, group, rule, dtype, clip_search=True)
    assert np.array_equal(qw.codes, codes) and np.array_equal(qw.scales, scales)
    assert np.array_equal(qw.zero_points, zeros)
    plain = dequantize(quantize(w, WeightQuant(bits, group, rule), dtype))
    searched, unsearched = np.square(w - dequantize(qw)).sum(), np.square(w - plain).sum()
    assert searched < unsearched if bits <= 4 else searched <= unsearched  # 8 bits: the full range may be best


def test_full_range_symmetric_beats_mlc_rule_and_uses_all_codes(rng):
    w = rng.standard_normal((64, 256)).astype(np.float32)
    full = quantize(w, WeightQuant(4, 32, "symmetric_full"))
    mlc = quantize(w, WeightQuant(4, 32, "symmetric"))
    assert sqnr_db(w, dequantize(full)) > sqnr_db(w, dequantize(mlc)) + 0.5
    assert full.codes.min() == 0 and full.codes.max() == 15 and mlc.codes.max() <= 15 and mlc.codes.min() >= 1
    # the value of largest magnitude in each group is represented exactly (code 0)
    groups = w.reshape(64, 8, 32)
    extreme = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], -1)[..., 0]
    assert np.allclose(dequantize(full).reshape(64, 8, 32).min(-1) * (extreme < 0) +
                       dequantize(full).reshape(64, 8, 32).max(-1) * (extreme > 0), extreme, rtol=1e-6)


def sqnr_db(ref, approx):
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - approx) ** 2))


@pytest.mark.parametrize("rule", ["symmetric", "asymmetric", "minmax_float_zp"])
def test_more_bits_and_smaller_groups_are_more_accurate(rule, rng):
    w = rng.standard_normal((64, 256)).astype(np.float32)
    err = {(b, g): sqnr_db(w, dequantize(quantize(w, WeightQuant(b, g, rule)))) for b in (2, 4, 8) for g in (32, None)}
    assert err[(8, 32)] > err[(4, 32)] > err[(2, 32)]
    assert err[(4, 32)] > err[(4, None)]
    assert err[(8, None)] > 35 and err[(4, 32)] > 18  # dB, torchao-style quality floor


def test_mlc_rule_values(rng):
    """q4f16_1: s = max|w|/7, q = clamp(round(w/s) + 7, 0, 14): our codes are MLC's + 1 (zero point 8)."""
    w = rng.standard_normal((4, 64)).astype(np.float32)
    qw = quantize(w, WeightQuant(4, 32, "symmetric"), np.float16)
    for row in range(4):
        for j in range(2):
            group = w[row, j * 32:(j + 1) * 32]
            s = np.float32(np.float16(np.abs(group).max() / np.float32(7)))
            mlc = np.clip(np.rint(group / s) + 7, 0, 14)
            assert np.array_equal(qw.codes[row, j * 32:(j + 1) * 32], mlc + 1)


@pytest.mark.parametrize("count", [40, 37])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_bitpack_round_trip_and_layout(bits, count, rng):
    codes = rng.integers(0, 2**bits, (3, 5, count), dtype=np.uint8)
    packed = pack_bytes(codes, bits)
    assert packed.shape == (3, 5, math.ceil(count * bits / 8))
    assert np.array_equal(unpack_bytes(packed, bits, count), codes)
    stream = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes[1, 2])  # LSB-first bit stream
    stream += "0" * (len(packed[1, 2]) * 8 - len(stream))
    assert [int(stream[i:i + 8][::-1], 2) for i in range(0, len(stream), 8)] == packed[1, 2].tolist()
    words = pack_words(codes, bits)
    per = 32 // bits
    assert words.shape == (3, 5, math.ceil(count / per))
    assert np.array_equal(unpack_words(words, bits, count), codes)
    assert int(words[0, 0, 0]) == sum(int(codes[0, 0, j]) << (bits * j) for j in range(min(per, count)))


def test_nibble_order_matches_ort_convention():
    assert pack_bytes(np.array([[1, 2, 3, 4]], np.uint8), 4).tolist() == [[0x21, 0x43]]
    assert pack_bytes(np.array([[1, 2, 3, 0]], np.uint8), 2).tolist() == [[0b00111001]]


@pytest.mark.parametrize("bits,group,rule", [(4, 32, "symmetric"), (4, 16, "asymmetric"), (2, 64, "asymmetric"),
                                             (8, 128, "asymmetric"), (8, 32, "symmetric")])
def test_matmul_nbits_pack_unpack_bit_exact(bits, group, rule, rng):
    w = rng.standard_normal((9, 200)).astype(np.float32)
    qw = quantize(w, WeightQuant(bits, group, rule))
    arrays = matmul_nbits.pack(qw, symmetric=rule == "symmetric")
    blocks = math.ceil(200 / group)
    assert arrays.b.shape == (9, blocks, group * bits // 8) and arrays.scales.shape == (9 * blocks,)
    if rule != "symmetric":
        assert arrays.zero_points.shape == (9 * math.ceil(blocks * bits / 8),)
    back = matmul_nbits.unpack(arrays)
    assert np.array_equal(back.codes, qw.codes) and np.array_equal(back.zero_points, qw.zero_points)
    assert np.array_equal(back.scales, qw.scales)


@pytest.mark.parametrize("bits,rule", [(4, "symmetric"), (4, "asymmetric"), (8, "symmetric"), (8, "asymmetric"),
                                       (2, "asymmetric")])
@pytest.mark.parametrize("k", [100, 128, 576, 1000])
def test_per_channel_as_matmul_nbits_blocks_is_bit_exact(bits, rule, k, rng):
    """A per-channel weight stored in MatMulNBits blocks dequantizes to exactly today's per-channel values."""
    w = rng.standard_normal((7, k)).astype(np.float32) * rng.uniform(0.1, 3, (7, 1)).astype(np.float32)
    qw = quantize(w, WeightQuant(bits, None, rule))
    block, blocks = matmul_nbits.block_layout(None, k)
    arrays = matmul_nbits.pack(qw, rule == "symmetric", block)
    assert arrays.b.shape == (7, blocks, block * bits // 8) and blocks == math.ceil(k / block)
    back = matmul_nbits.unpack(arrays)
    assert np.array_equal(dequantize(back), dequantize(qw))
    expected = np.repeat(qw.scales, blocks, axis=1)
    assert np.array_equal(back.scales, expected)
    assert np.array_equal(back.codes[:, k:], np.broadcast_to(qw.zero_points, (7, blocks * block - k)))


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_pack_unpack_bit_exact(bits, rng):
    w = rng.standard_normal((11, 64)).astype(np.float32)
    qw = quantize(w, WeightQuant(bits, 32, "asymmetric"))
    back = gather_block_quantized.unpack(gather_block_quantized.pack(qw))
    assert np.array_equal(back.codes, qw.codes) and np.array_equal(back.zero_points, qw.zero_points)


@pytest.mark.parametrize("bits,group", [(3, 40), (5, 24), (8, None), (2, 16)])
def test_blockwise_pack_unpack_bit_exact(bits, group, rng):
    w = rng.standard_normal((6, 172)).astype(np.float32)
    qw = quantize(w, WeightQuant(bits, group, "minmax_float_zp"), np.float16)
    back = blockwise.unpack(blockwise.pack(qw))
    assert np.array_equal(back.codes, qw.codes)
    assert np.array_equal(dequantize(back), dequantize(qw))


@pytest.mark.parametrize("bits,group,rule", [(3, 40, "symmetric"), (3, 32, "symmetric_full"), (2, 16, "symmetric_full")])
def test_blockwise_centred_rules_store_one_zero_point(bits, group, rule, rng):
    """Centred rules (every zero point 2^(bits-1)) store zero points as one [1, 1] value; unpacking repeats it, bit
    for bit the per-group layout."""
    w = rng.standard_normal((6, 172)).astype(np.float32)
    qw = quantize(w, WeightQuant(bits, group, rule), np.float16)
    arrays = blockwise.pack(qw, centered=True)
    assert arrays.zero_points.shape == (1, 1) and arrays.zero_points[0, 0] == 2 ** (bits - 1)
    back = blockwise.unpack(arrays)
    assert np.array_equal(back.codes, qw.codes) and np.array_equal(back.zero_points, qw.zero_points)
    assert np.array_equal(dequantize(back), dequantize(blockwise.unpack(blockwise.pack(qw))))
    asymmetric = quantize(w, WeightQuant(bits, group, "asymmetric"), np.float16)
    with pytest.raises(ValueError, match="zero points other than"):
        blockwise.pack(asymmetric, centered=True)


def test_int4_dq_storage_is_two_per_byte_low_first():
    import onnx_ir as ir

    codes = np.array([[-3, 2], [7, -8]], dtype=ml_dtypes.int4)
    assert ir.tensor(codes).tobytes() == bytes([0x2D, 0x87])


def test_chunked_quantization_equals_single_pass(monkeypatch, rng):
    from lowbit import affine

    w = rng.standard_normal((23, 70)).astype(np.float32)
    quant = WeightQuant(4, 32, "asymmetric")
    whole = quantize(w, quant)
    monkeypatch.setattr(affine, "ROWS_PER_CHUNK", 4)
    chunked = quantize(w, quant)
    for field in ("codes", "scales", "zero_points"):
        assert np.array_equal(getattr(whole, field), getattr(chunked, field))
    assert affine.relative_error(w, chunked) == float(np.abs(w - dequantize(whole)).max()) / float(np.abs(w).max())
