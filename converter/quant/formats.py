"""Storage formats: how a quantized weight is laid out in the graph, registered by name.

Each format says whether it can hold a given quantization (`unsupported`, returning a reason
or None) and emits the replacement nodes for one weight-consuming site. Sites are `matmul`
(`MatMul(x, W[K, N])`), `gemm_t` (`Gemm(x, W[N, K], transB=1)`, the tied lm_head) and
`gather` (`Gather(W[V, K], ids)`, the embedding). A format's `activation` is the activation
quantization its nodes compute with (None: float activations); it is chosen only for layers whose
plan asks for exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit import nvfp4 as nvfp4_math
from lowbit.affine import FLOAT4_RULES, FLOAT8_RULES, QuantizedWeight, WeightQuant, group_size_for, padded_k
from lowbit.converter.quant.plan import NVFP4_ACTIVATIONS, ActivationQuant
from lowbit.custom_ops import blockwise, gather_block_quantized, matmul_nbits, nvfp4
from lowbit.errors import LowbitError
from lowbit.fp8 import FLOAT8


@dataclass(frozen=True)
class Site:
    kind: str  # "matmul" | "gemm_t" | "gather"
    module: str
    node: ir.Node
    x: ir.Value  # activations or indices
    weight: ir.Value  # the float initializer: [K, N] for matmul, [N, K] otherwise
    n: int
    k: int


@dataclass(frozen=True)
class Part:
    """One initializer a format writes: name suffix, dtype, shape, and how to get it from the packed arrays."""

    suffix: str
    dtype: np.dtype
    shape: tuple[int, ...]
    get: Callable[[object], np.ndarray]


@dataclass(frozen=True)
class Emission:
    """What a format needs from the pass: the initializers, then the nodes given their values."""

    parts: list[Part]
    pack: Callable[[QuantizedWeight], object]
    build: Callable[[ir.tape.Tape, Site, list[ir.Value]], ir.Value]
    functions: tuple[str, ...] = ()


@dataclass(frozen=True)
class StorageFormat:
    name: str
    kinds: tuple[str, ...]
    targets: tuple[str, ...]
    unsupported: Callable[[WeightQuant, Site], str | None]
    emission: Callable[[WeightQuant, Site, np.dtype, int], Emission]
    description: str
    activation: ActivationQuant | None = None  # what the nodes do to the activations; None: nothing (weight-only)
    session_config: tuple[tuple[str, str], ...] = ()  # ORT session entries a folder with this format runs best with
    opset: int = 0  # the default-domain opset its nodes need (the pass raises the model's to it)


FORMATS: dict[str, StorageFormat] = {}


def register_format(fmt: StorageFormat) -> StorageFormat:
    FORMATS[fmt.name] = fmt
    return fmt


# ------------------------------------------------------------------------------ MatMulNBits


def _nbits_unsupported(q: WeightQuant, site: Site):
    return matmul_nbits.unsupported_reason(q.bits, q.group_size, q.integer_zero_point)


def _nbits_emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
    n = site.n
    g, blocks = matmul_nbits.block_layout(q.group_size, padded_k(q, site.k))
    symmetric = q.centered
    parts = [
        Part("qweight", np.dtype(np.uint8), (n, blocks, g * q.bits // 8), lambda a: a.b),
        Part("scales", np.dtype(scale_dtype), (n * blocks,), lambda a: a.scales),
    ]
    if not symmetric:
        parts.append(Part("qzeros", np.dtype(np.uint8), (n * (-(-blocks * q.bits // 8)),), lambda a: a.zero_points))
    attrs = {"K": site.k, "N": n, "bits": q.bits, "block_size": g, "accuracy_level": accuracy_level}

    def build(tape, site, values):
        return tape.op("MatMulNBits", [site.x, *values], attrs, domain=matmul_nbits.DOMAIN, name=site.module)

    return Emission(parts, lambda qw: matmul_nbits.pack(qw, symmetric, g), build)


register_format(StorageFormat(
    "matmulnbits", ("matmul", "gemm_t"), ("ort",), _nbits_unsupported, _nbits_emission,
    "com.microsoft.MatMulNBits: 2/4/8 bits, blocks 16-256 or per-channel (its scale repeated per block), "
    "integer zero points",
))


# ------------------------------------------------------------------------------ GatherBlockQuantized


def _gbq_unsupported(q: WeightQuant, site: Site):
    return gather_block_quantized.unsupported_reason(q.bits, q.group_size, q.integer_zero_point, site.k)


def _gbq_emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
    v, k, g = site.n, site.k, q.group_size
    blocks = k // g
    parts = [
        Part("qweight", np.dtype(np.uint8), (v, k * q.bits // 8), lambda a: a.data),
        Part("scales", np.dtype(scale_dtype), (v, blocks), lambda a: a.scales),
    ]
    if not q.centered:  # absent zero points mean 2^(bits-1), as for MatMulNBits
        parts.append(Part("qzeros", np.dtype(np.uint8), (v, -(-blocks * q.bits // 8)), lambda a: a.zero_points))
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": g, "bits": q.bits}

    def build(tape, site, values):
        data, scales, *zeros = values
        return tape.op("GatherBlockQuantized", [data, site.x, scales, *zeros], attrs,
                       domain=gather_block_quantized.DOMAIN, name=site.module)

    return Emission(parts, gather_block_quantized.pack, build)


register_format(StorageFormat(
    "gather_block_quantized", ("gather",), ("ort",), _gbq_unsupported, _gbq_emission,
    "com.microsoft.GatherBlockQuantized: 4/8-bit embeddings, power-of-two blocks",
))


def _linear(tape, site: Site, x: ir.Value, weight: ir.Value) -> ir.Value:
    """The site's own product with a (dequantized) weight: MatMul(x, W [K, N]) or Gemm(x, W [N, K], transB=1)."""
    if site.kind == "matmul":
        return tape.op("MatMul", [x, weight], name=site.module)
    return tape.op("Gemm", [x, weight], {"transB": 1}, name=site.module)


# ------------------------------------------------------------------------------ standard DequantizeLinear


def _dq_unsupported(q: WeightQuant, site: Site):
    if q.bits not in (4, 8):
        return f"DequantizeLinear stores 4 or 8 bits, not {q.bits}"
    if not q.integer_zero_point:
        return "DequantizeLinear needs integer zero points"
    if site.kind == "gather":
        return "quantized embeddings need ORT's GatherBlockQuantized or lowbit.GatherBlockwise"
    return None


def _dq_emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
    n, k = site.n, site.k
    signed = q.centered
    code_dtype = np.dtype({(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4,
                           (8, True): np.int8, (8, False): np.uint8}[(q.bits, signed)])
    per_channel = q.group_size is None
    groups = -(-k // group_size_for(q, k))
    k_major = site.kind == "matmul"  # MatMul consumes W [K, N]; Gemm(transB) consumes W [N, K]
    offset = 2 ** (q.bits - 1) if signed else 0

    def codes(qw):
        c = (qw.codes[:, :k].astype(np.int16) - offset).astype(code_dtype)
        return c.T if k_major else c

    def grid(a):  # [N, G] -> the layout DequantizeLinear expects
        a = a[:, 0] if per_channel else a
        return a.T if (k_major and not per_channel) else a

    parts = [
        Part("qweight", code_dtype, (k, n) if k_major else (n, k), codes),
        Part("scales", np.dtype(scale_dtype), (n,) if per_channel else ((groups, n) if k_major else (n, groups)),
             lambda qw: grid(qw.scales)),
    ]
    if not signed:
        parts.append(Part("qzeros", code_dtype, parts[1].shape, lambda qw: grid(qw.zero_points).astype(code_dtype)))
    if per_channel:
        attrs = {"axis": 1 if k_major else 0}
    else:
        attrs = {"axis": 0 if k_major else 1, "block_size": q.group_size}

    def build(tape, site, values):
        weight = tape.op("DequantizeLinear", values, attrs, name=f"{site.module}.dequantize")
        return _linear(tape, site, site.x, weight)

    return Emission(parts, lambda qw: qw, build)


register_format(StorageFormat(
    "dq", ("matmul", "gemm_t"), ("ort", "tensorrt"), _dq_unsupported, _dq_emission,
    "standard DequantizeLinear (int4/uint4/int8/uint8, per-channel or blocked, opset 21) + MatMul",
))


# ------------------------------------------------------------------------------ lowbit blockwise


def _blockwise_unsupported(q: WeightQuant, site: Site):
    if q.rule in FLOAT8_RULES:
        return "lowbit blockwise stores integer codes, not float8"
    if q.rule in FLOAT4_RULES:
        return f"lowbit blockwise stores integer codes, not {q.rule}"
    return None


def _blockwise_emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
    n, k = site.n, site.k
    g = group_size_for(q, k)
    kp = padded_k(q, k)
    per = 32 // q.bits
    parts = [
        Part("qweight", np.dtype(np.uint32), (n, -(-kp // per)), lambda a: a.words),
        Part("scales", np.dtype(scale_dtype), (n, kp // g), lambda a: a.scales),
        Part("qzeros", np.dtype(scale_dtype), (1, 1) if q.centered else (n, kp // g), lambda a: a.zero_points),
    ]
    attrs = {"bits": q.bits, "group_size": g, "K": k}
    op = "GatherBlockwise" if site.kind == "gather" else "MatMulBlockwise"

    def build(tape, site, values):
        words, scales, zeros = values
        inputs = [words, site.x, scales, zeros] if site.kind == "gather" else [site.x, words, scales, zeros]
        return tape.op(op, inputs, attrs, domain=blockwise.DOMAIN, name=site.module)

    return Emission(parts, partial(blockwise.pack, centered=q.centered), build, functions=(op,))


register_format(StorageFormat(
    "blockwise", ("matmul", "gemm_t", "gather"), ("ort",), _blockwise_unsupported, _blockwise_emission,
    "lowbit.MatMulBlockwise / GatherBlockwise: any bits 2-8, any group, float zero points (ONNX functions)",
))

# ------------------------------------------------------------------------------ DynamicQuantizeMatMul (A8W8)


def _dqmm_unsupported(q: WeightQuant, site: Site):
    if q.bits != 8:
        return f"DynamicQuantizeMatMul takes 8-bit weights, not {q.bits}"
    if q.group_size is not None:
        return "DynamicQuantizeMatMul takes per-channel weights, not groups"
    if not q.integer_zero_point:
        return "DynamicQuantizeMatMul needs integer zero points"
    return None


def _dqmm_emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
    # Weights stay uint8 codes with their zero point (128 for the symmetric rules), not int8: on AVX2 without
    # VNNI, ORT's u8 x s8 kernel sums pairs of products in int16 (vpmaddubsw) and saturates, 255 * 127 * 2 >
    # 32767; its u8 x u8 kernel widens to int16 first and is exact (same prompt speed, 15-20% slower decode).
    if np.dtype(scale_dtype) != np.float32:
        raise LowbitError(f"{site.module}: DynamicQuantizeMatMul computes in float32, not {np.dtype(scale_dtype)}")
    n, k = site.n, site.k
    parts = [
        Part("qweight", np.dtype(np.uint8), (k, n), lambda qw: np.ascontiguousarray(qw.codes[:, :k].T)),
        Part("scales", np.dtype(np.float32), (n,), lambda qw: qw.scales[:, 0]),
        Part("qzeros", np.dtype(np.uint8), (n,), lambda qw: qw.zero_points[:, 0]),
    ]

    def build(tape, site, values):
        return tape.op("DynamicQuantizeMatMul", [site.x, *values], domain="com.microsoft", name=site.module)

    return Emission(parts, lambda qw: qw, build)


DYNAMIC_INT8 = ActivationQuant(bits=8, type="int", dynamic=True, symmetric=False, strategy="tensor")

register_format(StorageFormat(
    "dynamic_quantize_matmul", ("matmul", "gemm_t"), ("ort",), _dqmm_unsupported, _dqmm_emission,
    "com.microsoft.DynamicQuantizeMatMul: activations quantized per tensor to uint8 (asymmetric) on every call, "
    "8-bit per-channel weights as uint8 codes [K, N] with per-column scales and zero points, integer GEMM",
    activation=DYNAMIC_INT8,
))

# ------------------------------------------------------------------------------ static activation Q/DQ (FP8, INT8)

ACTIVATION_SCALE_PLACEHOLDER = 1.0  # until calibration writes the measured scale (lowbit.converter.calibrate_folder)
ACTIVATION_SCALE = "input_scale"  # initializer `{module}.input_scale`: the activation scale calibration rewrites
ACTIVATION_ZERO_POINT = "input_zero_point"  # `{module}.input_zero_point`: rewritten too where it is not fixed at 0


@dataclass(frozen=True)
class QDQLayout:
    """One Q/DQ layout: DequantizeLinear on the stored weight, MatMul (Gemm) in float, and, for static activation
    quantization, QuantizeLinear/DequantizeLinear on the input with a calibrated per-tensor scale (and zero
    point); ORT and TensorRT fuse the pattern into their quantized GEMMs where they have one."""

    weight_element: np.dtype  # stored weight codes
    activation_element: np.dtype | None  # the activation Q/DQ element type (the zero point's); None: float input
    codes: Callable[[QuantizedWeight], np.ndarray]  # [N, K] codes in weight_element
    weight_zero_point: bool = False  # a per-channel zero-point tensor beside the codes (uint8 weights)
    activation_zero_placeholder: int = 0  # the zero point until calibration (the middle of an unsigned range)


def _qdq_emission(layout: QDQLayout):
    def emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
        n, k = site.n, site.k
        element, activation = layout.weight_element, layout.activation_element
        k_major = site.kind == "matmul"  # MatMul consumes W [K, N]; Gemm(transB) consumes W [N, K]

        def codes(qw):
            c = layout.codes(qw)[:, :k]
            return np.ascontiguousarray(c.T) if k_major else c

        scale_shape = () if q.per_tensor else (n,)
        parts = [
            Part("qweight", element, (k, n) if k_major else (n, k), codes),
            Part("scales", np.dtype(scale_dtype), scale_shape,
                 lambda qw: qw.scales[0, 0] if q.per_tensor else qw.scales[:, 0]),
        ]
        if layout.weight_zero_point:
            parts.append(Part("qzeros", element, (n,), lambda qw: qw.zero_points[:, 0].astype(element)))
        if activation is not None:
            parts += [
                Part(ACTIVATION_SCALE, np.dtype(scale_dtype), (), lambda qw: np.array(ACTIVATION_SCALE_PLACEHOLDER)),
                Part(ACTIVATION_ZERO_POINT, activation, (),
                     lambda qw: np.array(layout.activation_zero_placeholder).astype(activation)),
            ]
        weight_attrs = {} if q.per_tensor else {"axis": 1 if k_major else 0}
        weight_count = 3 if layout.weight_zero_point else 2

        def build(tape, site, values):
            weight, x = values[:weight_count], site.x
            if activation is not None:
                x_scale, x_zero = values[weight_count:]
                q_x = tape.op("QuantizeLinear", [x, x_scale, x_zero], name=f"{site.module}.input_quantize")
                x = tape.op("DequantizeLinear", [q_x, x_scale, x_zero], name=f"{site.module}.input_dequantize")
            w = tape.op("DequantizeLinear", weight, weight_attrs, name=f"{site.module}.dequantize")
            return _linear(tape, site, x, w)

        return Emission(parts, lambda qw: qw, build)

    return emission


def _fp8_unsupported(flavour: str):
    def unsupported(q: WeightQuant, site: Site):
        if q.rule not in FLOAT8_RULES:
            return f"float8 Q/DQ stores float8 weights (rules {', '.join(FLOAT8_RULES)}), not {q.rule}"
        if FLOAT8_RULES[q.rule] != flavour:
            return f"{q.rule} weights with {flavour} activations are not one format"
        return None

    return unsupported


def static_fp8(flavour: str) -> ActivationQuant:
    return ActivationQuant(bits=8, type="float", dynamic=False, symmetric=True, strategy="tensor", element=flavour)


# TensorRT computes FP8 as e4m3 only (its quantized types: INT8, INT4, FP8E4M3, FP4E2M1), so e5m2 is for ORT
FP8_TARGETS = {"e4m3": ("ort", "tensorrt"), "e5m2": ("ort",)}

for _flavour in FLOAT8:
    _element = np.dtype(FLOAT8[_flavour].dtype)
    register_format(StorageFormat(
        f"qdq_fp8_{_flavour}", ("matmul", "gemm_t"), FP8_TARGETS[_flavour], _fp8_unsupported(_flavour),
        _qdq_emission(QDQLayout(_element, _element, lambda qw, e=_element: qw.codes.view(e))),
        f"opset-21 QuantizeLinear/DequantizeLinear with float8 {_flavour}: activations per tensor with a calibrated "
        f"static scale, weights float8 with per-tensor or per-channel scales, DequantizeLinear + MatMul",
        activation=static_fp8(_flavour),
        # ORT's CPU provider has no float8 GEMM; with its QDQ handling off, constant folding dequantizes the float8
        # weights once at load (float16 in memory, as q0f16) instead of on every call: decode 12x faster measured
        session_config=(("session.disable_quant_qdq", "1"),),
    ))


def _int8_unsupported(q: WeightQuant, site: Site):
    if q.bits != 8 or q.rule != "symmetric" or q.group_size is not None or q.clip_search:
        return f"static INT8 Q/DQ stores 8-bit per-channel symmetric weights (s = max|w|/127), not {q.describe()}"
    return None


# Static INT8 activations. TensorRT takes symmetric int8 for both (zero points 0). ORT's CPU provider fuses the
# pattern into MatMulIntegerToFloat; on x86 without VNNI its int8 x int8 and uint8 x int8 kernels add pairs of
# products in int16 and saturate (255 * 127 * 2 > 32767: errors of the order of the output itself, measured),
# its uint8 x uint8 kernel is exact: so for ORT the activations are uint8 with a calibrated zero point (min/max
# range) and the weights uint8 codes with zero point 128 (the same values as int8, s = max|w|/127).
STATIC_INT8_SYMMETRIC = ActivationQuant(bits=8, type="int", dynamic=False, symmetric=True, strategy="tensor")
STATIC_UINT8 = ActivationQuant(bits=8, type="int", dynamic=False, symmetric=False, strategy="tensor")

register_format(StorageFormat(
    "qdq_int8", ("matmul", "gemm_t"), ("tensorrt",), _int8_unsupported,
    _qdq_emission(QDQLayout(np.dtype(np.int8), np.dtype(np.int8),
                            lambda qw: (qw.codes.astype(np.int16) - 128).astype(np.int8))),
    "opset-21 QuantizeLinear/DequantizeLinear with int8: activations symmetric per tensor with a calibrated static "
    "scale (absmax / 127), int8 per-channel weights, DequantizeLinear + MatMul (TensorRT's explicit INT8)",
    activation=STATIC_INT8_SYMMETRIC,
))

register_format(StorageFormat(
    "qdq_uint8", ("matmul", "gemm_t"), ("ort",), _int8_unsupported,
    _qdq_emission(QDQLayout(np.dtype(np.uint8), np.dtype(np.uint8), lambda qw: qw.codes, weight_zero_point=True,
                            activation_zero_placeholder=128)),
    "opset-21 QuantizeLinear/DequantizeLinear with uint8: activations per tensor with a calibrated static scale "
    "and zero point (min/max range), 8-bit per-channel symmetric weights as uint8 codes with zero point 128, "
    "DequantizeLinear + MatMul, which ORT fuses into MatMulIntegerToFloat (exact uint8 x uint8 integer GEMM)",
    activation=STATIC_UINT8,
))

# ------------------------------------------------------------------------------ float8 weights, float activations


def _dq_fp8_unsupported(q: WeightQuant, site: Site):
    if q.rule != "fp8_e4m3" or q.group_size is not None:
        return "float8 DequantizeLinear stores per-channel float8 e4m3 weights"
    if site.kind == "gather":
        return "not for embeddings"
    return None


register_format(StorageFormat(
    "dq_fp8_e4m3", ("matmul", "gemm_t"), ("ort", "tensorrt"), _dq_fp8_unsupported,
    _qdq_emission(QDQLayout(np.dtype(FLOAT8["e4m3"].dtype), None, lambda qw: qw.codes.view(FLOAT8["e4m3"].dtype))),
    "float8 e4m3 weights with per-channel scales, DequantizeLinear + MatMul, float activations "
    "(imported float-quantized checkpoints)",
    session_config=(("session.disable_quant_qdq", "1"),),
))


# ------------------------------------------------------------------------------ NVFP4 weights, float activations


def _nvfp4_unsupported(q: WeightQuant, site: Site):
    if q.rule not in FLOAT4_RULES:
        return f"NVFP4 stores FP4 e2m1 weights (rule {', '.join(FLOAT4_RULES)}), not {q.describe()}"
    if site.kind == "gather":
        return "not for embeddings"
    return None


def _nvfp4_two_level_unsupported(q: WeightQuant, site: Site):
    if q.rule in FLOAT4_RULES and site.k % nvfp4_math.GROUP:
        return f"TensorRT's FP4 blocks need K divisible by {nvfp4_math.GROUP}, not K = {site.k}"
    return _nvfp4_unsupported(q, site)


def _nvfp4_linear(tape, site: Site, weight_nk: ir.Value) -> ir.Value:
    """MatMul(x, transposed W [N, K]) or Gemm(x, W [N, K], transB=1)."""
    if site.kind == "matmul":
        weight_nk = tape.op("Transpose", [weight_nk], {"perm": [1, 0]}, name=f"{site.module}.transpose")
    return _linear(tape, site, site.x, weight_nk)


def _nvfp4_unpacked_emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
    n, k = site.n, site.k
    kp = padded_k(q, k)
    parts = [
        Part("qweight", np.dtype(np.uint8), (n, kp // 2), lambda a: a.packed),
        Part("scales", nvfp4_math.SCALE_DTYPE, (n, kp // q.group_size), lambda a: a.scales),
        Part("global_scale", np.dtype(np.float32), (), lambda a: np.asarray(a.global_scale, np.float32)),
    ]

    def build(tape, site, values):
        weight = nvfp4.dequantized_unpacked(tape, *values, n, k, scale_dtype, site.module)
        return _nvfp4_linear(tape, site, weight)

    return Emission(parts, nvfp4.pack, build)


def _nvfp4_two_level_emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
    n, k = site.n, site.k
    parts = [
        Part("qweight", nvfp4.FLOAT4, (n, k), lambda a: a.float4()),
        Part("scales", nvfp4_math.SCALE_DTYPE, (n, k // q.group_size), lambda a: a.scales),
        Part("global_scale_inverse", np.dtype(np.float32), (),
             lambda a: np.asarray(nvfp4_math.inverse_global_scale(a.global_scale), np.float32)),
    ]

    def build(tape, site, values):
        weight = nvfp4.dequantized_two_level(tape, *values, scale_dtype, site.module)
        return _nvfp4_linear(tape, site, weight)

    return Emission(parts, nvfp4.pack, build)


register_format(StorageFormat(
    "nvfp4_unpack", ("matmul", "gemm_t"), ("ort",), _nvfp4_unsupported, _nvfp4_unpacked_emission,
    "NVFP4 weights (packed FP4 e2m1 codes, FP8 e4m3 scales per 16, a float32 global scale) unpacked by standard "
    "ops (BitwiseAnd, BitShift, Gather from the e2m1 values, Mul by scale / global scale), which ORT folds to the "
    "float weight at load; float activations",
))

register_format(StorageFormat(
    "dq_nvfp4", ("matmul", "gemm_t"), ("tensorrt",), _nvfp4_two_level_unsupported, _nvfp4_two_level_emission,
    "NVFP4 weights as TensorRT takes them (ModelOpt's 2-level DQ, opset 23): DequantizeLinear of FLOAT4E2M1 [N, K] "
    "with block_size 16 whose scale is DequantizeLinear(FLOAT8E4M3FN scales, 1 / global scale); float activations",
    opset=nvfp4.TWO_LEVEL_OPSET,
))


# ------------------------------------------------------------------------------ NVFP4 weights and activations (W4A4)

INPUT_GLOBAL_SCALE = "input_global_scale"  # `{module}.input_global_scale`: gs of the activations (ort form)
INPUT_GLOBAL_SCALE_INVERSE = "input_global_scale_inverse"  # its 1 / gs, TRT_FP4DynamicQuantize's scale (tensorrt)


def _nvfp4_a4_unsupported(q: WeightQuant, site: Site):
    if q.rule in FLOAT4_RULES and site.k % nvfp4_math.GROUP:
        return f"FP4 activation blocks need K divisible by {nvfp4_math.GROUP}, not K = {site.k}"
    return _nvfp4_unsupported(q, site)


def _nvfp4_a4(weight_emission, scale_suffix: str, scale_of, activation_qdq):
    """An NVFP4 weight emission with NVFP4 input activations: the weight's parts and the activations' float32
    global scale (placeholder 1 until calibration), the activation subgraph on the MatMul's input."""
    def emission(q: WeightQuant, site: Site, scale_dtype, accuracy_level: int) -> Emission:
        weight = weight_emission(q, site, scale_dtype, accuracy_level)
        count = len(weight.parts)
        parts = [*weight.parts, Part(scale_suffix, np.dtype(np.float32), (),
                                     lambda a: np.asarray(scale_of(ACTIVATION_SCALE_PLACEHOLDER), np.float32))]

        def build(tape, site, values):
            x = activation_qdq(tape, site.x, values[count], site.module)
            return weight.build(tape, replace(site, x=x), values[:count])

        return Emission(parts, weight.pack, build, functions=weight.functions + (
            (nvfp4.ACTIVATION_OP,) if activation_qdq is nvfp4.activation_qdq else ()))

    return emission


register_format(StorageFormat(
    "nvfp4_a4_unpack", ("matmul", "gemm_t"), ("ort",), _nvfp4_a4_unsupported,
    _nvfp4_a4(_nvfp4_unpacked_emission, INPUT_GLOBAL_SCALE, lambda gs: gs, nvfp4.activation_qdq),
    "NVFP4 weights as nvfp4_unpack with NVFP4 input activations (W4A4): lowbit.NVFP4ActivationQDQ, an ONNX function "
    "of standard ops, fake-quantizes x in blocks of 16 (FP8 block scales computed on every call, a calibrated "
    "static global scale) before the float MatMul",
    activation=NVFP4_ACTIVATIONS,
))

register_format(StorageFormat(
    "dq_nvfp4_a4", ("matmul", "gemm_t"), ("tensorrt",), _nvfp4_a4_unsupported,
    _nvfp4_a4(_nvfp4_two_level_emission, INPUT_GLOBAL_SCALE_INVERSE, nvfp4_math.inverse_global_scale,
              nvfp4.activation_two_level),
    "NVFP4 weights as dq_nvfp4 with NVFP4 input activations (W4A4) as ModelOpt exports them for TensorRT: "
    "trt.TRT_FP4DynamicQuantize(x, 1 / global scale) → DequantizeLinear of the FP8 block scales → DequantizeLinear "
    "of the FLOAT4E2M1 values (axis -1, block_size 16)",
    activation=NVFP4_ACTIVATIONS, opset=nvfp4.TWO_LEVEL_OPSET,
))


# Preference order when a plan names no format.
PREFERENCE = ("matmulnbits", "gather_block_quantized", "dq", "blockwise", "dynamic_quantize_matmul", "qdq_fp8_e4m3",
              "qdq_fp8_e5m2", "qdq_uint8", "qdq_int8", "dq_fp8_e4m3", "nvfp4_unpack", "dq_nvfp4", "nvfp4_a4_unpack",
              "dq_nvfp4_a4")
