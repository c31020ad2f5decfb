"""NVFP4 weights (lowbit.nvfp4, custom_ops/nvfp4.py, the `nvfp4_unpack` and `dq_nvfp4` formats, recipes' NVFP4A16).

Tiers: the quantizer equals compressed-tensors' own functions bit for bit (global scale, FP8 block scales, codes,
packed bytes, dequantized values) on fresh random weights with values at the e2m1 rounding boundaries, zero and
tiny blocks; the packing is compressed-tensors' and ONNX's FLOAT4E2M1 byte order; the ORT graph's weight equals the
numpy reference bit for bit (run in onnxruntime) and ORT folds it at load; the TensorRT graph passes onnx.checker,
has ModelOpt's 2-level DQ layout and equals its numpy reference in onnx's reference evaluator; whole tiny models
converted with sample (b) equal transformers with the numpy-dequantized weights; stories260K converts and runs.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit import nvfp4
from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.converter.api import convert
from lowbit.converter.recipes import load_recipe, parse_recipe, resolve_recipe
from lowbit.custom_ops import nvfp4 as nvfp4_ops
from lowbit.errors import LowbitError
from tests.conftest import REPO, STORIES, build_tiny_model, near_rounding_boundary
from tests.test_fp8 import (CALIBRATION_TEXT, float8_rounding, fused_hf_names, ml_dtypes_fp8, onnx_logits,
                            write_char_tokenizer)

torch = pytest.importorskip("torch")
ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam  # noqa: E402

SAMPLE_B = REPO / "samples" / "recipes" / "b_nvfp4_fp8_down.yaml"
NVFP4A16 = "QuantizationModifier: {scheme: NVFP4A16, targets: [Linear], ignore: [lm_head]}\n"
ARGS = PRESET_SCHEMES["NVFP4A16"]["weights"]
BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)  # e2m1 rounding boundaries (ties)


def compressed_tensors_nvfp4(weight: np.ndarray):
    """(global scale, FP8 scales as uint8 bits, packed codes, float32 dequantized) by compressed-tensors' own
    functions, in llm-compressor's order: the global scale from the whole weight, block scales with it, quantize,
    pack, dequantize."""
    w = torch.from_numpy(weight)
    gs = generate_gparam(w.min(), w.max())
    scale, zero_point = compute_dynamic_scales_and_zp(w, ARGS, module=None, global_scale=gs)
    q = ct_forward.quantize(w, scale, zero_point, ARGS, global_scale=gs)
    values = ct_forward.dequantize(q, scale, args=ARGS, global_scale=gs, dtype=torch.float32)
    packed = pack_fp4_to_uint8(q)
    compressed = NVFP4PackedCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_global_scale": gs}, QuantizationScheme(targets=["Linear"],
                                                                                          weights=ARGS))
    assert torch.equal(compressed["weight_packed"], packed)  # the compressor's own path gives the same bytes
    fp8_bits = compressed["weight_scale"].view(torch.uint8).numpy()
    return np.float32(gs.item()), fp8_bits, packed.numpy(), values.numpy()


def hard_weight(rng, n=48, k=128) -> np.ndarray:
    """Random rows at random magnitudes, with a zero block, a block of tiny values (its FP8 scale rounds to 0),
    negative values that round to zero (code 8, -0.0), and in other blocks values exactly at, and one float32 step
    either side of, every e2m1 rounding boundary times the block's step (the block maximum left in place)."""
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 4, (n, 1))).astype(np.float32)
    w[0, 16:32] = 0
    w[1, :16] = rng.standard_normal(16).astype(np.float32) * np.float32(1e-30)
    first = nvfp4.quantize(w)
    step = first.scales.astype(np.float32) / first.global_scale  # [N, G]
    for row in range(2, n):
        for block in rng.choice(k // 16, size=2, replace=False):
            cols = slice(16 * block, 16 * block + 16)
            keep = int(np.abs(w[row, cols]).argmax())
            ties = np.concatenate([BOUNDS, np.nextafter(BOUNDS, 0), np.nextafter(BOUNDS, 10)])
            values = rng.choice(ties, 16) * rng.choice([-1, 1], 16).astype(np.float32) * step[row, block]
            values[keep] = w[row, 16 * block + keep]
            w[row, cols] = values.astype(np.float32)
    keep = 32 + int(np.abs(w[2, 32:48]).argmax())
    cols = [c for c in range(32, 48) if c != keep][:4]
    w[2, cols] = -step[2, 2] * np.array([0.1, 0.2, 0.25, 0.01], np.float32)  # round to -0: code 8
    return w


def test_quantizer_equals_compressed_tensors(rng):
    for n, k in ((48, 128), (16, 64), (33, 256)):
        w = hard_weight(rng, n, k)
        gs, fp8_bits, packed, values = compressed_tensors_nvfp4(w)
        ours = nvfp4.quantize(w)
        assert ours.global_scale == gs and ours.global_scale.dtype == np.float32
        np.testing.assert_array_equal(ours.scales.view(np.uint8), fp8_bits)
        np.testing.assert_array_equal(nvfp4.pack(ours.codes), packed)
        reference = nvfp4.dequantize(ours.codes, ours.scales, ours.global_scale)
        np.testing.assert_array_equal(reference.view(np.uint32), values.view(np.uint32))
        assert ours.scales[0, 1].astype(np.float32) == 0.125 and (ours.codes[0, 16:32] == 0).all()  # zero block
        assert ours.scales[1, 0].astype(np.float32) == 0.125  # tiny block: scale 0 -> compressed-tensors' eps
        assert (ours.codes[2, 32:48] == 8).sum() >= 4
        qw = quantize(w, WeightQuant(4, 16, "nvfp4"))  # lowbit.affine's entry point: the same arrays
        np.testing.assert_array_equal(qw.codes, ours.codes)
        np.testing.assert_array_equal(dequantize(qw).view(np.uint32), values.view(np.uint32))
    assert nvfp4.quantize(np.zeros((2, 16), np.float32)).global_scale == 1.0  # compressed-tensors' nan_to_num


def test_k_not_divisible_by_16_is_zero_padded(rng):
    """K = 40: the same codes and scales as compressed-tensors on the weight zero-padded to 48 (zeros change no
    maximum), the dequantized weight cut back to 40 columns."""
    w = hard_weight(rng, 16, 48)[:, :40]
    gs, fp8_bits, packed, values = compressed_tensors_nvfp4(np.pad(w, ((0, 0), (0, 8))))
    qw = quantize(w, WeightQuant(4, 16, "nvfp4"))
    assert qw.codes.shape == (16, 48) and qw.global_scale == gs
    np.testing.assert_array_equal(qw.scales.view(np.uint8), fp8_bits)
    np.testing.assert_array_equal(nvfp4.pack(qw.codes), packed)
    np.testing.assert_array_equal(dequantize(qw), values[:, :40])


def test_packing_order_is_compressed_tensors_and_onnx_float4(rng):
    codes = rng.integers(0, 16, (5, 32)).astype(np.uint8)
    packed = nvfp4.pack(codes)
    expected = pack_fp4_to_uint8(torch.from_numpy(nvfp4.E2M1[codes]))  # code 8 is -0.0: the sign bit survives
    np.testing.assert_array_equal(packed, expected.numpy())
    np.testing.assert_array_equal(nvfp4.unpack(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)
    proto = ir.serde.serialize_tensor(ir.tensor(codes.view(ml_dtypes.float4_e2m1fn), name="w"))
    assert proto.data_type == onnx.TensorProto.FLOAT4E2M1 and proto.raw_data == packed.tobytes()
    np.testing.assert_array_equal(codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32), nvfp4.E2M1[codes])


def _weight_model(build, initializers: dict[str, np.ndarray], opset: int, dtype, shape) -> onnx.ModelProto:
    values = {name: ir.Value(name=name, shape=ir.Shape(a.shape), type=ir.TensorType(ir.tensor(a).dtype),
                             const_value=ir.tensor(a, name=name)) for name, a in initializers.items()}
    graph = ir.Graph([], [], nodes=[], opset_imports={"": opset}, name="nvfp4")
    for value in values.values():
        graph.register_initializer(value)
    tape = ir.tape.Tape(graph)
    out = build(tape, *values.values())
    out.name = "W"
    out.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
    out.shape = ir.Shape(shape)
    graph.outputs.append(out)
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10))


@pytest.mark.parametrize("k, dtype", [(64, np.float32), (40, np.float32), (48, np.float16)])
def test_ort_form_equals_the_numpy_reference(k, dtype, rng, tmp_path):
    """The `ort` subgraph (BitwiseAnd/BitShift, Gather, Cast, Div, Mul) run in onnxruntime gives the numpy reference
    weight bit for bit, which is compressed-tensors' dequantization; ORT folds the whole subgraph at load."""
    w = hard_weight(rng, 24, -(-k // 16) * 16)[:, :k]
    arrays = nvfp4_ops.pack(quantize(w, WeightQuant(4, 16, "nvfp4")))
    model = _weight_model(
        lambda tape, p, s, g: nvfp4_ops.dequantized_unpacked(tape, p, s, g, 24, k, dtype, "w"),
        {"packed": arrays.packed, "scales": arrays.scales, "gs": np.asarray(arrays.global_scale, np.float32)}, 21,
        dtype, (24, k))
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {})[0]
    expected = nvfp4_ops.reference_weight(arrays).astype(dtype)
    assert got.dtype == dtype and got.shape == (24, k)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(nvfp4_ops.reference_weight(arrays), compressed_tensors_nvfp4(
        np.pad(w, ((0, 0), (0, arrays.codes().shape[1] - k))))[3][:, :k])
    folded = onnx.load(str(tmp_path / "optimized.onnx"))
    assert not [n.op_type for n in folded.graph.node if n.op_type in ("BitShift", "Gather", "Mul")]


def test_tensorrt_form_layout_and_reference(rng):
    """The `tensorrt` subgraph: DequantizeLinear(FLOAT4E2M1 [N, K], DequantizeLinear(FLOAT8E4M3FN [N, K/16], float32
    1/gs), axis 1, block_size 16) at opset 23, valid for onnx.checker; onnx's reference evaluator gives
    e2m1 · (s · (1/gs)) bit for bit, within a unit in the last place of compressed-tensors' e2m1 · (s / gs)."""
    w = hard_weight(rng, 32, 64)
    arrays = nvfp4_ops.pack(quantize(w, WeightQuant(4, 16, "nvfp4")))
    inverse = np.asarray(nvfp4.inverse_global_scale(arrays.global_scale), np.float32)
    model = _weight_model(lambda tape, w4, s, inv: nvfp4_ops.dequantized_two_level(tape, w4, s, inv, np.float32, "w"),
                          {"w4": arrays.float4(), "scales": arrays.scales, "inverse": inverse},
                          nvfp4_ops.TWO_LEVEL_OPSET, np.float32, (32, 64))
    onnx.checker.check_model(model, full_check=True)
    inner, outer = model.graph.node
    assert (inner.op_type, outer.op_type) == ("DequantizeLinear", "DequantizeLinear")
    assert list(inner.input) == ["scales", "inverse"] and not inner.attribute  # per tensor: no axis
    assert outer.input[0] == "w4" and outer.input[1] == inner.output[0]
    assert {a.name: a.i for a in outer.attribute} == {"axis": 1, "block_size": 16}
    tensors = {t.name: t for t in model.graph.initializer}
    assert tensors["w4"].data_type == onnx.TensorProto.FLOAT4E2M1 and list(tensors["w4"].dims) == [32, 64]
    assert tensors["w4"].raw_data == arrays.packed.tobytes()
    assert tensors["scales"].data_type == onnx.TensorProto.FLOAT8E4M3FN and list(tensors["scales"].dims) == [32, 4]
    assert tensors["inverse"].data_type == onnx.TensorProto.FLOAT and list(tensors["inverse"].dims) == []
    from onnx.reference import ReferenceEvaluator

    got = ReferenceEvaluator(model).run(None, {})[0]
    np.testing.assert_array_equal(got, nvfp4_ops.reference_weight_two_level(arrays))
    np.testing.assert_allclose(got, nvfp4_ops.reference_weight(arrays), rtol=2.0 ** -22, atol=0)


# ------------------------------------------------------------------------------ recipes


def test_presets_and_config_groups_resolve_to_nvfp4():
    from tests.test_recipes import BIG

    explicit = ("QuantizationModifier: {ignore: [lm_head], config_groups: {g: {targets: [Linear], weights: "
                "{num_bits: 4, type: float, strategy: tensor_group, group_size: 16, symmetric: true}}}}\n")
    for text in (NVFP4A16, explicit):
        res = resolve_recipe(parse_recipe(text), BIG, target="ort")
        quant = res.modules["layers.0.mlp.down_proj"].quant
        assert quant.weight == WeightQuant(4, 16, "nvfp4") and quant.activation is None
        assert res.modules["lm_head"].quant is None


@pytest.mark.parametrize("text, message", [
    ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 4, type: float, strategy: "
     "tensor_group, group_size: 16}, input_activations: {num_bits: 4, type: float, strategy: tensor_group, "
     "group_size: 16, dynamic: true}}}}", "NVFP4 activations with dynamic: True are not supported"),
    ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 4, type: float, strategy: "
     "tensor_group, group_size: 32}}}}", "NVFP4 weights take group_size 16"),
    ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 4, type: float, strategy: "
     "group, group_size: 16}}}}", "weights are not supported yet"),
])
def test_what_nvfp4_cannot_do_is_rejected_by_name(text, message):
    assert_rejected(text, message)


def assert_rejected(text: str, message: str) -> None:
    """Resolving the recipe `text` on a Llama-shaped module list fails with one line holding `message`."""
    from tests.test_recipes import BIG

    with pytest.raises(LowbitError) as info:
        resolve_recipe(parse_recipe(text), BIG)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_tensorrt_limits_are_errors():
    from tests.test_recipes import llama

    with pytest.raises(LowbitError, match="TensorRT's FP4 blocks need K divisible by 16, not K = 172"):
        resolve_recipe(parse_recipe(NVFP4A16.replace("]}", "], bypass_divisibility_checks: true}")), llama(),
                       target="tensorrt")
    # beside static activation scales it resolves: calibration runs the FLOAT4E2M1 bytes in ORT by standard ops
    resolved = resolve_recipe(load_recipe(SAMPLE_B), llama(), target="tensorrt")
    assert resolved.plan.static_activations()


# ------------------------------------------------------------------------------ whole models


def nvfp4_reference_weight(model, module: str) -> np.ndarray:
    """Our (fused) module's weight [N, K] from the transformers model, NVFP4 round trip by the numpy reference."""
    modules = dict(model.named_modules())
    weight = np.concatenate([modules[n].weight.detach().numpy() for n in fused_hf_names(model, module)])
    return dequantize(quantize(weight, WeightQuant(4, 16, "nvfp4")))


def set_weight(model, module: str, weight: np.ndarray, hook=None) -> None:
    modules, start = dict(model.named_modules()), 0
    for name in fused_hf_names(model, module):
        linear = modules[name]
        rows = linear.weight.shape[0]
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight[start:start + rows]))
        if hook is not None:
            linear.register_forward_pre_hook(hook)
        start += rows


def assert_folder_holds_our_packing(model, folder, modules) -> None:
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
    by_name = dict(model.named_modules())
    for module in modules:
        weight = np.concatenate([by_name[n].weight.detach().numpy() for n in fused_hf_names(model, module)])
        arrays = nvfp4_ops.pack(quantize(weight, WeightQuant(4, 16, "nvfp4")))
        np.testing.assert_array_equal(tensors[f"{module}.qweight"], arrays.packed)
        np.testing.assert_array_equal(tensors[f"{module}.scales"].view(np.uint8), arrays.scales.view(np.uint8))
        assert tensors[f"{module}.global_scale"] == arrays.global_scale


def test_sample_b_on_tiny_llama_equals_transformers(rng, tmp_path):
    """Sample (b) on the ort target: NVFP4 attention and gate/up (`nvfp4_unpack`), FP8 down_proj with static FP8
    activations. Reference: transformers with each NVFP4 linear's weight the numpy round trip of its own weight, each
    down_proj's weight the folder's float8 values times its scale and its input fake-quantized with the folder's
    activation scale. Logits agree to 1e-4 of their scale (the recipe tests' bound) at every token before the first
    whose down_proj input lay near a float8 rounding boundary (tests/test_fp8.py's reason)."""
    model = build_tiny_model("llama", tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    (tmp_path / "calib.txt").write_text(CALIBRATION_TEXT)
    out = tmp_path / "b"
    report = convert(tmp_path / "src", out, recipe=SAMPLE_B, calib_data=tmp_path / "calib.txt", num_samples=4,
                     seq_len=32, accuracy_level=0)  # float activations: the recipe's numerics exactly
    formats = {r.module: r.format for r in report.quant.layers}
    nvfp4_modules = [m for m, f in formats.items() if f == "nvfp4_unpack"]
    assert len(nvfp4_modules) == 6 and {f for m, f in formats.items() if "down_proj" in m} == {"qdq_fp8_e4m3"}
    for r in report.quant.layers:
        if r.format == "nvfp4_unpack":
            assert r.quant == "4-bit g16 nvfp4" and r.quant_bytes == r.n * r.k // 2 + r.n * r.k // 16 + 4
    assert_folder_holds_our_packing(model, out, nvfp4_modules)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "mixed-precision" and config["ignore"] == ["lm_head"]
    groups = {g.weights.num_bits: g for g in parsed.config_groups.values()}
    nv = groups[4]
    assert (nv.weights.type, nv.weights.strategy, nv.weights.group_size, nv.format) == \
        ("float", "tensor_group", 16, "nvfp4-pack-quantized")
    assert nv.weights.symmetric and nv.input_activations is None and groups[8].format == "float-quantized"

    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    reference = build_tiny_model("llama", tmp_path / "ref-src")
    near_tie = {}

    def fp8_hook(x_scale):
        def hook(_linear, args):
            scaled = args[0].numpy() / x_scale
            near_tie["mask"] |= near_rounding_boundary(scaled, float8_rounding("e4m3"))
            return (torch.from_numpy(ml_dtypes_fp8(scaled, "e4m3").astype(np.float32) * x_scale),)
        return hook

    for module, fmt in formats.items():
        if fmt == "nvfp4_unpack":
            set_weight(reference, module, nvfp4_reference_weight(reference, module))
        else:
            codes, scale = tensors[f"{module}.qweight"], np.float32(tensors[f"{module}.scales"])
            set_weight(reference, module, (codes.astype(np.float32) * scale).T,
                       fp8_hook(np.float32(tensors[f"{module}.input_scale"])))
    assert_matches_up_to_ties(model, reference, out, near_tie, rng)


def test_nvfp4a16_weight_only_on_both_targets(rng, tmp_path):
    """NVFP4A16 on every linear but lm_head: on ort the logits equal transformers with the numpy-dequantized
    weights at every token (1e-4 of their scale); on tensorrt every linear is the 2-level DQ (opset 23, valid for
    onnx.checker) over the same bytes."""
    model = build_tiny_model("llama", tmp_path / "src")
    recipe = tmp_path / "nvfp4a16.yaml"
    recipe.write_text(NVFP4A16)
    convert(tmp_path / "src", tmp_path / "ort", recipe=recipe, accuracy_level=0)  # float activations, exactly
    reference = build_tiny_model("llama", tmp_path / "ref-src")
    modules = list(json.loads((tmp_path / "ort" / "lowbit.json").read_text())["quantization"])
    assert len(modules) == 8
    assert_folder_holds_our_packing(model, tmp_path / "ort", modules)
    for module in modules:
        set_weight(reference, module, nvfp4_reference_weight(reference, module))
    ids = rng.integers(3, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids)).logits.numpy()
    got = onnx_logits(tmp_path / "ort", ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    report = convert(tmp_path / "src", tmp_path / "trt", recipe=recipe, target="tensorrt")
    assert {r.format for r in report.quant.layers} == {"dq_nvfp4"}
    onnx_model = onnx.load(str(tmp_path / "trt" / "model.onnx"))
    onnx.checker.check_model(onnx_model, full_check=True)
    assert {o.domain: o.version for o in onnx_model.opset_import}[""] == nvfp4_ops.TWO_LEVEL_OPSET
    tensors = {t.name: t for t in onnx_model.graph.initializer}
    ort_model = onnx.load(str(tmp_path / "ort" / "model.onnx"))
    ort_tensors = {t.name: numpy_helper.to_array(t) for t in ort_model.graph.initializer}
    producers = {o: n for n in onnx_model.graph.node for o in n.output}
    for module in modules:
        matmul = next(n for n in onnx_model.graph.node if n.name == module)
        transpose = producers[matmul.input[1]]
        outer = producers[transpose.input[0]]
        inner = producers[outer.input[1]]
        assert (transpose.op_type, outer.op_type, inner.op_type) == ("Transpose", "DequantizeLinear",
                                                                     "DequantizeLinear")
        assert outer.input[0] == f"{module}.qweight" and list(inner.input) == [f"{module}.scales",
                                                                               f"{module}.global_scale_inverse"]
        assert tensors[f"{module}.qweight"].data_type == onnx.TensorProto.FLOAT4E2M1
        assert tensors[f"{module}.qweight"].raw_data == ort_tensors[f"{module}.qweight"].tobytes()


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared (stories260K) is absent")
def test_stories260k_sample_b_converts_and_runs(tmp_path):
    from lowbit.runtime.model import Model

    out = tmp_path / "b"
    report = convert(STORIES, out, recipe=SAMPLE_B, num_samples=4, seq_len=64)
    assert {r.format for r in report.quant.layers} == {"nvfp4_unpack", "qdq_fp8_e4m3"}
    text = Model.load(out).generate("Once upon a time", max_new_tokens=12)
    assert text.strip()


def assert_matches_up_to_ties(model, reference, out, near_tie: dict, rng) -> None:
    """The folder's ORT logits equal the fake-quant `reference` model's within 1e-4 of their scale at every token
    before the first one whose activations sit near a rounding tie (`near_tie["mask"]`, filled by the reference's
    hooks; at least 20% of tokens remain), and differ from the float model's (the quantization is there)."""
    ids = rng.integers(3, model.config.vocab_size, (12, 8))  # many short rows: each stops at its first near-tie
    near_tie["mask"] = np.zeros(ids.shape, bool)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids)).logits.numpy()
        float_logits = model(input_ids=torch.tensor(ids)).logits.numpy()
    got = onnx_logits(out, ids)
    scale = np.abs(expected).max()
    exact = np.cumsum(near_tie["mask"], axis=1) == 0
    assert exact.mean() >= 0.2, exact.mean()
    assert (np.abs(got - expected) / scale)[exact].max() <= 1e-4
    assert np.abs(float_logits - expected).mean() / scale > 1e-3  # the quantization is really there
