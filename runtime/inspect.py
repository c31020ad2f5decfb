"""What a converted folder holds: ops, initializer bytes, scheme (read without loading weights)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import onnx

from lowbit.errors import LowbitError


# MatMulNBits accuracy_level -> what the CPU kernel computes with
COMPUTE = {0: "float", 1: "float32", 2: "float16", 3: "bfloat16", 4: "int8"}
# ops whose compute is fixed by the op itself, not by an accuracy level
OP_COMPUTE = {"com.microsoft.DynamicQuantizeMatMul": "int8"}


def inspect_model(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    path = model_dir / "model.onnx"
    if not path.is_file():
        raise LowbitError(f"{model_dir}: no model.onnx (is this a `lowbit convert` output folder?)")
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node)
    weight_bytes = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        weight_bytes += int(ext["length"]) if "length" in ext else len(init.raw_data)
    meta = {}
    if (model_dir / "lowbit.json").is_file():
        meta = json.loads((model_dir / "lowbit.json").read_text())
    quantized = {}
    modules = meta.get("quantization") or {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if modules and node.name not in modules:
            continue  # a helper node of a quantized layer (activation Q/DQ, weight DQ): listed under its layer
        if "lowbit.quant" in props and node.name:
            quantized.setdefault(node.name, {"op": f"{node.domain}.{node.op_type}" if node.domain else node.op_type,
                                             "quant": props["lowbit.quant"], "format": props["lowbit.format"]})
            if "lowbit.import" in props:  # a pre-quantized checkpoint's module: its source format
                quantized[node.name]["import"] = props["lowbit.import"]
            if "lowbit.recipe" in props:  # a recipe's module: the modifier and config group that produced it
                quantized[node.name]["recipe"] = props["lowbit.recipe"]
    for module, info in meta.get("quantization", {}).items():
        if module in quantized:
            quantized[module].update(bytes=info["bytes"], float_bytes=info["float_bytes"],
                                     max_rel_error=info["max_rel_error"])
            op = quantized[module]["op"]
            activation = info.get("activation")
            if activation:
                quantized[module]["activation"] = _describe_activation(activation, module, meta)
            if activation and activation.get("type") == "float":  # float8 Q/DQ: dequantized, then the model dtype
                quantized[module]["compute"] = meta.get("dtype", "float")
            elif op in OP_COMPUTE:
                quantized[module]["compute"] = OP_COMPUTE[op]
            elif activation and activation.get("type") == "int":  # static int Q/DQ: ORT's MatMulIntegerToFloat
                quantized[module]["compute"] = "int8"
            elif info.get("accuracy_level") is not None and "Gather" not in op:
                quantized[module]["compute"] = COMPUTE[info["accuracy_level"]]
    return {
        "scheme": meta.get("scheme", "?"),
        "import": meta.get("import"),
        "float_weight_bytes": meta.get("float_weight_bytes"),
        "quantized": quantized,
        "target": meta.get("target", "?"),
        "model_type": meta.get("model_type", "?"),
        "ops": dict(ops.most_common()),
        "nodes": len(model.graph.node),
        "nodes_per_layer": nodes_per_layer(model.graph),
        "initializers": len(model.graph.initializer),
        "weight_bytes": weight_bytes,
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
    }


LAYER_NAME = re.compile(r"^layers\.(\d+)[./]")  # node names as converter/graph.py scopes them


def nodes_per_layer(graph) -> dict[str, int]:
    """How many nodes each decoder layer has in the graph as written (ORT's optimizer fuses some more), by the
    layer prefix of their names; `other`: embedding, masks, final norm, lm_head."""
    counts = Counter()
    for node in graph.node:
        match = LAYER_NAME.match(node.name)
        counts[f"layers.{match.group(1)}" if match else "other"] += 1
    return dict(sorted(counts.items(), key=lambda item: (item[0] == "other", len(item[0]), item[0])))


def _describe_activation(activation: dict, module: str, meta: dict) -> str:
    """`int8 dynamic per-tensor`, `fp8 e4m3 static per-tensor scale 0.0121` (or `placeholder scale 1`)."""
    unsigned = activation.get("type") == "int" and not activation["dynamic"] and not activation["symmetric"]
    kind = (f"fp8 {activation['element']}" if activation.get("type") == "float"
            else f"{'u' if unsigned else ''}int{activation['bits']}")
    text = f"{kind} {'dynamic' if activation['dynamic'] else 'static'} per-{activation['strategy']}"
    calibration = meta.get("activation_calibration") or {}
    if activation["dynamic"]:
        return text
    if calibration.get("status") == "placeholder":
        return f"{text} placeholder scale {calibration.get('placeholder_scale', '?')} (run lowbit calibrate)"
    scale = calibration.get("scales", {}).get(module)
    zero = calibration.get("zero_points", {}).get(module)
    text = f"{text} scale {scale:.4g}" if scale is not None else text
    return f"{text} zero point {zero}" if zero is not None else text
