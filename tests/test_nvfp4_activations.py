"""NVFP4 input activations (W4A4, llm-compressor's `NVFP4` preset): lowbit.nvfp4.fake_quantize_activations, the
`nvfp4_a4_unpack` (ort) and `dq_nvfp4_a4` (tensorrt) formats, calibration of the global input scale, recipes, and
the compressed-tensors checkpoint's `input_global_scale`.

Tiers: the numpy fake-quant equals compressed-tensors' own `forward_quantize` (dynamic local tensor_group) bit for
bit on fresh random activations with values at every e2m1 rounding boundary, zero and tiny blocks; the ORT function
lowbit.NVFP4ActivationQDQ equals the numpy reference bit for bit in onnxruntime; the TensorRT layout
(TRT_FP4DynamicQuantize → two DequantizeLinear) passes onnx.checker with its schema registered and its numpy kernel
is compared with the ORT form; a tiny Llama converted with the NVFP4 preset (ort) equals transformers with the numpy
weights and the folder's calibrated global scales fake-quantizing each linear's input; stories260K converts and
generates; the compressed-tensors checkpoint carries the graph's input global scales.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lowbit import nvfp4
from lowbit.converter.api import convert
from lowbit.converter.calibrate_folder import bypass_activation_qdq, calibrate_folder, static_sites
from lowbit.converter.calibration.data import CalibrationSettings
from lowbit.converter.quant.plan import NVFP4_ACTIVATIONS
from lowbit.converter.recipes import parse_recipe, resolve_recipe
from lowbit.custom_ops import nvfp4 as nvfp4_ops
from lowbit.errors import LowbitError
from tests.conftest import STORIES, build_tiny_model
from tests.test_fp8 import CALIBRATION_TEXT, write_char_tokenizer

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import forward_quantize  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.utils import generate_gparam  # noqa: E402

from tests.test_nvfp4 import (assert_matches_up_to_ties, assert_rejected, nvfp4_reference_weight,  # noqa: E402
                               set_weight)

ARGS = PRESET_SCHEMES["NVFP4"]["input_activations"]
BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)  # e2m1 rounding boundaries (ties)
NVFP4 = "QuantizationModifier: {scheme: NVFP4, targets: [Linear], ignore: [lm_head]}\n"


def compressed_tensors_fake_quantize(x: np.ndarray, gs) -> np.ndarray:
    """compressed-tensors' forward pass on a module's input: dynamic local tensor_group args, the module's
    input_global_scale."""
    module = torch.nn.Module()
    module.input_global_scale = torch.nn.Parameter(torch.tensor([np.float32(gs)]), requires_grad=False)
    module.quantization_status = QuantizationStatus.CALIBRATION
    return forward_quantize(module, torch.from_numpy(x), "input", ARGS).numpy()


def hard_activations(rng, shape=(3, 7, 128)) -> tuple[np.ndarray, np.float32]:
    """Random rows at random magnitudes with a global scale from a random fraction of their max (so some block
    scales saturate at 448), a zero block, a tiny block (FP8 scale 0 -> 0.125), and in half of the other blocks
    values at and one float32 step either side of every e2m1 boundary times the block's step."""
    x = (rng.standard_normal(shape) * rng.uniform(1e-3, 50, (*shape[:-1], 1))).astype(np.float32)
    gs = nvfp4.global_scale_from_absmax(np.abs(x).max() * rng.uniform(0.3, 1.5))
    blocks = x.reshape(-1, shape[-1] // 16, 16)
    step = nvfp4.block_scales(blocks, gs).astype(np.float32) / gs
    ties = np.concatenate([BOUNDS, np.nextafter(BOUNDS, 0), np.nextafter(BOUNDS, 10)])
    for row in range(blocks.shape[0]):
        for block in rng.choice(blocks.shape[1], size=blocks.shape[1] // 2, replace=False):
            keep = int(np.abs(blocks[row, block]).argmax())
            values = rng.choice(ties, 16) * rng.choice([-1, 1], 16).astype(np.float32) * step[row, block]
            values[keep] = blocks[row, block, keep]
            blocks[row, block] = values.astype(np.float32)
    blocks[0, 0] = 0
    blocks[1, 1] *= np.float32(1e-30)
    return blocks.reshape(shape), gs


def test_fake_quantize_equals_compressed_tensors(rng):
    ties = 0
    for _ in range(6):
        x, gs = hard_activations(rng)
        ours = nvfp4.fake_quantize_activations(x, gs)
        theirs = compressed_tensors_fake_quantize(x, gs)
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
        blocks = x.reshape(-1, 16)
        step = (nvfp4.block_scales(blocks, gs).astype(np.float32) / gs)[:, None]
        ties += int(np.isin(np.abs(blocks / step), BOUNDS).sum())
    assert ties > 1000  # the boundaries were really hit
    assert nvfp4.fake_quantize_activations(np.zeros((2, 16), np.float32), 3.0).tolist() == [[0.0] * 16] * 2
    with pytest.raises(ValueError, match="divisible by 16"):
        nvfp4.fake_quantize_activations(np.ones((2, 24), np.float32), 1.0)


def test_global_scale_is_llm_compressors(rng):
    """gs from the calibration's max |x| = generate_gparam(min, max) of the static_minmax observer."""
    for _ in range(200):
        x = torch.from_numpy((rng.standard_normal(64) * 10.0 ** rng.uniform(-6, 6)).astype(np.float32))
        expected = generate_gparam(x.min(), x.max()).item()
        assert nvfp4.global_scale_from_absmax(float(x.abs().max())) == np.float32(expected)
    assert nvfp4.global_scale_from_absmax(0.0) == 1.0


def _activation_model(build, x_shape, initializers: dict, opset: int, domains: dict) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset, **domains}, name="act")
    values = []
    for name, array in initializers.items():
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.tensor(array).dtype),
                         const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        values.append(value)
    tape = ir.tape.Tape(graph)
    y = build(tape, x, *values)
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(x_shape)
    graph.outputs.append(y)
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ort_function_equals_the_numpy_reference(dtype, rng):
    """lowbit.NVFP4ActivationQDQ (an ONNX function of standard ops) run in onnxruntime gives the numpy reference
    bit for bit (float16 activations: computed in float32, cast back)."""
    for shape in ((3, 7, 128), (5, 64)):
        x, gs = hard_activations(rng, shape)
        model = _activation_model(lambda tape, x, g: nvfp4_ops.activation_qdq(tape, x, g, "m"), ["b", "s", 128]
                                  if len(shape) == 3 else ["t", 64], {"gs": np.asarray(gs, np.float32)}, 21,
                                  {nvfp4_ops.DOMAIN: 1})
        function = nvfp4_ops.activation_function()
        model.functions[function.identifier()] = function
        proto = ir.serde.serialize_model(model)
        if dtype == np.float16:
            proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
            proto.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        onnx.checker.check_model(proto, full_check=True)
        x = x.astype(dtype)
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]
        expected = nvfp4_ops.reference_activation(x, gs)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
        if dtype == np.float32:
            np.testing.assert_array_equal(got.view(np.uint32),
                                          compressed_tensors_fake_quantize(x, gs).view(np.uint32))


def test_tensorrt_layout_and_reference(rng):
    """ModelOpt's dynamic NVFP4 input quantizer: trt.TRT_FP4DynamicQuantize(x, 1/gs) {axis -1, block_size 16,
    scale_type FLOAT8E4M3FN} → DequantizeLinear(block scales, 1/gs) → DequantizeLinear(x4, that, axis -1,
    block_size 16); onnx.checker (full) passes with the node's schema registered. Its numpy kernel (TensorRT's
    documented formula: s · (1/gs) instead of s / gs, max / 6 / (1/gs) instead of gs · (max / 6)) stays within two
    block steps of the ort form on values at the ties, and within an ulp almost everywhere on plain random
    values."""
    nvfp4_ops.register_trt_schema()
    x, gs = hard_activations(rng, (2, 5, 64))
    inverse = np.asarray(nvfp4.inverse_global_scale(gs), np.float32)
    model = _activation_model(lambda tape, x, s2: nvfp4_ops.activation_two_level(tape, x, s2, "m"), [2, 5, 64],
                              {"s2": inverse}, nvfp4_ops.TWO_LEVEL_OPSET, {nvfp4_ops.TRT_DOMAIN: 1})
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    quantize, scales, values = proto.graph.node
    assert (quantize.domain, quantize.op_type) == ("trt", "TRT_FP4DynamicQuantize")
    assert list(quantize.input) == ["x", "s2"] and len(quantize.output) == 2
    assert {a.name: a.i for a in quantize.attribute} == {"axis": -1, "block_size": 16,
                                                         "scale_type": onnx.TensorProto.FLOAT8E4M3FN}
    assert (scales.op_type, list(scales.input), list(scales.attribute)) == \
        ("DequantizeLinear", [quantize.output[1], "s2"], [])
    assert values.op_type == "DequantizeLinear" and list(values.input) == [quantize.output[0], scales.output[0]]
    assert {a.name: a.i for a in values.attribute} == {"axis": -1, "block_size": 16}
    four, block_scales = nvfp4_ops.reference_trt_dynamic_quantize(x, inverse)
    assert four.dtype == nvfp4_ops.FLOAT4 and block_scales.shape == (2, 5, 4)
    trt = nvfp4_ops.reference_activation_two_level(x, inverse)
    ours = nvfp4.fake_quantize_activations(x, gs)
    step = np.repeat(nvfp4.block_scales(x.reshape(2, 5, 4, 16), gs).astype(np.float32) / gs, 16, -1)
    assert (np.abs(trt - ours) <= 2 * step.reshape(x.shape) * (1 + 1e-6)).all()
    plain = rng.standard_normal((64, 64)).astype(np.float32)  # away from constructed ties: nearly always equal
    gs = nvfp4.global_scale_from_absmax(np.abs(plain).max())
    close = np.isclose(nvfp4_ops.reference_activation_two_level(plain, nvfp4.inverse_global_scale(gs)),
                       nvfp4.fake_quantize_activations(plain, gs), rtol=2.0 ** -22, atol=0)  # the same codes
    assert close.mean() > 0.999


# ------------------------------------------------------------------------------ recipes


def test_preset_and_config_groups_resolve_on_both_targets():
    from tests.test_recipes import BIG

    explicit = ("QuantizationModifier: {ignore: [lm_head], config_groups: {g: {targets: [Linear], weights: "
                "{num_bits: 4, type: float, strategy: tensor_group, group_size: 16, symmetric: true}, "
                "input_activations: {num_bits: 4, type: float, strategy: tensor_group, group_size: 16, "
                "symmetric: true, dynamic: local}}}}\n")
    for text in (NVFP4, explicit):
        for target in ("ort", "tensorrt", None):
            res = resolve_recipe(parse_recipe(text), BIG, target=target)
            quant = res.modules["layers.0.attn.qkv_proj"].quant
            assert quant.activation == NVFP4_ACTIVATIONS and quant.weight.rule == "nvfp4"
            assert res.plan.static_activations() and res.modules["lm_head"].quant is None


@pytest.mark.parametrize("change, message", [
    ("dynamic: local", "dynamic: True are not supported"),
    ("group_size: 16, symmetric: true, dynamic: local", "NVFP4 activations take group_size 16, not 32"),
    ("observer: null", "NVFP4 activation observer 'mse' is not supported"),
])
def test_what_fp4_activations_cannot_do_is_rejected_by_name(change, message):
    args = "num_bits: 4, type: float, strategy: tensor_group, group_size: 16, symmetric: true, dynamic: local"
    bad = {"dynamic: True are not supported": args.replace("dynamic: local", "dynamic: true"),
           "NVFP4 activations take group_size 16, not 32": args.replace("group_size: 16", "group_size: 32"),
           "NVFP4 activation observer 'mse' is not supported": args + ", observer: mse"}[message]
    text = ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 4, type: float, "
            f"strategy: tensor_group, group_size: 16}}, input_activations: {{{bad}}}}}}}}}\n")
    assert_rejected(text, message)


def test_k_not_divisible_by_16_is_an_error():
    from tests.test_recipes import llama

    with pytest.raises(LowbitError, match="FP4 activation blocks need K divisible by 16, not K = 172"):
        resolve_recipe(parse_recipe(NVFP4.replace("]}", "], bypass_divisibility_checks: true}")), llama(),
                       target="ort")


# ------------------------------------------------------------------------------ whole models


def _convert_tiny(tmp_path, target: str, emit=None):
    model = build_tiny_model("llama", tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    (tmp_path / "calib.txt").write_text(CALIBRATION_TEXT)
    recipe = tmp_path / "nvfp4.yaml"
    recipe.write_text(NVFP4)
    out = tmp_path / target
    report = convert(tmp_path / "src", out, recipe=recipe, target=target, calib_data=tmp_path / "calib.txt",
                     num_samples=4, seq_len=32, **({"emit": emit} if emit else {}))
    return model, out, report


def test_tiny_llama_nvfp4_on_ort_equals_the_reference(rng, tmp_path):
    """The NVFP4 preset on every linear but lm_head, target ort. The folder's input global scales are the
    calibration's (gs = 2688 / the recorded max |x|, as generate_gparam gives), and the logits equal transformers
    with each linear's weight the numpy NVFP4 round trip and its input fake-quantized by
    lowbit.nvfp4.fake_quantize_activations with the folder's gs, to 1e-4 of their scale at every token before the
    first whose linear input lay within 2e-6 (relative) of an FP4 / FP8 rounding boundary (upstream float sums
    differ in the last place between ORT and torch)."""
    model, out, report = _convert_tiny(tmp_path, "ort")
    formats = {r.module: r.format for r in report.quant.layers}
    assert set(formats.values()) == {"nvfp4_a4_unpack"} and len(formats) == 8
    meta = json.loads((out / "lowbit.json").read_text())
    record = meta["activation_calibration"]
    assert record["status"] == "calibrated" and set(record["input_global_scales"]) == set(formats)
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    scales = {}
    for module in formats:
        gs = tensors[f"{module}.input_global_scale"]
        assert gs.dtype == np.float32 and gs.shape == ()
        absmax = record["absmax"][module]
        assert gs == nvfp4.global_scale_from_absmax(absmax) == record["input_global_scales"][module] != 1.0
        assert gs == np.float32(generate_gparam(torch.tensor(-absmax), torch.tensor(absmax)).item())
        scales[module] = np.float32(gs)
    graph = onnx.load(str(out / "model.onnx"))
    assert [f.name for f in graph.functions] == [nvfp4_ops.ACTIVATION_OP]
    assert sum(n.op_type == nvfp4_ops.ACTIVATION_OP for n in graph.graph.node) == 8

    reference = build_tiny_model("llama", tmp_path / "ref-src")
    near_tie = {}

    def hook(gs):
        def fake_quantize(_linear, args):
            x = args[0].numpy()
            up, down = (nvfp4.fake_quantize_activations(x * np.float32(1 + d), gs) / np.float32(1 + d)
                        for d in (2e-6, -2e-6))
            near_tie["mask"] |= (np.abs(up - down) > 1e-5 * np.abs(x).max()).any(axis=-1)
            return (torch.from_numpy(nvfp4.fake_quantize_activations(x, gs)),)
        return fake_quantize

    for module in formats:
        set_weight(reference, module, nvfp4_reference_weight(reference, module), hook(scales[module]))
    assert_matches_up_to_ties(model, reference, out, near_tie, rng)

    # calibration ran with every activation subgraph bypassed: the sites and the bypass see them all
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {s: e for s, (_, _, e) in static_sites(proto).items()} == {m: "nvfp4" for m in formats}
    edited = ir.serde.deserialize_model(proto)
    bypass_activation_qdq(edited)
    assert not [n for n in edited.graph if n.op_type == nvfp4_ops.ACTIVATION_OP]
    # `lowbit calibrate` on the folder with the same samples measures the same global scales (the bypass makes the
    # measurement independent of the scales the folder holds)
    again = calibrate_folder(out, CalibrationSettings(tmp_path / "calib.txt", num_samples=4, seq_len=32))
    assert again["input_global_scales"] == record["input_global_scales"] and again["absmax"] == record["absmax"]
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert all(after[f"{m}.input_global_scale"] == scales[m] for m in formats)


@pytest.mark.parametrize("integer", [True, False])
def test_nvfp4_activations_inside_the_cpu_kernel(integer, tmp_path, monkeypatch, capfd):
    """On lowbit's CPU kernels each NVFP4ActivationQDQ -> MatMul pair is one node: lowbit.cpu.MatMulInt4Int8 over the
    e2m1 codes with NVFP4 activations (e2m1 1, activation 1: each block's exact integer product,
    tests/test_int4_int8_kernel.py), or with
    LOWBIT_NVFP4_INTEGER=0 lowbit.cpu.MatMulNarrowFloat (input_type 23, the global scale as input_scale; its fake
    quantization is the function body's, bit for bit, in tests/test_narrow_float_kernel.py). No function body is
    left, and the logits, prefill and cached decode, are those of ONNX Runtime running the function bodies and the
    dequantized weights within 1e-5 of their scale (the kernels sum the products in another order; the integer
    route also keeps each product exact where the body rounds e * step to float32 first)."""
    import tempfile
    from pathlib import Path

    from lowbit.custom_ops import kernels
    from lowbit.runtime import fast_paths
    from lowbit.runtime.session import create_session
    from tests.conftest import prefill_and_decode, relative

    if kernels.library() is None:
        pytest.skip(f"no CPU kernel library: {kernels.unavailable()}")
    monkeypatch.setenv(fast_paths.NVFP4_INTEGER_SWITCH, "1" if integer else "0")
    _, out, _ = _convert_tiny(tmp_path, "ort")
    metadata = json.loads((out / "lowbit.json").read_text())
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    with tempfile.TemporaryDirectory() as folder:
        result = fast_paths.rewrite_blockwise(model, out, {}, Path(folder), fast_paths.nvfp4_layers(metadata),
                                              fp4_kernel=True)
    assert len(result.fp4_integer if integer else result.fp4_kernel) == 8
    assert not [n for n in model.graph.node if n.op_type == nvfp4_ops.ACTIVATION_OP]
    if integer:
        fused = [n for n in model.graph.node if n.op_type == "MatMulInt4Int8"]
        assert len(fused) == 8 and all({a.name: a.i for a in n.attribute}["activation"] == 1
                                       and {a.name: a.i for a in n.attribute}["e2m1"] == 1 for n in fused)
    else:
        fused = [n for n in model.graph.node if n.op_type == "MatMulNarrowFloat"]
        assert len(fused) == 8 and all({a.name: a.i for a in n.attribute}["input_type"] == 23 for n in fused)
    capfd.readouterr()
    on_kernel = prefill_and_decode(create_session(out))
    message = "8 NVFP4 MatMuls run as integer block products on lowbit.cpu.MatMulInt4Int8" if integer \
        else "8 NVFP4 weights run at 4 bits on lowbit.cpu.MatMulNarrowFloat"
    assert message in capfd.readouterr().err
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    bodies = prefill_and_decode(create_session(out))
    for a, b in zip(on_kernel, bodies):
        assert relative(a, b) <= 1e-5


def test_compressed_tensors_checkpoint_carries_the_input_global_scales(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    _, out, _ = _convert_tiny(tmp_path, "ort", emit="compressed-tensors")
    folder = out / "compressed-tensors"
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(str(path)))
    graph = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    (group,) = parsed.config_groups.values()
    assert group.format == "nvfp4-pack-quantized"
    assert group.input_activations.dynamic == "local" and group.input_activations.strategy == "tensor_group"
    assert group.input_activations.group_size == 16 and group.input_activations.num_bits == 4
    fused = {"q_proj": "attn.qkv_proj", "k_proj": "attn.qkv_proj", "v_proj": "attn.qkv_proj", "o_proj": "attn.o_proj",
             "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj", "down_proj": "mlp.down_proj"}
    count = 0
    for name, array in tensors.items():
        if not name.endswith(".input_global_scale"):
            continue
        layer, proj = name.split(".")[2], name.split(".")[-2]
        expected = graph[f"layers.{layer}.{fused[proj]}.input_global_scale"]
        array = array.numpy()
        assert array.dtype == np.float32 and array.shape == (1,) and array[0] == expected
        assert f"{name[:-len('input_global_scale')]}weight_global_scale" in tensors
        count += 1
    assert count == 14  # 2 layers x 7 linears


def test_tensorrt_target_converts_and_calibrates(tmp_path):
    """Target tensorrt: every linear is ModelOpt's layout (activations: TRT_FP4DynamicQuantize → 2 × DQ; weights:
    the 2-level DQ), opset 23 with the `trt` domain; calibration ran in ORT (the activation subgraph bypassed, the
    FLOAT4E2M1 weights read as uint8 by standard ops) and stored 1 / gs, gs being what the ort target's
    calibration measures from the same model."""
    nvfp4_ops.register_trt_schema()
    _, out, report = _convert_tiny(tmp_path, "tensorrt")
    assert {r.format for r in report.quant.layers} == {"dq_nvfp4_a4"}
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets[""] == nvfp4_ops.TWO_LEVEL_OPSET and opsets["trt"] == 1
    tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    record = json.loads((out / "lowbit.json").read_text())["activation_calibration"]
    for r in report.quant.layers:
        matmul = next(n for n in proto.graph.node if n.name == r.module)
        outer = producers[matmul.input[0]]
        inner, quantize = producers[outer.input[1]], producers[outer.input[0]]
        assert (outer.op_type, inner.op_type, quantize.op_type) == ("DequantizeLinear", "DequantizeLinear",
                                                                    "TRT_FP4DynamicQuantize")
        inverse = f"{r.module}.input_global_scale_inverse"
        assert list(quantize.input)[1] == inverse and list(inner.input)[1] == inverse
        gs = nvfp4.global_scale_from_absmax(record["absmax"][r.module])
        assert tensors[inverse] == nvfp4.inverse_global_scale(gs) and gs == record["input_global_scales"][r.module]
    ort_out = tmp_path / "ort-same"
    convert(tmp_path / "src", ort_out, recipe=tmp_path / "nvfp4.yaml", calib_data=tmp_path / "calib.txt",
            num_samples=4, seq_len=32)
    ort_record = json.loads((ort_out / "lowbit.json").read_text())["activation_calibration"]
    for module, absmax in record["absmax"].items():  # the two forms' weights differ by an ulp now and then
        assert absmax == pytest.approx(ort_record["absmax"][module], rel=1e-5)


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared (stories260K) is absent")
def test_stories260k_converts_and_generates(tmp_path):
    """stories260K: NVFP4 (W4A4) on attention and gate/up; down_proj (K = 172, not a multiple of 16) NVFP4A16."""
    from lowbit.runtime.model import Model

    recipe = tmp_path / "w4a4.yaml"
    recipe.write_text("QuantizationModifier: {scheme: {NVFP4: ['re:.*self_attn.*', 're:.*(gate|up)_proj$'], "
                      "NVFP4A16: ['re:.*down_proj$']}, ignore: [lm_head], bypass_divisibility_checks: true}\n")
    out = tmp_path / "w4a4"
    report = convert(STORIES, out, recipe=recipe, num_samples=4, seq_len=64)
    assert {r.format for r in report.quant.layers} == {"nvfp4_a4_unpack", "nvfp4_unpack"}
    text = Model.load(out).generate("Once upon a time", max_new_tokens=12)
    assert text.strip()
