"""Float16 and float8 weights kept in their stored width on the CPU, at load: `lowbit.cpu.MatMulNarrowFloat`.

ONNX Runtime's CPU provider has no float16 or float8 MatMul on x86, so it folds a float16 weight's Cast
(runtime/float32_compute.py reads each float16 initializer through one) and a float8 weight's DequantizeLinear into
float32 copies at load: a decode step then reads 4 bytes per weight where the folder stores 2 (`q0f16`, a float16
`lm_head`) or 1 (the FP8 codes). `rewrite(model, ...)` replaces, in a graph already computed in float32:

  MatMul(x, Cast(w float16 [K, N]))                       -> MatMulNarrowFloat(x, w)
  MatMul(x, DequantizeLinear(w float8 [K, N], s))         -> MatMulNarrowFloat(x, w, s)   (s: one, or one per column)
  MatMul(DequantizeLinear(QuantizeLinear(x, t, 0), t, 0), ...)  -> MatMulNarrowFloat(x, ..., t, input_type)
                                                             (an FP8 scheme's activations: t a scalar, 0 float8)
  Gemm(x, Cast(w float16 [N, K]), transB=1)               -> MatMulNarrowFloat(x, w)      (a tied lm_head)
  Gather(Cast(w float16), ids)                            -> Cast(Gather(w, ids))         (the same values)
  MatMul / Gemm / Gather of a float32 w whose values are all bfloat16 (a bfloat16 checkpoint in a float32 folder)
                                                          -> the same, reading w's bfloat16 half (the same values)

with the kernel's weights (custom_ops/matmul_narrow_float.py: the same bits in tile order) written to the fast
path's temporary folder. The products are float32 sums of the same float32 products in another order: float
rounding away from ORT's float32 MatMul on the folded weights, equal for every batch and prompt split. A weight
that another node also reads keeps its Cast (ORT folds it as before).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16  # onnx.TensorProto
FLOAT8 = (17, 19)  # FLOAT8E4M3FN, FLOAT8E5M2


@dataclass
class NarrowFloatResult:
    matmuls: list[str] = field(default_factory=list)  # nodes now running on lowbit.cpu.MatMulNarrowFloat
    gathers: list[str] = field(default_factory=list)  # Gathers now reading the float16 / bfloat16 table
    quantized_inputs: list[str] = field(default_factory=list)  # of `matmuls`: activations' float8 Q/DQ inside

    @property
    def changed(self) -> bool:
        return bool(self.matmuls or self.gathers)

    def message(self) -> str | None:
        if not self.matmuls:
            return None
        inputs = f", {len(self.quantized_inputs)} with their inputs' float8 Q/DQ" if self.quantized_inputs else ""
        return (f"{len(self.matmuls)} MatMuls read float16/bfloat16/float8 weights at that width{inputs} "
                "(lowbit.cpu.MatMulNarrowFloat)")


def rewrite(model, reader, writer) -> NarrowFloatResult:
    """Rewrites `model`'s graph in place (see the module docstring). `reader`, `writer`: runtime/fast_paths.py's
    tensor reader over the folder's initializers and graph writer over the temporary folder's data file."""
    from onnx import helper

    from lowbit.custom_ops import matmul_narrow_float as op

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    result = NarrowFloatResult()

    # a weight several nodes read (a tied embedding: the Gather and the lm_head) is checked once, and its bfloat16
    # values kept only until its last reader has been rewritten: memory stays at about one layer
    readers = Counter(name for node in graph.node for name in node.input)
    checked: dict = {}

    def bfloat16_weight(name: str):
        """A float32 2-D initializer's values as bfloat16, where all are; else None."""
        tensor = inits.get(name)
        if tensor is None or tensor.data_type != FLOAT or len(tensor.dims) != 2:
            return None
        values = checked[name] if name in checked else op.exact_bfloat16(reader.read(name))
        readers[name] -= 1
        if readers[name] > 0:
            checked[name] = values
        else:
            checked.pop(name, None)
        return values

    def float16_source(name: str) -> str | None:
        """The float16 initializer a float32 value is a Cast of, or None."""
        node = producers.get(name)
        if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return None
        source = inits.get(node.input[0])
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return source.name if source is not None and source.data_type == FLOAT16 and to == FLOAT else None

    def constant_float32(name: str) -> np.ndarray | None:
        if name in inits and inits[name].data_type == FLOAT:
            return np.asarray(reader.read(name), np.float32)
        source = float16_source(name)
        return None if source is None else np.asarray(reader.read(source), np.float32)

    def float8_weight(name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(w float8 [K, N], scales) of a DequantizeLinear the kernel can take, or None."""
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            return None
        w = inits.get(node.input[0])
        if w is None or w.data_type not in FLOAT8 or len(w.dims) != 2:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("block_size", 0) or attrs.get("axis", 1) not in (1, -1):
            return None
        scales = constant_float32(node.input[1])
        if scales is None or (scales.size != 1 and scales.shape != (w.dims[1],)):
            return None
        if len(node.input) > 2 and node.input[2]:
            zero = inits.get(node.input[2])
            if zero is None or np.any(np.asarray(reader.read(zero.name), np.float32) != 0):
                return None
        return reader.read(w.name), scales

    def activation_quant(name: str) -> tuple[str, str, int] | None:
        """(x, its float32 scale's name, float8 type) where `name` is DequantizeLinear(QuantizeLinear(x, t, z),
        t, z) with one scale t, z a float8 zero and saturation on; None otherwise."""
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.input) < 3:
            return None
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or len(q.input) < 3 \
                or q.input[1:3] != dq.input[1:3]:
            return None
        q_attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
        zero = inits.get(q.input[2])
        if q_attrs.get("saturate", 1) != 1 or q_attrs.get("block_size", 0) or zero is None \
                or zero.data_type not in FLOAT8 or np.any(np.asarray(reader.read(zero.name), np.float32) != 0):
            return None
        scale = constant_float32(q.input[1])
        if scale is None or scale.size != 1 or not float(scale.reshape(-1)[0]) > 0:
            return None
        return q.input[0], q.input[1], zero.data_type

    def kernel(node, x: str, weight) -> None:
        inputs, attrs = [x, writer.array("B", weight.b), writer.array("scales", weight.scales)], {}
        quantized = activation_quant(x)
        if quantized is not None:
            source, scale, input_type = quantized
            inputs = [source, *inputs[1:], writer.array("input_scale", constant_float32(scale).reshape(1))]
            attrs["input_type"] = input_type
            result.quantized_inputs.append(node.name or node.output[0])
        writer.node(op.OP_TYPE, inputs, "narrow_float", domain=op.DOMAIN, output=node.output[0], K=weight.k,
                    N=weight.n, weight_type=weight.weight_type, **attrs)
        result.matmuls.append(node.name or node.output[0])

    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain in ("", "ai.onnx") and node.op_type == "MatMul":
            source = float16_source(node.input[1])
            if source is not None and len(inits[source].dims) == 2:
                kernel(node, node.input[0], op.pack(reader.read(source)))
                continue
            float8 = float8_weight(node.input[1])
            if float8 is not None:
                kernel(node, node.input[0], op.pack(*float8))
                continue
            bfloat16 = bfloat16_weight(node.input[1])
            if bfloat16 is not None:
                kernel(node, node.input[0], op.pack(bfloat16))
                continue
        elif node.domain in ("", "ai.onnx") and node.op_type == "Gemm" and len(node.input) == 2 \
                and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0:
            source = float16_source(node.input[1])
            weight = reader.read(source) if source is not None and len(inits[source].dims) == 2 \
                else bfloat16_weight(node.input[1])
            if weight is not None:
                kernel(node, node.input[0], op.pack(weight, transposed=bool(attrs.get("transB", 0))))
                continue
        elif node.domain in ("", "ai.onnx") and node.op_type == "Gather":
            source = float16_source(node.input[0])
            table = bfloat16_weight(node.input[0]) if source is None else None
            if table is not None:
                source = writer.array("table_bfloat16", table)
            if source is not None:
                rows = writer.node("Gather", [source, node.input[1]], "gather_narrow", **attrs)
                writer.node("Cast", [rows], "to_float32", output=node.output[0], to=FLOAT)
                result.gathers.append(node.name or node.output[0])
                continue
        writer.nodes.append(node)
    return result


BFLOAT16_SOURCES = {"BF16", "torch.bfloat16"}  # lowbit.json source_float_dtypes (safetensors / torch names)


def kernel_applies(metadata: dict | None) -> bool:
    """Cheap check before loading the graph (no onnx import otherwise): a float16 folder, a float32 one converted
    from a bfloat16 checkpoint (lowbit.json `source_float_dtypes`), or one with float8 layers. Each weight is still
    checked itself."""
    metadata = metadata or {}
    if metadata.get("dtype") == "float16":
        return True
    sources = set(metadata.get("source_float_dtypes") or ())
    if metadata.get("dtype") == "float32" and sources and sources <= BFLOAT16_SOURCES:
        return True
    return any(str(layer.get("format", "")).startswith("qdq_fp8")
               for layer in metadata.get("quantization", {}).values())
