"""lowbit convert --algo gptq: Hessians captured through ORT on the float graph, GPTQ per layer, stored as is."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import lowbit
from lowbit.affine import WeightQuant
from lowbit.cli import main
from lowbit.converter.algorithms import gptq_quantize
from lowbit.converter.algorithms.pipeline import stages
from lowbit.converter.calibration import calibrate_statistics, load_calibration_samples
from lowbit.custom_ops import matmul_nbits
from tests.conftest import SAMPLE_MODEL

pytestmark = pytest.mark.skipif(not SAMPLE_MODEL.is_dir(), reason="samples/stories260K-hf missing")

CALIBRATION_TEXT = (
    "The little robot rolled across the kitchen floor, looking for crumbs. Every morning it sang a song to the "
    "cat, who never sang back. One day the window was open and a bird flew in. The robot stopped, the cat "
    "stopped, and the bird sat on the clock. Nobody moved until the clock rang twelve. Then everyone laughed, "
    "even the cat, and the bird stayed for lunch. After lunch they all went to the garden to look at the sky.\n"
) * 6
SETTINGS = dict(num_samples=6, seq_len=48, calib_seed=3)
QUANT = WeightQuant(4, 32, "symmetric_full")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    data = root / "calib.txt"
    data.write_text(CALIBRATION_TEXT)
    reference = root / "q0f32"
    lowbit.convert(SAMPLE_MODEL, reference, scheme="q0f32")
    samples = load_calibration_samples(data, SAMPLE_MODEL, SETTINGS["num_samples"], SETTINGS["seq_len"],
                                       SETTINGS["calib_seed"])
    return root, data, reference, samples


def initializers(folder) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def convert_gptq(root, data, name, **extra):
    out = root / name
    lowbit.convert(SAMPLE_MODEL, out, scheme="w4a16", accuracy_level=0, ignore=["lm_head", "embed_tokens"],
                   algo="gptq", calib_data=data, **SETTINGS, **extra)
    return out


def expected_arrays(weight_kn: np.ndarray, hessian: np.ndarray, **options):
    result = gptq_quantize(np.ascontiguousarray(weight_kn.T), hessian, QUANT, **options)
    return matmul_nbits.pack(result.quantized, symmetric=True)


def test_independent_gptq_equals_gptq_on_float_hessians(calibration):
    """Every layer of --independent is GPTQ on the Hessian of its input in the float model, code for code."""
    root, data, reference, samples = calibration
    out = convert_gptq(root, data, "independent", sequential=False)
    floats, stored = initializers(reference), initializers(out)
    modules = [name[: -len(".qweight")] for name in stored if name.endswith(".qweight")]
    assert len(modules) == 20  # 5 layers x qkv, o, gate_up, down; lm_head and embedding float
    hessians = calibrate_statistics(reference / "model.onnx", modules, ["hessian"], samples)
    for module in modules:
        expected = expected_arrays(floats[f"{module}.weight"], hessians[module]["hessian"])
        assert np.array_equal(stored[f"{module}.qweight"], expected.b), module
        assert np.array_equal(stored[f"{module}.scales"], expected.scales), module
    record = json.loads((out / "lowbit.json").read_text())["algorithm"]
    assert record["name"] == "gptq" and record["sequential"] is False and record["damp"] == 0.01
    assert record["calibration"]["samples"] == len(samples) == 6
    assert record["calibration"]["seq_len"] == 48 and record["calibration"]["seed"] == 3
    errors = record["layer_output_error"]
    assert all(e["gptq"] < e["rtn"] for e in errors.values())  # lower output error than RTN on every layer


def test_sequential_calibrates_on_the_quantized_layers_before(calibration):
    root, data, reference, samples = calibration
    sequential = initializers(convert_gptq(root, data, "sequential"))
    independent = initializers(convert_gptq(root, data, "independent-2", sequential=False))
    first = [f"layers.0.{m}.qweight" for m in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    for name in first:  # layer 0 sees the same float inputs either way
        assert np.array_equal(sequential[name], independent[name])
    later = [name for name in sequential if name.endswith(".qweight") and name not in first]
    assert any(not np.array_equal(sequential[name], independent[name]) for name in later)


def test_sequential_layer_equals_gptq_on_the_quantized_model_before_it(calibration, tmp_path):
    """Layer 1 of a sequential folder, code for code: GPTQ on the Hessians of the float model whose layer 0 holds
    the folder's own dequantized layer 0 (the whole model in one session, without the layer-by-layer passes)."""
    from lowbit.affine import dequantize

    root, data, reference, samples = calibration
    stored = initializers(convert_gptq(root, data, "sequential-check"))
    model = onnx.load(str(reference / "model.onnx"))
    floats = {}
    for tensor in model.graph.initializer:
        if tensor.name.startswith("layers.0.") and tensor.name.endswith(".weight") \
                and f"{tensor.name[: -len('.weight')]}.qweight" in stored:
            module = tensor.name[: -len(".weight")]
            kn = numpy_helper.to_array(tensor)
            arrays = matmul_nbits.MatMulNBitsArrays(stored[f"{module}.qweight"], stored[f"{module}.scales"], None,
                                                    *kn.shape, QUANT.bits, QUANT.group_size)
            layer0 = np.ascontiguousarray(dequantize(matmul_nbits.unpack(arrays)).T)
            assert not np.array_equal(layer0, kn)
            tensor.CopyFrom(numpy_helper.from_array(layer0, tensor.name))
        floats[tensor.name] = numpy_helper.to_array(tensor)
    assert sum(name.startswith("layers.0.") for name in floats if f"{name[:-7]}.qweight" in stored) == 4
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    modules = [f"layers.1.{m}" for m in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    hessians = calibrate_statistics(tmp_path / "model.onnx", modules[:1] + modules[2:3], ["hessian"], samples)
    for module in modules[:1] + modules[2:3]:  # the layer's inputs that its own quantized linears do not feed
        expected = expected_arrays(floats[f"{module}.weight"], hessians[module]["hessian"])
        assert np.array_equal(stored[f"{module}.qweight"], expected.b), module
        assert np.array_equal(stored[f"{module}.scales"], expected.scales), module


def test_act_order_keeps_static_groups(calibration):
    root, data, reference, samples = calibration
    out = convert_gptq(root, data, "act-order", sequential=False, act_order=True)
    floats, stored = initializers(reference), initializers(out)
    module = "layers.2.mlp.down_proj"
    hessian = calibrate_statistics(reference / "model.onnx", [module], ["hessian"], samples)[module]["hessian"]
    expected = expected_arrays(floats[f"{module}.weight"], hessian, act_order=True)
    assert np.array_equal(stored[f"{module}.qweight"], expected.b)
    assert np.array_equal(stored[f"{module}.scales"], expected.scales)


def test_stages_follow_the_layers():
    class S:
        def __init__(self, module):
            self.module = module

    sites = [(S(m), None) for m in ("lm_head", "layers.10.mlp.down_proj", "layers.2.attn.o_proj",
                                    "layers.2.attn.qkv_proj", "layers.0.mlp.down_proj")]
    assert [[s.module for s, _ in stage] for stage in stages(sites)] == [
        ["layers.0.mlp.down_proj"], ["layers.2.attn.o_proj", "layers.2.attn.qkv_proj"],
        ["layers.10.mlp.down_proj"], ["lm_head"]]


@pytest.mark.parametrize("args,message", [
    (["--scheme", "q0f32", "--algo", "gptq"], "q0f32 quantizes nothing"),
    (["--scheme", "w4a16", "--calib-data", "CALIB"], "need a calibrated --algo"),
    (["--scheme", "w4a16", "--damp", "0.1"], "GPTQ options: add --algo gptq"),
    (["--scheme", "w4a16", "--algo", "gptq", "--seq-len", "100000"], "exceeds the model's context length"),
    (["--scheme", "w4a16", "--algo", "gptq", "--ignore", "re:.*"], "quantizes no MatMul layer"),
    (["--scheme", "w4a16", "--algo", "gptq", "--calib-data", "EMPTY"], "empty"),
    (["--scheme", "w4a16", "--algo", "gptq", "--num-samples", "0"], "--num-samples"),
    (["--scheme", "w4a16", "--algo", "gptq", "--damp", "1.5"], "--damp"),
    (["--scheme", "q4f16_awq", "--algo", "gptq"], "q4f16_awq is awq by definition"),
    (["--scheme", "q4f16_awq", "--group-size", "32"], "q4f16_awq"),
])
def test_bad_input(tmp_path, calibration, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = [str(calibration[1]) if a == "CALIB" else str(empty) if a == "EMPTY" else a for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------ --algo awq


def test_independent_awq_equals_the_core_on_float_statistics(calibration):
    """Layer 0 of an --independent AWQ folder: scales from `awq_search` on the float model's statistics, folded into
    the norms (and up_proj's rows for down_proj), weights quantized from W·diag(s) by the clip search."""
    from lowbit.converter.algorithms.awq import (awq_clip_search, awq_search, fold_into_norm, quantize_clipped,
                                                 scale_weight)

    root, data, reference, samples = calibration
    out = root / "awq"
    lowbit.convert(SAMPLE_MODEL, out, scheme="w4a16", accuracy_level=0, ignore=["lm_head", "embed_tokens"],
                   algo="awq", calib_data=data, sequential=False, **SETTINGS)
    floats, stored = initializers(reference), initializers(out)
    modules = ["layers.0.attn.qkv_proj", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj", "layers.0.attn.o_proj"]
    stats = calibrate_statistics(reference / "model.onnx", modules, ["hessian", "mean_abs_per_channel"], samples)
    w = {m: np.ascontiguousarray(floats[f"{m}.weight"].T) for m in modules}
    s = {m: awq_search([w[m]], stats[m]["hessian"], stats[m]["mean_abs_per_channel"], QUANT).scales
         for m in modules[:3]}
    for module, norm in (("layers.0.attn.qkv_proj", "layers.0.attn_norm"), ("layers.0.mlp.gate_up_proj",
                                                                          "layers.0.mlp_norm")):
        np.testing.assert_array_equal(stored[f"{norm}.weight"], fold_into_norm(floats[f"{norm}.weight"], s[module]))
    scaled = {m: scale_weight(w[m], s[m]) for m in modules[:3]}
    half = scaled["layers.0.mlp.gate_up_proj"].shape[0] // 2
    scaled["layers.0.mlp.gate_up_proj"][half:] = (
        scaled["layers.0.mlp.gate_up_proj"][half:].astype(np.float64) / s["layers.0.mlp.down_proj"][:, None]
    ).astype(np.float32)
    scaled["layers.0.attn.o_proj"] = w["layers.0.attn.o_proj"]
    for module in ("layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj", "layers.0.attn.o_proj"):
        h = stats[module]["hessian"]
        if module in s:
            h = h / np.outer(s[module], s[module])
        bounds = awq_clip_search(scaled[module], h, QUANT)
        expected = matmul_nbits.pack(quantize_clipped(scaled[module], bounds, QUANT), symmetric=True)
        assert np.array_equal(stored[f"{module}.qweight"], expected.b), module
        assert np.array_equal(stored[f"{module}.scales"], expected.scales), module
    record = json.loads((out / "lowbit.json").read_text())["algorithm"]
    assert record["name"] == "awq" and record["sequential"] is False and set(record["alpha"]) >= set(modules[:3])
    assert all(e["awq"] < e["rtn"] for e in record["layer_output_error"].values())


def test_mlc_q4f16_awq_is_awq_with_mlc_storage(calibration, tmp_path):
    root, data, reference, samples = calibration
    out = tmp_path / "q4f16_awq"
    lowbit.convert(SAMPLE_MODEL, out, scheme="q4f16_awq", calib_data=data, **SETTINGS)
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["algorithm"]["name"] == "awq" and meta["dtype"] == "float16"
    layers = meta["quantization"]
    assert set(layers) == {f"layers.{i}.{m}" for i in range(5)
                           for m in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert all(q["quant"].startswith("4-bit") and "asymmetric" in q["quant"] for q in layers.values())
    stored = initializers(out)
    assert all(f"{m}.qzeros" in stored for m in layers)  # zero points, as AWQ stores them
