"""Layer-by-layer calibration: one decoder layer's subgraph at a time, fed the residual stream the layers before
it produced, so each calibration pass costs one layer, not the whole model.

The decoder names the two values that enter every layer, the residual stream and its normed copy
(`layers.{i}.residual`, `layers.{i}.normed`; after the last layer `final_norm.*`), and lists them in the model's
`lowbit.layer_inputs` metadata. `layer_subgraph` cuts the saved float model between two such boundaries: the
nodes that compute the requested values from the boundary values, the graph inputs (ids, mask, positions,
that layer's empty KV cache) and the weights, which stay in the folder's external data file. `LayerRunner` runs
one such subgraph over every sample in an ONNX Runtime session and hands back the captured MatMul inputs and
the values at the next boundary, which the caller keeps for the next layer (one sample's residual stream per
sample: the memory GPTQ's and AWQ's sequential pipelines hold).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lowbit.converter.calibration.capture import PAST_PREFIX, empty_feeds
from lowbit.errors import LowbitError

LAYER_INPUTS = "lowbit.layer_inputs"  # the decoder's metadata key (converter/decoder.py)


def layer_boundaries(model) -> list[tuple[str, str]]:
    """[(residual, normed)] entering each decoder layer, then the final norm's: from the model's metadata."""
    meta = {p.key: p.value for p in model.metadata_props}
    if LAYER_INPUTS not in meta:
        raise LowbitError("the model names no layer boundaries (lowbit.layer_inputs): convert it with this lowbit")
    return [tuple(pair) for pair in json.loads(meta[LAYER_INPUTS])]


def capture_value(model, node_name: str) -> str:
    """The value a named MatMul/Gemm node reads as its activations (its first input)."""
    for node in model.graph.node:
        if node.name == node_name:
            return node.input[0]
    raise LowbitError(f"no node named '{node_name}' in the calibration model")


def layer_subgraph(model, inputs: list[str], outputs: list[str]):
    """The part of `model` (an onnx ModelProto loaded without external data) that computes `outputs` from the
    values `inputs`, the graph inputs and the initializers; `inputs` become graph inputs of the compute dtype."""
    import onnx
    from onnx import helper

    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    initializers = {t.name for t in graph.initializer}
    graph_inputs = {v.name: v for v in graph.input}
    stop = set(inputs)
    needed_nodes, needed_inputs, seen = set(), [], set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in stop or name in initializers:
            continue
        if name in graph_inputs:
            needed_inputs.append(name)
            continue
        if name not in producers:
            raise LowbitError(f"calibration subgraph: no node produces '{name}'")
        node = producers[name]
        if id(node) not in needed_nodes:
            needed_nodes.add(id(node))
            stack.extend(node.input)
    dtype = next(v.type.tensor_type.elem_type for v in graph.input if v.name.startswith(PAST_PREFIX))
    sub = helper.make_graph(
        [n for n in graph.node if id(n) in needed_nodes],
        "lowbit_layer",
        [helper.make_tensor_value_info(name, dtype, None) for name in inputs]
        + [graph_inputs[name] for name in graph_inputs if name in needed_inputs],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [t for t in graph.initializer if t.name in seen],
    )
    return helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                             functions=list(model.functions))


class LayerRunner:
    """An ORT session over one subgraph of the float model saved at `folder/model.onnx`."""

    def __init__(self, folder: Path, model, inputs: list[str], outputs: list[str], threads: int | None = None):
        import onnxruntime as ort

        self.inputs, self.outputs = list(inputs), list(outputs)
        fetch = [name for name in outputs if name not in self.inputs]  # a capture of a boundary value: the feed
        self.fetch = list(dict.fromkeys(fetch))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        self.session = None
        if self.fetch:
            sub = layer_subgraph(model, self.inputs, self.fetch)
            try:
                self.session = ort.InferenceSession(sub.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                raise LowbitError(f"onnxruntime cannot run a calibration subgraph ({str(e).splitlines()[0]})") \
                    from None

    def run(self, token_ids: np.ndarray, boundary: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        """{output name: value} for one sample: `boundary` holds the values of `inputs` for it."""
        known = dict(zip(self.inputs, boundary))
        if self.session is None:
            return {name: known[name] for name in self.outputs}
        feeds = empty_feeds(self.session, np.asarray(token_ids, np.int64), known)
        values = dict(zip(self.fetch, self.session.run(self.fetch, feeds)))
        return {name: values[name] if name in values else known[name] for name in self.outputs}
