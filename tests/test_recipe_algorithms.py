"""Several calibrated algorithms in one model: a recipe with AWQ on attention and GPTQ on the MLP (the shape of
sample (d)), run as llm-compressor's sequential pipeline (one layer-by-layer pass through every modifier) and
independent pipeline (`--independent`: each modifier calibrated on a pass of its own over the float model)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lowbit
from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.converter.algorithms import gptq_quantize
from lowbit.converter.calibration import calibrate_statistics, load_calibration_samples
from lowbit.custom_ops import matmul_nbits
from tests.conftest import SAMPLE_MODEL

pytestmark = pytest.mark.skipif(not SAMPLE_MODEL.is_dir(), reason="samples/stories260K-hf missing")

CALIBRATION_TEXT = (
    "A small boat sailed along the river at dawn. The fisherman counted the birds on the bank: three herons, a "
    "duck and a crow that would not stop talking. His daughter wrote the numbers in a blue book. At noon they "
    "ate bread and cheese under a willow, and the crow came down to ask for crumbs. They gave it the crust.\n"
) * 6
SETTINGS = dict(num_samples=5, seq_len=40, calib_seed=11)

AWQ = """    AWQModifier:
      duo_scaling: false
      n_grid: 10
      mappings:
        - smooth_layer: "re:.*input_layernorm$"
          balance_layers: ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]
"""
ATTENTION_GROUP = """        attention:
          targets: ["re:.*self_attn\\\\.(q|k|v|o)_proj$"]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 32}
"""
MLP_GROUP = """        mlp:
          targets: ["re:.*mlp\\\\.(gate|up|down)_proj$"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}
"""
ATTENTION = "    QuantizationModifier:\n      ignore: [lm_head]\n      config_groups:\n" + ATTENTION_GROUP
MLP_RTN = ("    QuantizationModifier:\n      ignore: [lm_head]\n      bypass_divisibility_checks: true\n"
           "      config_groups:\n" + ATTENTION_GROUP + MLP_GROUP)
GPTQ = """    GPTQModifier:
      ignore: [lm_head]
      bypass_divisibility_checks: true
      dampening_frac: 0.02
      actorder: null
      config_groups:
""" + MLP_GROUP
STAGE = "quant_stage:\n  quant_modifiers:\n"
RECIPES = {
    "awq_gptq": STAGE + AWQ + ATTENTION + GPTQ,  # AWQ (+ RTN) on attention, GPTQ on the MLP; o_proj RTN
    "awq_only": STAGE + AWQ + MLP_RTN,  # the same AWQ, the MLP round to nearest
    "gptq_only": STAGE + ATTENTION + GPTQ,  # the same GPTQ, attention round to nearest
}
MLP_QUANT = WeightQuant(4, 32, "symmetric")
ATTENTION_MODULES = ("attn.qkv_proj", "attn.o_proj")
MLP_MODULES = ("mlp.gate_up_proj", "mlp.down_proj")
LAYERS = 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-algorithms")
    data = root / "calib.txt"
    data.write_text(CALIBRATION_TEXT)
    out = {"float": root / "float"}
    lowbit.convert(SAMPLE_MODEL, out["float"], scheme="q0f32")
    for name, text in RECIPES.items():
        recipe = root / f"{name}.yaml"
        recipe.write_text(text)
        for sequential in ((True, False) if name == "awq_gptq" else (False,)):
            key = f"{name}-{'sequential' if sequential else 'independent'}"
            out[key] = root / key
            lowbit.convert(SAMPLE_MODEL, out[key], recipe=recipe, calib_data=data, sequential=sequential, **SETTINGS)
    samples = load_calibration_samples(data, SAMPLE_MODEL, SETTINGS["num_samples"], SETTINGS["seq_len"],
                                       SETTINGS["calib_seed"])
    return out, samples


def initializers(folder) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def module_tensors(stored: dict[str, np.ndarray], module: str) -> dict[str, np.ndarray]:
    found = {name: value for name, value in stored.items() if name.startswith(module + ".")}
    assert found, module
    return found


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names) -> None:
    for name in names:
        assert np.array_equal(a[name], b[name]), name


def convert_recipe(folders, where, name: str, text: str, **options):
    """`text` converted as a recipe into where/name with the fixture's calibration settings: (folder, its
    initializers, the float folder's initializers)."""
    out, _ = folders
    recipe = where / f"{name}.yaml"
    recipe.write_text(text)
    folder = where / name
    lowbit.convert(SAMPLE_MODEL, folder, recipe=recipe, calib_data=out["float"].parent / "calib.txt", **SETTINGS,
                   **options)
    return folder, initializers(folder), initializers(out["float"])


def test_independent_is_each_modifier_on_its_own(folders):
    """--independent: attention (AWQ scales folded into the input norm, its quantized weights) is exactly what the
    AWQ recipe alone gives, the MLP exactly what the GPTQ recipe alone gives; the post-attention norm stays float."""
    out, _ = folders
    both = initializers(out["awq_gptq-independent"])
    awq, gptq, floats = (initializers(out[k]) for k in ("awq_only-independent", "gptq_only-independent", "float"))
    for i in range(LAYERS):
        for module in ATTENTION_MODULES:
            tensors = module_tensors(both, f"layers.{i}.{module}")
            assert_same(tensors, awq, tensors)
        for module in MLP_MODULES:
            tensors = module_tensors(both, f"layers.{i}.{module}")
            assert_same(tensors, gptq, tensors)
        assert np.array_equal(both[f"layers.{i}.attn_norm.weight"], awq[f"layers.{i}.attn_norm.weight"])
        assert not np.array_equal(both[f"layers.{i}.attn_norm.weight"], floats[f"layers.{i}.attn_norm.weight"])
        assert np.array_equal(both[f"layers.{i}.mlp_norm.weight"], floats[f"layers.{i}.mlp_norm.weight"])
    record = json.loads((out["awq_gptq-independent"] / "lowbit.json").read_text())["algorithm"]
    assert record["name"] == "awq+gptq" and record["pipeline"] == "independent"
    assert set(record["algorithms"]) == {"awq", "gptq"}
    awq_record, gptq_record = record["algorithms"]["awq"], record["algorithms"]["gptq"]
    assert set(awq_record["layer_output_error"]) == {f"layers.{i}.attn.qkv_proj" for i in range(LAYERS)}
    assert set(gptq_record["layer_output_error"]) == {f"layers.{i}.{m}" for i in range(LAYERS) for m in MLP_MODULES}
    assert (awq_record["grid"], awq_record["duo_scaling"], awq_record["clip"]) == (10, False, False)  # the recipe's
    assert (gptq_record["damp"], gptq_record["act_order"]) == (0.02, False)
    meta = json.loads((out["awq_gptq-independent"] / "lowbit.json").read_text())
    algorithms = {m: e["algorithm"] for m, e in meta["recipe"]["modules"].items()}
    assert algorithms["layers.1.attn.qkv_proj"] == "awq" and algorithms["layers.1.attn.o_proj"] == "rtn"
    assert algorithms["layers.1.mlp.down_proj"] == "gptq"


def _dequantized_kn(stored: dict[str, np.ndarray], module: str, reference_kn: np.ndarray, bits=4, group=32):
    k, n = reference_kn.shape
    arrays = matmul_nbits.MatMulNBitsArrays(stored[f"{module}.qweight"], stored[f"{module}.scales"],
                                            stored.get(f"{module}.qzeros"), k, n, bits, group)
    return dequantize(matmul_nbits.unpack(arrays)).T


def test_sequential_is_one_pass_through_both_modifiers(folders, tmp_path):
    """Sequential: layer 0 sees float inputs (equal to --independent); layer 1's MLP is GPTQ on the Hessian of its
    input in the model whose layer 0 is quantized (AWQ's folded norm included) and whose layer-1 attention is
    still float: every modifier gathers a layer's statistics in the same pass, before any of them quantizes it."""
    out, samples = folders
    sequential, independent = initializers(out["awq_gptq-sequential"]), initializers(out["awq_gptq-independent"])
    for module in ATTENTION_MODULES + MLP_MODULES:
        tensors = module_tensors(sequential, f"layers.0.{module}")
        assert_same(tensors, independent, tensors)
    later = [name for name in sequential if name.endswith(".qweight") and not name.startswith("layers.0.")]
    assert any(not np.array_equal(sequential[name], independent[name]) for name in later)

    model = onnx.load(str(out["float"] / "model.onnx"))
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    replaced = {f"layers.0.{m}.weight": _dequantized_kn(sequential, f"layers.0.{m}", floats[f"layers.0.{m}.weight"])
                for m in ATTENTION_MODULES + MLP_MODULES}
    replaced["layers.0.attn_norm.weight"] = sequential["layers.0.attn_norm.weight"]
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name in replaced:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(replaced[tensor.name], tensor.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    module = "layers.1.mlp.gate_up_proj"
    hessian = calibrate_statistics(tmp_path / "model.onnx", [module], ["hessian"], samples)[module]["hessian"]
    result = gptq_quantize(np.ascontiguousarray(floats[f"{module}.weight"].T), hessian, MLP_QUANT, damp=0.02,
                           block_size=128, act_order=False)
    expected = matmul_nbits.pack(result.quantized, symmetric=True)
    assert np.array_equal(sequential[f"{module}.qweight"], expected.b)
    assert np.array_equal(sequential[f"{module}.scales"], expected.scales)
    record = json.loads((out["awq_gptq-sequential"] / "lowbit.json").read_text())["algorithm"]
    assert record["pipeline"] == "sequential" and record["calibration"]["samples"] == SETTINGS["num_samples"]


def test_both_algorithms_beat_round_to_nearest_on_their_layers(folders):
    out, _ = folders
    for key in ("awq_gptq-sequential", "awq_gptq-independent"):
        record = json.loads((out[key] / "lowbit.json").read_text())["algorithm"]["algorithms"]
        for name, entry in record.items():
            assert all(e[name] < e["rtn"] for e in entry["layer_output_error"].values()), (key, name)


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
def test_sample_d_converts_and_runs_both_ways(arch_id, rng, tmp_path):
    """Sample (d) on tiny Llama and Qwen2 (untied, GQA): AWQ + RTN asymmetric int4 on attention, GPTQ int8 with
    dynamic int8 activations on the MLP, lm_head float. Each node carries its group's setting and modifier, both
    pipelines run on ORT CPU, and their logits stay close to the float model's."""
    from tests.conftest import build_tiny_model
    from tests.test_fp8 import CALIBRATION_TEXT as TEXT, onnx_logits, write_char_tokenizer
    from tests.test_recipe_convert import SAMPLES, quantized_nodes

    model = build_tiny_model(arch_id, tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    (tmp_path / "calib.txt").write_text(TEXT)
    ids = rng.integers(3, model.config.vocab_size, (2, 16))
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        reference = model(input_ids=torch.tensor(ids)).logits.numpy()
    for sequential in (True, False):
        out = tmp_path / f"d-{sequential}"
        lowbit.convert(tmp_path / "src", out, recipe=SAMPLES / "d_awq_attn_gptq_mlp.yaml",
                       calib_data=tmp_path / "calib.txt", num_samples=4, seq_len=32, sequential=sequential)
        meta = json.loads((out / "lowbit.json").read_text())
        nodes = quantized_nodes(out)
        layers = model.config.num_hidden_layers
        assert set(nodes) == {f"layers.{i}.{m}" for i in range(layers) for m in ATTENTION_MODULES + MLP_MODULES}
        for module, props in nodes.items():
            attention = ".attn." in module
            assert props["lowbit.quant"] == ("4-bit g32 asymmetric" if attention else "8-bit per-channel symmetric")
            assert props["lowbit.recipe"].endswith("/ attention_w4a16_asym" if attention else "GPTQModifier / mlp_w8a8")
            assert meta["quantization"][module]["format"] == ("matmulnbits" if attention else "dynamic_quantize_matmul")
            expected = "awq" if module.endswith("qkv_proj") or module.endswith("o_proj") else "gptq"
            assert meta["recipe"]["modules"][module]["algorithm"] == expected
        record = meta["algorithm"]
        assert record["name"] == "awq+gptq" and record["pipeline"] == ("sequential" if sequential else "independent")
        got = onnx_logits(out, ids)
        assert np.isfinite(got).all()
        assert np.abs(got - reference).max() <= 0.25 * np.abs(reference).max()  # quantized, not broken


AWQ_THEN_GPTQ = STAGE + AWQ + """    GPTQModifier:
      ignore: [lm_head]
      dampening_frac: 0.02
      actorder: null
      config_groups:
        attention:
          targets: ["re:.*self_attn\\\\.(q|k|v)_proj$"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}
"""


def test_awq_then_gptq_on_one_module(folders):
    """AWQ as a transform, then GPTQ on the modules it scaled (--independent, so every layer sees float inputs):
    q/k/v = GPTQ of W·diag(s) on the Hessian of x / s, with s from `awq_search` on the float statistics and 1/s
    folded into the input norm, code for code."""
    from lowbit.converter.algorithms import awq_search, fold_into_norm
    from lowbit.converter.algorithms.awq import scale_weight

    out, samples = folders
    folder, stored, floats = convert_recipe(folders, out["float"].parent, "awq_then_gptq", AWQ_THEN_GPTQ,
                                            sequential=False)
    modules = [f"layers.{i}.attn.qkv_proj" for i in range(LAYERS)]
    stats = calibrate_statistics(out["float"] / "model.onnx", modules, ["hessian", "mean_abs_per_channel"], samples)
    for i, module in enumerate(modules):
        w = np.ascontiguousarray(floats[f"{module}.weight"].T)
        h = stats[module]["hessian"]
        s = awq_search([w], h, stats[module]["mean_abs_per_channel"], MLP_QUANT, grid=10, duo_scaling=False).scales
        result = gptq_quantize(scale_weight(w, s), h / np.outer(s, s), MLP_QUANT, damp=0.02, block_size=128,
                               act_order=False)
        expected = matmul_nbits.pack(result.quantized, symmetric=True)
        assert np.array_equal(stored[f"{module}.qweight"], expected.b), module
        assert np.array_equal(stored[f"{module}.scales"], expected.scales), module
        norm = f"layers.{i}.attn_norm.weight"
        assert np.array_equal(stored[norm], fold_into_norm(floats[norm], s)), norm
    record = json.loads((folder / "lowbit.json").read_text())
    assert record["algorithm"]["name"] == "awq" and record["algorithm"]["gptq"]["damp"] == 0.02
    assert record["recipe"]["modules"]["layers.0.attn.qkv_proj"]["gptq"]["damp"] == 0.02


def test_pipeline_option(tmp_path):
    """--pipeline is llm-compressor's name for --sequential / --independent; contradicting them is one line."""
    from click.testing import CliRunner

    from lowbit.cli import main
    from tests.test_bad_input import assert_clean_failure, run_convert
    from tests.test_recipe_convert import SAMPLES

    recipe = SAMPLES / "d_awq_attn_gptq_mlp.yaml"
    out = tmp_path / "out"
    assert_clean_failure(run_convert(SAMPLE_MODEL, "-o", out, "--recipe", recipe, "--pipeline", "sequential",
                                     "--independent"), out, "--pipeline sequential contradicts --independent")
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), "--recipe", str(recipe),
                                       "--pipeline", "independent", "--num-samples", "2", "--seq-len", "24"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "lowbit.json").read_text())["algorithm"]["pipeline"] == "independent"


TWO_SMOOTHQUANTS = """
- SmoothQuantModifier:
    smoothing_strength: 0.8
    mappings:
    - - ['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']
      - re:.*input_layernorm
- SmoothQuantModifier:
    smoothing_strength: 0.3
    mappings:
    - - ['re:.*gate_proj', 're:.*up_proj']
      - re:.*post_attention_layernorm
- QuantizationModifier:
    ignore: [lm_head]
    config_groups:
      w8a8:
        targets: [Linear]
        weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
        input_activations: {num_bits: 8, type: int, symmetric: false, dynamic: true, strategy: tensor}
"""


def test_smoothquant_strength_and_mappings_per_modifier(folders):
    """Two SmoothQuantModifiers: q/k/v smoothed at α = 0.8 into the input norm, gate/up at α = 0.3 into the
    post-attention norm, down_proj (mapped by neither) not smoothed; s from the paper's rule on the float model's
    per-channel max |x|, code for code."""
    from lowbit.converter.algorithms import fold_into_norm
    from lowbit.converter.algorithms.smoothquant import smoothing_scales

    out, samples = folders
    root = out["float"].parent
    recipe = root / "two_smoothquants.yaml"
    recipe.write_text(TWO_SMOOTHQUANTS)
    folder = root / "two_smoothquants"
    lowbit.convert(SAMPLE_MODEL, folder, recipe=recipe, calib_data=root / "calib.txt", **SETTINGS)
    stored, floats = initializers(folder), initializers(out["float"])
    record = json.loads((folder / "lowbit.json").read_text())["algorithm"]["smoothquant"]
    assert set(record["scales"]) == {f"layers.{i}.{m}" for i in range(LAYERS)
                                     for m in ("attn.qkv_proj", "mlp.gate_up_proj")}
    assert record["alpha"] == {**{f"layers.{i}.attn.qkv_proj": 0.8 for i in range(LAYERS)},
                               **{f"layers.{i}.mlp.gate_up_proj": 0.3 for i in range(LAYERS)}}
    modules = sorted(record["scales"])
    absmax = calibrate_statistics(out["float"] / "model.onnx", modules, ["absmax_per_channel"], samples)
    for i in range(LAYERS):
        for module, norm, alpha in (("attn.qkv_proj", "attn_norm", 0.8), ("mlp.gate_up_proj", "mlp_norm", 0.3)):
            name = f"layers.{i}.{module}"
            s = smoothing_scales(absmax[name]["absmax_per_channel"], [floats[f"{name}.weight"].T], alpha)
            norm = f"layers.{i}.{norm}.weight"
            assert np.array_equal(stored[norm], fold_into_norm(floats[norm], s)), norm


def test_smoothquant_mapping_without_a_place_for_its_scales_is_an_error(tmp_path):
    from tests.test_bad_input import assert_clean_failure, run_convert

    recipe = tmp_path / "v_to_o.yaml"
    recipe.write_text(TWO_SMOOTHQUANTS.replace("['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']", "['re:.*o_proj']")
                      .replace("re:.*input_layernorm", "re:.*v_proj"))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(SAMPLE_MODEL, "-o", out, "--recipe", recipe, "--num-samples", "2"), out,
                         "layers.0.attn.o_proj, layers.1.attn.o_proj, layers.2.attn.o_proj, layers.3.attn.o_proj, "
                         "layers.4.attn.o_proj has no norm or up projection before it")


AWQ_UNFUSED = """
- AWQModifier:
    duo_scaling: true
    n_grid: 8
    mappings:
    - smooth_layer: "re:.*input_layernorm$"
      balance_layers: ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]
    - smooth_layer: "re:.*post_attention_layernorm$"
      balance_layers: ["re:.*gate_proj$", "re:.*up_proj$"]
    - smooth_layer: "re:.*up_proj$"
      balance_layers: ["re:.*down_proj$"]
- QuantizationModifier:
    ignore: [lm_head]
    bypass_divisibility_checks: true
    config_groups:
      int4:
        targets: ["re:.*self_attn\\\\.(q|k|o)_proj$", "re:.*mlp\\\\.(gate|down)_proj$"]
        weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}
      int8:
        targets: ["re:.*self_attn\\\\.v_proj$", "re:.*mlp\\\\.up_proj$"]
        weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
"""
INT8_CHANNEL = WeightQuant(8, None, "symmetric")


def _stored_values(stored: dict[str, np.ndarray], module: str, quant: WeightQuant, k: int, n: int) -> np.ndarray:
    """The dequantized [N, K] weight of a symmetric MatMulNBits node."""
    block = matmul_nbits.block_layout(quant.group_size, k)[0]
    arrays = matmul_nbits.MatMulNBitsArrays(stored[f"{module}.qweight"], stored[f"{module}.scales"], None, k, n,
                                            quant.bits, block)
    return dequantize(matmul_nbits.unpack(arrays))[:, :k]


def test_awq_on_unfused_projections(folders, tmp_path):
    """AWQ beside a recipe that quantizes q/k at int4 and v at int8 (gate int4, up int8): the parts become nodes of
    their own, and the parts that read one norm share one s, searched with each part quantized by its own setting
    (`awq_search` with one WeightQuant per part, duo scaling's means over each part's own groups); γ / s in the
    norms, up_proj's rows divided by down_proj's s, every part's values those of its W·diag(s), value for value
    (--independent: every layer calibrated on the float model's inputs)."""
    from lowbit.converter.algorithms import awq_search, fold_into_linear_rows, fold_into_norm
    from lowbit.converter.algorithms.awq import scale_weight

    out, samples = folders
    folder, stored, floats = convert_recipe(folders, tmp_path, "awq_unfused", AWQ_UNFUSED, sequential=False)
    fused = [f"layers.{i}.{m}" for i in range(LAYERS) for m in ("attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    stats = calibrate_statistics(out["float"] / "model.onnx", fused, ["hessian", "mean_abs_per_channel"], samples)
    int4 = WeightQuant(4, 32, "symmetric")
    q_rows = 64
    kv_rows, inter = 32, 172  # stories260K: 8 heads of 8 over 4 KV heads; MLP 172
    for i in range(LAYERS):
        def search(module, parts):
            return awq_search([w for w, _ in parts], stats[module]["hessian"], stats[module]["mean_abs_per_channel"],
                              [quant for _, quant in parts], grid=8, duo_scaling=True).scales

        qkv = np.ascontiguousarray(floats[f"layers.{i}.attn.qkv_proj.weight"].T)
        q, k, v = qkv[:q_rows], qkv[q_rows:q_rows + kv_rows], qkv[q_rows + kv_rows:]
        s_attn = search(f"layers.{i}.attn.qkv_proj", [(q, int4), (k, int4), (v, INT8_CHANNEL)])
        gate_up = np.ascontiguousarray(floats[f"layers.{i}.mlp.gate_up_proj.weight"].T)
        gate, up = gate_up[:inter], gate_up[inter:]
        s_mlp = search(f"layers.{i}.mlp.gate_up_proj", [(gate, int4), (up, INT8_CHANNEL)])
        down = np.ascontiguousarray(floats[f"layers.{i}.mlp.down_proj.weight"].T)
        s_down = search(f"layers.{i}.mlp.down_proj", [(down, int4)])
        for norm, s in (("attn_norm", s_attn), ("mlp_norm", s_mlp)):
            name = f"layers.{i}.{norm}.weight"
            assert np.array_equal(stored[name], fold_into_norm(floats[name], s)), name
        expected = {"attn.q_proj": (scale_weight(q, s_attn), int4), "attn.k_proj": (scale_weight(k, s_attn), int4),
                    "attn.v_proj": (scale_weight(v, s_attn), INT8_CHANNEL),
                    "mlp.gate_proj": (scale_weight(gate, s_mlp), int4),
                    "mlp.up_proj": (fold_into_linear_rows(scale_weight(up, s_mlp), s_down), INT8_CHANNEL),
                    "mlp.down_proj": (scale_weight(down, s_down), int4)}
        for part, (w, quant) in expected.items():
            module = f"layers.{i}.{part}"
            got = _stored_values(stored, module, quant, w.shape[1], w.shape[0])
            assert np.array_equal(got, dequantize(quantize(w, quant))), module
        assert not np.array_equal(s_attn, np.ones_like(s_attn))
    record = json.loads((folder / "lowbit.json").read_text())["algorithm"]
    assert set(record["alpha"]) >= {f"layers.0.attn.{p}_proj" for p in "qkv"}
    assert record["alpha"]["layers.0.attn.q_proj"] == record["alpha"]["layers.0.attn.v_proj"]


def test_awq_scales_float_readers_of_its_norm(folders, tmp_path, rng):
    """A norm read by AWQ'd q/k and by a float v_proj (ignored): v_proj's float weight takes W·diag(s), so the
    converted model computes the float model's attention inputs; its logits equal those of the fake-quantized
    float model (q/k and the rest dequantized) to float rounding."""
    folder, stored, floats = convert_recipe(
        folders, tmp_path, "awq_float_v", AWQ_UNFUSED.replace("ignore: [lm_head]", "ignore: [lm_head, 're:.*v_proj$']"))
    record = json.loads((folder / "lowbit.json").read_text())
    assert "layers.0.attn.v_proj" in record["recipe"]["float"]
    for i in range(LAYERS):
        norm = f"layers.{i}.attn_norm.weight"
        s = floats[norm].astype(np.float64) / stored[norm]  # the folded γ / s gives s back (to float rounding)
        qkv = np.ascontiguousarray(floats[f"layers.{i}.attn.qkv_proj.weight"].T)
        v = stored[f"layers.{i}.attn.v_proj.weight"].T
        np.testing.assert_allclose(v, qkv[96:] * s, rtol=1e-6)
        assert not np.allclose(s, 1.0)


def test_awq_refuses_a_norm_reader_another_modifier_quantizes(tmp_path):
    """v_proj quantized by the QuantizationModifier but left out of AWQ's mapping for the input norm: AWQ would
    scale its input without its weight; one line, nothing written."""
    from tests.test_bad_input import assert_clean_failure, run_convert

    (tmp_path / "calib.txt").write_text(CALIBRATION_TEXT)
    recipe = tmp_path / "awq_partial.yaml"
    recipe.write_text(AWQ_UNFUSED.replace('["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]',
                                          '["re:.*q_proj$", "re:.*k_proj$"]'))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(SAMPLE_MODEL, "-o", out, "--recipe", recipe, "--calib-data",
                                     tmp_path / "calib.txt", "--num-samples", "2", "--seq-len", "24"), out,
                         "layers.0.attn.v_proj also read(s) but another modifier quantizes")
