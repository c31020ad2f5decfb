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


def dequantized_unpacked(tape: ir.tape.Tape, packed: ir.Value, scales: ir.Value, gs: ir.Value, n: int, k: int,
                         dtype, name: str) -> ir.Value:
    """The `ort` form: W [N, K] in `dtype` from packed uint8 [N, K_padded / 2], FLOAT8E4M3FN scales [N, G] and the
    float32 scalar gs."""
    low = tape.op("BitwiseAnd", [packed, _const(tape, 15, np.uint8)], name=f"{name}.low_nibbles")
    high = tape.op("BitShift", [packed, _const(tape, 4, np.uint8)], {"direction": "RIGHT"}, name=f"{name}.high_nibbles")
    pairs = tape.op("Concat", [tape.op("Unsqueeze", [low, _const(tape, [-1])]),
                               tape.op("Unsqueeze", [high, _const(tape, [-1])])], {"axis": -1})  # [N, K_p / 2, 2]
    codes = tape.op("Reshape", [pairs, _const(tape, [n, -1, nvfp4.GROUP])])  # [N, G, 16]
    table = _const(tape, nvfp4.E2M1, np.float32, name=f"{name}.e2m1_values")
    values = tape.op("Gather", [table, tape.op("Cast", [codes], {"to": ir.DataType.INT32})], {"axis": 0})
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
