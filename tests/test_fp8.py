"""FP8 e4m3 / e5m2 weights and activations (MLC's e4m3_e4m3_f16, e5m2_e5m2_f16 and their *_max_calibrate flow).

Tiers: rounding equals `ml_dtypes` casts (and ONNX Runtime's QuantizeLinear) bit for bit; whole tiny models equal a
reference built from the folder's own tensors (transformers with the float8 weights and fake-quantized linear
inputs); the scales are max|x| / fp8_max of the calibration activations; `*_max_calibrate` + `lowbit calibrate`
gives the one-shot folder byte for byte and is idempotent; bad input leaves everything as it was.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.cli import main
from lowbit.converter import calibrate_folder as calibrate_module
from lowbit.converter.api import convert
from lowbit.converter.calibration import load_calibration_samples
from lowbit.converter.calibration.layerwise import LayerRunner
from lowbit.converter.schemes import SCHEMES, get_scheme, scheme_names
from lowbit.errors import LowbitError
from lowbit.runtime.session import create_session
from tests.conftest import REPO, SAMPLE_MODEL, build_tiny_model, near_rounding_boundary

torch = pytest.importorskip("torch")

FP8 = {"e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "e5m2": (ml_dtypes.float8_e5m2, 57344.0)}
CALIBRATION_TEXT = ("once upon a time, a small fox found a red ball in the park. she asked: can i keep it? "
                    "the answer was yes! 1, 2, 3 - they played until dark.\n") * 12


def ml_dtypes_fp8(values_over_scale: np.ndarray, flavour: str) -> np.ndarray:
    """The reference rounding: clip to +-fp8_max (QuantizeLinear's saturate=1), then ml_dtypes' cast."""
    dtype, top = FP8[flavour]
    return np.clip(np.asarray(values_over_scale, np.float32), -top, top).astype(dtype)


def float8_rounding(flavour: str):
    """`ml_dtypes_fp8` as a monotone function to float32 values (conftest.near_rounding_boundary's `rounding`)."""
    return lambda values_over_scale: ml_dtypes_fp8(values_over_scale, flavour).astype(np.float32)


def scale_reference(absmax: float, flavour: str, dtype=np.float16):
    """max|x| / fp8_max in float32, rounded to `dtype`, at least its smallest normal (float16: 2^-14)."""
    return np.dtype(dtype).type(max(np.float32(absmax) / np.float32(FP8[flavour][1]), np.float32(np.finfo(dtype).tiny)))


def fp8_grid_midpoints(flavour: str) -> np.ndarray:
    """Every finite fp8 value and the midpoint between each pair of neighbours (the ties), as float32."""
    values = np.arange(256, dtype=np.uint8).view(FP8[flavour][0]).astype(np.float32)
    values = np.unique(values[np.isfinite(values)])
    return np.concatenate([values, (values[1:] + values[:-1]) / 2])


def write_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer of 49 ids (BOS 1, EOS 2) that fits the tiny models' 96-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    chars = list(" abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;\n")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def initializers(folder: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"))  # a tiny model: all of its weights
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------ (a) rounding, bit for bit


@pytest.mark.parametrize("flavour", ["e4m3", "e5m2"])
def test_weight_rounding_equals_ml_dtypes(flavour, rng):
    """Every fp8 value, every tie between neighbours (round half to even) and values beyond the range (saturate),
    times a power-of-two scale, plus random weights: codes are ml_dtypes' cast of clip(w / s) bit for bit."""
    top = FP8[flavour][1]
    grid = fp8_grid_midpoints(flavour)
    beyond = np.array([top * 1.02, top * 1.2, top * 4, -top * 1.07, -top * 3], np.float32)
    special = np.concatenate([grid, beyond, rng.standard_normal(63).astype(np.float32) * top / 3])
    scale = np.float32(2.0 ** -6)
    w = np.zeros((4, special.size), np.float32)
    w[0] = special * scale  # max|w| = 4 * top * s: the per-tensor scale then is 4 s, so also check rows 1..3
    w[1] = rng.standard_normal(special.size) * 0.05
    w[2, :5] = [1e-7, -3e-6, 2e-5, 0.0, 1e-3]  # tiny values: subnormal fp8 codes and zero
    w[3] = rng.standard_normal(special.size) * 3
    for per_tensor in (True, False):
        quant = WeightQuant(8, None, f"fp8_{flavour}", per_tensor=per_tensor)
        qw = quantize(w, quant, np.float16)
        absmax = np.abs(w).max(axis=None if per_tensor else 1)
        s = np.broadcast_to(np.array([scale_reference(a, flavour) for a in np.atleast_1d(absmax)]), (4,))
        np.testing.assert_array_equal(qw.scales[:, 0], s)
        expected = ml_dtypes_fp8(w / s.astype(np.float32)[:, None], flavour)
        np.testing.assert_array_equal(qw.codes, expected.view(np.uint8))
        np.testing.assert_array_equal(dequantize(qw), expected.astype(np.float32) * s.astype(np.float32)[:, None])
    # the rounding itself, with the scale fixed at a power of two: exact ties and saturation
    from lowbit.fp8 import to_float8

    codes = to_float8(special * scale, scale, flavour)
    np.testing.assert_array_equal(codes.view(np.uint8), ml_dtypes_fp8(special, flavour).view(np.uint8))
    assert np.all(np.abs(codes[-68:-63].astype(np.float32)) == top)  # beyond the range: saturated, never NaN/inf


@pytest.mark.parametrize("flavour", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_activation_rounding_equals_ml_dtypes_and_ort(flavour, dtype, rng, tmp_path):
    """ORT's QuantizeLinear (opset 21, float8 zero point, float16 or float32 x and scale) gives the ml_dtypes
    reference codes bit for bit, ties and saturation included; lowbit.fp8.fake_quantize equals DQ(Q(x))."""
    from lowbit.fp8 import fake_quantize, scale_for

    elem = {"e4m3": ir.DataType.FLOAT8E4M3FN, "e5m2": ir.DataType.FLOAT8E5M2}[flavour]
    top = FP8[flavour][1]
    grid = fp8_grid_midpoints(flavour)
    scale = dtype(2.0 ** -4)
    special = np.concatenate([grid[np.abs(grid) * 2.0 ** -4 < np.finfo(dtype).max],
                              np.array([top * 1.1, -top * 5], np.float32)])
    x_special = (special * np.float32(scale)).astype(dtype)
    x_random = (rng.standard_normal(999) * 7).astype(dtype)
    random_scale = scale_for(np.abs(x_random.astype(np.float32)).max() * 0.5, flavour, dtype)  # half saturates
    x_value = ir.Value(name="x", shape=ir.Shape([None]), type=ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype))))
    s_value = ir.Value(name="s", shape=ir.Shape([]), type=ir.TensorType(x_value.dtype))
    zero = ir.Value(name="z", shape=ir.Shape([]), type=ir.TensorType(elem),
                    const_value=ir.tensor(np.zeros((), FP8[flavour][0]), name="z"))
    one = ir.Value(name="one", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                   const_value=ir.tensor(np.array(1.0, np.float32), name="one"))
    q = ir.node("QuantizeLinear", [x_value, s_value, zero])
    codes = ir.node("DequantizeLinear", [q.outputs[0], one, zero])  # scale 1: the fp8 values as float32
    fake = ir.node("DequantizeLinear", [q.outputs[0], s_value, zero])
    codes.outputs[0].name, fake.outputs[0].name = "codes", "fake"
    graph = ir.Graph([x_value, s_value], [codes.outputs[0], fake.outputs[0]], nodes=[q, codes, fake],
                     initializers=[zero, one], opset_imports={"": 21})
    ir.save(ir.Model(graph, ir_version=10), str(tmp_path / "q.onnx"))
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    for x, s in ((x_special, scale), (x_random, random_scale)):
        got_codes, got_fake = session.run(None, {"x": x, "s": np.asarray(s, dtype)})
        expected = ml_dtypes_fp8(x.astype(np.float32) / np.float32(s), flavour).astype(np.float32)
        np.testing.assert_array_equal(got_codes.view(np.uint32), expected.view(np.uint32))  # -0 kept
        reference = fake_quantize(x, s, flavour)
        np.testing.assert_array_equal(reference, expected * np.float32(s))
        np.testing.assert_array_equal(got_fake, reference.astype(dtype))


# ------------------------------------------------------------------------------ (b) whole models vs reference


def fused_hf_names(arch_model, module: str) -> list[str]:
    """transformers module names of one of our (fused) linears, in the order their rows are stacked."""
    _, i, block, name = module.split(".")
    prefix = f"model.layers.{i}"
    return {"qkv_proj": [f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")],
            "o_proj": [f"{prefix}.self_attn.o_proj"],
            "gate_up_proj": [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"],
            "down_proj": [f"{prefix}.mlp.down_proj"]}[name]


def load_fused_weight(model, modules: dict, module: str, weight: np.ndarray, hook) -> None:
    """Copies our (possibly fused) module's weight [N, K] into its transformers linears, row blocks in order, and
    registers `hook` as each one's forward pre-hook."""
    start = 0
    for name in fused_hf_names(model, module):
        linear = modules[name]
        rows = linear.weight.shape[0]
        linear.weight.copy_(torch.from_numpy(weight[start:start + rows]))
        start += rows
        linear.register_forward_pre_hook(hook)
    assert start == weight.shape[0]


class FakeQuantReference:
    """The tiny transformers model run in float32 with the folder's tensors: every float weight rounded to
    float16 as the folder stores it, each quantized linear's weight = its float8 values * its scale, and a forward
    pre-hook that turns the linear's input into fp8(clip(x / s_x)) * s_x with the stored activation scale (ml_dtypes
    reference rounding). With `quantize_inputs=False` the hooks only record max|x| per module."""

    def __init__(self, model, folder: Path, flavour: str):
        self.model, self.flavour = model, flavour
        tensors = initializers(folder)
        meta = json.loads((folder / "lowbit.json").read_text())
        modules = dict(model.named_modules())
        self.absmax: dict[str, float] = {}
        self.quantize_inputs = True
        dtype = np.dtype(meta["dtype"])
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.from_numpy(param.numpy().astype(dtype).astype(np.float32)))
            for module in meta["quantization"]:
                codes, scale = tensors[f"{module}.qweight"], tensors[f"{module}.scales"]
                assert codes.dtype == FP8[flavour][0] and scale.dtype == dtype and scale.shape == ()
                weight = (codes.astype(np.float32) * np.float32(scale)).T  # [N, K]
                x_scale = np.float32(tensors[f"{module}.input_scale"])
                load_fused_weight(model, modules, module, weight, self._hook(module, x_scale))

    def _hook(self, module: str, x_scale: np.float32):
        def hook(_linear, args):
            x = args[0].numpy()
            self.absmax[module] = max(self.absmax.get(module, 0.0), float(np.abs(x).max()))
            if not self.quantize_inputs:
                return None
            scaled = x / x_scale
            # a value near a float8 rounding boundary may round either way in another implementation of the same
            # float32 math (a different summation order upstream): mark its token
            self.near_tie |= near_rounding_boundary(scaled, float8_rounding(self.flavour))
            fake = ml_dtypes_fp8(scaled, self.flavour).astype(np.float32) * x_scale
            return (torch.from_numpy(fake),)

        return hook

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.near_tie = np.zeros(ids.shape, bool)  # [batch, tokens]: some linear input lay at a rounding boundary
        with torch.no_grad():
            return self.model(input_ids=torch.tensor(ids)).logits.numpy()


def onnx_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    session = create_session(folder)
    batch, seq = ids.shape
    logits, _ = session.forward(ids, np.ones_like(ids), np.arange(seq)[None].repeat(batch, 0),
                                session.empty_past(batch))
    return np.asarray(logits, np.float32)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text(CALIBRATION_TEXT)
    return path


def tiny_source(arch_id: str, folder: Path):
    model = build_tiny_model(arch_id, folder)
    write_char_tokenizer(folder)
    return model


def float32_variant(monkeypatch, flavour: str) -> str:
    """A test-only scheme: the FP8 scheme's plan with float32 compute (MLC's codes fix float16), so the graph's
    arithmetic is the reference's and the comparison is exact up to float32 rounding."""
    name = f"test_{flavour}_{flavour}_f32"
    one_shot = SCHEMES[f"{flavour}_{flavour}_f16"]
    monkeypatch.setitem(SCHEMES, name, lambda options, target: dataclasses.replace(
        one_shot(options, target), name=name, dtype=np.dtype(np.float32)))
    return name


@pytest.mark.parametrize("flavour", ["e4m3", "e5m2"])
@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_logits_equal_fake_quant_reference(arch_id, flavour, calibration_file, rng, tmp_path, monkeypatch):
    """The float8 graph with float32 compute equals the float32 fake-quant reference built from the folder's own
    tensors to 1e-5 of the logits' scale (measured: 3e-7) at every token before the first whose linear inputs lay
    near a float8 rounding boundary (within 2e-6 of itself or 1e-7 of its row's largest value: conftest's
    near_rounding_boundary): such a value may round either way after float32 sums in another order (one did, once
    in a few runs, giving 0.6% at the tokens after it). With float16 compute (the
    scheme itself) the difference is float16 rounding (11 bits) that now and then moves an activation across a
    float8 rounding boundary (a step of 1/8 for e4m3, 1/4 for e5m2). A single logit's difference is heavy-tailed
    (up to 6.8% of the scale seen), so the bounds are on the 99th percentile and the mean: over 12 seeds at most
    2.4% and 0.46% (the float model is 0.7-1.3% away on average); the bounds are about 2x that. The stored
    activation scales are
    max|x| / fp8_max over the calibration inputs the reference sees with quantized weights and float activations
    (the float16 graph's max: 2e-3 relative). The graph runs on ONNX Runtime's own kernels (LOWBIT_KERNELS=0), the
    path the near-tie bound was measured on: lowbit's float8 kernel sums the same products in another order (and
    gave a 1.4e-5 once in 60 runs), and tests/test_narrow_float_kernel.py checks it against this path."""
    from lowbit.custom_ops import kernels

    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    model = tiny_source(arch_id, tmp_path / "src")
    float_model = build_tiny_model(arch_id, tmp_path / "float-src")  # the same seed: the same weights
    # many short rows: the comparison of a row stops at its first token near a rounding boundary
    ids = rng.integers(3, model.config.vocab_size, (12, 8))
    with torch.no_grad():
        float_logits = float_model(input_ids=torch.tensor(ids)).logits.numpy()
    options = dict(calib_data=calibration_file, num_samples=8, seq_len=64)
    for scheme in (float32_variant(monkeypatch, flavour), f"{flavour}_{flavour}_f16"):
        out = tmp_path / scheme
        report = convert(tmp_path / "src", out, scheme, **options)
        assert {r.format for r in report.quant.layers} == {f"qdq_fp8_{flavour}"} and len(report.quant.layers) == 8
        reference = FakeQuantReference(build_tiny_model(arch_id, tmp_path / "ref-src"), out, flavour)
        reference.quantize_inputs = False  # the scales: max|x| over the calibration samples
        for sample in load_calibration_samples(calibration_file, tmp_path / "src", 8, 64):
            reference.logits(sample[None])
        meta = json.loads((out / "lowbit.json").read_text())
        tensors = initializers(out)
        for module, absmax in reference.absmax.items():
            measured = meta["activation_calibration"]["absmax"][module]
            assert measured == pytest.approx(absmax, rel=1e-5 if scheme.startswith("test_") else 2e-3)
            stored = tensors[f"{module}.input_scale"]
            assert stored.dtype == np.dtype(meta["dtype"])
            assert stored == scale_reference(measured, flavour, stored.dtype)
        reference.quantize_inputs = True
        got, expected = onnx_logits(out, ids), reference.logits(ids)
        scale = np.abs(expected).max()
        error = np.abs(got - expected) / scale
        float_error = np.abs(float_logits - expected) / scale
        if scheme.startswith("test_"):
            # causal attention: a token at a rounding boundary can move the logits of its row from there on
            exact = np.cumsum(reference.near_tie, axis=1) == 0
            assert exact.mean() >= 0.2, exact.mean()  # measured 0.57-0.94 of the logits (24 runs, 12 rows of 8)
            assert error[exact].max() <= 1e-5, error[exact].max()
            assert float_error.mean() > 1e-3  # the quantization is really there
        else:
            assert np.percentile(error, 99) <= 5e-2 and error.mean() <= 1e-2, (np.percentile(error, 99), error.mean())


# ------------------------------------------------------------------------------ (c) MLC's calibrate flow


@pytest.mark.parametrize("flavour", ["e4m3", "e5m2"])
def test_max_calibrate_then_calibrate_equals_one_shot(flavour, calibration_file, rng, tmp_path):
    tiny_source("llama", tmp_path / "src")
    one_shot, deferred = tmp_path / "one-shot", tmp_path / "deferred"
    options = dict(calib_data=calibration_file, num_samples=6, seq_len=48, calib_seed=3)
    convert(tmp_path / "src", one_shot, f"{flavour}_{flavour}_f16", **options)
    convert(tmp_path / "src", deferred, f"{flavour}_{flavour}_f16_max_calibrate")
    meta = json.loads((deferred / "lowbit.json").read_text())
    assert meta["scheme"] == f"{flavour}_{flavour}_f16_max_calibrate"
    assert meta["activation_calibration"] == {"status": "placeholder", "placeholder_scale": 1.0,
                                              "calibrated_scheme": f"{flavour}_{flavour}_f16",
                                              "converted_as": f"{flavour}_{flavour}_f16_max_calibrate"}
    placeholder_scales = {k: v for k, v in initializers(deferred).items() if k.endswith(".input_scale")}
    assert len(placeholder_scales) == 8 and all(v == 1.0 for v in placeholder_scales.values())
    result = CliRunner().invoke(main, ["calibrate", str(deferred), "--dataset", str(calibration_file),
                                       "--num-calibration-samples", "6", "--seq-len", "48", "--calib-seed", "3"])
    assert result.exit_code == 0, result.output
    assert (deferred / "model.onnx").read_bytes() == (one_shot / "model.onnx").read_bytes()
    assert (deferred / "model.onnx.data").read_bytes() == (one_shot / "model.onnx.data").read_bytes()
    ids = rng.integers(3, 96, (2, 20))
    np.testing.assert_array_equal(onnx_logits(deferred, ids), onnx_logits(one_shot, ids))
    meta = json.loads((deferred / "lowbit.json").read_text())
    record = meta["activation_calibration"]
    assert meta["scheme"] == f"{flavour}_{flavour}_f16"
    import hashlib

    assert record["status"] == "calibrated" and record["observer"] == "absmax" and record["by"] == "lowbit calibrate"
    assert record["sha256"] == hashlib.sha256(calibration_file.read_bytes()).hexdigest()
    assert (record["samples"], record["seq_len"], record["seed"]) == (6, 48, 3)
    assert record["converted_as"] == f"{flavour}_{flavour}_f16_max_calibrate"
    one_shot_record = json.loads((one_shot / "lowbit.json").read_text())["activation_calibration"]
    assert record["scales"] == one_shot_record["scales"] and record["absmax"] == one_shot_record["absmax"]
    # twice: nothing changes, byte for byte
    before = snapshot(deferred)
    result = CliRunner().invoke(main, ["calibrate", str(deferred), "--calib-data", str(calibration_file),
                                       "--num-samples", "6", "--seq-len", "48", "--calib-seed", "3"])
    assert result.exit_code == 0, result.output
    assert snapshot(deferred) == before
    # a different seed gives other scales (the calibration data really is used)
    result = CliRunner().invoke(main, ["calibrate", str(deferred), "--calib-data", str(calibration_file),
                                       "--num-samples", "2", "--seq-len", "40", "--calib-seed", "1"])
    assert result.exit_code == 0, result.output
    assert (deferred / "model.onnx").read_bytes() != before["model.onnx"]


# ------------------------------------------------------------------------------ (d) bad input


@pytest.fixture(scope="module")
def deferred_folder(tmp_path_factory):
    source = tmp_path_factory.mktemp("src")
    tiny_source("llama", source)
    out = tmp_path_factory.mktemp("fp8") / "deferred"
    convert(source, out, "e4m3_e4m3_f16_max_calibrate")
    return source, out


def assert_one_line_error(result, message: str):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), result.output


def test_bad_calibration_input_leaves_the_folder_as_it_was(deferred_folder, tmp_path, monkeypatch):
    source, folder = deferred_folder
    before = snapshot(folder)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    wrong = tmp_path / "rows.jsonl"
    wrong.write_text('{"prompt": "no known field"}\n')
    cases = [
        (["--calib-data", str(empty)], "empty"),
        (["--calib-data", str(binary)], "not UTF-8"),
        (["--calib-data", str(tmp_path)], "not a file"),
        (["--calib-data", str(tmp_path / "missing.txt")], "no such calibration file"),
        (["--calib-data", str(wrong)], "line 1: none of the known fields"),
        (["--num-samples", "0"], "num-samples"),
        (["--seq-len", "129"], "exceeds the model's context length \\(128\\)"),
    ]
    for args, message in cases:
        assert_one_line_error(CliRunner().invoke(main, ["calibrate", str(folder), *args]), message)
        assert snapshot(folder) == before, args
    # an interrupted calibration: onnxruntime fails on the second sample (calibration runs layer by layer)
    calls = []
    original_run = LayerRunner.run

    def failing_run(self, token_ids, boundary):
        calls.append(1)
        if len(calls) == 2:
            raise LowbitError("onnxruntime failed on a calibration sample (simulated)")
        return original_run(self, token_ids, boundary)

    with monkeypatch.context() as patch:
        patch.setattr(LayerRunner, "run", failing_run)
        assert_one_line_error(CliRunner().invoke(main, ["calibrate", str(folder)]), "simulated")
    assert len(calls) == 2 and snapshot(folder) == before
    # interrupted between the two file moves: model.onnx already replaced, lowbit.json fails
    moves = []
    real_replace = calibrate_module.os.replace

    def failing_replace(src, dst):
        moves.append(Path(dst).name)
        if len(moves) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(calibrate_module.os, "replace", failing_replace)
        assert_one_line_error(CliRunner().invoke(main, ["calibrate", str(folder)]), "No space left on device")
    assert moves[:2] == ["model.onnx", "lowbit.json"] and snapshot(folder) == before
    # a folder that is not a *_max_calibrate output
    weight_only = tmp_path / "q0"
    convert(source, weight_only, "q0f32")
    weight_only_before = snapshot(weight_only)
    assert_one_line_error(CliRunner().invoke(main, ["calibrate", str(weight_only)]),
                          "scheme q0f32 has no static activation scales; calibrate takes a \\*_max_calibrate")
    assert snapshot(weight_only) == weight_only_before
    assert_one_line_error(CliRunner().invoke(main, ["calibrate", str(tmp_path / "nowhere")]), "no readable lowbit.json")


def test_bad_convert_options(deferred_folder, tmp_path):
    source, _ = deferred_folder
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    for args, message in [
        (["--scheme", "e4m3_e4m3_f16", "--calib-data", str(empty)], "the calibration file is empty"),
        (["--scheme", "e5m2_e5m2_f16", "--num-samples", "0"], "num-samples"),
        (["--scheme", "e4m3_e4m3_f16", "--seq-len", "500"], "exceeds the model's context length \\(128\\)"),
        (["--scheme", "e4m3_e4m3_f16_max_calibrate", "--num-samples", "4"], "takes them in `lowbit calibrate`"),
        (["--scheme", "q4f16_1", "--num-samples", "4"], "need a calibrated --algo"),
        (["--scheme", "e4m3_e4m3_f16", "--algo", "gptq"], "--algo gptq is for integer weights"),
        (["--scheme", "e4m3_e4m3_f16", "--dtype", "float32"], "fixes its own dtype"),
        (["--scheme", "e5m2_e5m2_f16", "--target", "tensorrt"], "qdq_fp8_e5m2: not for target tensorrt"),
    ]:
        result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), *args])
        assert_one_line_error(result, message)
        assert not out.exists(), args


# ------------------------------------------------------------------------------ graph form, listings, docs


def test_tensorrt_form_and_listings(deferred_folder, tmp_path):
    """--target tensorrt: standard ops only at opset 21; every quantized MatMul reads DQ(Q(x)) with symmetric float8
    zero points (0) and DQ(float8 W); no Q/DQ on any output; lm_head and embedding float. lowbit.json and inspect
    name the activation setting."""
    source, _ = deferred_folder
    out = tmp_path / "trt"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--scheme", "e4m3_e4m3_f16",
                                       "--target", "tensorrt", "--num-samples", "4", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out / "model.onnx"))
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.name in json.loads((out / "lowbit.json").read_text())["quantization"]]
    assert len(matmuls) == 8
    for node in matmuls:
        dq = producers[node.input[0]]
        q = producers[dq.input[0]]
        weight = producers[node.input[1]]
        assert (node.op_type, dq.op_type, q.op_type, weight.op_type) == (
            "MatMul", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear")
        assert q.input[1] == dq.input[1] and q.input[2] == dq.input[2]
        assert inits[q.input[2]].dtype == ml_dtypes.float8_e4m3fn and float(inits[q.input[2]]) == 0.0
        assert inits[weight.input[0]].dtype == ml_dtypes.float8_e4m3fn and inits[weight.input[1]].shape == ()
        assert inits[q.input[1]] > 0
        for consumer in (n for n in model.graph.node if set(node.output) & set(n.input)):
            assert consumer.op_type not in ("QuantizeLinear", "DequantizeLinear")
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 8  # lm_head, embedding: float
    layers = json.loads((out / "lowbit.json").read_text())["quantization"]
    assert all(entry["activation"] == {"bits": 8, "type": "float", "dynamic": False, "symmetric": True,
                                       "strategy": "tensor", "element": "e4m3"} for entry in layers.values())
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert re.search(r"layers.1.mlp.down_proj\s+MatMul\s+8-bit per-tensor fp8_e4m3\s+qdq_fp8_e4m3\s+float16 compute"
                     r".*activations fp8 e4m3 static per-tensor scale \d", result.output), result.output
    assert "layers.1.mlp.down_proj.input_quantize" not in result.output


def test_schemes_listed_and_documented():
    names = set(scheme_names())
    assert {"e4m3_e4m3_f16", "e5m2_e5m2_f16", "e4m3_e4m3_f16_max_calibrate", "e5m2_e5m2_f16_max_calibrate"} <= names
    scheme = get_scheme("e5m2_e5m2_f16_max_calibrate")
    assert scheme.dtype == np.float16 and scheme.calibrated_name == "e5m2_e5m2_f16"
    assert not scheme.calibrates_at_conversion and get_scheme("e5m2_e5m2_f16").calibrates_at_conversion
    assert scheme.plan.lookup("lm_head") is None and scheme.plan.lookup("embed_tokens") is None
    docs = (REPO / "docs" / "schemes.md").read_text()
    assert "## FP8" in docs and "lowbit calibrate" in docs and "e5m2_e5m2_f16_max_calibrate" in docs
    assert "e4m3_e4m3_f16" in (REPO / "docs" / "performance.md").read_text()


def test_stories260k_runs(tmp_path):
    """The real sample model: one-shot e4m3 greedy text stays the float model's for the first tokens."""
    out = tmp_path / "e4m3"
    convert(SAMPLE_MODEL, out, "e4m3_e4m3_f16", num_samples=8)
    from lowbit.runtime.model import Model

    text = Model.load(out).generate("Once upon a time", max_new_tokens=12)
    assert text.strip()
