"""Layer-by-layer calibration: one decoder layer's subgraph at a time, fed the residual stream the layers before
it produced, so each calibration pass costs one layer, not the whole model.

The decoder names the two values that enter every layer, the residual stream and its normed copy
(`layers.{i}.residual`, `layers.{i}.normed`; after the last layer `final_norm.*`), and lists them in the model's
`lowbit.layer_inputs` metadata. `layer_subgraph` cuts the saved float model between two such boundaries: the
nodes that compute the requested values from the boundary values, the graph inputs (ids, mask, positions,
that layer's empty KV cache) and the weights, which stay in the folder's external data file. `LayerRunner` runs
one such subgraph over every sample in an ONNX Runtime session and hands back the captured MatMul inputs and
the values at the next boundary. `walk_layers` drives it over the whole decoder: each sample's boundary values
wait in a `BoundaryCache` on disk, so memory holds one layer's weights and one sample's activations whatever the
depth of the model and the number of samples.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lowbit.converter.calibration.capture import PAST_PREFIX, empty_feeds
from lowbit.converter.calibration.observers import Observer
from lowbit.errors import LowbitError

LAYER_INPUTS = "lowbit.layer_inputs"  # the decoder's metadata key (converter/decoder.py)
AFTER_LAYERS = 1 << 30  # layer key of modules after the decoder layers (an untied lm_head)


def layer_of(module: str) -> int:
    """Decoder layer index of a module name (`layers.3.mlp.down_proj` -> 3); AFTER_LAYERS for lm_head and others."""
    parts = module.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else AFTER_LAYERS


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

    def __init__(self, folder: Path, model, inputs: list[str], outputs: list[str], threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        self.inputs, self.outputs = list(inputs), list(outputs)
        fetch = [name for name in outputs if name not in self.inputs]  # a capture of a boundary value: the feed
        self.fetch = list(dict.fromkeys(fetch))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # one layer: ORT's arena would keep its largest activations
        # the observers' BLAS runs between two samples: ORT's pool threads must not spin on through it
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
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
        try:
            values = dict(zip(self.fetch, self.session.run(self.fetch, feeds)))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise LowbitError(f"onnxruntime failed on a calibration sample ({str(e).splitlines()[0]})") from None
        return {name: values[name] if name in values else known[name] for name in self.outputs}


class BoundaryCache:
    """Each sample's values at the current layer boundary, in a temporary folder: `get(i)` reads sample i's,
    `put(i, values)` stores its values at the next boundary, `advance()` makes those current. Memory holds one
    sample's values (the files live in the page cache or on disk, not in the process)."""

    def __init__(self, count: int):
        self._folder = tempfile.TemporaryDirectory(prefix="lowbit-boundaries-")
        self.count, self.generation = count, 0

    def _path(self, generation: int, index: int) -> Path:
        return Path(self._folder.name) / f"{generation}-{index}.npz"

    def get(self, index: int) -> tuple[np.ndarray, ...]:
        if self.generation == 0:
            return ()
        with np.load(self._path(self.generation, index)) as f:
            return tuple(f[f"arr_{k}"] for k in range(len(f.files)))

    def put(self, index: int, values: tuple[np.ndarray, ...]) -> None:
        np.savez(self._path(self.generation + 1, index), *values)

    def advance(self) -> None:
        for index in range(self.count):
            self._path(self.generation, index).unlink(missing_ok=True)
        self.generation += 1

    def close(self) -> None:
        self._folder.cleanup()


LayerStatistics = dict[str, dict[str, Observer]]  # site -> observer name -> observer, after every sample


def walk_layers(folder: Path, model, sites: dict[int, list[str]], samples: Sequence[np.ndarray],
                make_observers: Callable[[str], dict[str, Observer]],
                finish_layer: Callable[[int, LayerStatistics], bool] | None = None,
                progress: Callable[[int], Callable[[int, int], None] | None] | None = None,
                threads: int | None = None, session_config: dict[str, str] | None = None,
                reruns: bool = False) -> None:
    """Walks the decoder of `folder/model.onnx` (`model`: its ModelProto without external data) one layer at a
    time. `sites`: layer index (AFTER_LAYERS for an untied lm_head) -> names of the MatMul nodes whose inputs are
    observed there. For each layer holding sites, the layer's subgraph runs over every sample, fed that sample's
    values at the layer's boundary, and each site's input rows go to its observers (`make_observers(site)`,
    sites without any are not captured); then `finish_layer(index, statistics)` runs. When it returns True it has
    changed the layer's weights in the folder, and the layer runs again so that the next one is fed its new
    outputs. Stops after the last layer that holds a site. `progress(layer)` gives a per-sample callback.
    `reruns`: finish_layer is expected to change every layer (a sequential algorithm), so the first pass computes
    only the captured inputs (not the rest of the layer, which the second pass computes anyway), and a layer that
    holds sites runs again whether it changed or not."""
    boundaries = layer_boundaries(model)
    last_key = max(sites) if sites else -1
    cache = BoundaryCache(len(samples))
    try:
        for index in range(len(boundaries)):
            last = index == len(boundaries) - 1
            if index > last_key:
                break
            names = sites.get(AFTER_LAYERS if last else index, [])
            if last and not names:
                break
            state = {site: make_observers(site) for site in names}
            captures = {site: capture_value(model, site) for site in names if state[site]}
            inputs = list(boundaries[index]) if index else []
            following = [] if last else list(boundaries[index + 1])
            capture_only = reruns and bool(captures) and not last  # the second pass gives the next layer's inputs
            first = list(captures.values()) if capture_only else following + list(captures.values())
            runner = LayerRunner(folder, model, inputs, first, threads, session_config)
            report = progress(index) if progress is not None and names else None
            for i, sample in enumerate(samples):
                values = runner.run(sample, cache.get(i))
                for site, value in captures.items():
                    rows = values[value].reshape(-1, values[value].shape[-1]).astype(np.float32, copy=False)
                    for observer in state[site].values():
                        observer.update(rows)
                if not capture_only:
                    cache.put(i, tuple(values[name] for name in following))
                del values
                if report:
                    report(i + 1, len(samples))
            del runner
            changed = bool(names) and finish_layer is not None and finish_layer(index, state)
            if (changed or capture_only) and not last:
                runner = LayerRunner(folder, model, inputs, following, threads, session_config)
                for i, sample in enumerate(samples):  # the next layer sees this layer's new outputs
                    values = runner.run(sample, cache.get(i))
                    cache.put(i, tuple(values[name] for name in following))
                del runner
            cache.advance()
    finally:
        cache.close()
