"""Activation capture through ONNX Runtime: the inputs of chosen MatMul/Gemm nodes of a saved model.

The graph is read without its weights (`onnx.load(..., load_external_data=False)`), the input value of each
chosen node (nodes carry module names: `layers.0.attn.qkv_proj`, `lm_head`) becomes an extra graph output
(once per value: sites that share an input share the output), and ORT loads the edited graph from bytes with
`session.model_external_initializers_file_folder_path` pointing at the model's own folder, so the weights file
is neither copied nor rewritten. Each run feeds one sample (batch 1, an empty KV cache) and fetches only the
captured values, each reshaped to rows [tokens, features] in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.session import PROVIDERS

# ops whose first input is the activation rows [..., K] (the rest are weights)
CAPTURABLE_OPS = {"MatMul", "Gemm", "MatMulNBits", "MatMulBlockwise", "FusedMatMul"}
PAST_PREFIX = "past_key_values."
ORT_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class CaptureSite:
    """A chosen node and the graph value (its first input) captured for it."""

    node: str
    value: str


def _load_graph(model_onnx: Path):
    import onnx
    import onnx_ir as ir

    if not model_onnx.is_file():
        raise LowbitError(f"{model_onnx}: no such ONNX model")
    try:
        return ir.serde.deserialize_model(onnx.load(model_onnx, load_external_data=False))
    except Exception as e:  # noqa: BLE001 - onnx raises protobuf's and its own exception types
        raise LowbitError(f"{model_onnx}: cannot read it as ONNX ({str(e).splitlines()[0] if str(e) else e})") from None


def add_capture_outputs(model, sites: list[str], model_onnx: Path) -> list[CaptureSite]:
    """Make the first input of each named node a graph output (once per value); the sites in order."""
    nodes = {node.name: node for node in model.graph.all_nodes()}
    model.graph.outputs.clear()  # logits and KV are never read: without them ORT drops the nodes after the last site
    outputs: set[str] = set()
    captured = []
    for site in sites:
        node = nodes.get(site)
        if node is None:
            raise LowbitError(f"{model_onnx}: no node named '{site}' (nodes are named by module, e.g. 'lm_head')")
        if node.op_type not in CAPTURABLE_OPS:
            raise LowbitError(f"{model_onnx}: node '{site}' is a {node.op_type}, not one of "
                              f"{', '.join(sorted(CAPTURABLE_OPS))}")
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            raise LowbitError(f"{model_onnx}: node '{site}' is a Gemm with transA=1 (rows are not its first axis)")
        if node.graph is not model.graph:
            raise LowbitError(f"{model_onnx}: node '{site}' lies inside a subgraph")
        value = node.inputs[0]
        if value.name not in outputs:
            model.graph.outputs.append(value)
            outputs.add(value.name)
        captured.append(CaptureSite(site, value.name))
    return captured


def empty_feeds(session, token_ids: np.ndarray, values: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inputs for one prefill of `token_ids` (batch 1) over an empty KV cache; `values` feed other inputs by name
    (a layer subgraph's residual stream)."""
    seq = token_ids.shape[0]
    known = {
        "input_ids": token_ids[None, :],
        "attention_mask": np.ones((1, seq), np.int64),
        "position_ids": np.arange(seq, dtype=np.int64)[None, :],
        **(values or {}),
    }
    feeds = {}
    for graph_input in session.get_inputs():
        if graph_input.name in known:
            feeds[graph_input.name] = known[graph_input.name]
            continue
        if not graph_input.name.startswith(PAST_PREFIX) or graph_input.type not in ORT_INPUT_DTYPES:
            raise LowbitError(f"model input '{graph_input.name}' ({graph_input.type}) is not one calibration can feed")
        # [batch, kv_heads, past_sequence_length, head_dim]: batch 1, every other named dimension 0
        shape = [1] + [d if isinstance(d, int) else 0 for d in graph_input.shape[1:]]
        feeds[graph_input.name] = np.zeros(shape, ORT_INPUT_DTYPES[graph_input.type])
    return feeds


def folder_session_config(folder: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ORT session entries the converter recorded for a folder (lowbit.json's `ort_session_config`, e.g. the
    DQ+MatMul fusion's accuracy level), then `extra`."""
    metadata = Path(folder) / "lowbit.json"
    config = json.loads(metadata.read_text()).get("ort_session_config", {}) if metadata.is_file() else {}
    return {**config, **(extra or {})}


class ActivationCapture:
    """An ORT session over a saved model that also returns the input rows of chosen MatMul/Gemm nodes.
    `edit(model)`, if given, changes the graph (an onnx_ir Model, weights not loaded) before the outputs are added,
    e.g. to bypass activation quantization (lowbit.converter.calibrate_folder). `session_config`: ORT session
    entries applied after the folder's own (lowbit.json's `ort_session_config`)."""

    def __init__(self, model_onnx: str | Path, sites: list[str], provider: str = "cpu", threads: int | None = None,
                 edit: Callable[[object], None] | None = None, session_config: dict[str, str] | None = None):
        import onnx_ir as ir
        import onnxruntime as ort

        model_onnx = Path(model_onnx)
        if isinstance(sites, str) or not sites:
            raise LowbitError("give at least one site (a list of node names such as 'layers.0.mlp.down_proj')")
        if len(set(sites)) != len(sites):
            raise LowbitError(f"sites listed twice: {', '.join(sorted({s for s in sites if sites.count(s) > 1}))}")
        if provider not in PROVIDERS:
            raise LowbitError(f"unknown provider '{provider}' (known: {', '.join(PROVIDERS)})")
        model = _load_graph(model_onnx)
        if edit is not None:
            edit(model)
        self.sites = add_capture_outputs(model, list(sites), model_onnx)
        self.output_names = list(dict.fromkeys(site.value for site in self.sites))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # measured: 50 MB less peak RSS on SmolLM2-135M, same speed
        if threads:
            options.intra_op_num_threads = threads
        folder = model_onnx.resolve().parent
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        for key, value in folder_session_config(folder, session_config).items():
            options.add_session_config_entry(key, value)
        ep = PROVIDERS[provider]
        providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                                providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise LowbitError(f"{model_onnx}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None

    def run(self, token_ids: np.ndarray) -> dict[str, np.ndarray]:
        """{site: rows [tokens, features] float32} for one sample (1-D token ids); sites sharing a value share
        the array."""
        token_ids = np.asarray(token_ids)
        if token_ids.ndim != 1 or token_ids.size == 0 or not np.issubdtype(token_ids.dtype, np.integer):
            raise LowbitError(f"a calibration sample must be a non-empty 1-D array of token ids, got "
                              f"{token_ids.dtype} {token_ids.shape}")
        feeds = empty_feeds(self.session, token_ids.astype(np.int64))
        try:
            values = self.session.run(self.output_names, feeds)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise LowbitError(f"onnxruntime failed on a calibration sample ({str(e).splitlines()[0]})") from None
        rows = {name: v.reshape(-1, v.shape[-1]).astype(np.float32, copy=False)
                for name, v in zip(self.output_names, values)}
        return {site.node: rows[site.value] for site in self.sites}
