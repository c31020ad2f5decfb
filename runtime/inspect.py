"""What a converted folder holds: ops, initializer bytes, scheme (read without loading weights)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx

from converter.errors import LowbitError


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
    return {
        "scheme": meta.get("scheme", "?"),
        "target": meta.get("target", "?"),
        "model_type": meta.get("model_type", "?"),
        "ops": dict(ops.most_common()),
        "initializers": len(model.graph.initializer),
        "weight_bytes": weight_bytes,
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
    }
