"""Recipes (lowbit.converter.recipes): llm-compressor / compressed-tensors recipes read strictly and resolved into
per-module lowbit settings. The `--recipe` conversion itself: tests/test_recipe_convert.py."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import yaml

from lowbit.affine import WeightQuant
from lowbit.converter.quant.formats import DYNAMIC_INT8, STATIC_UINT8, static_fp8
from lowbit.converter.recipes import PRESETS, load_recipe, parse_recipe, resolve_recipe
from lowbit.converter.recipes.schema import QuantArgs
from lowbit.errors import LowbitError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "recipes"


def llama(layers=2, hidden=64, inter=172, vocab=512, q_heads_dim=None):
    """A Llama's weight modules as lowbit's converter names them (stories260K's sizes by default): (name, transformers
    modules, class, K, N)."""
    qkv = q_heads_dim or 2 * hidden
    mods = [("embed_tokens", ("model.embed_tokens",), "Embedding", hidden, vocab)]
    for i in range(layers):
        p = f"model.layers.{i}"
        mods += [
            (f"layers.{i}.attn.qkv_proj", tuple(f"{p}.self_attn.{x}_proj" for x in "qkv"), "Linear", hidden, qkv),
            (f"layers.{i}.attn.o_proj", (f"{p}.self_attn.o_proj",), "Linear", hidden, hidden),
            (f"layers.{i}.mlp.gate_up_proj", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), "Linear", hidden, 2 * inter),
            (f"layers.{i}.mlp.down_proj", (f"{p}.mlp.down_proj",), "Linear", inter, hidden),
        ]
    return mods + [("lm_head", ("lm_head",), "Linear", hidden, vocab)]


BIG = llama(hidden=256, inter=512)  # sizes the presets' group 128 divides


def resolve(text, modules=None, **kw):
    return resolve_recipe(parse_recipe(text), modules or BIG, **kw)


def fails(text, modules=None, **kw) -> str:
    with pytest.raises(LowbitError) as info:
        resolve(text, modules, **kw)
    message = str(info.value)
    assert "\n" not in message and message.startswith("<recipe>"), message
    return message


# ------------------------------------------------------------------------------ the samples


def test_sample_a_int8_down_int4_rest():
    res = resolve_recipe(load_recipe(SAMPLES / "a_int8_down_int4_rest.yaml"), llama())
    for i in range(2):
        down = res.modules[f"layers.{i}.mlp.down_proj"]
        assert down.quant.weight == WeightQuant(8, None, "symmetric") and down.group == "int8_down_proj"
        for name in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj"):
            m = res.modules[f"layers.{i}.{name}"]
            assert m.quant.weight == WeightQuant(4, 32, "symmetric") and m.group == "int4_rest"
            assert m.quant.activation is None and m.quant.accuracy_level == 0 and m.algorithm == "rtn"
            assert m.modifier == "quant_stage.quant_modifiers.QuantizationModifier"
    assert res.modules["embed_tokens"].quant is None and res.modules["lm_head"].quant is None
    assert [r.pattern for r in res.plan.rules] == [m[0] for m in llama()]
    assert res.plan.lookup("layers.1.mlp.down_proj").weight.bits == 8 and res.plan.lookup("lm_head") is None


def test_sample_b_nvfp4_fp8_down():
    res = resolve_recipe(load_recipe(SAMPLES / "b_nvfp4_fp8_down.yaml"), llama(), target="ort")
    for i in range(2):
        assert res.modules[f"layers.{i}.mlp.down_proj"].quant.activation == static_fp8("e4m3")
        for name in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj"):
            q = res.modules[f"layers.{i}.{name}"].quant
            assert q.weight == WeightQuant(4, 16, "nvfp4") and q.activation is None
    assert res.modules["lm_head"].quant is None


def test_sample_c_fp8_per_channel_attention_per_tensor_mlp():
    res = resolve_recipe(load_recipe(SAMPLES / "c_fp8_attn_channel_mlp_tensor.yaml"), llama(), target="ort")
    for name in ("attn.qkv_proj", "attn.o_proj"):
        q = res.modules[f"layers.0.{name}"].quant
        assert q.weight == WeightQuant(8, None, "fp8_e4m3", per_tensor=False) and q.activation == static_fp8("e4m3")
    for name in ("mlp.gate_up_proj", "mlp.down_proj"):
        q = res.modules[f"layers.1.{name}"].quant
        assert q.weight == WeightQuant(8, None, "fp8_e4m3", per_tensor=True) and q.activation == static_fp8("e4m3")
    assert res.plan.static_activations()


def test_sample_d_awq_attention_gptq_mlp():
    res = resolve_recipe(load_recipe(SAMPLES / "d_awq_attn_gptq_mlp.yaml"), llama())
    qkv, o = res.modules["layers.1.attn.qkv_proj"], res.modules["layers.1.attn.o_proj"]
    assert qkv.algorithm == o.algorithm == "awq" and qkv.quant.weight == WeightQuant(4, 32, "asymmetric")
    assert qkv.awq.smooth_layer == "re:.*input_layernorm$" and o.awq.smooth_layer == "re:.*v_proj$"
    assert qkv.awq.duo_scaling and not qkv.awq.clip and qkv.awq.grid == 20 and qkv.gptq is None
    for name in ("mlp.gate_up_proj", "mlp.down_proj"):
        m = res.modules[f"layers.0.{name}"]
        assert m.algorithm == "gptq" and m.awq is None and m.group == "mlp_w8a8"
        assert m.quant.weight == WeightQuant(8, None, "symmetric") and m.quant.activation == DYNAMIC_INT8
        assert (m.gptq.damp, m.gptq.block_size, m.gptq.act_order) == (0.01, 128, True)
    assert res.algorithms == {"awq", "gptq"}
    assert res.modules["layers.0.mlp.down_proj"].record()["modifier"] == "quant_stage.quant_modifiers.GPTQModifier"
    assert res.group("layers.0.mlp.down_proj").name == "mlp_w8a8" and res.group("lm_head") is None


def test_sample_e_dashinfer_matches_the_quant_config_scheme():
    from lowbit.converter.schemes import SCHEME_PATTERNS, SCHEMES, SchemeOptions, dashinfer_scheme_name

    res = resolve_recipe(load_recipe(SAMPLES / "e_dashinfer_instant_quant.yaml"), llama())
    name = dashinfer_scheme_name({"quant_method": "instant_quant", "weight_format": "int8", "group_size": -1})
    pattern, make = next((p, f) for p, f in SCHEME_PATTERNS if p.fullmatch(name))
    assert name not in SCHEMES
    scheme = make(pattern.fullmatch(name), SchemeOptions(accuracy_level=0), "ort")
    for module, hf, *_ in llama():
        assert res.modules[module].quant == scheme.plan.lookup(module), module


def test_real_module_names_from_the_converter(tmp_path):
    """The names a conversion records (lowbit.hf_modules) and the weight shapes, for stories260K."""
    onnx = pytest.importorskip("onnx")
    import lowbit

    lowbit.convert(ROOT / "samples" / "stories260K-hf", tmp_path / "f", scheme="q0f32")
    graph = onnx.load(tmp_path / "f" / "model.onnx", load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    modules = []
    for node in graph.node:
        hf = {p.key: p.value for p in node.metadata_props}.get("lowbit.hf_modules")
        if hf and node.op_type in ("MatMul", "Gemm", "Gather"):
            weight = shapes[node.input[1] if node.op_type != "Gather" else node.input[0]]
            k, n = (weight if node.op_type == "MatMul" else weight[::-1])
            modules.append((node.name, tuple(hf.split(",")), "Embedding" if node.op_type == "Gather" else "Linear",
                            k, n))
    assert len(modules) == 22
    res = resolve_recipe(load_recipe(SAMPLES / "a_int8_down_int4_rest.yaml"), modules)
    assert [m.quant.weight.bits for m in res.modules.values() if m.quant] == [4, 4, 4, 8] * 5
    res = resolve_recipe(load_recipe(SAMPLES / "d_awq_attn_gptq_mlp.yaml"), modules)
    assert {m.algorithm for m in res.modules.values()} == {None, "awq", "gptq"}


# ------------------------------------------------------------------------------ llm-compressor's own recipes

GPTQ_W4A16_STAGED = """
quant_stage:
  quant_modifiers:
    GPTQModifier: {targets: Linear, scheme: W4A16, ignore: [lm_head]}
"""

GPTQ_W4A16_SAVED = """
default_stage:
  default_modifiers:
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W4A16
      block_size: 128
      dampening_frac: 0.01
      actorder: static
      offload_hessians: false
"""

W8A8_STATIC_ASYM = """
quant_stage:
  quant_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.8
    GPTQModifier:
      ignore: [lm_head]
      actorder: null
      config_groups:
        group_0:
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
          input_activations: {num_bits: 8, symmetric: false, dynamic: false, strategy: tensor, type: int, observer: static_minmax}
          targets: [Linear]
"""  # noqa: E501 (tests/e2e/recipes/INT8/recipe_w8a8_static_asym.yaml, unchanged)

SMOOTHQUANT_GPTQ_W8A8 = """
quant_stage:
  quant_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.8
      mappings:
      - - ['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']
        - re:.*input_layernorm
      - - ['re:.*gate_proj', 're:.*up_proj']
        - re:.*post_attention_layernorm
    GPTQModifier:
      targets: ["Linear"]
      ignore: [lm_head]
      scheme: W8A8
"""

GPTQ_AWQ_MIXED = """
quant_stage:
  quant_modifiers:
    AWQModifier:
      duo_scaling: true
      mappings:
        - smooth_layer: "re:.*input_layernorm$"
          balance_layers: ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]
    QuantizationModifier:
      ignore: ["lm_head"]
      scheme: "W4A16"
      targets:
        - "re:.*self_attn\\\\.(k|q|o|v)_proj$"
    GPTQModifier:
      ignore: ["lm_head"]
      scheme: "W8A8"
      targets:
        - "re:.*mlp\\\\.(down|gate|up)_proj$"
      block_size: 128
      dampening_frac: 0.001
      actorder: null
"""


def test_staged_and_saved_gptq_recipes():
    for text in (GPTQ_W4A16_STAGED, GPTQ_W4A16_SAVED):
        res = resolve(text)
        assert res.recipe.layout == "staged"
        for name, m in res.modules.items():
            if name in ("embed_tokens", "lm_head"):
                assert m.quant is None
            else:
                assert m.quant.weight == WeightQuant(4, 128, "symmetric") and m.algorithm == "gptq"
                assert m.group == "group_0" and m.gptq.act_order and m.gptq.block_size == 128


def test_flat_layouts_and_plain_form_and_json():
    modifier = {"targets": "Linear", "scheme": "W4A16_ASYM", "ignore": ["lm_head"]}
    texts = {
        "list": yaml.safe_dump([{"QuantizationModifier": modifier}]),
        "mapping": yaml.safe_dump({"QuantizationModifier": modifier}),
        "modifiers key": yaml.safe_dump({"modifiers": [{"QuantizationModifier": modifier}]}),
        "group": yaml.safe_dump({"quant_modifiers": {"QuantizationModifier": modifier}}),
        "plain": yaml.safe_dump(modifier),
        "json": json.dumps({"quant_stage": {"quant_modifiers": {"QuantizationModifier": modifier}}}, indent=1),
    }
    for how, text in texts.items():
        res = resolve(text)
        assert res.modules["layers.1.mlp.down_proj"].quant.weight == WeightQuant(4, 128, "asymmetric"), how
        assert res.modules["lm_head"].quant is None and res.recipe.layout != "", how


def test_json_errors_have_lines(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"QuantizationModifier": {"scheme": "W4A16", "ignor": []}}, indent=2))
    with pytest.raises(LowbitError, match=r"r\.json:4: QuantizationModifier\.ignor: unknown key 'ignor' \(did you "
                                          r"mean 'ignore'\?\)"):
        load_recipe(path)


def test_smoothquant_gptq_static_int8():
    res = resolve(W8A8_STATIC_ASYM)
    for i in range(2):
        for name in ("attn.qkv_proj", "mlp.gate_up_proj"):
            m = res.modules[f"layers.{i}.{name}"]
            assert m.smoothquant.alpha == 0.8 and m.algorithm == "gptq" and not m.gptq.act_order
            assert m.quant.activation == STATIC_UINT8 and m.quant.weight == WeightQuant(8, None, "symmetric")
        for name in ("attn.o_proj", "mlp.down_proj"):
            assert res.modules[f"layers.{i}.{name}"].smoothquant is None


def test_old_awq_modifier_with_its_own_scheme():
    res = resolve("AWQModifier: {ignore: [lm_head], scheme: W4A16_ASYM, targets: [Linear]}")
    assert {m.algorithm for n, m in res.modules.items() if n not in ("embed_tokens", "lm_head")} == {"awq"}
    assert res.modules["layers.0.mlp.down_proj"].awq.smooth_layer == "re:.*up_proj$"


def test_llm_compressor_recipes_we_cannot_honour_are_rejected_by_name():
    assert "per-token dynamic activations" in fails(SMOOTHQUANT_GPTQ_W8A8)
    assert "scheme: preset W8A8 (input_activations.strategy): per-token" in fails(GPTQ_AWQ_MIXED)
    assert "duo_scaling: both is not supported" in fails(GPTQ_AWQ_MIXED.replace("duo_scaling: true",
                                                                                 "duo_scaling: both"))
    assert "KV-cache quantization is not supported" in fails(
        "GPTQModifier: {scheme: W4A16, kv_cache_scheme: {num_bits: 8, type: float}}")
    assert "SparseGPTModifier (pruning) is not supported" in fails("SparseGPTModifier: {sparsity: 0.5}")
    assert "FP4 activations are NVFP4: strategy tensor_group" in fails(  # the NVFP4 preset itself resolves
        "QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 4, type: float, strategy: "
        "tensor_group, group_size: 16}, input_activations: {num_bits: 4, type: float, strategy: group, "
        "group_size: 16, dynamic: true}}}}")
    assert "MXFP4" in fails("QuantizationModifier: {scheme: MXFP4A16}")
    assert "dynamic FP8 activations" in fails(
        "QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 8, type: float, "
        "strategy: channel}, input_activations: {num_bits: 8, type: float, strategy: tensor, dynamic: true}}}}")
    assert "mse" in fails("QuantizationModifier: {scheme: W4A16, weight_observer: mse}")
    assert "output activation quantization" in fails(
        "QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 8}, "
        "output_activations: {num_bits: 8}}}}")


def test_awq_then_gptq_on_the_same_modules():
    """AWQ as a transform before a GPTQModifier: the modules its mappings scale carry both settings (the pipeline
    quantizes the scaled weight by GPTQ); the others are GPTQ alone."""
    res = resolve("- AWQModifier: {n_grid: 10, mappings: [{smooth_layer: 're:.*input_layernorm$', "
                  "balance_layers: ['re:.*q_proj$', 're:.*k_proj$', 're:.*v_proj$']}]}\n"
                  "- GPTQModifier: {scheme: W4A16, targets: [Linear], ignore: [lm_head], dampening_frac: 0.05}")
    qkv, down = res.modules["layers.0.attn.qkv_proj"], res.modules["layers.0.mlp.down_proj"]
    assert qkv.algorithm == "awq" and qkv.awq.grid == 10 and qkv.gptq.damp == 0.05
    assert down.algorithm == "gptq" and down.awq is None and down.gptq.damp == 0.05


def test_awq_then_quantization_modifier_default_mappings():
    res = resolve("- AWQModifier: {duo_scaling: false, n_grid: 10}\n"
                  "- QuantizationModifier: {scheme: W4A16_ASYM, targets: [Linear], ignore: [lm_head]}")
    smooth = {n: m.awq.smooth_layer for n, m in res.modules.items() if m.awq}
    assert smooth["layers.0.attn.qkv_proj"] == "re:.*input_layernorm$"
    assert smooth["layers.0.mlp.down_proj"] == "re:.*up_proj$" and len(smooth) == 8
    o_proj = res.modules["layers.0.attn.o_proj"].awq
    assert o_proj.grid == 10 and not o_proj.duo_scaling
    assert "needs a quantizing modifier after it" in fails("AWQModifier: {}")


# ------------------------------------------------------------------------------ presets and semantics


def test_presets_equal_compressed_tensors():
    quant_scheme = pytest.importorskip("compressed_tensors.quantization.quant_scheme")
    assert set(PRESETS) == set(quant_scheme.PRESET_SCHEMES)
    for name, theirs in quant_scheme.PRESET_SCHEMES.items():
        ours = PRESETS[name]
        assert set(ours) == set(theirs), name
        for role, args in theirs.items():
            mine = QuantArgs.model_validate(ours[role])
            for key in ("num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "observer",
                        "block_structure", "actorder"):
                assert getattr(mine, key) == getattr(args, key), (name, role, key)
            scale = None if args.scale_dtype is None else str(args.scale_dtype).removeprefix("torch.")
            assert mine.scale_dtype == scale, (name, role)


def test_lowbit_rules_against_compressed_tensors_formulas():
    """asymmetric == compressed-tensors' asymmetric rule exactly; symmetric differs (docs/recipes.md): its scale is
    max|w| / ((2^b - 1) / 2), ours max|w| / (2^(b-1) - 1)."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from lowbit.affine import dequantize, quantize

    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    t = torch.from_numpy(w)
    for bits in (4, 8):
        for symmetric in (False, True):
            args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
            scale, zero = calculate_qparams(t.amin(1, keepdim=True), t.amax(1, keepdim=True), args)
            theirs = fake_quantize(t, scale, zero, args).numpy()
            ours = dequantize(quantize(w, WeightQuant(bits, None, "symmetric" if symmetric else "asymmetric")))
            if symmetric:
                expected = np.abs(w).max(1) / ((2**bits - 1) / 2)
                np.testing.assert_allclose(scale[:, 0].numpy(), expected, rtol=1e-6)
            else:
                np.testing.assert_array_equal(theirs, ours)


def test_target_precedence_is_compressed_tensors():
    """Exact name > regex > class name, as compressed-tensors' match_targets orders them."""
    text = """
QuantizationModifier:
  config_groups:
    int4: {targets: [Linear], weights: {num_bits: 4, strategy: group, group_size: 32}}
    int8: {targets: ["re:.*down_proj$"], weights: {num_bits: 8, strategy: channel}}
    int2: {targets: [model.layers.0.mlp.down_proj], weights: {num_bits: 2, strategy: group, group_size: 32}}
"""
    res = resolve(text, llama(hidden=64, inter=128))
    assert res.modules["layers.0.mlp.down_proj"].group == "int2"
    assert res.modules["layers.1.mlp.down_proj"].group == "int8"
    assert res.modules["lm_head"].group == "int4" and res.modules["layers.1.attn.o_proj"].group == "int4"
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.utils.match import match_targets

    targets = ["Linear", "re:.*down_proj$", "model.layers.0.mlp.down_proj"]
    assert match_targets("model.layers.0.mlp.down_proj", torch.nn.Linear(1, 1), targets)[0] == targets[2]
    assert match_targets("model.layers.1.mlp.down_proj", torch.nn.Linear(1, 1), targets)[0] == targets[1]


def test_ignore_wins_and_unused_ignores_are_reported():
    res = resolve("GPTQModifier: {scheme: W8A16, ignore: ['re:.*layers\\.1\\..*', lm_head, 're:.*vision_tower.*']}")
    assert all(m.quant is None for n, m in res.modules.items() if n.startswith("layers.1."))
    assert res.modules["layers.0.attn.o_proj"].quant.weight == WeightQuant(8, 128, "symmetric")
    assert res.unused_ignores == ("re:.*vision_tower.*",)


def test_pad_and_bypass_divisibility():
    text = "QuantizationModifier: {scheme: W4A16, ignore: [lm_head]}"
    message = fails(text, llama())
    assert "group size 128 does not divide K = 64" in message and "bypass_divisibility_checks" in message
    res = resolve(text, llama(), pad=True)
    assert res.plan.pad and res.modules["layers.0.mlp.down_proj"].quant.weight.group_size == 128
    resolve(text.replace("ignore", "bypass_divisibility_checks: true, ignore"), llama())
    assert "--no-pad" in fails(text.replace("ignore", "bypass_divisibility_checks: true, ignore"), llama(), pad=False)
    assert not resolve(text, BIG, pad=False).plan.pad


# ------------------------------------------------------------------------------ bad recipes: one line, key and line

BAD = {
    "unknown key": ("QuantizationModifier:\n  config_groups:\n    g:\n      targets: [Linear]\n"
                    "      weights: {num_bit: 4}\n",
                    "<recipe>:5: QuantizationModifier.config_groups.g.weights.num_bit: unknown key 'num_bit' (did "
                    "you mean 'num_bits'?)"),
    "unknown preset": ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A17\n",
                       "<recipe>:4: quant_stage.quant_modifiers.GPTQModifier.scheme: unknown preset scheme 'W4A17'"),
    "target matches nothing": ("QuantizationModifier:\n  scheme: W8A16\n  targets:\n    - Linear\n"
                               "    - re:.*dense_h_to_4h$\n",
                               "<recipe>:5: QuantizationModifier.targets[1]: target 're:.*dense_h_to_4h$' matches "
                               "no weight module of the model (names look like model.layers.0.self_attn.q_proj"),
    "two groups claim one module": (
        "QuantizationModifier:\n  config_groups:\n"
        "    a: {targets: ['re:.*mlp.*'], weights: {num_bits: 4, group_size: 128}}\n"
        "    b: {targets: ['re:.*down_proj$'], weights: {num_bits: 8, strategy: channel}}\n",
        "<recipe>:4: QuantizationModifier.config_groups.b.targets[0]: model.layers.0.mlp.down_proj is claimed by two "
        "config groups of QuantizationModifier: a (target 're:.*mlp.*') and b (target 're:.*down_proj$')"),
    "two modifiers quantize one module": (
        "- QuantizationModifier: {scheme: W8A16}\n- GPTQModifier: {scheme: W4A16, targets: ['re:.*down_proj$']}\n",
        "<recipe>:2: [1].GPTQModifier.targets[0]: model.layers.0.mlp.down_proj is quantized by two modifiers: "
        "[0].QuantizationModifier (group group_0) and [1].GPTQModifier (group group_0)"),
    "activations on a format that cannot take them": (
        "GPTQModifier:\n  config_groups:\n    group_0:\n      targets: [Linear]\n"
        "      weights: {num_bits: 8, type: int, symmetric: false, strategy: channel}\n"
        "      input_activations: {num_bits: 8, type: int, symmetric: false, strategy: tensor}\n",
        "<recipe>:6: GPTQModifier.config_groups.group_0.input_activations: no lowbit format computes 8-bit "
        "per-channel asymmetric weights with int8 static asymmetric per-tensor activations: qdq_uint8: static INT8 "
        "Q/DQ stores 8-bit per-channel symmetric weights"),
    "int4 weights with int8 activations": (
        "QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: {num_bits: 4, group_size: 128}, "
        "input_activations: {num_bits: 8, dynamic: true, symmetric: false}}}}\n",
        "<recipe>:1: QuantizationModifier.config_groups.g.input_activations: no lowbit format computes 4-bit g128 "
        "symmetric weights with int8 dynamic asymmetric per-tensor activations: dynamic_quantize_matmul: "
        "DynamicQuantizeMatMul takes 8-bit weights, not 4"),
    "wrong type": ("QuantizationModifier:\n  config_groups:\n    g:\n      targets: [Linear]\n      weights:\n"
                   "        num_bits: four\n",
                   "<recipe>:6: QuantizationModifier.config_groups.g.weights.num_bits: Input should be a valid "
                   "integer (got 'four')"),
    "group without group_size": ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: "
                                 "{strategy: group}}}}\n",
                                 "<recipe>:1: QuantizationModifier.config_groups.g.weights.group_size: strategy group "
                                 "needs a positive group_size, got None"),
    "per-tensor int weights": ("QuantizationModifier: {config_groups: {g: {targets: [Linear], weights: "
                               "{num_bits: 8}}}}\n",
                               "<recipe>:1: QuantizationModifier.config_groups.g.weights.strategy: integer weights "
                               "with strategy tensor are not supported"),
    "scheme and config_groups": ("QuantizationModifier: {scheme: W8A16, config_groups: {}}\n",
                                 "<recipe>:1: QuantizationModifier.scheme: give either scheme or config_groups"),
    "missing targets": ("QuantizationModifier: {config_groups: {g: {weights: {num_bits: 8, strategy: channel}}}}\n",
                        "<recipe>:1: QuantizationModifier.config_groups.g: missing key 'targets'"),
    "bad regex": ("QuantizationModifier: {scheme: W8A16, targets: ['re:(']}\n",
                  "<recipe>:1: QuantizationModifier.targets[0]: 're:(' is not a regular expression"),
    "duplicate key": ("QuantizationModifier:\n  scheme: W8A16\n  scheme: W4A16\n",
                      "<recipe>:3: duplicate key 'scheme' (first on line 2)"),
    "yaml syntax": ("QuantizationModifier: {scheme: W8A16\n", "<recipe>:2: "),
    "unknown modifier": ("quant_stage:\n  quant_modifiers:\n    QuantisationModifier: {scheme: W8A16}\n",
                         "<recipe>:3: quant_stage.quant_modifiers.QuantisationModifier: unknown modifier "
                         "'QuantisationModifier' (did you mean 'QuantizationModifier'?)"),
    "stage key": ("quant_stage:\n  quant_mods:\n    QuantizationModifier: {scheme: W8A16}\n",
                  "<recipe>:2: quant_stage.quant_mods: unknown key 'quant_mods' in a stage"),
    "fused parts differ": (
        "QuantizationModifier:\n  config_groups:\n"
        "    a: {targets: ['re:.*q_proj$'], weights: {num_bits: 4, group_size: 128}}\n"
        "    b: {targets: ['re:.*(k|v)_proj$'], weights: {num_bits: 8, strategy: channel}}\n",
        "<recipe>:4: QuantizationModifier.config_groups.b: layers.0.attn.qkv_proj computes "
        "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj in one "
        "node but the recipe gives them different settings (model.layers.0.self_attn.q_proj: 4-bit g128 symmetric "
        "(rtn); model.layers.0.self_attn.k_proj: 8-bit per-channel symmetric (rtn);"),
    "fused part ignored": (
        "QuantizationModifier: {scheme: W8A16, ignore: ['re:.*gate_proj$']}\n",
        "<recipe>:1: QuantizationModifier.scheme: layers.0.mlp.gate_up_proj computes model.layers.0.mlp.gate_proj, "
        "model.layers.0.mlp.up_proj in one node but the recipe gives them different settings "
        "(model.layers.0.mlp.gate_proj: float; model.layers.0.mlp.up_proj: 8-bit g128 symmetric (rtn)); they can be "
        "unfused only where"),
    "embedding activations": (
        "QuantizationModifier: {config_groups: {g: {targets: [Embedding], weights: {num_bits: 8, type: float, "
        "strategy: channel}, input_activations: {num_bits: 8, type: float}}}}\n",
        "<recipe>:1: QuantizationModifier.config_groups.g: embed_tokens is an embedding: it has no input activations"),
    "training schedule": ("GPTQModifier: {scheme: W8A16, start: 2}\n",
                          "<recipe>:1: GPTQModifier.start: start: 2.0 is a training schedule"),
    "sparse format": ("QuantizationModifier: {config_groups: {g: {targets: [Linear], format: sparse-24-bitmask, "
                      "weights: {num_bits: 8, strategy: channel}}}}\n",
                      "<recipe>:1: QuantizationModifier.config_groups.g.format: format sparse-24-bitmask (sparsity) is "
                      "not supported"),
    "not a mapping": ("- 3\n", "<recipe>:1: [0]: each list entry is one ModifierName"),
    "empty": ("", "<recipe>: (top level): empty recipe"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipes_fail_with_one_line_naming_the_key(case):
    text, expected = BAD[case]
    message = fails(text)
    assert message.startswith(expected), message


# ------------------------------------------------------------------------------ fuzz

VALUES = [None, True, False, 0, 1, -1, 3, 4, 8, 16, 128, 0.5, 1e9, "", "x", "re:(", "re:.*", "Linear", "int",
          "float", "group", "channel", "tensor", "token", "tensor_group", "block", "local", "W4A16", "FP8", "NVFP4",
          [], [1], ["Linear"], {}, {"a": 1}, {"num_bits": 4}]
KEYS = ["num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "observer", "targets", "weights",
        "input_activations", "ignore", "scheme", "config_groups", "actorder", "block_size", "mappings", "x_y",
        "QuantizationModifier", "GPTQModifier", "quant_modifiers", "quant_stage"]


def _containers(node, out):
    if isinstance(node, (dict, list)):
        out.append(node)
        for child in (node.values() if isinstance(node, dict) else node):
            _containers(child, out)
    return out


def _mutate(doc, rng: random.Random):
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        container = rng.choice(_containers(doc, []))
        if not container:
            continue
        if isinstance(container, dict):
            key = rng.choice(list(container))
            action = rng.choice(["drop", "rename", "duplicate", "value", "value", "wrap"])
            if action == "drop":
                del container[key]
            elif action == "rename":
                container[rng.choice(KEYS)] = container.pop(key)
            elif action == "duplicate":
                container[rng.choice(KEYS)] = copy.deepcopy(container[key])
            elif action == "value":
                container[key] = copy.deepcopy(rng.choice(VALUES))
            else:
                container[key] = [container[key]]
        else:
            i = rng.randrange(len(container))
            action = rng.choice(["drop", "duplicate", "value"])
            if action == "drop":
                del container[i]
            elif action == "duplicate":
                container.append(copy.deepcopy(container[i]))
            else:
                container[i] = copy.deepcopy(rng.choice(VALUES))
    return doc


def test_fuzz_mutated_recipes_resolve_or_fail_with_one_line():
    rng = random.Random(9)
    docs = [yaml.safe_load(p.read_text()) for p in sorted(SAMPLES.glob("*.yaml"))]
    docs += [yaml.safe_load(t) for t in (GPTQ_W4A16_SAVED, W8A8_STATIC_ASYM, GPTQ_AWQ_MIXED)]
    outcomes = {"ok": 0, "error": 0}
    for i in range(400):
        text = yaml.safe_dump(_mutate(rng.choice(docs), rng), sort_keys=False)
        try:
            resolve_recipe(parse_recipe(text), BIG if i % 2 else llama(), pad=[None, True, False][i % 3])
            outcomes["ok"] += 1
        except LowbitError as e:
            assert "\n" not in str(e) and str(e).startswith("<recipe>"), (text, str(e))
            outcomes["error"] += 1
    assert outcomes["ok"] > 20 and outcomes["error"] > 100, outcomes


def test_docs_example_runs(monkeypatch, capsys):
    import re

    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "recipes.md").read_text(), re.DOTALL)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/recipes.md", "exec"), {})  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "layers.0.mlp.down_proj 8-bit per-channel symmetric int8_down_proj rtn" in out
    assert "layers.0.attn.qkv_proj 4-bit g32 symmetric int4_rest rtn" in out and "lm_head float None None" in out


def test_weight_modules_from_the_ignore_pass_are_accepted():
    from lowbit.converter.quant.ignore import WeightModule

    modules = [WeightModule(name, hf) for name, hf, *_ in BIG]
    res = resolve_recipe(parse_recipe(GPTQ_W4A16_STAGED), modules)
    assert res.modules["embed_tokens"].kind == "Embedding" and res.modules["embed_tokens"].quant is None
    assert res.modules["layers.0.mlp.down_proj"].quant.weight.group_size == 128
