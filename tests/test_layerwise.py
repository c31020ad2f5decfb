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


def test_layerwise_calibration_equals_the_whole_model(tmp_path):
    """calibrate_layerwise (one decoder layer in ORT at a time, boundaries on disk) gives the statistics of
    calibrate_statistics (the whole model in one session), observer for observer, on a w8a8-static folder with
    its activation Q/DQ bypassed, as `lowbit calibrate` runs it; the boundary files are gone afterwards."""
    import tempfile
    from pathlib import Path

    from lowbit.converter.calibrate_folder import (QUANTIZED_WEIGHTS_FLOAT_COMPUTE, bypass_activation_qdq,
                                                   static_sites)
    from lowbit.converter.calibration import calibrate_layerwise, calibrate_statistics, load_calibration_samples
    from tests.conftest import SAMPLE_MODEL

    if not SAMPLE_MODEL.is_dir():
        pytest.skip("samples/stories260K-hf missing")
    out = tmp_path / "static"
    lowbit.convert(SAMPLE_MODEL, out, scheme="w8a8-static", num_samples=2, seq_len=16)
    sites = list(static_sites(onnx.load(str(out / "model.onnx"), load_external_data=False)))
    assert len(sites) == 20
    samples = load_calibration_samples(None, SAMPLE_MODEL, 5, 40, 7)
    observers = {"absmax": {}, "minmax": {}, "percentile": {"percentile": 99.9}, "hessian": {}}
    options = dict(edit=bypass_activation_qdq, session_config=QUANTIZED_WEIGHTS_FLOAT_COMPUTE)
    before = set(Path(tempfile.gettempdir()).glob("lowbit-boundaries-*"))
    layerwise = calibrate_layerwise(out / "model.onnx", sites, observers, samples, **options)
    assert set(Path(tempfile.gettempdir()).glob("lowbit-boundaries-*")) == before
    whole = calibrate_statistics(out / "model.onnx", sites, observers, samples, **options)
    assert list(layerwise) == sites
    for site in sites:
        assert layerwise[site]["absmax"] == whole[site]["absmax"]
        assert layerwise[site]["percentile"] == whole[site]["percentile"]
        assert (layerwise[site]["minmax"].min, layerwise[site]["minmax"].max) == (whole[site]["minmax"].min,
                                                                                 whole[site]["minmax"].max)
        assert np.array_equal(layerwise[site]["hessian"], whole[site]["hessian"])


@pytest.mark.parametrize("changes", [False, True])
def test_capture_only_passes_give_the_same_statistics(changes, tmp_path, rng):
    """walk_layers(reruns=True) runs each layer first up to its captured inputs only, then whole for the next
    layer's inputs: the statistics of every site equal those of the plain walk, whatever finish_layer answers."""
    from lowbit.converter.calibration.layerwise import walk_layers
    from lowbit.converter.calibration.observers import make_observer

    model = build_tiny_model("llama", tmp_path / "src")
    lowbit.convert(tmp_path / "src", tmp_path / "f32", scheme="q0f32")
    proto = onnx.load(str(tmp_path / "f32" / "model.onnx"), load_external_data=False)
    sites = {layer: [f"layers.{layer}.attn.qkv_proj", f"layers.{layer}.mlp.down_proj"]
             for layer in range(model.config.num_hidden_layers)}
    samples = [rng.integers(3, model.config.vocab_size, n) for n in (5, 9, 3)]
    results = {}
    for reruns in (False, True):
        got, finished = {}, []

        def finish_layer(index, state, got=got, finished=finished):
            finished.append(index)
            got.update({site: {name: o.result() for name, o in by_name.items()} for site, by_name in state.items()})
            return changes

        walk_layers(tmp_path / "f32", proto, sites, samples,
                    lambda site: {name: make_observer(name) for name in ("hessian", "absmax")}, finish_layer,
                    reruns=reruns)
        assert finished == sorted(sites)
        results[reruns] = got
    assert set(results[True]) == {site for names in sites.values() for site in names}
    for site, by_name in results[False].items():
        np.testing.assert_array_equal(results[True][site]["hessian"], by_name["hessian"])
        assert results[True][site]["absmax"] == by_name["absmax"]
