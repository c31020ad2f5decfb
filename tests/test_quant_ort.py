"""Each storage format, emitted by the rewrite pass, runs in ONNX Runtime and matches its numpy
reference kernel (and X @ dequantize(W).T) to float rounding."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lowbit.errors import LowbitError
from lowbit.converter.graph import GraphBuilder, lazy_tensor
from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.converter.quant.plan import LayerQuant, QuantPlan, QuantRule
from lowbit.converter.quant.rewrite import quantize_model
from lowbit.custom_ops import blockwise, gather_block_quantized, matmul_nbits

MODULE = "layers.0.mlp.down_proj"


def single_site_model(kind: str, weight: np.ndarray, dtype, x_shape):
    """`matmul`: Y = X @ W  (W given [N, K], stored [K, N]); `gemm_t`: Gemm(X, W, transB); `gather`: W[ids]."""
    b = GraphBuilder("t", {"": 21})
    if kind == "gather":
        x = b.input("x", ir.DataType.INT64, list(x_shape))
    else:
        x = b.input("x", ir.DataType.FLOAT if dtype == np.float32 else ir.DataType.FLOAT16, list(x_shape))
    stored = weight.T if kind == "matmul" else weight
    w = b.initializer(lazy_tensor("w", dtype, stored.shape, lambda: stored))
    if kind == "matmul":
        y = b.op("MatMul", x, w, node_name=MODULE)
    elif kind == "gemm_t":
        y = b.op("Gemm", x, w, transB=1, node_name=MODULE)
    else:
        y = b.op("Gather", w, x, axis=0, node_name=MODULE)
    y.name = "y"
    b.graph.outputs.append(y)
    return ir.Model(b.graph, ir_version=10)


def run_quantized(tmp_path, kind, weight, quant: LayerQuant, dtype, x, target="ort", pad=True):
    model = single_site_model(kind, weight, dtype, x.shape)
    report = quantize_model(model, QuantPlan((QuantRule("layers.*", quant),), pad), target, dtype)
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.onnx.data")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(quant.accuracy_level))
    out = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return out, report, model


def assert_close(actual, expected, rel):
    err = np.abs(actual.astype(np.float32) - expected.astype(np.float32)).max() / np.abs(expected).max()
    assert err <= rel, err


FORMAT_CASES = [
    # format, bits, group, rule
    ("matmulnbits", 4, 32, "symmetric"),
    ("matmulnbits", 4, 16, "asymmetric"),
    ("matmulnbits", 2, 32, "asymmetric"),
    ("matmulnbits", 8, 64, "asymmetric"),
    ("matmulnbits", 8, 128, "symmetric"),
    ("matmulnbits", 8, None, "asymmetric"),
    ("matmulnbits", 4, None, "symmetric"),
    ("matmulnbits", 4, None, "asymmetric"),
    ("matmulnbits", 4, 32, "symmetric_full"),
    ("dq", 4, 32, "symmetric_full"),
    ("dq", 4, 32, "symmetric"),
    ("dq", 4, 64, "asymmetric"),
    ("dq", 8, None, "asymmetric"),
    ("dq", 4, None, "asymmetric"),
    ("dq", 8, None, "symmetric"),
    ("blockwise", 3, 40, "symmetric"),
    ("blockwise", 8, None, "minmax_float_zp"),
    ("blockwise", 5, 24, "asymmetric"),
]


@pytest.mark.parametrize("fmt,bits,group,rule", FORMAT_CASES)
@pytest.mark.parametrize("kind", ["matmul", "gemm_t"])
def test_matmul_formats_match_reference(fmt, bits, group, rule, kind, tmp_path, rng):
    n, k = 48, 200  # K a multiple of no group: padded
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    quant = WeightQuant(bits, group, rule)
    out, report, model = run_quantized(tmp_path, kind, w, LayerQuant(quant, fmt), np.float32, x)
    assert report.layers[0].format == fmt
    qw = quantize(w, quant)
    assert_close(out, x @ dequantize(qw).T, 1e-5)
    assert not any(n.op_type in ("MatMul", "Gemm") and n.inputs[1].const_value is not None
                   and n.inputs[1].const_value.dtype == ir.DataType.FLOAT for n in model.graph)
    if fmt == "matmulnbits":
        block, _ = matmul_nbits.block_layout(group, k)
        assert_close(out, matmul_nbits.reference(x, matmul_nbits.pack(qw, quant.centered, block)), 1e-5)
    if fmt == "blockwise":
        assert_close(out, blockwise.reference_matmul(x, blockwise.pack(qw)), 1e-5)
    assert report.layers[0].max_rel_error > 0


def test_float16_matmul_nbits_and_blockwise(tmp_path, rng):
    w = rng.standard_normal((32, 128)).astype(np.float32)
    x = rng.standard_normal((2, 128)).astype(np.float16)
    for fmt, quant in [("matmulnbits", WeightQuant(4, 32)), ("blockwise", WeightQuant(3, 40))]:
        out, _, _ = run_quantized(tmp_path, "matmul", w, LayerQuant(quant, fmt), np.float16, x)
        assert out.dtype == np.float16
        w16 = w.astype(np.float16).astype(np.float32)  # the graph holds W in float16 before quantizing it
        assert_close(out, x.astype(np.float32) @ dequantize(quantize(w16, quant, np.float16)).T, 2e-3)


@pytest.mark.parametrize("fmt,bits,group,rule", [
    ("gather_block_quantized", 4, 32, "symmetric"),
    ("gather_block_quantized", 8, 16, "asymmetric"),
    ("blockwise", 3, 40, "symmetric"),
    ("blockwise", 8, None, "minmax_float_zp"),
])
def test_gather_formats_match_reference(fmt, bits, group, rule, tmp_path, rng):
    v, k = 50, 64
    w = rng.standard_normal((v, k)).astype(np.float32)
    ids = rng.integers(0, v, (2, 7)).astype(np.int64)
    quant = WeightQuant(bits, group, rule)
    out, report, model = run_quantized(tmp_path, "gather", w, LayerQuant(quant, fmt), np.float32, ids)
    qw = quantize(w, quant)
    assert np.array_equal(out, dequantize(qw)[ids])
    if fmt == "gather_block_quantized":
        assert np.array_equal(out, gather_block_quantized.reference(ids, gather_block_quantized.pack(qw)))
    else:
        centered = quant.centered
        assert np.array_equal(out, blockwise.reference_gather(ids, blockwise.pack(qw, centered)))
        zeros = next(v for v in model.graph.initializers.values() if v.name.endswith("qzeros"))
        assert zeros.shape == ((1, 1) if centered else (v, k // (group or k)))  # centred rules: one zero point


def test_auto_format_choice(tmp_path, rng):
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    expected = {WeightQuant(4, 32): "matmulnbits", WeightQuant(8, None, "asymmetric"): "matmulnbits",
                WeightQuant(3, 40): "blockwise", WeightQuant(8, None, "minmax_float_zp"): "blockwise"}
    for quant, fmt in expected.items():
        _, report, _ = run_quantized(tmp_path, "matmul", w, LayerQuant(quant), np.float32, x)
        assert report.layers[0].format == fmt


def test_tensorrt_target_writes_int4_blocked_dq(tmp_path, rng):
    w = rng.standard_normal((16, 256)).astype(np.float32)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    out, report, model = run_quantized(tmp_path, "matmul", w, LayerQuant(WeightQuant(4, 128)), np.float32, x,
                                       target="tensorrt")
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT4 and len(dq.inputs) == 2
    assert dq.attributes.get_int("block_size") == 128 and dq.attributes.get_int("axis") == 0
    assert not any(n.domain for n in model.graph)
    assert_close(out, x @ dequantize(quantize(w, WeightQuant(4, 128))).T, 1e-5)
    with pytest.raises(LowbitError, match="layers.0.mlp.down_proj: cannot store 3-bit"):
        run_quantized(tmp_path, "matmul", w, LayerQuant(WeightQuant(3, 40)), np.float32, x, target="tensorrt")


def test_padding_disabled_names_the_layer(tmp_path, rng):
    w = rng.standard_normal((16, 100)).astype(np.float32)
    x = rng.standard_normal((1, 100)).astype(np.float32)
    with pytest.raises(LowbitError, match=r"layers.0.mlp.down_proj: K=100 is not a multiple of the group size 32"):
        run_quantized(tmp_path, "matmul", w, LayerQuant(WeightQuant(4, 32)), np.float32, x, pad=False)
