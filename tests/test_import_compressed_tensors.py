"""compressed-tensors checkpoints written by the compressed-tensors library itself import with their own values:
our dequantized weights equal the library's own decompression bit for bit, and the ONNX logits equal transformers'
on those weights."""

from __future__ import annotations

import copy
import json

import ml_dtypes
import numpy as np
import pytest

from lowbit.converter.api import convert
from lowbit.converter.checkpoint import Checkpoint
from lowbit.converter.importers import detect
from lowbit.runtime.inspect import inspect_model
from tests.conftest import build_tiny_model
from tests.test_import_gptq import TOLERANCE, assert_clean_failure, logits_error, run_convert

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)

ATTN = "re:.*self_attn\\.(q|k|v|o)_proj$"
MLP = "re:.*mlp\\.(gate|up|down)_proj$"


def _random_values(rng, args: QuantizationArgs, shape):
    """Random codes the library will find again: signed integers, or float8 e4m3 values (no NaN)."""
    if args.type == "float":  # normal values rounded to float8 (many exponents, none beyond the range)
        return rng.normal(0, 8, shape).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    lo, hi = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
    return rng.integers(lo, hi + 1, shape).astype(np.float32)


def write_compressed(model, directory, rng, groups: dict[str, tuple[list[str], QuantizationArgs]], fmt: str | None,
                     ignore=("lm_head",), activations: QuantizationArgs | None = None):
    """Quantize `model` with the library (known random codes, scales, zero points; with `activations`, random
    static input scales), compress it with the library, save; returns (the library's decompressed weights by
    module, a float model holding them)."""
    reference = copy.deepcopy(model)
    config = QuantizationConfig(
        config_groups={name: QuantizationScheme(targets=targets, weights=args, input_activations=activations)
                       for name, (targets, args) in groups.items()},
        ignore=list(ignore))
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "weight_scale"):
                continue
            args = module.quantization_scheme.weights
            n, k = module.weight.shape
            scale_shape = tuple(module.weight_scale.shape)
            g = scale_shape[-1] if len(scale_shape) == 2 else 1
            # |weight| like a trained model's: finer grids take proportionally smaller scales
            scales = (rng.uniform(0.002, 0.02, scale_shape) * 2.0 ** (4 - args.num_bits)).astype(np.float32)
            values = _random_values(rng, args, (n, k))
            zeros = np.zeros(scale_shape, np.float32)
            if not args.symmetric:
                zeros = rng.integers(-(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1), scale_shape)
                module.weight_zero_point.copy_(torch.from_numpy(zeros.astype(np.int8)))
            expand = (lambda a: np.repeat(a.reshape(-1, g), -(-k // g), axis=1)[:, :k]) if g > 1 else \
                (lambda a: np.broadcast_to(a.reshape(-1, 1), (n, k)))
            weight = (values + expand(zeros).astype(np.float32)) * expand(scales)
            module.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
            module.weight_scale.copy_(torch.from_numpy(scales))
            if hasattr(module, "input_scale"):  # coarse on purpose: the activations' rounding shows in the logits
                module.input_scale.fill_(float(rng.uniform(0.02, 0.05)))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    compressor.decompress_model(model)  # the library's own decompression: the reference weights
    expected = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "quantization_scheme") and module.quantization_scheme is not None and \
                    hasattr(module, "weight"):
                expected[name] = module.weight.detach().float().numpy().copy()
                reference.get_submodule(name).weight.copy_(module.weight.detach().float())
    return expected, reference


def int_args(bits, strategy, symmetric, group=None):
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group)


def fp8_args(strategy):
    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)


CASES = {
    "pack-w4-g16-asym": ({"group_0": (["Linear"], int_args(4, "group", False, 16))}, "pack-quantized"),
    "pack-w4-channel-sym": ({"group_0": (["Linear"], int_args(4, "channel", True))}, "pack-quantized"),
    "pack-w3-g16-sym": ({"group_0": (["Linear"], int_args(3, "group", True, 16))}, "pack-quantized"),
    "pack-w2-g16-asym": ({"group_0": (["Linear"], int_args(2, "group", False, 16))}, "pack-quantized"),
    "int-w8-channel-sym": ({"group_0": (["Linear"], int_args(8, "channel", True))}, "int-quantized"),
    "naive-w8-tensor-asym": ({"group_0": (["Linear"], int_args(8, "tensor", False))}, "naive-quantized"),
    "fp8-channel": ({"group_0": (["Linear"], fp8_args("channel"))}, "float-quantized"),
    "fp8-tensor": ({"group_0": (["Linear"], fp8_args("tensor"))}, "float-quantized"),
    "mixed-precision": ({"attention": ([ATTN], int_args(4, "group", False, 16)),
                         "mlp": ([MLP], fp8_args("channel"))}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_import_is_exact(case, tmp_path, rng):
    groups, fmt = CASES[case]
    source = tmp_path / "ct"
    model = build_tiny_model("llama", source)
    expected, reference = write_compressed(model, source, rng, groups, fmt)
    assert len(expected) == 14
    config = json.loads((source / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    view = detect(source).view(Checkpoint(source))
    for name, dense in expected.items():
        got = view.read_float32(f"{name}.weight")
        assert got.dtype == np.float32 and np.array_equal(got, dense), name
    out = tmp_path / "onnx"
    report = convert(str(source), out, accuracy_level=0)
    layers = {r.module: r for r in report.quant.layers}
    assert len(layers) == 8 and all(r.max_rel_error == 0.0 for r in layers.values()), layers
    if case == "mixed-precision":
        assert report.scheme == "mixed"
        assert layers["layers.0.attn.qkv_proj"].format == "matmulnbits"
        assert layers["layers.0.mlp.gate_up_proj"].format == "dq_fp8_e4m3"
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["import"]["format"] == "compressed-tensors"
    assert inspect_model(out)["quantized"]["layers.0.attn.o_proj"]["import"].startswith("compressed-tensors")
    assert logits_error(reference, out, rng) <= TOLERANCE


def test_ignored_modules_stay_float(tmp_path, rng):
    source = tmp_path / "ct"
    model = build_tiny_model("llama", source)
    groups = {"group_0": (["Linear"], int_args(4, "group", True, 16))}
    expected, reference = write_compressed(model, source, rng, groups, "pack-quantized",
                                           ignore=("lm_head", "re:.*down_proj$"))
    assert not any(name.endswith("down_proj") for name in expected)
    out = tmp_path / "onnx"
    report = convert(str(source), out, accuracy_level=0)
    assert sorted(r.module for r in report.quant.layers) == sorted(
        f"layers.{i}.{m}" for i in range(2) for m in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj"))
    assert logits_error(reference, out, rng) <= TOLERANCE


def test_missing_weight_scale_and_bad_format(tmp_path, rng):
    source = tmp_path / "ct"
    model = build_tiny_model("llama", source)
    write_compressed(model, source, rng, {"group_0": (["Linear"], int_args(4, "group", False, 16))},
                     "pack-quantized")
    from safetensors.torch import load_file, save_file

    state = load_file(source / "model.safetensors")
    state.pop("model.layers.1.self_attn.v_proj.weight_zero_point")
    save_file(state, source / "model.safetensors")
    out = tmp_path / "out"
    assert_clean_failure(run_convert(source, "-o", out), out,
                         "checkpoint has no tensor model.layers.1.self_attn.v_proj.weight_zero_point")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "nvfp4-pack-quantized"
    (source / "config.json").write_text(json.dumps(config))
    assert_clean_failure(run_convert(source, "-o", out), out, "format 'nvfp4-pack-quantized' is not supported")


def fp8_activation_hooks(model, scales: dict[str, float]):
    """transformers' forward with each linear's input rounded to float8 e4m3 per tensor: x -> e4m3(x / s) * s
    (saturating at 448), s from `scales` by module name."""
    def hook(scale):
        def pre(module, args):
            x = args[0]
            q = torch.clamp(x / scale, -448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)
            return (q * scale,) + tuple(args[1:])
        return pre

    return [model.get_submodule(name).register_forward_pre_hook(hook(scale)) for name, scale in scales.items()]


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_static_fp8_activations_import_with_the_checkpoints_scales(strategy, tmp_path, rng):
    """llm-compressor's FP8 preset (float8 weights, static per-tensor float8 activations): each linear's input gets
    QuantizeLinear/DequantizeLinear with the checkpoint's own input_scale (the largest of q/k/v's and of gate/up's,
    which read one input), no calibration; the logits are transformers' with the same rounding of the inputs."""
    source = tmp_path / "ct"
    model = build_tiny_model("llama", source)
    static = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)
    _, reference = write_compressed(model, source, rng, {"group_0": (["Linear"], fp8_args(strategy))},
                                    "float-quantized", activations=static)
    checkpoint = Checkpoint(source)
    scales = {n[: -len(".input_scale")]: float(checkpoint.read(n).reshape(-1)[0]) for n in checkpoint.names()
              if n.endswith(".input_scale")}
    assert len(scales) == 14 and len(set(scales.values())) == 14
    out = tmp_path / "onnx"
    report = convert(str(source), out)
    assert report.scheme == "w8a8-fp8"
    layers = {r.module: r for r in report.quant.layers}
    assert {r.format for r in layers.values()} == {"qdq_fp8_e4m3"}
    assert all(r.max_rel_error == 0.0 for r in layers.values())

    expected = {}
    for i in range(2):
        p = f"model.layers.{i}"
        expected[f"layers.{i}.attn.qkv_proj"] = max(scales[f"{p}.self_attn.{m}_proj"] for m in "qkv")
        expected[f"layers.{i}.attn.o_proj"] = scales[f"{p}.self_attn.o_proj"]
        expected[f"layers.{i}.mlp.gate_up_proj"] = max(scales[f"{p}.mlp.{m}_proj"] for m in ("gate", "up"))
        expected[f"layers.{i}.mlp.down_proj"] = scales[f"{p}.mlp.down_proj"]
    meta = json.loads((out / "lowbit.json").read_text())
    record = meta["activation_calibration"]
    assert record["status"] == "imported" and record["scales"] == pytest.approx(expected, rel=0, abs=0)
    assert meta["import"]["groups"]["group_0"]["activations"] == "fp8 static per-tensor"
    info = inspect_model(out)["quantized"]["layers.0.attn.qkv_proj"]
    assert info["activation"].startswith("fp8 e4m3 static per-tensor scale")

    # the float model of the checkpoint's weights, its linears' inputs rounded as the checkpoint says
    hf_scales = {n: expected[_ours(n)] for n in scales}
    handles = fp8_activation_hooks(reference, hf_scales)
    error = logits_error(reference, out, rng)
    for handle in handles:
        handle.remove()
    float_error = logits_error(reference, out, rng)  # without the rounding: far off
    assert error <= 1e-3 and float_error > 10 * error, (error, float_error)


def _ours(hf: str) -> str:
    layer, rest = hf.split(".")[2], hf.split(".", 3)[3]
    module = {"self_attn.q_proj": "attn.qkv_proj", "self_attn.k_proj": "attn.qkv_proj",
              "self_attn.v_proj": "attn.qkv_proj", "self_attn.o_proj": "attn.o_proj",
              "mlp.gate_proj": "mlp.gate_up_proj", "mlp.up_proj": "mlp.gate_up_proj",
              "mlp.down_proj": "mlp.down_proj"}[rest]
    return f"layers.{layer}.{module}"


def test_dynamic_activations_stay_float_and_are_recorded(tmp_path, rng):
    """FP8_DYNAMIC (per-token dynamic float8 activations): the weights import exactly, the activations stay float,
    and both lowbit.json and the summary say so."""
    source = tmp_path / "ct"
    model = build_tiny_model("llama", source)
    dynamic = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    _, reference = write_compressed(model, source, rng, {"group_0": (["Linear"], fp8_args("channel"))},
                                    "float-quantized", activations=dynamic)
    out = tmp_path / "onnx"
    report = convert(str(source), out)
    assert report.scheme == "w8a16-fp8"
    assert any("float8 dynamic per-token (activations kept float)" in note for note in report.notes), report.notes
    meta = json.loads((out / "lowbit.json").read_text())
    assert "activation_calibration" not in meta
    assert meta["import"]["groups"]["group_0"]["activations"] == "float8 dynamic per-token (activations kept float)"
    assert logits_error(reference, out, rng) <= TOLERANCE
