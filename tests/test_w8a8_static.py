"""w8a8-static: int8 per-channel weights, activations with one calibrated scale (and zero point) per tensor as Q/DQ.

Tiers: one emitted linear in ONNX Runtime equals a numpy model of the Q/DQ integer math, for ORT's uint8 form
(which ORT fuses into MatMulIntegerToFloat) and TensorRT's int8 form; whole tiny models equal a transformers
reference built from the folder's own tensors with fake-quantized linear inputs, and the stored scales and zero
points are the min/max rule over the calibration activations; `lowbit calibrate` on such a folder is idempotent;
listings, lowbit.json, bad options.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from lowbit.affine import WeightQuant
from lowbit.cli import main
from lowbit.converter.api import convert
from lowbit.converter.calibration import load_calibration_samples
from lowbit.converter.quant.formats import STATIC_INT8_SYMMETRIC, STATIC_UINT8
from lowbit.converter.quant.plan import LayerQuant, QuantPlan, QuantRule
from lowbit.converter.quant.rewrite import quantize_model
from lowbit.converter.schemes import get_scheme, scheme_names
from tests.conftest import REPO, SAMPLE_MODEL, build_tiny_model, near_rounding_boundary
from tests.test_fp8 import (CALIBRATION_TEXT, initializers, load_fused_weight, onnx_logits, snapshot,
                            write_char_tokenizer)
from tests.test_w8a8 import int8_reference, single_linear_model

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------ plain numpy references


def uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """ONNX Runtime's static quantizer rule: the range widened to include 0, s = (hi - lo) / 255 in float32,
    z = round-half-even(-lo / s) clipped to [0, 255]."""
    lo, hi = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    s = np.float32((hi - lo) / np.float32(255))
    return s, np.uint8(np.clip(np.rint(-lo / s), 0, 255))


def fake_quant_uint8(x: np.ndarray, s: np.float32, z: np.uint8) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) for uint8 in float32: (clip(round(x / s) + z, 0, 255) - z) * s."""
    q = np.clip(np.rint(np.asarray(x, np.float32) / s) + np.float32(z), 0, 255)
    return ((q - np.float32(z)) * s).astype(np.float32)


def fake_quant_int8(x: np.ndarray, s: np.float32) -> np.ndarray:
    q = np.clip(np.rint(np.asarray(x, np.float32) / s), -128, 127)
    return (q * s).astype(np.float32)


def static_plan(activation) -> QuantPlan:
    return QuantPlan((QuantRule("layers.*", LayerQuant(WeightQuant(8, None, "symmetric"), activation=activation)),))


def set_activation_params(model: ir.Model, module: str, scale, zero) -> None:
    initializers = model.graph.initializers
    initializers[f"{module}.input_scale"].const_value = ir.tensor(np.asarray(scale, np.float32))
    initializers[f"{module}.input_zero_point"].const_value = ir.tensor(np.asarray(zero))


def run(model: ir.Model, path, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    ir.save(model, str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


# ------------------------------------------------------------------------------ one linear


def test_ort_form_equals_uint8_integer_math(rng, tmp_path):
    """qdq_uint8: uint8 weight codes (zero point 128) are int8_reference's codes + 128, the graph fuses into
    MatMulIntegerToFloat, and its output equals the numpy Q/DQ math to 2e-6 of the output's scale, including
    activation codes 0 and 255 against weight codes +/-127 (where ORT's u8 x s8 AVX2 kernel would saturate)."""
    n, k = 48, 96
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w[:, 0] = 0.5  # the row maximum: codes +127 in column 0
    w[: n // 2, 1] = -0.5
    model = single_linear_model(w, "matmul", batch_shape=(2, 5))
    report = quantize_model(model, static_plan(STATIC_UINT8), "ort", np.float32)
    assert [(r.format, r.activation) for r in report.layers] == [("qdq_uint8", STATIC_UINT8)]
    assert [n.op_type for n in model.graph] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]
    tensors = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    q, s = int8_reference(w)
    module = "layers.0.mlp.down_proj"
    np.testing.assert_array_equal(tensors[f"{module}.qweight"], (q.astype(np.int16) + 128).astype(np.uint8).T)
    np.testing.assert_array_equal(tensors[f"{module}.scales"], s)
    np.testing.assert_array_equal(tensors[f"{module}.qzeros"], np.full(n, 128, np.uint8))
    assert tensors[f"{module}.input_zero_point"].dtype == np.uint8
    x = (rng.standard_normal((2, 5, k)) * 2 + 0.3).astype(np.float32)
    x[0, 0] = np.where(np.arange(k) % 2, 50.0, -50.0)  # saturates both ends of the range
    x_scale, x_zero = uint8_params(-3.0, 5.0)
    set_activation_params(model, module, x_scale, x_zero)
    y = run(model, tmp_path / "u8.onnx", x)
    weight = (q.astype(np.float32) * s[:, None]).T
    expected = fake_quant_uint8(x, x_scale, x_zero) @ weight
    assert np.abs(y - expected).max() <= 2e-6 * np.abs(expected).max()
    assert np.abs(y - x @ w.T).max() > 1e-3 * np.abs(expected).max()  # the activations really were quantized
    ir.save(model, str(tmp_path / "u8.onnx"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "u8-optimized.onnx")
    ort.InferenceSession(str(tmp_path / "u8.onnx"), options, providers=["CPUExecutionProvider"])
    import onnx

    fused = [node.op_type for node in onnx.load(str(tmp_path / "u8-optimized.onnx")).graph.node]
    assert "MatMulIntegerToFloat" in fused, fused


def test_tensorrt_form_is_symmetric_int8(rng, tmp_path):
    """qdq_int8 (TensorRT): int8 codes equal int8_reference's, zero points are int8 0; run by ORT without its QDQ
    fusions (float math on the dequantized values), the output equals the numpy Q/DQ math."""
    n, k = 32, 64
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    model = single_linear_model(w, "matmul", batch_shape=(3, 4))
    report = quantize_model(model, static_plan(STATIC_INT8_SYMMETRIC), "tensorrt", np.float32)
    assert [r.format for r in report.layers] == ["qdq_int8"]
    module = "layers.0.mlp.down_proj"
    tensors = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    q, s = int8_reference(w)
    np.testing.assert_array_equal(tensors[f"{module}.qweight"], q.T)
    assert tensors[f"{module}.input_zero_point"] == np.int8(0) and f"{module}.qzeros" not in tensors
    x = (rng.standard_normal((3, 4, k)) * 2).astype(np.float32)
    x_scale = np.float32(np.abs(x).max() * 0.8 / 127)  # some values saturate at +/-127..128
    set_activation_params(model, module, x_scale, np.int8(0))
    y = run(model, tmp_path / "s8.onnx", x, optimize=False)
    expected = fake_quant_int8(x, x_scale) @ (q.astype(np.float32) * s[:, None]).T
    assert np.abs(y - expected).max() <= 2e-6 * np.abs(expected).max()


# ------------------------------------------------------------------------------ whole models


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text(CALIBRATION_TEXT)
    return path


class StaticInt8Reference:
    """The tiny transformers model with each quantized linear's weight = its int8 codes times its scales (from the
    folder) and a forward pre-hook that fake-quantizes the linear's input with the folder's uint8 scale and zero
    point; with `quantize_inputs=False` the hooks record each module's input min/max instead."""

    def __init__(self, model, folder):
        self.model, self.quantize_inputs = model, True
        tensors = initializers(folder)
        meta = json.loads((folder / "lowbit.json").read_text())
        modules = dict(model.named_modules())
        self.ranges: dict[str, list[float]] = {}
        with torch.no_grad():
            for module in meta["quantization"]:
                codes = tensors[f"{module}.qweight"].astype(np.float32) - np.float32(128)
                weight = (codes * tensors[f"{module}.scales"]).T  # [N, K]
                params = (tensors[f"{module}.input_scale"], tensors[f"{module}.input_zero_point"])
                load_fused_weight(model, modules, module, weight, self._hook(module, *params))

    def _hook(self, module, scale, zero):
        def hook(_linear, args):
            x = args[0].numpy()
            lo, hi = self.ranges.get(module, (np.inf, -np.inf))
            self.ranges[module] = [min(lo, float(x.min())), max(hi, float(x.max()))]
            if not self.quantize_inputs:
                return None
            # a value near a rounding boundary may round either way after float32 sums in another order upstream:
            # mark its token
            self.near_tie |= near_rounding_boundary(x / scale, np.rint)
            return (torch.from_numpy(fake_quant_uint8(x, scale, zero)),)

        return hook

    def logits(self, ids):
        self.near_tie = np.zeros(ids.shape, bool)
        with torch.no_grad():
            return self.model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_logits_equal_fake_quant_reference(arch_id, calibration_file, rng, tmp_path):
    """The stored activation parameters are uint8_params of each linear input's min/max over the calibration
    samples (seen with quantized weights and float activations, as calibration runs), and the logits equal the
    fake-quant reference to 1e-5 of their scale at every token before the first near a rounding boundary."""
    model = build_tiny_model(arch_id, tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    float_model = build_tiny_model(arch_id, tmp_path / "float-src")
    # many short rows: with uint8's coarse grid some linear input of a token lies near a rounding boundary about one
    # token in ten, and from there on causal attention may carry a difference down the row
    ids = rng.integers(3, model.config.vocab_size, (12, 8))
    with torch.no_grad():
        float_logits = float_model(input_ids=torch.tensor(ids)).logits.numpy()
    out = tmp_path / "w8a8-static"
    report = convert(tmp_path / "src", out, "w8a8-static", calib_data=calibration_file, num_samples=8, seq_len=64)
    assert {r.format for r in report.quant.layers} == {"qdq_uint8"} and len(report.quant.layers) == 8
    reference = StaticInt8Reference(build_tiny_model(arch_id, tmp_path / "ref-src"), out)
    reference.quantize_inputs = False
    for sample in load_calibration_samples(calibration_file, tmp_path / "src", 8, 64):
        reference.logits(sample[None])
    meta = json.loads((out / "lowbit.json").read_text())
    record = meta["activation_calibration"]
    assert record["observer"] == "minmax" and record["samples"] == 8 and record["calibrated_scheme"] == "w8a8-static"
    tensors = initializers(out)
    for module, (lo, hi) in reference.ranges.items():
        measured = record["ranges"][module]
        assert measured == pytest.approx([lo, hi], rel=1e-5)
        scale, zero = uint8_params(*measured)
        assert tensors[f"{module}.input_scale"] == scale and tensors[f"{module}.input_zero_point"] == zero
        assert record["zero_points"][module] == int(zero)
    reference.quantize_inputs = True
    got, expected = onnx_logits(out, ids), reference.logits(ids)
    scale = np.abs(expected).max()
    exact = np.cumsum(reference.near_tie, axis=1) == 0
    assert exact.mean() >= 0.2, exact.mean()
    assert (np.abs(got - expected) / scale)[exact].max() <= 1e-5
    assert (np.abs(float_logits - expected) / scale).mean() > 1e-4  # the quantization is really there


def test_calibrate_recalibrates_idempotently(calibration_file, tmp_path):
    """`lowbit calibrate` on a w8a8-static folder with the conversion's data changes no byte of the model; with
    other data it rewrites the scales and zero points, and again with the first data gives the first folder back."""
    build_tiny_model("llama", tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    out = tmp_path / "out"
    convert(tmp_path / "src", out, "w8a8-static", calib_data=calibration_file, num_samples=4, seq_len=32)
    before = snapshot(out)
    args = ["calibrate", str(out), "--dataset", str(calibration_file), "--num-calibration-samples", "4",
            "--seq-len", "32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert snapshot(out)["model.onnx"] == before["model.onnx"]
    other = tmp_path / "other.txt"
    other.write_text("zebra quiz: 9 8 7 ... why? because!\n" * 30)
    result = CliRunner().invoke(main, ["calibrate", str(out), "--dataset", str(other), "--num-calibration-samples",
                                       "4", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    assert snapshot(out)["model.onnx"] != before["model.onnx"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert snapshot(out)["model.onnx"] == before["model.onnx"]
    result = CliRunner().invoke(main, ["inspect", str(out)])
    zeros = json.loads((out / "lowbit.json").read_text())["activation_calibration"]["zero_points"]
    zero = zeros["layers.1.mlp.down_proj"]
    assert re.search(r"layers.1.mlp.down_proj\s+MatMul\s+8-bit per-channel symmetric\s+qdq_uint8\s+int8 compute.*"
                     rf"activations uint8 static per-tensor scale [0-9.e-]+ zero point {zero}\n", result.output), \
        result.output


# ------------------------------------------------------------------------------ listings, targets, options


def test_scheme_listed_documented_and_per_target():
    assert "w8a8-static" in scheme_names()
    ort_layer = get_scheme("w8a8-static").plan.lookup("layers.0.attn.qkv_proj")
    trt_layer = get_scheme("w8a8-static", target="tensorrt").plan.lookup("layers.0.attn.qkv_proj")
    assert ort_layer.activation == STATIC_UINT8 and trt_layer.activation == STATIC_INT8_SYMMETRIC
    assert get_scheme("w8a8-static").plan.lookup("lm_head") is None
    docs = (REPO / "docs" / "schemes.md").read_text()
    assert "`w8a8-static`" in docs and "MatMulIntegerToFloat" in docs
    assert "w8a8-static" in (REPO / "docs" / "performance.md").read_text()


def test_tensorrt_folder_and_bad_options(tmp_path):
    out = tmp_path / "trt"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), "--scheme", "w8a8-static",
                                       "--target", "tensorrt", "--num-samples", "2", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "lowbit.json").read_text())["quantization"]
    assert {entry["format"] for entry in layers.values()} == {"qdq_int8"}
    assert all(entry["activation"]["symmetric"] and not entry["activation"]["dynamic"] for entry in layers.values())
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert re.search(r"layers.0.attn.o_proj\s+MatMul\s+.*qdq_int8\s+int8 compute.*activations int8 static "
                     r"per-tensor scale [0-9.e-]+\n", result.output), result.output
    bad = tmp_path / "bad"
    for args, message in [(["--group-size", "64"], "fixes its own group-size"),
                          (["--accuracy-level", "4"], "fixes its own accuracy-level"),
                          (["--num-samples", "0"], "num-samples")]:
        result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(bad), "--scheme", "w8a8-static",
                                           *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert not bad.exists()
