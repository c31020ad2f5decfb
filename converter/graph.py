"""A thin helper over onnx-ir's Tape: scoped node names, constants, lazy weights."""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import onnx_ir as ir

IR_DTYPES = {
    np.dtype(np.float32): ir.DataType.FLOAT,
    np.dtype(np.float16): ir.DataType.FLOAT16,
    np.dtype(np.int64): ir.DataType.INT64,
    np.dtype(np.int32): ir.DataType.INT32,
    np.dtype(np.uint8): ir.DataType.UINT8,
    np.dtype(np.int8): ir.DataType.INT8,
    np.dtype(np.bool_): ir.DataType.BOOL,
}


def ir_dtype(dtype) -> ir.DataType:
    dtype = np.dtype(dtype)
    if dtype in IR_DTYPES:
        return IR_DTYPES[dtype]
    return ir.DataType.from_numpy(dtype)


TRANSPOSED_SOURCE = "lowbit.transposed_source"  # tensor.meta key: loader of the tensor's transpose
HF_MODULES = "lowbit.hf_modules"  # node metadata: the transformers modules a weight node computes, comma-separated


def set_hf_modules(node: ir.Node, modules: list[str]) -> None:
    """Records which transformers modules (`model.layers.0.self_attn.q_proj`, ...) `node` computes: several
    for a fused projection. Saved with the node, so the names stay findable in the written model."""
    node.metadata_props[HF_MODULES] = ",".join(modules)


def hf_modules(node: ir.Node) -> tuple[str, ...]:
    value = node.metadata_props.get(HF_MODULES)
    return tuple(value.split(",")) if value else ()


def lazy_tensor(
    name: str, dtype, shape: tuple[int, ...], load: Callable[[], np.ndarray], transposed_source=None
) -> ir.LazyTensor:
    """A tensor whose bytes are produced by `load()` only when the model is written.

    `transposed_source`, if given, loads the transpose directly (a MatMul weight's checkpoint
    layout), so passes that need [N, K] rows skip a transpose of a transpose.
    """

    def materialize():
        array = np.asarray(load(), dtype=dtype)
        array = np.ascontiguousarray(array) if array.ndim else array  # (a 0-d array would become [1])
        assert array.shape == tuple(shape), (name, array.shape, shape)
        return ir.tensor(array, name=name)

    tensor = ir.LazyTensor(materialize, dtype=ir_dtype(dtype), shape=ir.Shape(shape), name=name)
    if transposed_source is not None:
        tensor.meta[TRANSPOSED_SOURCE] = transposed_source
    return tensor


class GraphBuilder:
    """Appends nodes to one graph; node names follow the current scope (`layers.3/attn/MatMul_0`)."""

    def __init__(self, name: str, opset_imports: dict[str, int]):
        self.graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports=opset_imports, name=name)
        self._tape = ir.tape.Tape(self.graph)
        self._scope: list[str] = []
        self._counts: dict[str, int] = {}
        self._constants: dict[tuple, ir.Value] = {}

    @contextlib.contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _node_name(self, op_type: str, name: str | None) -> str:
        prefix = "/".join(self._scope)
        base = f"{prefix}/{name or op_type}" if prefix else (name or op_type)
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return base if n == 0 and name else f"{base}_{n}"

    def op(self, op_type: str, *inputs, domain: str = "", name: str | None = None, node_name: str | None = None,
           **attributes) -> ir.Value:
        """`name` is scoped and numbered; `node_name` is used as given (module names like `lm_head`)."""
        attributes = {k: v for k, v in attributes.items() if v is not None}
        return self._tape.op(
            op_type, list(inputs), attributes, domain=domain, name=node_name or self._node_name(op_type, name)
        )

    def ops(self, op_type: str, *inputs, num_outputs: int, domain: str = "", name: str | None = None, **attributes):
        attributes = {k: v for k, v in attributes.items() if v is not None}
        return self._tape.op_multi_out(
            op_type,
            list(inputs),
            attributes,
            num_outputs=num_outputs,
            domain=domain,
            name=self._node_name(op_type, name),
        )

    def input(self, name: str, dtype: ir.DataType, shape: list) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.graph.inputs.append(value)
        return value

    def overridable(self, name: str, default: np.ndarray) -> ir.Value:
        """A graph input with a default value (an initializer of the same name): callers may feed it or leave it
        out, and ORT never folds it into a constant."""
        value = self._tape.initializer(ir.tensor(np.asarray(default), name=name), name=name)
        self.graph.inputs.append(value)
        return value

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: list) -> None:
        value.name = name
        value.type = ir.TensorType(dtype)
        value.shape = ir.Shape(shape)
        self.graph.outputs.append(value)

    def initializer(self, tensor: ir.TensorProtocol) -> ir.Value:
        return self._tape.initializer(tensor)

    def const(self, values, dtype) -> ir.Value:
        """A small constant, shared between all nodes that use the same values."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        value = self._constants.get(key)
        if value is None:
            name = f"const_{len(self._constants)}"
            value = self._tape.initializer(ir.tensor(array, name=name), name=name)
            self._constants[key] = value
        return value

    def i64(self, *values) -> ir.Value:
        return self.const(list(values), np.int64)
