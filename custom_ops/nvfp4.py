"""NVFP4 weights in ONNX (the math: lowbit.nvfp4): packing, numpy reference weights, and the two graph forms.

Stored per weight W [N, K] (K_padded = K rounded up to 16, G = K_padded / 16): the e2m1 codes, two a byte in
compressed-tensors' order (column 2j in the low nibble), FP8 e4m3 block scales [N, G] and one float32 global
scale gs; 4.5 bits a weight plus 4 bytes.

- `tensorrt` (`dequantized_two_level`, opset 23): ModelOpt's "2-level DQ", the form TensorRT's NVFP4 support
  takes: `DequantizeLinear(W4 FLOAT4E2M1 [N, K], DequantizeLinear(scales FLOAT8E4M3FN [N, G], 1 / gs), axis=1,
  block_size=16)` -> W [N, K] (then Transpose for a MatMul). The FLOAT4E2M1 tensor holds the same bytes as the
  packed codes. Values: e2m1 · (s · (1 / gs)).
- `ort` (`dequantized_unpacked`, opset 21, standard ops ORT's CPU provider runs): packed uint8 [N, K_padded / 2]
  -> BitwiseAnd 15 / BitShift 4 -> codes [N, G, 16] -> Gather from the 16 e2m1 values -> times Cast(scales) / gs
  [N, G, 1] -> W [N, K]. Values: e2m1 · (s / gs), compressed-tensors' dequantization bit for bit. Everything is
  constant, so ORT folds it to the float weight at load; the file keeps 4.5 bits a weight. (A DequantizeLinear of
  the scales with scale 1 / gs would compute s · (1 / gs), a unit in the last place away from s / gs now and
  then; the Cast keeps ORT's weight equal to compressed-tensors'.)

`reference_weight` / `reference_weight_two_level` are the numpy weights each form computes.

NVFP4 input activations (the `NVFP4` preset, W4A4; math: lowbit.nvfp4.fake_quantize_activations), on the MatMul's
input x [..., K], K a multiple of 16, with the calibrated global input scale gs:

- `ort`: `lowbit.NVFP4ActivationQDQ(X, input_global_scale) -> Y`, a model-local function (domain `lowbit`, version
  1) whose body is standard opset-21 ops ORT's CPU provider runs (ORT inlines it at load): Cast to float32 →
  Reshape [..., K/16, 16] → ReduceMax(Abs) → Mul(gs, amax / 6) → Min 448 → QuantizeLinear/DequantizeLinear to
  FLOAT8E4M3FN with scale 1 (round to nearest even) → Where(0, 0.125) → step = s / gs → x / step, Abs, Min 6 →
  e2m1 rounding as Where(m < 2, Round(2m) / 2, Where(m < 4, Round(m), 2 Round(m / 2))) (Round: half to even, the
  e2m1 ties) → times −1 where x / step < 0 → times step → Reshape back → CastLike X. `reference_activation` is its numpy
  kernel: compressed-tensors' fake_quantize bit for bit.
- `tensorrt`: ModelOpt's export of a dynamic NVFP4 input quantizer (`export_fp4` → `_fp4_dynamic_quantize`), which
  onnx-tensorrt maps to IDynamicQuantizeLayer: `trt.TRT_FP4DynamicQuantize(X, s2)` (attributes axis -1, block_size
  16, scale_type 17 = FLOAT8E4M3FN; s2 = 1 / gs a float32 scalar initializer, ModelOpt's amax / 6 / 448) → (X4
  FLOAT4E2M1, block scales FLOAT8E4M3FN [..., K/16]); `DequantizeLinear(block scales, s2)` → `DequantizeLinear(X4,
  that, axis -1, block_size 16)` → MatMul. `TRT_SCHEMA` is the node's schema (onnx.defs.OpSchema, registered by
  `register_trt_schema` so that onnx.checker can check it); `reference_trt_dynamic_quantize` its numpy kernel as
  TensorRT documents the layer (block scale fp8(max|x_block| / 6 / s2), values e2m1(x / (scale · s2))). ORT cannot
  run this form (no `trt` domain kernels on CPU, no FLOAT4E2M1 DequantizeLinear), and no TensorRT engine was built.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit import nvfp4
from lowbit.affine import QuantizedWeight

TWO_LEVEL_OPSET = 23  # DequantizeLinear takes FLOAT4E2M1 from opset 23
FLOAT4 = np.dtype(ml_dtypes.float4_e2m1fn)


@dataclass(frozen=True)
class NVFP4Arrays:
    packed: np.ndarray  # uint8 [N, K_padded / 2]
    scales: np.ndarray  # float8_e4m3fn [N, G]
    global_scale: np.float32  # gs
    k: int  # K before padding

    def codes(self) -> np.ndarray:
        """uint8 [N, K_padded] e2m1 codes."""
        return nvfp4.unpack(self.packed)

    def float4(self) -> np.ndarray:
        """[N, K] as ml_dtypes float4_e2m1fn (one code a byte in memory; ONNX packs two a byte)."""
        return np.ascontiguousarray(self.codes()[:, : self.k]).view(FLOAT4)


def pack(qw: QuantizedWeight) -> NVFP4Arrays:
    if qw.element != nvfp4.ELEMENT:
        raise ValueError(f"not an NVFP4 weight (element {qw.element!r})")
    return NVFP4Arrays(nvfp4.pack(qw.codes), qw.scales, np.float32(qw.global_scale), qw.k)


def reference_weight(arrays: NVFP4Arrays) -> np.ndarray:
    """W [N, K] float32 as the `ort` form computes it: e2m1 · (s / gs)."""
    return nvfp4.dequantize(arrays.codes(), arrays.scales, arrays.global_scale)[:, : arrays.k]


def reference_weight_two_level(arrays: NVFP4Arrays, dtype=np.float32) -> np.ndarray:
    """W [N, K] as the `tensorrt` form computes it: e2m1 · dtype(s · (1 / gs))."""
    return nvfp4.dequantize_two_level(arrays.codes(), arrays.scales, arrays.global_scale, dtype)[:, : arrays.k]


def _const(tape: ir.tape.Tape, values, dtype=np.int64, name: str | None = None) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(values, dtype))}, name=name)


def e2m1_blocks(tape: ir.tape.Tape, packed: ir.Value, n: int, name: str | None = None) -> ir.Value:
    """Standard ops: packed uint8 [N, K_padded / 2] (two e2m1 codes a byte, even column in the low nibble) -> the
    e2m1 values, float32 [N, K_padded / 16, 16] (BitwiseAnd / BitShift, then a Gather from the 16 values).
    `name`: the nodes' name stem (None: unnamed)."""
    def named(suffix):
        return None if name is None else f"{name}.{suffix}"

    low = tape.op("BitwiseAnd", [packed, _const(tape, 15, np.uint8)], name=named("low_nibbles"))
    high = tape.op("BitShift", [packed, _const(tape, 4, np.uint8)], {"direction": "RIGHT"}, name=named("high_nibbles"))
    pairs = tape.op("Concat", [tape.op("Unsqueeze", [low, _const(tape, [-1])]),
                               tape.op("Unsqueeze", [high, _const(tape, [-1])])], {"axis": -1})  # [N, K_p / 2, 2]
    codes = tape.op("Reshape", [pairs, _const(tape, [n, -1, nvfp4.GROUP])])  # [N, G, 16]
    table = _const(tape, nvfp4.E2M1, np.float32, name=named("e2m1_values"))
    return tape.op("Gather", [table, tape.op("Cast", [codes], {"to": ir.DataType.INT32})], {"axis": 0})


def dequantized_unpacked(tape: ir.tape.Tape, packed: ir.Value, scales: ir.Value, gs: ir.Value, n: int, k: int,
                         dtype, name: str) -> ir.Value:
    """The `ort` form: W [N, K] in `dtype` from packed uint8 [N, K_padded / 2], FLOAT8E4M3FN scales [N, G] and the
    float32 scalar gs."""
    values = e2m1_blocks(tape, packed, n, name)
    step = tape.op("Div", [tape.op("Cast", [scales], {"to": ir.DataType.FLOAT}), gs])  # s / gs, float32 [N, G]
    weight = tape.op("Mul", [values, tape.op("Unsqueeze", [step, _const(tape, [-1])])])
    weight = tape.op("Reshape", [weight, _const(tape, [n, -1])])  # [N, K_padded]
    weight = tape.op("Slice", [weight, _const(tape, [0]), _const(tape, [k]), _const(tape, [1])])
    if np.dtype(dtype) != np.float32:
        weight = tape.op("Cast", [weight], {"to": ir.DataType.from_numpy(np.dtype(dtype))})
    return weight


def dequantized_two_level(tape: ir.tape.Tape, weight4: ir.Value, scales: ir.Value, inverse_gs: ir.Value, dtype,
                          name: str) -> ir.Value:
    """The `tensorrt` form: W [N, K] in `dtype` = DequantizeLinear(FLOAT4E2M1 [N, K], DequantizeLinear(FLOAT8E4M3FN
    scales [N, G], float32 1 / gs), axis 1, block_size 16)."""
    attrs = {} if np.dtype(dtype) == np.float32 else {"output_dtype": ir.DataType.from_numpy(np.dtype(dtype))}
    block_scales = tape.op("DequantizeLinear", [scales, inverse_gs], attrs, name=f"{name}.dequantize_scales")
    return tape.op("DequantizeLinear", [weight4, block_scales], {"axis": 1, "block_size": nvfp4.GROUP},
                   name=f"{name}.dequantize")


# ------------------------------------------------------------------------------ NVFP4 input activations

DOMAIN = "lowbit"
VERSION = 1
ACTIVATION_OP = "NVFP4ActivationQDQ"
ACTIVATION_OPSET = 21
TRT_DOMAIN = "trt"
TRT_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"


def reference_activation(x: np.ndarray, gs) -> np.ndarray:
    """What `lowbit.NVFP4ActivationQDQ` computes: the float32 fake-quantized activations, cast back to x's dtype."""
    return nvfp4.fake_quantize_activations(np.asarray(x, np.float32), gs).astype(np.asarray(x).dtype)


def activation_function() -> ir.Function:
    """lowbit.NVFP4ActivationQDQ(X [..., K], GS float32 scalar) -> Y like X, standard ops only."""
    x_in, gs = ir.Value(name="X"), ir.Value(name="GS")
    graph = ir.Graph([x_in, gs], [], nodes=[], opset_imports={"": ACTIVATION_OPSET}, name=ACTIVATION_OP)
    tape = ir.tape.Tape(graph)

    def scalar(value, dtype=np.float32):
        return _const(tape, value, dtype)

    x = tape.op("Cast", [x_in], {"to": ir.DataType.FLOAT})
    blocks_shape = tape.op("Concat", [tape.op("Shape", [x], {"end": -1}), _const(tape, [-1, nvfp4.GROUP])], {"axis": 0})
    blocks = tape.op("Reshape", [x, blocks_shape])  # [..., G, 16]
    amax = tape.op("ReduceMax", [tape.op("Abs", [blocks]), _const(tape, [-1])], {"keepdims": 1})  # [..., G, 1]
    scale = tape.op("Min", [tape.op("Mul", [gs, tape.op("Div", [amax, scalar(nvfp4.FP4_MAX)])]),
                            scalar(nvfp4.FP8_MAX)])
    one, fp8_zero = scalar(1.0), _const(tape, 0, nvfp4.SCALE_DTYPE)
    scale = tape.op("DequantizeLinear", [tape.op("QuantizeLinear", [scale, one, fp8_zero]), one, fp8_zero])
    scale = tape.op("Where", [tape.op("Equal", [scale, scalar(0.0)]), scalar(nvfp4.SCALE_EPS), scale])
    step = tape.op("Div", [scale, gs])  # s / gs
    scaled = tape.op("Div", [blocks, step])
    magnitude = tape.op("Min", [tape.op("Abs", [scaled]), scalar(nvfp4.FP4_MAX)])
    halves = tape.op("Mul", [tape.op("Round", [tape.op("Mul", [magnitude, scalar(2.0)])]), scalar(0.5)])
    ones = tape.op("Round", [magnitude])
    twos = tape.op("Mul", [tape.op("Round", [tape.op("Mul", [magnitude, scalar(0.5)])]), scalar(2.0)])
    rounded = tape.op("Where", [tape.op("Less", [magnitude, scalar(2.0)]), halves,
                                tape.op("Where", [tape.op("Less", [magnitude, scalar(4.0)]), ones, twos])])
    sign = tape.op("Where", [tape.op("Less", [scaled, scalar(0.0)]), scalar(-1.0), scalar(1.0)])
    signed = tape.op("Mul", [rounded, sign])  # −0.0 where a negative value rounds to zero, as code 8
    values = tape.op("Reshape", [tape.op("Mul", [signed, step]), tape.op("Shape", [x])])
    y = tape.op("CastLike", [values, x_in])
    y.name = "Y"
    graph.outputs.append(y)
    return ir.Function(DOMAIN, ACTIVATION_OP, graph=graph, attributes=[])


FUNCTIONS = {ACTIVATION_OP: activation_function}


def activation_qdq(tape: ir.tape.Tape, x: ir.Value, gs: ir.Value, name: str) -> ir.Value:
    """The `ort` form: one lowbit.NVFP4ActivationQDQ node on x."""
    return tape.op(ACTIVATION_OP, [x, gs], domain=DOMAIN, name=f"{name}.input_nvfp4")


def activation_two_level(tape: ir.tape.Tape, x: ir.Value, inverse_gs: ir.Value, name: str) -> ir.Value:
    """The `tensorrt` form: TRT_FP4DynamicQuantize(x, 1 / gs) → two DequantizeLinear (ModelOpt's layout)."""
    x4, block_scales = tape.op_multi_out(
        TRT_DYNAMIC_QUANTIZE, [x, inverse_gs],
        {"axis": -1, "block_size": nvfp4.GROUP, "scale_type": ir.DataType.FLOAT8E4M3FN.value},
        num_outputs=2, domain=TRT_DOMAIN, name=f"{name}.input_quantize")
    scales = tape.op("DequantizeLinear", [block_scales, inverse_gs], name=f"{name}.input_dequantize_scales")
    return tape.op("DequantizeLinear", [x4, scales], {"axis": -1, "block_size": nvfp4.GROUP},
                   name=f"{name}.input_dequantize")


def trt_schema():
    """onnx.defs.OpSchema of trt::TRT_FP4DynamicQuantize as onnx-tensorrt's importer reads it."""
    from onnx import defs

    return defs.OpSchema(
        TRT_DYNAMIC_QUANTIZE, TRT_DOMAIN, 1,
        doc="Dynamic NVFP4 block quantization (TensorRT IDynamicQuantizeLayer): FP4 values and FP8 block scales.",
        inputs=[defs.OpSchema.FormalParameter("X", "T1"), defs.OpSchema.FormalParameter("scale", "tensor(float)")],
        outputs=[defs.OpSchema.FormalParameter("Y", "T2"), defs.OpSchema.FormalParameter("Y_scale", "T3")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "input"),
                          ("T2", ["tensor(float4e2m1)"], "FP4 values"),
                          ("T3", ["tensor(float8e4m3fn)"], "FP8 block scales")],
        attributes=[defs.OpSchema.Attribute("axis", defs.OpSchema.AttrType.INT, "blocked axis (-1)"),
                    defs.OpSchema.Attribute("block_size", defs.OpSchema.AttrType.INT, "16"),
                    defs.OpSchema.Attribute("scale_type", defs.OpSchema.AttrType.INT, "17: FLOAT8E4M3FN")],
    )


def register_trt_schema() -> None:
    """Registers `trt_schema()` with onnx (once), so that onnx.checker checks TRT_FP4DynamicQuantize nodes."""
    from onnx import defs

    if not defs.has(TRT_DYNAMIC_QUANTIZE, TRT_DOMAIN):
        defs.register_schema(trt_schema())


def reference_trt_dynamic_quantize(x: np.ndarray, inverse_gs) -> tuple[np.ndarray, np.ndarray]:
    """(float4_e2m1fn values [..., K], float8_e4m3fn block scales [..., K/16]) of TRT_FP4DynamicQuantize(x, s2) as
    TensorRT documents it: block scale fp8(max|x_block| / 6 / s2), values e2m1(x / (scale · s2)); a zero block
    scale gives zero values."""
    x = np.asarray(x, np.float32)
    s2 = np.float32(inverse_gs)
    blocks = x.reshape(*x.shape[:-1], -1, nvfp4.GROUP)
    scales = np.clip(np.abs(blocks).max(axis=-1) / nvfp4.FP4_MAX / s2, 0, nvfp4.FP8_MAX).astype(nvfp4.SCALE_DTYPE)
    step = (scales.astype(np.float32) * s2)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = nvfp4.to_e2m1_codes(np.where(step > 0, blocks / step, 0))
    return codes.reshape(x.shape).view(FLOAT4), scales


def reference_activation_two_level(x: np.ndarray, inverse_gs) -> np.ndarray:
    """The `tensorrt` form's activations: e2m1 · (block scale · s2) in float32 (the two DequantizeLinear)."""
    values, scales = reference_trt_dynamic_quantize(x, inverse_gs)
    step = scales.astype(np.float32) * np.float32(inverse_gs)
    blocks = values.astype(np.float32).reshape(*step.shape, nvfp4.GROUP)
    return (blocks * step[..., None]).reshape(np.shape(x))
