"""The weight-only quantization pass: float graph + plan -> graph with quantized nodes.

Weights stay lazy: each emitted initializer is an `ir.LazyTensor` that quantizes its source
weight when the model is written (once per weight, shared by its parts, then released), so
peak memory follows the largest layer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError
from lowbit.converter.graph import TRANSPOSED_SOURCE, hf_modules, lazy_tensor, set_hf_modules
from lowbit.affine import FLOAT4_RULES, QuantizedWeight, group_size_for, quantize, relative_error
from lowbit.converter.quant.formats import FORMATS, PREFERENCE, Site, StorageFormat
from lowbit.converter.quant.ignore import WeightModule, ignored_modules
from lowbit.converter.quant.plan import ActivationQuant, LayerQuant, QuantPlan
from lowbit.custom_ops import blockwise, nvfp4


@dataclass
class LayerReport:
    module: str
    quant: str
    format: str
    n: int
    k: int
    float_bytes: int
    quant_bytes: int
    accuracy_level: int = 0
    max_rel_error: float | None = None  # filled in when the weight is quantized (at write time)
    shares: str | None = None  # module whose quantized tensors this one reuses (tied embeddings)

    @property
    def activation(self) -> ActivationQuant | None:
        """What the layer's nodes do to its activations: the format's setting, which is the plan's (choose_format)."""
        return FORMATS[self.format].activation


@dataclass
class QuantReport:
    layers: list[LayerReport] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # modules --ignore kept in float

    def resolve_shared(self) -> None:
        """After writing: layers that reuse another's tensors take over its error."""
        by_module = {r.module: r for r in self.layers}
        for r in self.layers:
            if r.shares:
                r.max_rel_error = by_module[r.shares].max_rel_error

    def qdq_accuracy_level(self) -> int | None:
        """Accuracy level for ORT's DequantizeLinear+MatMul -> MatMulNBits fusion (most accurate asked for)."""
        levels = [r.accuracy_level for r in self.layers if r.format == "dq"]
        return min(levels) if levels else None

    def session_config(self) -> dict[str, str]:
        """ORT session entries the layers' formats ask for (target ort)."""
        return {k: v for r in self.layers for k, v in FORMATS[r.format].session_config}

    def as_dict(self) -> dict:
        return {
            r.module: {"quant": r.quant, "format": r.format, "shape": [r.n, r.k], "bytes": r.quant_bytes,
                       "float_bytes": r.float_bytes, "max_rel_error": r.max_rel_error, "shares": r.shares,
                       "accuracy_level": r.accuracy_level,
                       "activation": r.activation.as_dict() if r.activation else None}
            for r in self.layers
        }


class _QuantizeOnce:
    """Quantizes one weight on first use and hands the packed result to each of its parts."""

    def __init__(self, load_nk, layer: LayerQuant, scale_dtype, pack, parts: int, report: LayerReport,
                 quantized: Callable[[], QuantizedWeight] | None = None):
        self._load, self._layer, self._dtype, self._pack = load_nk, layer, scale_dtype, pack
        self._left, self._report, self._quantized = parts, report, quantized
        self._packed = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._packed is None:
                weight = self._load()
                qw = self._quantized() if self._quantized else quantize(weight, self._layer.weight, self._dtype)
                self._report.max_rel_error = relative_error(weight, qw)
                self._packed = self._pack(qw)
            packed = self._packed
            self._left -= 1
            if self._left == 0:
                self._packed = None
            return packed


def _site(node: ir.Node) -> Site | None:
    """The weight-consuming site a node is, if its weight is a 2-D initializer."""
    if node.domain not in ("", "ai.onnx") or not node.name:
        return None
    if node.op_type == "MatMul":
        kind, weight = "matmul", node.inputs[1]
    elif node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1 and len(node.inputs) == 2:
        kind, weight = "gemm_t", node.inputs[1]
    elif node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0:
        kind, weight = "gather", node.inputs[0]
    else:
        return None
    if weight is None or weight.const_value is None or len(weight.shape) != 2:
        return None
    rows, cols = weight.shape
    if kind == "matmul":
        return Site(kind, node.name, node, node.inputs[0], weight, n=cols, k=rows)
    x = node.inputs[1] if kind == "gather" else node.inputs[0]
    return Site(kind, node.name, node, x, weight, n=rows, k=cols)


def choose_format(layer: LayerQuant, site: Site, target: str) -> StorageFormat:
    names = [layer.format] if layer.format else list(PREFERENCE)
    reasons = []
    for name in names:
        fmt = FORMATS.get(name)
        if fmt is None:
            raise LowbitError(f"{site.module}: unknown storage format '{name}' (known: {', '.join(FORMATS)})")
        if site.kind not in fmt.kinds:
            reasons.append(f"{name}: not for {site.kind}")
            continue
        if target not in fmt.targets:
            reasons.append(f"{name}: not for target {target}")
            continue
        if fmt.activation != layer.activation:
            reasons.append(f"{name}: {_activations(fmt.activation)} activations, not {_activations(layer.activation)}")
            continue
        why = fmt.unsupported(layer.weight, site)
        if why is None:
            return fmt
        reasons.append(f"{name}: {why}")
    what = layer.weight.describe() + (f" with {_activations(layer.activation)} activations" if layer.activation else "")
    raise LowbitError(f"{site.module}: cannot store {what} for target {target} ({'; '.join(reasons)})")


def _activations(activation: ActivationQuant | None) -> str:
    return activation.describe() if activation else "float"


def weight_loader(site: Site):
    """Loads the site's float weight as [N, K] float32 (in the graph's dtype first, as stored)."""
    tensor = site.weight.const_value
    if site.kind != "matmul":
        return lambda: np.asarray(tensor.numpy(), dtype=np.float32)
    source = tensor.meta.get(TRANSPOSED_SOURCE)
    if source is not None:  # the checkpoint's [N, K] rows: no transpose of a transpose
        return lambda: np.asarray(source(), dtype=np.float32)
    return lambda: np.asarray(tensor.numpy(), dtype=np.float32).T


def weight_sites(model: ir.Model) -> list[Site]:
    """Every weight-consuming site of the graph (MatMul, Gemm with transB, Gather of a 2-D initializer), in order."""
    return [site for site in map(_site, list(model.graph)) if site is not None]


def planned_sites(model: ir.Model, plan: QuantPlan, ignore: tuple[str, ...] = ()):
    """([(site, its LayerQuant)] the plan quantizes, in graph order; [modules --ignore keeps float]).
    A group larger than the site's K means one group per row (per channel)."""
    sites = weight_sites(model)
    ignored = ignored_modules([WeightModule(s.module, hf_modules(s.node)) for s in sites], ignore)
    planned = []
    for site in sites:
        layer = None if site.module in ignored else plan.lookup(site.module)
        if layer is None:
            continue
        if layer.weight.group_size is not None and layer.weight.group_size > site.k \
                and layer.weight.rule not in FLOAT4_RULES:  # NVFP4's blocks are 16 (a shorter K is padded)
            layer = replace(layer, weight=replace(layer.weight, group_size=None))
        g = group_size_for(layer.weight, site.k)
        if site.k % g and not plan.pad:
            raise LowbitError(
                f"{site.module}: K={site.k} is not a multiple of the group size {g} and padding is disabled"
            )
        planned.append((site, layer))
    return planned, sorted(ignored)


def quantize_model(model: ir.Model, plan: QuantPlan, target: str, dtype, ignore: tuple[str, ...] = (),
                   quantized: dict[str, Callable[[], QuantizedWeight]] | None = None,
                   float_weights: dict[str, Callable[[], np.ndarray]] | None = None) -> QuantReport:
    """Rewrites `model` in place; returns the per-layer report (errors filled in at write time).
    `ignore`: --ignore patterns (`ignore.py`); the modules they match stay float. `quantized`: loaders of
    weights an algorithm already quantized (GPTQ, AWQ), by module; the others are rounded to nearest.
    `float_weights`: the float weight an algorithm quantized where it is not the checkpoint's (AWQ's scaled
    W·diag(s)), for the error report."""
    graph = model.graph
    report = QuantReport()
    used_functions: set[str] = set()
    emitted: dict[tuple, tuple] = {}  # (source weight, settings, format) -> (node, values, report)
    sites, report.ignored = planned_sites(model, plan, ignore)
    quantized = quantized or {}
    for site, layer in sites:
        fmt = choose_format(layer, site, target)
        emission = fmt.emission(layer.weight, site, np.dtype(dtype), layer.accuracy_level)
        load = (float_weights or {}).get(site.module) or weight_loader(site)
        layer_report = LayerReport(
            site.module, layer.weight.describe(), fmt.name, site.n, site.k, site.weight.const_value.nbytes,
            sum(_part_bytes(p) for p in emission.parts), layer.accuracy_level,
        )
        once = _QuantizeOnce(load, layer, np.dtype(dtype), emission.pack, len(emission.parts), layer_report,
                             quantized.get(site.module))
        values = []
        for part in emission.parts:
            name = f"{site.module}.{part.suffix}"
            tensor = lazy_tensor(name, part.dtype, part.shape, lambda part=part, once=once: part.get(once.get()))
            value = ir.Value(name=name, shape=ir.Shape(part.shape), type=ir.TensorType(tensor.dtype),
                             const_value=tensor)
            graph.register_initializer(value)
            values.append(value)
        tape = ir.tape.Tape()
        output = emission.build(tape, site, values)
        for new_node in tape.nodes:
            new_node.metadata_props["lowbit.quant"] = layer.weight.describe()
            new_node.metadata_props["lowbit.format"] = fmt.name
        if hf_modules(site.node):
            set_hf_modules(tape.nodes[-1], list(hf_modules(site.node)))
        ir.convenience.replace_nodes_and_values(
            graph, site.node, [site.node], list(tape.nodes), [site.node.outputs[0]], [output]
        )
        used_functions.update(emission.functions)
        report.layers.append(layer_report)
        emitted[(id(site.weight), layer, fmt.name, site.kind)] = (tape.nodes[-1], values, layer_report)
    _share_tied_embedding(emitted)
    _drop_unused_initializers(graph)
    opset = max((FORMATS[r.format].opset for r in report.layers), default=0)
    if opset > model.opset_imports.get("", 0):  # e.g. FLOAT4E2M1 DequantizeLinear (opset 23)
        model.opset_imports[""] = opset
    for name in sorted(used_functions):
        function = {**blockwise.FUNCTIONS, **nvfp4.FUNCTIONS}[name]()
        model.functions[function.identifier()] = function
        model.opset_imports[blockwise.DOMAIN] = blockwise.VERSION
    if any(n.domain == "com.microsoft" for n in graph):
        model.opset_imports.setdefault("com.microsoft", 1)
    if any(n.domain == nvfp4.TRT_DOMAIN for n in graph):  # TensorRT's TRT_FP4DynamicQuantize (NVFP4 activations)
        model.opset_imports.setdefault(nvfp4.TRT_DOMAIN, 1)
    return report


def _share_tied_embedding(emitted: dict) -> None:
    """A tied table quantized the same way for the embedding and lm_head is stored once: the gather reads
    the lm_head's tensors, as they are or through a Reshape that holds the same bytes (`SHARED_LAYOUTS`)."""
    for (source, layer, fmt, kind), (gather, _, gather_report) in emitted.items():
        if kind != "gather":
            continue
        for matmul_fmt, share in SHARED_LAYOUTS.get(fmt, {}).items():
            match = emitted.get((source, layer, matmul_fmt, "gemm_t"))  # a tied table feeds Gemm(transB=1)
            if match is None:
                continue
            _, matmul_values, matmul_report = match
            for slot, value in share(gather, gather_report, matmul_values).items():
                gather.replace_input_with(slot, value)
            gather_report.quant_bytes = 0
            gather_report.shares = matmul_report.module
            break


def _gbq_from_matmulnbits(gather: ir.Node, report: LayerReport, values: list[ir.Value]) -> dict[int, ir.Value]:
    """GatherBlockQuantized inputs from MatMulNBits' tensors: [N, blocks, blob] -> [N, K * bits / 8] and
    scales (zero points) [N * blocks] -> [N, blocks]."""
    rows = ir.Value(name=f"{gather.name}.shared_rows", const_value=ir.tensor(np.array([report.n, -1])))
    graph = gather.graph
    graph.register_initializer(rows)
    slots = {0: values[0], 2: values[1]}
    if len(values) > 2:  # asymmetric: packed zero points share the same layout too
        slots[3] = values[2]
    inputs = {}
    for slot, source_value in slots.items():
        reshape = ir.node("Reshape", [source_value, rows], name=f"{gather.name}.shared_{slot}")
        graph.insert_before(gather, reshape)
        inputs[slot] = reshape.outputs[0]
    return inputs


def _blockwise_from_blockwise(gather: ir.Node, report: LayerReport, values: list[ir.Value]) -> dict[int, ir.Value]:
    """GatherBlockwise(words, indices, scales, zero_points) reads MatMulBlockwise's [N, ...] tensors as they are."""
    words, scales, zero_points = values
    return {0: words, 2: scales, 3: zero_points}


# embedding format -> {lm_head format: how the gather reads the lm_head's tensors}
SHARED_LAYOUTS = {
    "gather_block_quantized": {"matmulnbits": _gbq_from_matmulnbits},
    "blockwise": {"blockwise": _blockwise_from_blockwise},
}


def _part_bytes(part) -> int:
    count = int(np.prod(part.shape))
    return -(-count // 2) if part.dtype.name in ("int4", "uint4", "float4_e2m1fn") else count * part.dtype.itemsize


def _drop_unused_initializers(graph: ir.Graph) -> None:
    outputs = set(id(v) for v in graph.outputs)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and id(value) not in outputs:
            graph.initializers.pop(name)
