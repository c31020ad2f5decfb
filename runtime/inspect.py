"""What a converted folder holds: ops, initializer bytes, scheme (read without loading weights)."""

from __future__ import annotations

import json
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
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if "lowbit.quant" in props and node.name:
            quantized.setdefault(node.name, {"op": f"{node.domain}.{node.op_type}" if node.domain else node.op_type,
                                             "quant": props["lowbit.quant"], "format": props["lowbit.format"]})
    for module, info in meta.get("quantization", {}).items():
        if module in quantized:
            quantized[module].update(bytes=info["bytes"], float_bytes=info["float_bytes"],
                                     max_rel_error=info["max_rel_error"])
            op = quantized[module]["op"]
            if op in OP_COMPUTE:
                quantized[module]["compute"] = OP_COMPUTE[op]
            elif info.get("accuracy_level") is not None and "Gather" not in op:
                quantized[module]["compute"] = COMPUTE[info["accuracy_level"]]
    return {
        "scheme": meta.get("scheme", "?"),
        "float_weight_bytes": meta.get("float_weight_bytes"),
        "quantized": quantized,
        "target": meta.get("target", "?"),
        "model_type": meta.get("model_type", "?"),
        "ops": dict(ops.most_common()),
        "initializers": len(model.graph.initializer),
        "weight_bytes": weight_bytes,
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
    }
