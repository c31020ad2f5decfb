"""A written lowbit graph's quantized weights read back exactly, by storage format (converter/quant/formats.py).

`read_weight(node, tensor, group_size)` gives the node's weight as a `lowbit.affine.QuantizedWeight` [N, K]: the
unsigned codes, scales and zero points the graph stores, whatever its layout (MatMulNBits blocks, DequantizeLinear
[K, N], lowbit's uint32 words, float8 values), so writers of other checkpoint formats (converter/emit) pack exactly
the integers the ONNX model computes with. `tensor(suffix)` returns the initializer `{module}.{suffix}` (a format's
`Part` names) as numpy, or None. `read_activation` gives a static activation's scale and zero point.
"""

from __future__ import annotations

from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.affine import QuantizedWeight
from lowbit.custom_ops import blockwise, matmul_nbits
from lowbit.errors import LowbitError
from lowbit.fp8 import FLOAT8

Tensor = Callable[[str], "np.ndarray | None"]
READERS: dict[str, Callable[[ir.Node, Tensor, "int | None"], QuantizedWeight]] = {}


def register_reader(*formats: str):
    def wrap(reader):
        for name in formats:
            READERS[name] = reader
        return reader

    return wrap


def read_weight(fmt: str, node: ir.Node, tensor: Tensor, group_size: int | None) -> QuantizedWeight:
    """`group_size`: the weight's group along K (None: per channel or per tensor)."""
    reader = READERS.get(fmt)
    if reader is None:
        raise LowbitError(f"{node.name}: storage format {fmt} cannot be read back yet (readable: "
                          f"{', '.join(READERS)})")
    return reader(node, tensor, group_size)


def _attr(node: ir.Node, name: str) -> int:
    return node.attributes.get_int(name)


@register_reader("matmulnbits")
def _matmulnbits(node, tensor, group_size):
    arrays = matmul_nbits.MatMulNBitsArrays(tensor("qweight"), tensor("scales"), tensor("qzeros"), _attr(node, "K"),
                                            _attr(node, "N"), _attr(node, "bits"), _attr(node, "block_size"))
    return matmul_nbits.unpack(arrays)


@register_reader("blockwise")
def _blockwise(node, tensor, group_size):
    zero_points = tensor("qzeros")
    arrays = blockwise.BlockwiseArrays(tensor("qweight"), tensor("scales"), zero_points, _attr(node, "bits"),
                                       _attr(node, "group_size"), _attr(node, "K"))
    qw = blockwise.unpack(arrays)  # zero points [N, G], a [1, 1] one repeated
    integer = np.rint(qw.zero_points.astype(np.float32))
    if not np.array_equal(integer, qw.zero_points.astype(np.float32)):
        raise LowbitError(f"{node.name}: float zero points have no integer equivalent")
    return QuantizedWeight(qw.codes, qw.scales, integer.astype(np.uint8), qw.bits, qw.group_size, qw.k)


ELEMENTS = {np.dtype(f.dtype): name for name, f in FLOAT8.items()}
SIGNED_BITS = {np.dtype(np.int8): 8, np.dtype(ml_dtypes.int4): 4}
UNSIGNED_BITS = {np.dtype(np.uint8): 8, np.dtype(ml_dtypes.uint4): 4}


@register_reader("dq", "dynamic_quantize_matmul", "qdq_fp8_e4m3", "qdq_fp8_e5m2", "qdq_uint8", "qdq_int8",
                 "dq_fp8_e4m3")
def _dense(node, tensor, group_size):
    """One code per element ([K, N] for MatMul and DynamicQuantizeMatMul, [N, K] for Gemm), scales per tensor
    (a scalar), per channel ([N]) or per group, zero points of the codes' type (absent: 0, ONNX's default)."""
    codes, scales, zeros = tensor("qweight"), tensor("scales"), tensor("qzeros")
    k_major = node.op_type != "Gemm"
    if k_major:
        codes = codes.T
        scales, zeros = (a.T if a is not None and a.ndim == 2 else a for a in (scales, zeros))
    n, k = codes.shape
    element = ELEMENTS.get(codes.dtype)
    if element is not None:
        bits, shift, codes = 8, 0, np.ascontiguousarray(codes).view(np.uint8)
    elif codes.dtype in SIGNED_BITS:
        bits = SIGNED_BITS[codes.dtype]
        shift = 2 ** (bits - 1)  # signed codes as lowbit's unsigned ones: q + 2^(b-1), zero points alike
    elif codes.dtype in UNSIGNED_BITS:
        bits, shift = UNSIGNED_BITS[codes.dtype], 0
    else:
        raise LowbitError(f"{node.name}: weight codes of type {codes.dtype} cannot be read back")
    if element is None:
        codes = (codes.astype(np.int16) + shift).astype(np.uint8)
    scales = np.asarray(scales)
    grid = (n, 1) if scales.ndim < 2 else scales.shape
    scales = np.broadcast_to(scales.reshape(-1, 1) if scales.ndim == 1 else scales, grid).copy()
    if zeros is None:
        zero_points = np.full(grid, shift, np.uint8)
    else:
        zeros = np.asarray(zeros)
        zeros = zeros.reshape(-1, 1) if zeros.ndim == 1 else zeros
        zero_points = (np.broadcast_to(zeros, grid).astype(np.int16) + shift).astype(np.uint8)
    g = k if grid[1] == 1 else group_size or -(-k // grid[1])
    if grid[1] * g > k:  # a shorter last group: padded with its zero point, as lowbit.affine pads
        codes = np.concatenate([codes, np.repeat(zero_points[:, -1:], grid[1] * g - k, axis=1)], axis=1)
    return QuantizedWeight(np.ascontiguousarray(codes), scales, zero_points, bits, g, k, element)


@register_reader("nvfp4_unpack", "dq_nvfp4", "nvfp4_a4_unpack", "dq_nvfp4_a4")
def _nvfp4(node, tensor, group_size):
    """NVFP4 (lowbit.nvfp4.NVFP4Weight): e2m1 codes (two a byte, or FLOAT4E2M1 [N, K]), FP8 e4m3 scales per 16 and
    the global scale gs (stored as 1 / gs for TensorRT's two-level DequantizeLinear)."""
    from lowbit import nvfp4

    codes = tensor("qweight")
    codes = nvfp4.unpack(codes) if codes.dtype == np.uint8 else np.ascontiguousarray(codes).view(np.uint8)
    gs = tensor("global_scale")
    if gs is None:
        inverse = np.float32(tensor("global_scale_inverse"))
        gs = np.float32(1) / inverse
        if nvfp4.inverse_global_scale(gs) != inverse:
            raise LowbitError(f"{node.name}: the global scale cannot be recovered from its inverse exactly")
    return nvfp4.NVFP4Weight(codes, tensor("scales"), np.float32(gs))


def read_input_global_scale(module: str, tensor: Tensor) -> np.ndarray | None:
    """NVFP4 activations' global scale gs as float32 [1] (`input_global_scale`, or recovered exactly from the
    TensorRT form's `input_global_scale_inverse`), or None where the node has no NVFP4 activations."""
    from lowbit import nvfp4

    gs = tensor("input_global_scale")
    if gs is None:
        inverse = tensor("input_global_scale_inverse")
        if inverse is None:
            return None
        gs = np.float32(1) / np.float32(inverse)
        if nvfp4.inverse_global_scale(gs) != np.float32(inverse):
            raise LowbitError(f"{module}: the input global scale cannot be recovered from its inverse exactly")
    return np.asarray(gs, np.float32).reshape(1)


def read_activation(module: str, tensor: Tensor) -> tuple[np.ndarray, int] | None:
    """A static activation's (scale [1], signed zero point) — uint8 zero points as int8 (z − 128, the same
    (q − z)·s) — or None where the node's activations are float or dynamic."""
    scale = tensor("input_scale")
    if scale is None:
        return None
    zero = tensor("input_zero_point")
    zero_point = 0
    if zero is not None and zero.dtype in UNSIGNED_BITS:
        zero_point = int(zero) - 2 ** (UNSIGNED_BITS[zero.dtype] - 1)
    elif zero is not None and zero.dtype in SIGNED_BITS:
        zero_point = int(zero)
    return np.asarray(scale).reshape(1), zero_point
