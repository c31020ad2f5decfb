"""`lowbit.cpu.MatMulInt4Int8`: a matmul over weight codes of 4 bits or fewer with int8 activations, run by a compiled
kernel of our own (custom_ops/kernels/matmul_int4_int8.c) that ONNX Runtime loads as a custom op library.

The node exists only in the graphs the runtime builds in memory (runtime/fast_paths.py): files on disk keep
`com.microsoft.MatMulNBits` and `lowbit.MatMulBlockwise`, whose weights this module repacks at load, and a folder
runs without the kernel exactly as before. Arithmetic, per row m of A [M, K] and group g of `group_size` rows of K:

    amax = max |A[m, k]| over the group; sx = amax / 127; xq = rint(A[m, k] * (127 / amax)) (0 where amax == 0)
    dot[n] = sum of q[k, n] * xq[k] over the group (integers); xsum = sum of the group's xq
    Y[m, n] = sum over g, in order, of float32(dot[n] - z[g, n] * xsum) * (s[g, n] * sx)  (float32, no fused add)

`reference_matmul` computes this in numpy; the kernel's result is equal bit for bit. The activations are quantized
as ORT's int8 compute (accuracy level 4) quantizes them, symmetric int8 with one scale per block of K (here: per
group of the weight). The node's standard-ONNX fallback is the node it replaces.

Inputs: A float32 [..., K]; B uint8 [N_pad / 16, groups, group_size / 4, 32] (`pack`); scales float32 and zero_points
uint8 [N_pad / 16, groups, 16] (`by_tile`: a tile's values in one run, as B's), or [1] where all are equal; optional
input_scale float32 [1] (activation 1). Attributes: K, N, group_size (a multiple of 4), layout (optional: 0 AVX2, 1
VNNI; see `pack`), e2m1 (optional, 1: the codes are FLOAT4E2M1 bit patterns standing for `E2M1_BYTES`, layout 1
and groups of 16; `from_nvfp4`), activation (optional, 1: NVFP4 activations with input_scale as their global
scale, groups of 16: `nvfp4_activations` instead of int8 ones), float_zero_points (optional, 1: input 5 float32
zero points in the scales' layout replace input 3, `with_float_zero_points`), max_code (optional, default 15: no
code is larger; 7 for 3-bit codes and 3 for 2-bit ones let the kernel sum more rows in int16 before widening, the
same exact sums). Output: Y float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

DOMAIN = "lowbit.cpu"
OP_TYPE = "MatMulInt4Int8"
TILE = 16  # columns per tile of B
MAX_CODE = 15
AVX2, VNNI = 0, 1  # B's layouts (the `layout` attribute)


@dataclass(frozen=True)
class Int4Int8Weight:
    b: np.ndarray  # uint8 [N_pad / 16, groups, group_size / 4, 32]
    scales: np.ndarray  # float32 [N_pad / 16, groups, 16] (`by_tile`)
    zero_points: np.ndarray  # uint8 [N_pad / 16, groups, 16], or [1] where all are equal
    k: int
    n: int
    group_size: int
    layout: int = AVX2
    e2m1: bool = False  # the codes are FLOAT4E2M1 bit patterns, each standing for E2M1_BYTES[code] (`from_nvfp4`)
    float_zero_points: np.ndarray | None = None  # float32 [N_pad / 16, groups, 16] (`with_float_zero_points`)

    @property
    def groups(self) -> int:
        return self.scales.shape[1]


def supports(group_size: int, layout: int = AVX2) -> bool:
    return group_size >= 4 and group_size % (8 if layout == VNNI else 4) == 0


def pack(codes: np.ndarray, scales: np.ndarray, zero_points, group_size: int, layout: int = AVX2) -> Int4Int8Weight:
    """codes: integers 0..15, [N, K] (one row per output column, as MatMulNBits and MatMulBlockwise store them);
    scales [groups, N] (stored as float32: exact for float16); zero_points [groups, N] (integers 0..15) or a
    scalar -> the kernel's arrays. B's layouts, per tile t (16 columns) and group g, both G * 8 bytes:

    AVX2 ([.., G / 4, 32]): quad j, byte 2c + h holds q[4j + h, c] (low nibble) and q[4j + 2 + h, c] (high nibble),
        for `vpmaddubsw` on pairs of rows;
    VNNI (the same shape; octet j = quads 2j and 2j + 1, 64 bytes): byte 4c + r holds q[8j + r, c] (low nibble)
        and q[8j + 4 + r, c] (high nibble), for `vpdpbusd` on fours of rows, 8 columns a register (group_size a
        multiple of 8); on CPUs without AVX512-VNNI, `vpmaddubsw` on the same bytes with each row's four
        activations broadcast from memory as one 32-bit value (faster than the AVX2 layout there too)."""
    n, k = codes.shape
    return pack_rows(lambda start, stop: codes[start:stop], n, k, scales, zero_points, group_size, layout=layout)


def pack_rows(read_codes, n: int, k: int, scales: np.ndarray, zero_points, group_size: int,
              rows_per_chunk: int = 4096, layout: int = AVX2) -> Int4Int8Weight:
    """`pack`, reading the codes `rows_per_chunk` output columns at a time: `read_codes(start, stop)` -> integers
    [stop - start, >= K] (columns past K are ignored). Only one chunk is unpacked at once."""
    if not supports(group_size, layout):
        raise ValueError(f"group_size must be a positive multiple of {8 if layout == VNNI else 4}, got {group_size}")
    groups = -(-k // group_size)
    if np.shape(scales) != (groups, n):
        raise ValueError(f"scales {np.shape(scales)} != ({groups}, {n})")
    quads = group_size // 4

    def arrange(padded: np.ndarray, tiles: int) -> np.ndarray:
        if layout == VNNI:
            # [tiles, 16 columns, groups, octets, 8 rows] -> [tiles, groups, octets, 16 columns, 8 rows]
            rows = padded.reshape(tiles, TILE, groups, quads // 2, 8).transpose(0, 2, 3, 1, 4)
            return rows[..., :4] | (rows[..., 4:] << 4)  # [.., 16 columns, 4 rows]
        # [tiles, 16 columns, groups, quads, 4 rows] -> [tiles, groups, quads, 16 columns, 4 rows]
        rows = padded.reshape(tiles, TILE, groups, quads, 4).transpose(0, 2, 3, 1, 4)
        return rows[..., :2] | (rows[..., 2:] << 4)  # [.., 16 columns, 2 rows]

    b = tile_codes(read_codes, n, k, group_size, MAX_CODE, quads, arrange, rows_per_chunk)
    return Int4Int8Weight(b, *tile_scales_and_zero_points(scales, zero_points, n), k, n, group_size, layout)


def tile_codes(read_codes, n: int, k: int, group_size: int, max_code: int, rows_per_group: int, arrange,
               rows_per_chunk: int) -> np.ndarray:
    """B [N_pad / 16, groups, rows_per_group, 32] uint8, `rows_per_chunk` output columns at a time: the codes of a
    chunk (`read_codes(start, stop)`, checked to lie in 0..max_code), zero-padded to whole tiles and groups
    [tiles * 16, groups * group_size], laid out by `arrange(padded, tiles)` -> [tiles, groups, ..]."""
    groups, n_pad = -(-k // group_size), -(-n // TILE) * TILE
    b = np.empty((n_pad // TILE, groups, rows_per_group, 2 * TILE), np.uint8)
    chunk = max(TILE, rows_per_chunk // TILE * TILE)
    for start in range(0, n_pad, chunk):
        stop = min(n, start + chunk)
        codes = np.asarray(read_codes(start, stop))[:, :k]
        if codes.size and (codes.min() < 0 or codes.max() > max_code):
            raise ValueError(f"codes must lie in 0..{max_code}")
        tiles = -(-(stop - start) // TILE)
        padded = np.zeros((tiles * TILE, groups * group_size), np.uint8)
        padded[: stop - start, :k] = codes
        b[start // TILE: start // TILE + tiles] = arrange(padded, tiles).reshape(tiles, groups, rows_per_group,
                                                                                 2 * TILE)
    return b


def tile_scales_and_zero_points(scales: np.ndarray, zero_points, n: int) -> tuple[np.ndarray, np.ndarray]:
    """scales [groups, N] and zero points ([groups, N] or a scalar) -> the kernel's scales [N_pad / 16, groups, 16]
    (`by_tile`, zero past N) and zero points: [1] where all are equal, else as the scales."""
    groups, n_pad = np.shape(scales)[0], -(-n // TILE) * TILE
    s = np.zeros((groups, n_pad), np.float32)
    s[:, :n] = scales
    zero_points = np.asarray(zero_points)
    if zero_points.size and np.all(zero_points == zero_points.flat[0]):
        return by_tile(s), np.array([zero_points.flat[0]], np.uint8)
    z = np.zeros((groups, n_pad), np.uint8)
    z[:, :n] = np.broadcast_to(zero_points, (groups, n))
    return by_tile(s), by_tile(z)


def by_tile(per_group: np.ndarray) -> np.ndarray:
    """[groups, N_pad] -> [N_pad / 16, groups, 16]: each tile's values in one run, as B."""
    groups, n_pad = per_group.shape
    return np.ascontiguousarray(per_group.reshape(groups, n_pad // TILE, TILE).transpose(1, 0, 2))


def per_group(by_tiles: np.ndarray) -> np.ndarray:
    """Inverse of `by_tile`: [groups, N_pad]."""
    tiles, groups, _ = by_tiles.shape
    return by_tiles.transpose(1, 0, 2).reshape(groups, tiles * TILE)


def unpack_codes(weight: Int4Int8Weight) -> np.ndarray:
    """The codes [N, K] `weight` holds (inverse of `pack`)."""
    tiles, groups, quads, _ = weight.b.shape
    if weight.layout == VNNI:
        fours = weight.b.reshape(tiles, groups, quads // 2, TILE, 4)
        rows = np.concatenate([fours & 0x0F, fours >> 4], axis=-1)  # [..., 16 columns, rows 0..7]
        codes = rows.transpose(0, 3, 1, 2, 4).reshape(tiles * TILE, groups * quads * 4)
        return codes[: weight.n, : weight.k]
    pairs = weight.b.reshape(tiles, groups, quads, TILE, 2)
    rows = np.concatenate([pairs & 0x0F, pairs >> 4], axis=-1)  # [..., 16 columns, rows 0 1 2 3]
    codes = rows.transpose(0, 3, 1, 2, 4).reshape(tiles * TILE, groups * quads * 4)
    return codes[: weight.n, : weight.k]


def quantize_activations(a: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a float32 [M, K] -> xq int32 [M, groups, group_size] (0 past K), sx float32 [M, groups], xsum int64
    [M, groups]."""
    m, k = a.shape
    groups = -(-k // group_size)
    x = np.zeros((m, groups * group_size), np.float32)
    x[:, :k] = a
    x = x.reshape(m, groups, group_size)
    amax = np.abs(x).max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int32)
    return xq, (amax / np.float32(127)).astype(np.float32), xq.sum(axis=-1, dtype=np.int64)


def reference_matmul(a: np.ndarray, weight: Int4Int8Weight, nvfp4_global_scale=None) -> np.ndarray:
    """Y [..., N] float32, the kernel's arithmetic step for step; with `nvfp4_global_scale`, the node's
    activation 1 (NVFP4 activations, `nvfp4_activations`)."""
    codes = unpack_codes(weight)
    return reference_from_codes(a, E2M1_BYTES[codes] if weight.e2m1 else codes, weight.scales, weight.zero_points,
                                weight.group_size, activation_quantizer(nvfp4_global_scale), weight.float_zero_points)


def with_float_zero_points(weight, zero_points: np.ndarray):
    """`weight` (either kernel's) with float zero points z [groups, N] (the attribute float_zero_points 1, input 5):
    each group's term is (float(dot) - z * float(xsum)) * (s * sx), in float32, and the integer zero points go
    unused."""
    groups, n_pad = weight.scales.shape[1], weight.scales.shape[0] * TILE
    z = np.zeros((groups, n_pad), np.float32)
    z[:, : weight.n] = zero_points
    return replace(weight, zero_points=np.zeros(1, np.uint8), float_zero_points=by_tile(z))


def activation_quantizer(nvfp4_global_scale=None):
    """`reference_from_codes`' `quantize` for the node's activation attribute: None (int8 per group, activation 0),
    or with a global scale NVFP4 activations (activation 1, `nvfp4_activations`)."""
    if nvfp4_global_scale is None:
        return None
    return lambda a2, group_size: nvfp4_activations(a2, nvfp4_global_scale)


def reference_from_codes(a: np.ndarray, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                         group_size: int, quantize=None, float_zero_points: np.ndarray | None = None) -> np.ndarray:
    """The arithmetic of both int8-activation kernels (lowbit.cpu.MatMulInt4Int8 and MatMulInt8Int8) for codes
    [N, K], the kernel's scales and zero points (`tile_scales_and_zero_points`): Y [..., N] float32. `quantize(a
    [M, K], group_size)` -> (xq, sx, xsum) as `quantize_activations` returns them (its default).
    `float_zero_points` (by tile, `with_float_zero_points`) replace the integer ones."""
    a = np.asarray(a, np.float32)
    n, k = codes.shape
    lead = a.shape[:-1]
    a2 = a.reshape(-1, k)
    g = group_size
    groups = scales.shape[1]
    xq, sx, xsum = (quantize or quantize_activations)(a2, g)
    padded = np.zeros((groups * g, n), np.int64)
    padded[:k] = codes.T
    padded = padded.reshape(groups, g, n)
    z = np.broadcast_to(zero_points.astype(np.int64), (groups, n)) \
        if zero_points.size == 1 else per_group(zero_points)[:, :n].astype(np.int64)
    s = per_group(scales)[:, :n]
    y = np.zeros((a2.shape[0], n), np.float32)
    for group in range(groups):
        dot = xq[:, group].astype(np.int64) @ padded[group]  # [M, N], exact
        if float_zero_points is not None:
            zf = per_group(float_zero_points)[group, :n]
            term = dot.astype(np.float32) - zf * xsum[:, group, None].astype(np.float32)
        else:
            term = (dot - z[group] * xsum[:, group, None]).astype(np.float32)
        y = y + term * (s[group] * sx[:, group, None])
    return y.reshape(*lead, n)


# ------------------------------------------------------------------------------ NVFP4 as integers

NVFP4_ZERO_POINT = 12  # twice an e2m1 value (-12..12) plus 12: 0..24


def _e2m1_bytes() -> np.ndarray:
    from lowbit import nvfp4

    return (2 * nvfp4.E2M1 + NVFP4_ZERO_POINT).astype(np.uint8)  # code 8 (-0) -> 12


E2M1_BYTES = _e2m1_bytes()  # FLOAT4E2M1 code -> twice its value plus 12 (the kernel's vpshufb table)


def from_nvfp4(codes: np.ndarray, steps: np.ndarray) -> Int4Int8Weight:
    """NVFP4 weights, e2m1 codes [N, K] (K a multiple of 16) and each block's float32 step [N, K / 16] (s / gs), as
    this node's weight (attribute e2m1 1, VNNI layout, groups of 16): the codes as they are, each standing for twice
    its e2m1 value plus 12 (`E2M1_BYTES`), zero point 12, scales half the steps. Times int8 activations (activation
    0) that is int8 compute on the exact weights; times NVFP4 activations (activation 1: twice their e2m1 values,
    scales half their steps) each block's integer dot times the two half steps is the block's exact product."""
    from lowbit import nvfp4

    halves = (np.asarray(steps, np.float32) * np.float32(0.5)).T  # [K / 16, N], exact
    weight = pack(np.asarray(codes, np.uint8), np.ascontiguousarray(halves), NVFP4_ZERO_POINT, nvfp4.GROUP, VNNI)
    return replace(weight, e2m1=True)


def nvfp4_activations(a: np.ndarray, gs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a float32 [M, K] -> NVFP4 activations as `quantize_activations` returns int8 ones: xq [M, K / 16, 16] twice
    the e2m1 values (lowbit.nvfp4.fake_quantize_activations' values times 2 over their step), sx [M, K / 16] half
    the blocks' steps, xsum [M, K / 16]."""
    from lowbit import nvfp4

    codes, step = nvfp4.quantize_activations(a, gs)
    xq = (2 * nvfp4.E2M1[codes]).astype(np.int32)
    return xq, (step * np.float32(0.5)).astype(np.float32), xq.sum(axis=-1, dtype=np.int64)
