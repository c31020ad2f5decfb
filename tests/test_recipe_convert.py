"""`lowbit convert --recipe`: the samples convert tiny Llama and Qwen2 models and stories260K, the per-node report
matches the recipe (the test walks lowbit.json and the graph), weight-only logits equal a transformers reference
whose weights are the recipe's own round-to-nearest, and what the pipeline cannot run fails with one line."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.cli import main
from lowbit.converter.api import convert
from tests.conftest import REPO, SAMPLE_MODEL, build_tiny_model
from tests.test_bad_input import assert_clean_failure, run_convert
from tests.test_fp8 import CALIBRATION_TEXT, fused_hf_names, onnx_logits, write_char_tokenizer

torch = pytest.importorskip("torch")

SAMPLES = REPO / "samples" / "recipes"
RECIPE_A = SAMPLES / "a_int8_down_int4_rest.yaml"
EXPECTED_A = {"qkv_proj": ("4-bit g32 symmetric", "int4_rest"), "o_proj": ("4-bit g32 symmetric", "int4_rest"),
              "gate_up_proj": ("4-bit g32 symmetric", "int4_rest"),
              "down_proj": ("8-bit per-channel symmetric", "int8_down_proj")}


def quantized_nodes(folder) -> dict[str, dict[str, str]]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {n.name: {p.key: p.value for p in n.metadata_props} for n in model.graph.node
            if any(p.key == "lowbit.quant" for p in n.metadata_props) and n.op_type != "DequantizeLinear"
            and n.op_type != "QuantizeLinear"}


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_sample_a_matches_the_recipe_and_a_rtn_reference(arch_id, rng, tmp_path):
    """int8 down_proj + int4 g32 elsewhere, lm_head ignored: every node carries its group's setting, and with
    float compute (accuracy level 0, the recipe's A16) the logits equal transformers with each linear's weight
    replaced by lowbit.affine's round trip of the same setting (1e-4 of the logits' scale)."""
    model = build_tiny_model(arch_id, tmp_path / "src")
    out = tmp_path / "a"
    report = convert(tmp_path / "src", out, recipe=RECIPE_A, accuracy_level=0)
    assert report.scheme == "recipe"
    meta = json.loads((out / "lowbit.json").read_text())
    nodes = quantized_nodes(out)
    assert set(nodes) == set(meta["quantization"]) == set(meta["recipe"]["modules"])
    assert "lm_head" in meta["recipe"]["float"] and "lm_head" not in nodes
    for module, props in nodes.items():
        quant, group = EXPECTED_A[module.rsplit(".", 1)[-1]]
        assert props["lowbit.quant"] == quant and props["lowbit.recipe"].endswith(f"/ {group}"), (module, props)
        assert meta["recipe"]["modules"][module]["group"] == group
    settings = {"4-bit g32 symmetric": WeightQuant(4, 32, "symmetric"),
                "8-bit per-channel symmetric": WeightQuant(8, None, "symmetric")}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, props in nodes.items():
            names = fused_hf_names(model, module)
            weight = np.concatenate([modules[n].weight.numpy() for n in names])
            rounded = dequantize(quantize(weight, settings[props["lowbit.quant"]]))
            start = 0
            for name in names:
                rows = modules[name].weight.shape[0]
                modules[name].weight.copy_(torch.from_numpy(rounded[start:start + rows]))
                start += rows
    ids = rng.integers(3, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits.numpy()
    got = onnx_logits(out, ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_stories260k_samples_and_inspect(tmp_path):
    """Samples (a), (c) and (e) convert stories260K; inspect names each node's modifier and group; (c) stores
    attention weights per channel and MLP weights per tensor, all with static FP8 activations."""
    out = tmp_path / "c"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), "--recipe",
                                       str(SAMPLES / "c_fp8_attn_channel_mlp_tensor.yaml"), "--num-samples", "2",
                                       "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "lowbit.json").read_text())["quantization"]
    for module, entry in layers.items():
        attention = ".attn." in module
        assert entry["quant"] == ("8-bit per-channel fp8_e4m3" if attention else "8-bit per-tensor fp8_e4m3"), module
        assert entry["format"] == "qdq_fp8_e4m3" and entry["activation"]["element"] == "e4m3"
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert re.search(r"layers.0.attn.o_proj .*recipe quant_stage.quant_modifiers.QuantizationModifier / "
                     r"attention_per_channel", result.output), result.output
    for sample in ("a_int8_down_int4_rest.yaml", "e_dashinfer_instant_quant.yaml"):
        result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(tmp_path / sample), "--recipe",
                                           str(SAMPLES / sample)])
        assert result.exit_code == 0, result.output


GPTQ_RECIPE = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      dampening_frac: 0.02
      actorder: null
      ignore: [lm_head]
      config_groups:
        mlp:
          targets: ["re:.*mlp\\\\.(gate|up|down)_proj$"]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: channel}
    QuantizationModifier:
      config_groups:
        attention:
          targets: ["re:.*self_attn\\\\.(q|k|v|o)_proj$"]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
"""


def test_gptq_modifier_runs_on_its_modules_only(tmp_path):
    """A GPTQModifier on the MLP and a QuantizationModifier (RTN) on attention: GPTQ's record lists exactly the MLP
    layers with the recipe's dampening; attention is round-to-nearest (its codes equal lowbit.affine.quantize)."""
    build_tiny_model("llama", tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    (tmp_path / "calib.txt").write_text(CALIBRATION_TEXT)
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(GPTQ_RECIPE)
    out = tmp_path / "out"
    convert(tmp_path / "src", out, recipe=recipe, calib_data=tmp_path / "calib.txt", num_samples=4, seq_len=32)
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["algorithm"]["name"] == "gptq" and meta["algorithm"]["damp"] == 0.02
    assert set(meta["algorithm"]["layer_output_error"]) == {f"layers.{i}.mlp.{m}" for i in range(2)
                                                            for m in ("gate_up_proj", "down_proj")}
    kinds = {m: e["quant"] for m, e in meta["quantization"].items()}
    assert kinds["layers.0.mlp.down_proj"] == "4-bit per-channel asymmetric"
    assert kinds["layers.1.attn.o_proj"] == "8-bit per-channel symmetric"


def test_what_cannot_run_fails_with_one_line(tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--recipe", RECIPE_A, "--scheme", "w4a16"], "give either --scheme or --recipe"),
        (["--recipe", RECIPE_A, "--ignore", "lm_head"], "--ignore does not combine with --recipe"),
        (["--recipe", RECIPE_A, "--algo", "gptq"], "--algo and --smoothquant-alpha do not combine"),
        (["--recipe", RECIPE_A, "--group-size", "64"], "--group-size does not combine with --recipe"),
        (["--recipe", tmp_path / "missing.yaml"], "no such file"),
    ]
    for args, message in cases:
        assert_clean_failure(run_convert(SAMPLE_MODEL, "-o", out, *args), out, message)


UNFUSED = """QuantizationModifier:
  ignore: [lm_head]
  config_groups:
    int4_qk_gate:
      targets: ["re:.*self_attn\\\\.(q|k)_proj$", "re:.*mlp\\\\.gate_proj$"]
      weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}
    int8_rest:
      targets: ["re:.*self_attn\\\\.(v|o)_proj$", "re:.*mlp\\\\.(up|down)_proj$"]
      weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
"""


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_projections_a_recipe_splits_are_emitted_unfused(arch_id, rng, tmp_path):
    """q/k at int4 and v at int8 (gate at int4, up at int8): q/k/v and gate/up become one MatMulNBits each, their
    outputs concatenated as the fused node's; modules the recipe treats alike stay fused elsewhere (o, down). The
    logits equal transformers with each linear's weight rounded by its own group's setting (1e-4)."""
    model = build_tiny_model(arch_id, tmp_path / "src")
    recipe = tmp_path / "unfused.yaml"
    recipe.write_text(UNFUSED)
    out = tmp_path / "out"
    convert(tmp_path / "src", out, recipe=recipe, accuracy_level=0)  # float activations: the recipe's numerics
    nodes = quantized_nodes(out)
    layers = model.config.num_hidden_layers
    expected = {f"layers.{i}.{m}" for i in range(layers) for m in
                ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")}
    assert set(nodes) == expected
    settings = {"int4_qk_gate": WeightQuant(4, 32, "symmetric"), "int8_rest": WeightQuant(8, None, "symmetric")}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, props in nodes.items():
            group = props["lowbit.recipe"].rsplit("/ ", 1)[-1]
            assert props["lowbit.quant"] == {"int4_qk_gate": "4-bit g32 symmetric",
                                             "int8_rest": "8-bit per-channel symmetric"}[group]
            _, i, block, name = module.split(".")
            hf = modules[f"model.layers.{i}.{'self_attn' if block == 'attn' else 'mlp'}.{name}"]
            hf.weight.copy_(torch.from_numpy(dequantize(quantize(hf.weight.numpy(), settings[group]))))
    ids = rng.integers(3, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        reference = model(input_ids=torch.tensor(ids)).logits.numpy()
    got = onnx_logits(out, ids)
    assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max()
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "Concat" and n.name.startswith("layers.") for n in graph.node) >= 2 * layers


def test_a_split_with_smoothquant_smooths_every_part(tmp_path):
    """SmoothQuant (llm-compressor's default mappings, α = 0.5) beside q/k at int4 and v at int8 (gate int4, up
    int8): the parts are unfused, and all read the norm's output divided by one s from the paper's rule over the
    three (two) weights and the float model's activations; the norms hold γ / s and each part's codes are those of
    its W·diag(s), code for code; down_proj, which no default mapping names, is not smoothed."""
    from onnx import numpy_helper

    from lowbit.converter.algorithms import fold_into_norm
    from lowbit.converter.algorithms.awq import scale_weight
    from lowbit.converter.algorithms.smoothquant import smoothing_scales
    from lowbit.converter.calibration import calibrate_statistics, load_calibration_samples
    from lowbit.custom_ops import matmul_nbits

    model = build_tiny_model("llama", tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    (tmp_path / "calib.txt").write_text(CALIBRATION_TEXT)
    recipe = tmp_path / "unfused_sq.yaml"
    recipe.write_text("SmoothQuantModifier:\n  smoothing_strength: 0.5\n" + UNFUSED)
    out, floats = tmp_path / "out", tmp_path / "f32"
    convert(tmp_path / "src", out, recipe=recipe, calib_data=tmp_path / "calib.txt", num_samples=4, seq_len=32)
    convert(tmp_path / "src", floats, scheme="q0f32")

    def tensors(folder):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}

    stored, reference = tensors(out), tensors(floats)
    samples = load_calibration_samples(tmp_path / "calib.txt", tmp_path / "src", 4, 32, 0)
    layers = model.config.num_hidden_layers
    fused = {f"layers.{i}.{m}" for i in range(layers) for m in ("attn.qkv_proj", "mlp.gate_up_proj")}
    absmax = calibrate_statistics(floats / "model.onnx", sorted(fused), ["absmax_per_channel"], samples)
    q = model.config.num_attention_heads * model.config.head_dim
    kv = model.config.num_key_value_heads * model.config.head_dim
    inter = model.config.intermediate_size
    int4, int8 = WeightQuant(4, 32, "symmetric"), WeightQuant(8, None, "symmetric")
    for i in range(layers):
        for module, norm, parts in (("attn.qkv_proj", "attn_norm", (("attn.q_proj", q, int4), ("attn.k_proj", kv, int4),
                                                                     ("attn.v_proj", kv, int8))),
                                    ("mlp.gate_up_proj", "mlp_norm", (("mlp.gate_proj", inter, int4),
                                                                       ("mlp.up_proj", inter, int8)))):
            w = np.ascontiguousarray(reference[f"layers.{i}.{module}.weight"].T)  # [N, K], parts stacked
            s = smoothing_scales(absmax[f"layers.{i}.{module}"]["absmax_per_channel"], [w], 0.5)
            name = f"layers.{i}.{norm}.weight"
            assert np.array_equal(stored[name], fold_into_norm(reference[name], s)), name
            start = 0
            for part, rows, quant in parts:
                qw = quantize(scale_weight(w[start:start + rows], s), quant)
                start += rows
                if quant.bits == 4:
                    assert np.array_equal(stored[f"layers.{i}.{part}.qweight"],
                                          matmul_nbits.pack(qw, symmetric=True).b), part
                else:
                    k = w.shape[1]
                    arrays = matmul_nbits.MatMulNBitsArrays(stored[f"layers.{i}.{part}.qweight"],
                                                            stored[f"layers.{i}.{part}.scales"], None, k, rows, 8,
                                                            matmul_nbits.block_layout(None, k)[0])
                    assert np.array_equal(dequantize(matmul_nbits.unpack(arrays)), dequantize(qw)), part
    record = json.loads((out / "lowbit.json").read_text())["algorithm"]["smoothquant"]
    assert record["alpha"] == 0.5 and len(record["scales"]) == 2 * layers


def test_config_json_carries_the_recipe_as_compressed_tensors_reads_it(tmp_path):
    """config.json's quantization_config: compressed-tensors' own QuantizationConfig validates it, its groups
    target exactly the transformers modules each group quantizes, lm_head is ignored, and the per-group
    arguments are the recipe's."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    out = tmp_path / "a"
    convert(SAMPLE_MODEL, out, recipe=RECIPE_A)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = ct.QuantizationConfig.model_validate(config)
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "pack-quantized"
    assert config["ignore"] == ["lm_head"]
    groups = parsed.config_groups
    assert set(groups) == {"int4_rest", "int8_down_proj"}
    assert (groups["int4_rest"].weights.num_bits, groups["int4_rest"].weights.group_size) == (4, 32)
    assert (groups["int8_down_proj"].weights.num_bits, groups["int8_down_proj"].weights.strategy) == (8, "channel")
    meta = json.loads((out / "lowbit.json").read_text())["recipe"]["modules"]
    for name, group in groups.items():
        expected = sorted(hf for m in meta.values() if m["group"] == name for hf in m["hf_modules"])
        assert sorted(group.targets) == expected
    source = json.loads((SAMPLE_MODEL / "config.json").read_text())
    assert {k: v for k, v in json.loads((out / "config.json").read_text()).items()
            if k != "quantization_config"} == source  # nothing else changes
