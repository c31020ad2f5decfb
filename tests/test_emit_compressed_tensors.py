"""`lowbit convert --recipe R --emit compressed-tensors`: the checkpoint written beside the ONNX folder loads in
compressed-tensors (its own model-free dequantizer, the per-group compressors, and transformers' loading through
ModelCompressor), and its decompressed weights equal, bit for bit, the graph's weights dequantized with lowbit's own
unpackers (MatMulNBits) or numpy (Q/DQ); every other tensor equals the source's, or the graph's where AWQ or
SmoothQuant folded scales into it; static activation scales are the graph's calibrated ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.affine import dequantize
from lowbit.converter.api import convert
from lowbit.custom_ops import matmul_nbits
from tests.conftest import SAMPLE_MODEL, build_tiny_model
from tests.test_bad_input import assert_clean_failure, run_convert
from tests.test_fp8 import CALIBRATION_TEXT, onnx_logits, write_char_tokenizer
from tests.test_recipe_convert import GPTQ_RECIPE, RECIPE_A, SAMPLES

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: E402
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from safetensors.torch import load_file as load_torch  # noqa: E402

RECIPE_C = SAMPLES / "c_fp8_attn_channel_mlp_tensor.yaml"
AWQ_RECIPE = """
quant_stage:
  quant_modifiers:
    AWQModifier: {n_grid: 4}
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        w4_asym:
          targets: ["re:.*self_attn\\\\.(q|k|v|o)_proj$", "re:.*mlp\\\\.(gate|up|down)_proj$"]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 16}
"""
SMOOTHQUANT_RECIPE = """
SmoothQuantModifier: {smoothing_strength: 0.5}
QuantizationModifier:
  ignore: [lm_head]
  config_groups:
    w8a8_static:
      targets: [Linear]
      weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
      input_activations: {num_bits: 8, type: int, symmetric: false, strategy: tensor, dynamic: false}
"""


def convert_with_emit(arch_id: str, tmp_path: Path, recipe, **calibration) -> tuple[Path, Path]:
    src, out = tmp_path / "src", tmp_path / "out"
    build_tiny_model(arch_id, src)
    if calibration:
        write_char_tokenizer(src)
        (tmp_path / "calib.txt").write_text(CALIBRATION_TEXT)
        calibration = dict(calib_data=tmp_path / "calib.txt", num_samples=4, seq_len=32)
    if isinstance(recipe, str):
        (tmp_path / "recipe.yaml").write_text(recipe)
        recipe = tmp_path / "recipe.yaml"
    convert(src, out, recipe=recipe, emit="compressed-tensors", accuracy_level=0, **calibration)
    return src, out


def graph_reference(out: Path, source: dict) -> tuple[dict, dict]:
    """({transformers module: the graph's weight [N, K] dequantized}, {module: (input scale, zero point)}) from
    model.onnx: MatMulNBits through lowbit's unpacker and lowbit.affine.dequantize, Q/DQ weights in numpy."""
    model = ir.load(out / "model.onnx")
    inits = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    weights, activations = {}, {}
    for node in model.graph:
        hf, fmt = node.metadata_props.get("lowbit.hf_modules"), node.metadata_props.get("lowbit.format")
        if not hf or not fmt:
            continue
        get = lambda suffix: inits.get(f"{node.name}.{suffix}")  # noqa: E731
        if fmt == "matmulnbits":
            attrs = {a: node.attributes.get_int(a) for a in ("K", "N", "bits", "block_size")}
            w = dequantize(matmul_nbits.unpack(matmul_nbits.MatMulNBitsArrays(
                get("qweight"), get("scales"), get("qzeros"), attrs["K"], attrs["N"], attrs["bits"],
                attrs["block_size"])))
        elif fmt in ("qdq_fp8_e4m3", "qdq_uint8"):  # MatMul's [K, N] codes, per-tensor or per-column scales
            zero = get("qzeros").astype(np.float32) if get("qzeros") is not None else np.float32(0)
            w = ((get("qweight").astype(np.float32) - zero) * get("scales").astype(np.float32)).T
        else:
            raise AssertionError(f"no reference for {fmt}")
        start = 0
        for module in hf.split(","):
            rows = source[f"{module}.weight"].shape[0]
            weights[module] = w[start:start + rows]
            start += rows
            if get("input_scale") is not None:
                zero = get("input_zero_point")
                activations[module] = (get("input_scale"), None if zero is None else int(zero))
        assert start == w.shape[0]
    return weights, activations


def check_checkpoint(src: Path, out: Path, folded: dict[str, str] | None = None) -> dict:
    """The emitted folder against the graph and the source; returns its config's quantization_config."""
    folder = out / "compressed-tensors"
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    parsed = QuantizationConfig.model_validate(quant)
    assert parsed.quantization_status == "compressed"
    for name, scheme in parsed.config_groups.items():  # the format compressed-tensors itself infers
        assert scheme.format == infer_module_format(torch.nn.Linear, scheme).value, name
    assert {k: v for k, v in config.items() if k != "quantization_config"} == \
        json.loads((src / "config.json").read_text())
    source = load_file(src / "model.safetensors")
    reference, activations = graph_reference(out, source)
    emitted = load_torch(folder / "model.safetensors")
    decompressed = CompressedTensorsDequantizer(folder, dtype=torch.float32).process(dict(emitted))
    leftovers = {k for k in decompressed if k.rsplit(".", 1)[-1] in ("input_scale", "input_zero_point")}
    assert {k.rsplit(".", 1)[0] for k in leftovers} <= set(activations)
    assert set(decompressed) - leftovers == set(source)
    for module, weight in reference.items():
        stored = emitted.get(f"{module}.weight")  # replaced by its compressed parameters
        assert stored is None or stored.dtype in (torch.int8, torch.float8_e4m3fn), module
        got = decompressed[f"{module}.weight"].numpy()
        assert got.dtype == np.float32 and np.array_equal(got, weight), module
    for module, (scale, zero) in activations.items():
        assert np.array_equal(emitted[f"{module}.input_scale"].numpy(), np.reshape(scale, 1))
        assert scale != 1.0  # calibrated, not the placeholder
        if zero is not None and f"{module}.input_zero_point" in emitted:
            assert int(emitted[f"{module}.input_zero_point"]) == zero - 128  # uint8 zero point as int8
    graph = ir.load(out / "model.onnx").graph.initializers
    record = json.loads((out / "lowbit.json").read_text())["emit"]
    assert sorted(record["from_graph"]) == sorted(folded or {})
    for name, array in source.items():
        if name.rsplit(".", 1)[0] in reference:
            continue
        expected = graph[folded[name]].const_value.numpy() if folded and name in folded else array
        got = decompressed[name].numpy()
        assert got.dtype == expected.dtype and np.array_equal(got, expected), name
    return quant


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_sample_a_int4_int8_weights_decompress_to_the_graph(arch_id, tmp_path):
    src, out = convert_with_emit(arch_id, tmp_path, RECIPE_A)
    quant = check_checkpoint(src, out)
    assert quant["format"] == "pack-quantized" and quant["ignore"] == ["lm_head"]
    folder = out / "compressed-tensors"
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_sample_c_fp8_weights_and_static_scales(arch_id, tmp_path):
    src, out = convert_with_emit(arch_id, tmp_path, RECIPE_C, calibrate=True)
    quant = check_checkpoint(src, out)
    assert quant["format"] == "float-quantized"
    emitted = load_torch(out / "compressed-tensors" / "model.safetensors")
    assert emitted["model.layers.0.mlp.up_proj.weight_scale"].shape == (1,)  # per tensor
    assert emitted["model.layers.0.self_attn.k_proj.weight_scale"].shape == (32, 1)  # per channel
    assert emitted["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float8_e4m3fn


def test_gptq_asymmetric_zero_points_are_packed(tmp_path):
    """GPTQ's asymmetric per-channel int4 MLP (zero points packed along N) and RTN int8 attention."""
    src, out = convert_with_emit("llama", tmp_path, GPTQ_RECIPE, calibrate=True)
    check_checkpoint(src, out)
    emitted = load_file(out / "compressed-tensors" / "model.safetensors")
    assert emitted["model.layers.0.mlp.down_proj.weight_zero_point"].shape == (8, 1)  # 64 rows / (32 / 4)


def _norms(layers: int) -> dict[str, str]:
    return {**{f"model.layers.{i}.input_layernorm.weight": f"layers.{i}.attn_norm.weight" for i in range(layers)},
            **{f"model.layers.{i}.post_attention_layernorm.weight": f"layers.{i}.mlp_norm.weight"
               for i in range(layers)}}


@pytest.mark.parametrize("recipe", ["awq", "smoothquant"])
def test_folded_norms_are_written_as_the_graph_has_them(recipe, tmp_path):
    """AWQ (W4 asymmetric, groups of 16) and SmoothQuant (static int8 activations, int-quantized) divide the norm
    weights by their scales: those tensors are the graph's, everything else the source's."""
    text = AWQ_RECIPE if recipe == "awq" else SMOOTHQUANT_RECIPE
    src, out = convert_with_emit("qwen2", tmp_path, text, calibrate=True)
    quant = check_checkpoint(src, out, folded=_norms(2))
    assert quant["format"] == ("pack-quantized" if recipe == "awq" else "int-quantized")


def test_transformers_loads_and_runs_it(tmp_path, rng):
    """transformers (ModelCompressor: compress on load, decompress on the first forward) gives the logits of
    model.onnx for the weight-only sample (1e-4 of their scale, as tests/test_recipe_convert.py)."""
    from transformers import AutoModelForCausalLM

    src, out = convert_with_emit("llama", tmp_path, RECIPE_A)
    model = AutoModelForCausalLM.from_pretrained(out / "compressed-tensors", dtype=torch.float32).eval()
    ids = rng.integers(3, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits.numpy()
    got = onnx_logits(out, ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    reference, _ = graph_reference(out, load_file(src / "model.safetensors"))
    state = model.state_dict()
    for module, weight in reference.items():
        assert np.array_equal(state[f"{module}.weight"].numpy(), weight), module


def test_bad_uses_fail_with_one_line(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_convert(SAMPLE_MODEL, "-o", out, "--emit", "compressed-tensors"), out,
                         "--emit compressed-tensors needs --recipe")
    assert_clean_failure(run_convert(SAMPLE_MODEL, "-o", out, "--recipe", RECIPE_A, "--emit", "gguf"), out,
                         "unknown --emit format 'gguf' (known: compressed-tensors)")
    build_tiny_model("qwen2", tmp_path / "src")  # tied embeddings: lm_head has no tensor of its own
    recipe = tmp_path / "all.yaml"
    recipe.write_text("QuantizationModifier:\n  config_groups:\n    g:\n      targets: [Linear]\n"
                      "      weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}\n")
    assert_clean_failure(run_convert(tmp_path / "src", "-o", out, "--recipe", recipe, "--emit",
                                     "compressed-tensors"), out, "lm_head: has no weight of its own")


def test_sample_b_nvfp4_parameters_are_the_graphs(tmp_path):
    """NVFP4 (nvfp4-pack-quantized) + FP8 down_proj: compressed-tensors' own unpacker gives the graph's e2m1 values,
    the FP8 block scales and the global scale are the graph's bytes. (Its NVFP4 decompression computes in bfloat16,
    so the dequantized weights are compared through the parameters rather than as float32 weights.)"""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    from lowbit import nvfp4

    src, out = convert_with_emit("llama", tmp_path, SAMPLES / "b_nvfp4_fp8_down.yaml", calibrate=True)
    folder = out / "compressed-tensors"
    parsed = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    for scheme in parsed.config_groups.values():
        assert scheme.format == infer_module_format(torch.nn.Linear, scheme).value
    emitted = load_torch(folder / "model.safetensors")
    CompressedTensorsDequantizer(folder, dtype=torch.float32).process(dict(emitted))  # decompresses every module
    graph = {name: v.const_value.numpy() for name, v in ir.load(out / "model.onnx").graph.initializers.items()}
    source = load_file(src / "model.safetensors")
    for i in range(2):
        for node, parts in ((f"layers.{i}.attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                            (f"layers.{i}.mlp.gate_up_proj", ("gate_proj", "up_proj"))):
            codes, scales = nvfp4.unpack(graph[f"{node}.qweight"]), graph[f"{node}.scales"]
            start = 0
            for part in parts:
                name = f"model.layers.{i}.{'self_attn' if 'attn' in node else 'mlp'}.{part}"
                rows = source[f"{name}.weight"].shape[0]
                values = unpack_fp4_from_uint8(emitted[f"{name}.weight_packed"], rows, codes.shape[1],
                                               dtype=torch.float32).numpy()
                assert np.array_equal(values, nvfp4.E2M1[codes[start:start + rows]]), name
                assert np.array_equal(emitted[f"{name}.weight_scale"].view(torch.uint8).numpy(),
                                      scales[start:start + rows].view(np.uint8)), name
                assert float(emitted[f"{name}.weight_global_scale"]) == float(graph[f"{node}.global_scale"])
                start += rows
