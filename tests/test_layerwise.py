"""Layer-by-layer subgraphs: chaining every layer's subgraph gives the full model's values, for every architecture."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lowbit
from lowbit.converter.calibration.layerwise import LayerRunner, capture_value, layer_boundaries, layer_subgraph
from lowbit.errors import LowbitError
from tests.conftest import TINY_CONFIGS, build_tiny_model


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
@pytest.mark.parametrize("arch_id", sorted(TINY_CONFIGS))
def test_chained_layers_equal_the_whole_model(arch_id, target, tmp_path, rng):
    model = build_tiny_model(arch_id, tmp_path / "src")
    out = tmp_path / "f32"
    lowbit.convert(tmp_path / "src", out, scheme="q0f32", target=target)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    boundaries = layer_boundaries(proto)
    assert len(boundaries) == model.config.num_hidden_layers + 1
    head = capture_value(proto, "lm_head")
    names = [name for pair in boundaries for name in pair] + [head]
    whole = LayerRunner(out, proto, [], names)  # every value straight from the graph inputs
    for length in (1, 7):
        sample = rng.integers(3, model.config.vocab_size, length)
        expected = whole.run(sample, ())
        values = ()
        for index in range(len(boundaries)):
            inputs = list(boundaries[index]) if index else []
            outputs = list(boundaries[index + 1]) if index + 1 < len(boundaries) else [head]
            result = LayerRunner(out, proto, inputs, outputs).run(sample, values)
            values = tuple(result[name] for name in outputs)
            for name in outputs:
                scale = np.abs(expected[name]).max()
                assert np.abs(result[name] - expected[name]).max() <= 1e-5 * scale, (arch_id, name)


def test_a_value_no_node_produces(tmp_path):
    build_tiny_model("llama", tmp_path / "src")
    lowbit.convert(tmp_path / "src", tmp_path / "f32", scheme="q0f32")
    proto = onnx.load(str(tmp_path / "f32" / "model.onnx"), load_external_data=False)
    with pytest.raises(LowbitError, match="no node produces 'nothing'"):
        layer_subgraph(proto, [], ["nothing"])
    with pytest.raises(LowbitError, match="no node named 'layers.9.mlp.down_proj'"):
        capture_value(proto, "layers.9.mlp.down_proj")
