"""w8a8 / a8w8: int8 per-channel weights, activations quantized per tensor at run time (DynamicQuantizeMatMul).

Tiers: the stored weights equal a plain numpy int8 reference bit for bit; one emitted linear in ONNX Runtime
equals a numpy model of the graph's integer math (DynamicQuantizeLinear, integer GEMM, rescale) to float
rounding; whole tiny models stay close to the float model; listings, lowbit.json, inspect and bad options.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from lowbit.cli import main
from lowbit.converter.export import convert
from lowbit.converter.quant.formats import FORMATS, Site
from lowbit.converter.quant.plan import ActivationQuant, LayerQuant, QuantPlan, QuantRule
from lowbit.converter.quant.rewrite import quantize_model
from lowbit.converter.schemes import get_scheme, scheme_names
from lowbit.affine import WeightQuant, quantize
from lowbit.errors import LowbitError
from lowbit.runtime.session import create_session
from tests.conftest import REPO, SAMPLE_MODEL, build_tiny_model

torch = pytest.importorskip("torch")

DYNAMIC_INT8 = ActivationQuant(bits=8, type="int", dynamic=True, symmetric=False, strategy="tensor")


# ------------------------------------------------------------------------------ plain numpy references


def int8_reference(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output row (W is [N, K]): s = max|w| / 127 in float32 (1 for an all-zero row), q = round-half-even(w / s)."""
    w = np.asarray(w, np.float32)
    s = np.abs(w).max(axis=1) / np.float32(127)
    s = np.where(s == 0, np.float32(1), s).astype(np.float32)
    q = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
    return q, s


def dynamic_quantize_linear(x: np.ndarray):
    """ONNX DynamicQuantizeLinear in float32: uint8, scale = (max(0, xmax) - min(0, xmin)) / 255,
    zero point = saturate(round(-min / scale)), codes = saturate(round(x / scale) + zero point), half to even."""
    x = np.asarray(x, np.float32)
    lo, hi = np.minimum(x.min(), np.float32(0)), np.maximum(x.max(), np.float32(0))
    scale = np.float32((hi - lo) / np.float32(255))
    zero = np.float32(np.clip(np.rint(-lo / scale), 0, 255))
    codes = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
    return codes, scale, np.uint8(zero)


def fake_quant_linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The graph's math for y = x @ W.T: activations as DynamicQuantizeLinear, int8 weights, exact integer
    products, then the int32 sum times (activation scale * weight scale)."""
    codes, x_scale, x_zero = dynamic_quantize_linear(x)
    q, s = int8_reference(w)
    acc = (codes.astype(np.int64) - np.int64(x_zero)) @ q.astype(np.int64).T
    return acc.astype(np.float32) * (x_scale * s)


# ------------------------------------------------------------------------------ helpers


def single_linear_model(w: np.ndarray, kind: str, batch_shape=(2, 7)) -> ir.Model:
    """A one-node graph: MatMul(x, W.T) or Gemm(x, W, transB=1), named like a decoder linear."""
    n, k = w.shape
    rank_shape = list(batch_shape) if kind == "matmul" else [int(np.prod(batch_shape))]
    x = ir.Value(name="x", shape=ir.Shape([*rank_shape, k]), type=ir.TensorType(ir.DataType.FLOAT))
    stored = np.ascontiguousarray(w.T) if kind == "matmul" else w
    weight = ir.Value(name="w", shape=ir.Shape(stored.shape), type=ir.TensorType(ir.DataType.FLOAT),
                      const_value=ir.tensor(stored, name="w"))
    if kind == "matmul":
        node = ir.node("MatMul", [x, weight], name="layers.0.mlp.down_proj")
    else:
        node = ir.node("Gemm", [x, weight], {"transB": 1}, name="lm_head")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def w8a8_plan(lm_head: bool = False) -> QuantPlan:
    layer = LayerQuant(WeightQuant(8, None, "symmetric"), activation=DYNAMIC_INT8)
    return QuantPlan((QuantRule("lm_head", layer if lm_head else None), QuantRule("layers.*", layer)))


def run_single(model: ir.Model, path, x: np.ndarray) -> np.ndarray:
    ir.save(model, str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def weight_of(folder, name: str) -> np.ndarray:
    model = onnx.load(str(folder / "model.onnx"))  # a tiny model: all of its weights
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


# ------------------------------------------------------------------------------ bit-exact weights


def test_stored_weights_equal_int8_reference_bit_for_bit(rng):
    """The format's parts, from lowbit.affine's symmetric rule: uint8 codes q + 128 as [K, N], scales [N], zero
    points 128: q and s are the plain int8 reference's, on an odd shape with an all-zero row and exact ties."""
    n, k = 37, 100
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3] = 0
    w[5, :4] = [1.27, 0.005, 0.015, -0.025]  # s = 0.01: w / s = 0.5, 1.5, -2.5 round half to even
    w[5, 4:] = 0
    site = Site("matmul", "layers.0.mlp.down_proj", None, None, None, n=n, k=k)
    fmt = FORMATS["dynamic_quantize_matmul"]
    quant = WeightQuant(8, None, "symmetric")
    assert fmt.unsupported(quant, site) is None
    emission = fmt.emission(quant, site, np.dtype(np.float32), 0)
    packed = emission.pack(quantize(w, quant, np.float32))
    qweight, scales, zeros = (part.get(packed) for part in emission.parts)
    q, s = int8_reference(w)
    assert [p.shape for p in emission.parts] == [(k, n), (n,), (n,)]
    assert qweight.dtype == np.uint8 and scales.dtype == np.float32 and zeros.dtype == np.uint8
    np.testing.assert_array_equal(qweight, (q.astype(np.int16) + 128).astype(np.uint8).T)
    np.testing.assert_array_equal(scales, s)
    np.testing.assert_array_equal(zeros, np.full(n, 128, np.uint8))
    assert qweight.min() >= 1  # -127..127: the code 0 (-128) is never used


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_converted_folder_holds_the_reference_weights(arch_id, tmp_path):
    model = build_tiny_model(arch_id, tmp_path / "src")
    out = tmp_path / "w8a8"
    convert(str(tmp_path / "src"), out, scheme="w8a8")
    params = dict(model.named_parameters())
    for module, hf in [("layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj.weight"),
                       ("layers.0.attn.o_proj", "model.layers.0.self_attn.o_proj.weight")]:
        q, s = int8_reference(params[hf].detach().numpy())
        codes = (q.astype(np.int16) + 128).astype(np.uint8).T
        np.testing.assert_array_equal(weight_of(out, f"{module}.qweight"), codes)
        np.testing.assert_array_equal(weight_of(out, f"{module}.scales"), s)
        np.testing.assert_array_equal(weight_of(out, f"{module}.qzeros"), np.full(len(s), 128, np.uint8))


# ------------------------------------------------------------------------------ graph math vs numpy


def test_dynamic_quantize_linear_reference_is_ort_exactly(rng, tmp_path):
    """The numpy activation quantizer the other checks use is ORT's DynamicQuantizeLinear, bit for bit."""
    x_value = ir.Value(name="x", shape=ir.Shape([4, 9, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("DynamicQuantizeLinear", [x_value], num_outputs=3)
    for value, name in zip(node.outputs, ("q", "scale", "zero")):
        value.name = name
    graph = ir.Graph([x_value], node.outputs, nodes=[node], opset_imports={"": 21})
    ir.save(ir.Model(graph, ir_version=10), str(tmp_path / "dql.onnx"))
    session = ort.InferenceSession(str(tmp_path / "dql.onnx"), providers=["CPUExecutionProvider"])
    for shift in (0.0, 0.7, -0.9):  # zero point inside, at the bottom, at the top of the range
        x = (rng.standard_normal((4, 9, 64)) + shift * 4).astype(np.float32)
        codes, scale, zero = session.run(None, {"x": x})
        ref_codes, ref_scale, ref_zero = dynamic_quantize_linear(x)
        np.testing.assert_array_equal(codes, ref_codes)
        assert scale == ref_scale and zero == ref_zero


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["matmul", "gemm_t"])
def test_emitted_linear_equals_numpy_integer_math(arch_id, kind, rng, tmp_path):
    """One linear of the tiny model (down_proj; lm_head's tied table for Gemm) emitted by the rewrite pass and run
    in ORT equals fake_quant_linear to float rounding: 2e-6 of the output's scale, int32 sums rounded to float32."""
    model = build_tiny_model(arch_id, tmp_path / "src")
    params = dict(model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight" if kind == "matmul" else "model.embed_tokens.weight"
    w = params[name].detach().numpy().copy()
    graph_model = single_linear_model(w, kind)
    report = quantize_model(graph_model, w8a8_plan(lm_head=True), "ort", np.float32)
    assert [(r.format, r.activation) for r in report.layers] == [("dynamic_quantize_matmul", DYNAMIC_INT8)]
    assert [n.op_type for n in graph_model.graph] == ["DynamicQuantizeMatMul"]
    shape = (2, 7, w.shape[1]) if kind == "matmul" else (14, w.shape[1])
    for offset in (0.0, 0.5):
        x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
        y = run_single(graph_model, tmp_path / f"{kind}.onnx", x)
        expected = fake_quant_linear(x.reshape(-1, w.shape[1]), w).reshape(y.shape)
        assert np.abs(y - expected).max() <= 2e-6 * np.abs(expected).max()
        float_y = x @ w.T
        assert np.abs(y - float_y).max() > 1e-4 * np.abs(float_y).max()  # the activations really were quantized


def test_extreme_codes_do_not_saturate(tmp_path):
    """Activation codes 255 against weight codes +/-127 in every pair of K: exact (the int16 pair sums of ORT's
    AVX2 u8 x s8 kernel would saturate here; the stored uint8 weights take its exact u8 x u8 path)."""
    n, k = 16, 64
    w = np.where(np.add.outer(np.arange(n), np.arange(k)) % 3 == 0, -1.0, 1.0).astype(np.float32)
    w[:, :2] = 1.0
    graph_model = single_linear_model(w, "matmul", batch_shape=(1, 3))
    quantize_model(graph_model, w8a8_plan(), "ort", np.float32)
    x = np.full((1, 3, k), 2.0, np.float32)
    x[0, 0, 5] = -1e-3  # codes 255 nearly everywhere, zero point 0
    y = run_single(graph_model, tmp_path / "extreme.onnx", x)
    expected = fake_quant_linear(x.reshape(-1, k), w).reshape(y.shape)
    assert np.abs(y - expected).max() <= 2e-6 * np.abs(expected).max()


# ------------------------------------------------------------------------------ whole models


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_whole_model_stays_close_to_float(arch_id, rng, tmp_path):
    """Logits within 5% of the float model's scale, next-token argmax agreeing at >= 90% of 128 positions."""
    model = build_tiny_model(arch_id, tmp_path / "src")
    out = tmp_path / "w8a8"
    report = convert(str(tmp_path / "src"), out, scheme="w8a8")
    assert {r.module.split(".")[-1] for r in report.quant.layers} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                                        "down_proj"}
    ids = rng.integers(3, model.config.vocab_size, (4, 32))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits.numpy()
    session = create_session(out)
    logits, _ = session.forward(ids, np.ones_like(ids), np.arange(32)[None].repeat(4, 0), session.empty_past(4))
    scale = np.abs(expected).max()
    error = np.abs(logits - expected).max() / scale
    agreement = (logits.argmax(-1) == expected.argmax(-1)).mean()
    assert 1e-4 < error <= 5e-2, error
    assert agreement >= 0.9, agreement


# ------------------------------------------------------------------------------ listings, reports, options


def test_scheme_is_listed_and_documented():
    assert {"w8a8", "a8w8"} <= set(scheme_names())
    w8a8, a8w8 = get_scheme("w8a8"), get_scheme("a8w8")
    assert a8w8.plan == w8a8.plan and a8w8.name == "a8w8" and w8a8.dtype == np.float32
    layer = w8a8.plan.lookup("layers.3.mlp.gate_up_proj")
    assert layer.weight == WeightQuant(8, None, "symmetric") and layer.activation == DYNAMIC_INT8
    assert w8a8.plan.lookup("lm_head") is None and w8a8.plan.lookup("embed_tokens") is None
    docs = (REPO / "docs" / "schemes.md").read_text()
    assert "`w8a8`" in docs and "`a8w8`" in docs and "DynamicQuantizeMatMul" in docs
    assert "w8a8" in (REPO / "docs" / "performance.md").read_text()


def test_lowbit_json_and_inspect_show_int8_activations(tmp_path):
    out = tmp_path / "a8w8"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), "--scheme", "a8w8"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["scheme"] == "a8w8"
    layers = meta["quantization"]
    assert "lm_head" not in layers and "embed_tokens" not in layers and len(layers) == 5 * 4
    assert all(entry["activation"] == {"bits": 8, "type": "int", "dynamic": True, "symmetric": False,
                                       "strategy": "tensor"} for entry in layers.values())
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0
    assert re.search(r"layers.4.mlp.down_proj\s+com.microsoft.DynamicQuantizeMatMul\s+8-bit per-channel symmetric\s+"
                     r"dynamic_quantize_matmul\s+int8 compute", result.output), result.output
    weight_only = tmp_path / "a16w8"
    convert(str(SAMPLE_MODEL), weight_only, scheme="a16w8")
    weight_only_layers = json.loads((weight_only / "lowbit.json").read_text())["quantization"]
    assert all(entry["activation"] is None for entry in weight_only_layers.values())


def test_bad_options_and_targets(tmp_path):
    out = tmp_path / "out"
    for args, message in [(["--scheme", "w8a8", "--group-size", "64"], "fixes its own group-size"),
                          (["--scheme", "w8a8", "--dtype", "float16"], "fixes its own dtype"),
                          (["--scheme", "a8w8", "--accuracy-level", "4"], "fixes its own accuracy-level"),
                          (["--scheme", "w8a8", "--target", "tensorrt"], "dynamic_quantize_matmul: not for target")]:
        result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert not out.exists()


def test_activation_setting_picks_the_format_and_errors_name_it():
    site = Site("matmul", "layers.0.attn.o_proj", None, None, None, n=64, k=64)
    from lowbit.converter.quant.rewrite import choose_format

    weight = WeightQuant(8, None, "symmetric")
    assert choose_format(LayerQuant(weight), site, "ort").name == "matmulnbits"
    assert choose_format(LayerQuant(weight, activation=DYNAMIC_INT8), site, "ort").name == "dynamic_quantize_matmul"
    per_token = LayerQuant(weight, activation=ActivationQuant(strategy="token"))
    with pytest.raises(LowbitError, match="int8 dynamic asymmetric per-token activations.*"
                                          "dynamic_quantize_matmul: int8 dynamic asymmetric per-tensor activations"):
        choose_format(per_token, site, "ort")
    with pytest.raises(LowbitError, match="DynamicQuantizeMatMul takes per-channel weights"):
        choose_format(LayerQuant(WeightQuant(8, 32, "symmetric"), activation=DYNAMIC_INT8), site, "ort")
    with pytest.raises(ValueError, match="strategy"):
        ActivationQuant(strategy="channel")
