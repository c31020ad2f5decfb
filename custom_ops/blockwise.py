"""lowbit's own nodes for layouts ORT's kernels refuse: any bit width 2..8, any group size
(e.g. MLC's 3-bit / group 40), float zero points (DashInfer's CPU uint8 rule).

Schema (domain `lowbit`, version 1):

- `MatMulBlockwise(A[..., K], words, scales, zero_points) -> Y[..., N]`
- `GatherBlockwise(words, indices, scales, zero_points) -> Y[*indices.shape, K]`

with `words` uint32 [N, W]: each row's codes (zero-padded to K_padded = G * group_size) packed
`32 // bits` to a word, value j at bit j*bits (MLC-LLM's layout: 10 three-bit values a word);
`scales` [N, G] and `zero_points` [N, G] in the activation dtype; dequant = (q - zero_point) * scale.
`zero_points` may be [1, 1]: one zero point for every group (the centred rules, 2^(bits-1)), which saves a
value per group (0.4 bits a weight for MLC's 3-bit groups of 40 in float16). Attributes: `bits`, `group_size`,
`K`.

Implementation: each op is an ONNX model-local function whose body is standard ops (BitShift,
BitwiseAnd, Reshape, Slice, Sub, Mul, MatMul/Gather), so any ONNX Runtime runs it after
inlining; `reference_*` are the numpy kernels the tests compare against. GatherBlockwise's body
gathers the rows' words first and unpacks only those. MatMulBlockwise's body unpacks the whole
weight, so lowbit's runtime does not run it on CPU: at load it rewrites each node into
`com.microsoft.MatMulNBits` over the same codes and scales (`blockwise_repack.py`,
runtime/fast_paths.py); the file keeps this layout and these bodies for every other runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.affine import QuantizedWeight, dequantize
from lowbit.custom_ops.bitpack import pack_words, unpack_words

DOMAIN = "lowbit"
VERSION = 1


@dataclass(frozen=True)
class BlockwiseArrays:
    words: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    group_size: int
    k: int


def pack(qw: QuantizedWeight, centered: bool = False) -> BlockwiseArrays:
    """`centered`: the weight's rule puts every zero point at 2^(bits-1) (`WeightQuant.centered`): they are stored
    as one [1, 1] value."""
    zp = qw.zero_points.astype(qw.scales.dtype)
    if centered:
        centre = 2 ** (qw.bits - 1)
        if not np.all(qw.zero_points == centre):
            raise ValueError(f"blockwise: a centred weight has zero points other than {centre}")
        zp = np.full((1, 1), centre, qw.scales.dtype)
    return BlockwiseArrays(pack_words(qw.codes, qw.bits), qw.scales, zp, qw.bits, qw.group_size, qw.k)


def zero_points_per_group(arrays) -> np.ndarray:
    """The zero points [N, G] of blockwise arrays (a [1, 1] zero point repeated; a view, nothing is copied)."""
    return np.broadcast_to(np.asarray(arrays.zero_points), np.shape(arrays.scales))


def unpack(arrays: BlockwiseArrays) -> QuantizedWeight:
    kp = arrays.scales.shape[1] * arrays.group_size
    codes = unpack_words(arrays.words, arrays.bits, kp)
    return QuantizedWeight(codes, arrays.scales, np.array(zero_points_per_group(arrays)), arrays.bits,
                           arrays.group_size, arrays.k)


def reference_matmul(a: np.ndarray, arrays: BlockwiseArrays) -> np.ndarray:
    return (a.astype(np.float32) @ dequantize(unpack(arrays)).T).astype(a.dtype)


def reference_gather(indices: np.ndarray, arrays: BlockwiseArrays) -> np.ndarray:
    return dequantize(unpack(arrays)).astype(arrays.scales.dtype)[indices]



# ------------------------------------------------------------------------------ function bodies


def _const_from_attr(tape: ir.tape.Tape, attr: str):
    return tape.op("Constant", [], {"value_int": ir.RefAttr("value_int", attr, ir.AttributeType.INT)})


def _const(tape: ir.tape.Tape, values, dtype=np.int64):
    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(values, dtype))})


def _dequantized_rows(tape: ir.tape.Tape, words, scales, zero_points, k):
    """[R, W] words, [R, G] scales/zero points -> [R, K] dequantized rows (scales' dtype)."""
    bits = _const_from_attr(tape, "bits")
    group = _const_from_attr(tape, "group_size")
    per_word = tape.op("Div", [_const(tape, 32), bits])
    shifts = tape.op("Cast", [tape.op("Mul", [tape.op("Range", [_const(tape, 0), per_word, _const(tape, 1)]), bits])],
                     {"to": ir.DataType.UINT32})
    mask = tape.op("Cast", [tape.op("Sub", [tape.op("Pow", [_const(tape, 2), bits]), _const(tape, 1)])],
                   {"to": ir.DataType.UINT32})
    shifted = tape.op("BitShift", [tape.op("Unsqueeze", [words, _const(tape, [-1])]), shifts], {"direction": "RIGHT"})
    values = tape.op("BitwiseAnd", [shifted, mask])  # [R, W, per_word]
    rows = tape.op("Shape", [words], {"end": 1})
    groups = tape.op("Shape", [scales], {"start": 1})
    flat = tape.op("Reshape", [values, tape.op("Concat", [rows, _const(tape, [-1])], {"axis": 0})])
    k_padded = tape.op("Mul", [groups, tape.op("Reshape", [group, _const(tape, [1])])])
    codes = tape.op("Slice", [flat, _const(tape, [0]), k_padded, _const(tape, [1])])
    grouped = tape.op("Reshape", [codes, tape.op("Concat", [rows, groups, _const(tape, [-1])], {"axis": 0})])
    centred = tape.op("Sub", [tape.op("CastLike", [grouped, scales]), tape.op("Unsqueeze", [zero_points, _const(tape, [-1])])])
    dequant = tape.op("Mul", [centred, tape.op("Unsqueeze", [scales, _const(tape, [-1])])])
    full = tape.op("Reshape", [dequant, tape.op("Concat", [rows, _const(tape, [-1])], {"axis": 0})])
    return tape.op("Slice", [full, _const(tape, [0]), k, _const(tape, [1])])


def _function(name: str, input_names: list[str], build) -> ir.Function:
    inputs = [ir.Value(name=n) for n in input_names]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 21}, name=name)
    tape = ir.tape.Tape(graph)
    output = build(tape, *inputs)
    output.name = "Y"
    graph.outputs.append(output)
    attrs = [ir.Attr(a, ir.AttributeType.INT, None) for a in ("bits", "group_size", "K")]
    return ir.Function(DOMAIN, name, graph=graph, attributes=attrs)


def matmul_function() -> ir.Function:
    def build(tape, a, words, scales, zero_points):
        k = tape.op("Shape", [a], {"start": -1})
        weight = _dequantized_rows(tape, words, scales, zero_points, k)  # [N, K]
        return tape.op("MatMul", [a, tape.op("Transpose", [weight], {"perm": [1, 0]})])

    return _function("MatMulBlockwise", ["A", "words", "scales", "zero_points"], build)


def gather_function() -> ir.Function:
    def build(tape, words, indices, scales, zero_points):
        flat_idx = tape.op("Reshape", [indices, _const(tape, [-1])])
        k = tape.op("Reshape", [_const_from_attr(tape, "K"), _const(tape, [1])])
        rows = _dequantized_rows(
            tape,
            tape.op("Gather", [words, flat_idx], {"axis": 0}),
            tape.op("Gather", [scales, flat_idx], {"axis": 0}),
            # row index mod the zero points' rows: a [1, 1] zero point serves every row
            tape.op("Gather", [zero_points, tape.op("Mod", [flat_idx, tape.op("Shape", [zero_points], {"end": 1})])],
                    {"axis": 0}),
            k,
        )
        return tape.op("Reshape", [rows, tape.op("Concat", [tape.op("Shape", [indices]), k], {"axis": 0})])

    return _function("GatherBlockwise", ["words", "indices", "scales", "zero_points"], build)


FUNCTIONS = {"MatMulBlockwise": matmul_function, "GatherBlockwise": gather_function}
