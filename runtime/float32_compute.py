"""Float16 graphs computed in float32 on the CPU, at load.

ONNX Runtime's CPU provider has float16 kernels for few ops on x86 (MatMul and Gemm have none): for the others its
graph transformer inserts a Cast to float32 before and a Cast back to float16 after every such node, and folds the
Casts of float16 weights into float32 copies at load. A float16 folder (`q0f16`, MLC's `q4f16_1` and `q3f16_1`,
the FP8 codes) thus runs in float32 anyway, plus a pair of Casts around most nodes and float16 rounding between
them (docs/targets.md, "Float16 graphs on the CPU").

`to_float32(model)` rewrites the graph itself instead: every float16 graph input and output, value and constant
becomes float32, and each float16 initializer is read through one Cast to float32 that ORT folds at load (the
file's float16 tensors are what ORT reads; its memory holds the float32 copies it held before). The runtime applies
it to folders whose lowbit.json says `"dtype": "float16"`, on the CPU provider only; the session's inputs then take
a float32 KV cache and its logits are float32 (runtime/session.py reads both from the session). The results are
float32 computation of the same weights: closer to the float model than float16 computation, not bit for bit the
float16 graph's. `LOWBIT_CPU_FLOAT32=0` keeps the float16 graph. The folder on disk is not changed.
"""

from __future__ import annotations

import os

ENV_SWITCH = "LOWBIT_CPU_FLOAT32"
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
SOURCE_SUFFIX = "::float16"  # a float16 initializer's new name; the Cast that reads it outputs the old one
_TYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                    "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def applies(metadata: dict | None, provider: str) -> bool:
    """Whether a session of `provider` (an ORT provider name) over a folder with this lowbit.json gets the rewrite."""
    return enabled() and provider == "CPUExecutionProvider" and (metadata or {}).get("dtype") == "float16"


def to_float32(model) -> bool:
    """Rewrites `model` (an onnx.ModelProto, loaded with or without its external data) in place so that it computes
    in float32 where it computed in float16; False (and no change) where the graph has no float16 value, or where
    a float16 initializer is also a graph input."""
    from onnx import helper

    graph = model.graph
    initializers = [t for t in graph.initializer  # those named SOURCE_SUFFIX already go through a Cast
                    if t.data_type == FLOAT16 and not t.name.endswith(SOURCE_SUFFIX)]
    inputs = {i.name for i in graph.input}
    if any(t.name in inputs for t in initializers):
        return False  # an overridable float16 initializer: a caller may feed float16 there
    changed = _retype_values(list(graph.input) + list(graph.output) + list(graph.value_info))
    changed = _retype_nodes(graph.node) or changed
    for function in model.functions:
        changed = _retype_nodes(function.node) or changed
    casts = []
    for tensor in initializers:
        name = tensor.name
        tensor.name = name + SOURCE_SUFFIX
        casts.append(helper.make_node("Cast", [tensor.name], [name], name=f"lowbit_float32/{name}", to=FLOAT))
    if casts:
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return changed or bool(casts)


def _retype_values(values) -> bool:
    changed = False
    for value in values:
        tensor_type = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor_type.elem_type == FLOAT16:
            tensor_type.elem_type = FLOAT
            changed = True
    return changed


def _retype_nodes(nodes) -> bool:
    """Cast targets and type attributes of float16 become float32; float16 tensor attributes (Constant,
    ConstantOfShape) become float32 tensors of the same values."""
    changed = False
    for node in nodes:
        for attribute in node.attribute:
            if attribute.name == _TYPE_ATTRIBUTES.get(node.op_type) and attribute.i == FLOAT16:
                attribute.i = FLOAT
                changed = True
            elif attribute.HasField("t") and attribute.t.data_type == FLOAT16:
                attribute.t.CopyFrom(_float32_tensor(attribute.t))
                changed = True
            for graph in list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else []):
                changed = _retype_values(list(graph.input) + list(graph.output) + list(graph.value_info)) or changed
                changed = _retype_nodes(graph.node) or changed
                for tensor in graph.initializer:  # a subgraph's own constants: small, stored inline
                    if tensor.data_type == FLOAT16:
                        tensor.CopyFrom(_float32_tensor(tensor))
                        changed = True
    return changed


def _float32_tensor(tensor):
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
