"""--ignore: modules kept in float by our or transformers' module names."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lowbit.cli import main
from lowbit.converter.export import convert
from lowbit.converter.quant.ignore import IgnorePattern, WeightModule, ignored_modules
from lowbit.converter.quant.plan import QuantPlan, QuantRule
from lowbit.converter.schemes import SchemeOptions, get_scheme
from lowbit.errors import LowbitError
from lowbit.runtime.session import create_session
from tests.conftest import SAMPLE_MODEL, build_tiny_model

MODULES = [
    WeightModule("embed_tokens", ("model.embed_tokens",)),
    WeightModule("layers.0.attn.qkv_proj", tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")),
    WeightModule("layers.0.mlp.down_proj", ("model.layers.0.mlp.down_proj",)),
    WeightModule("layers.1.mlp.down_proj", ("model.layers.1.mlp.down_proj",)),
    WeightModule("lm_head", ("lm_head",)),
]


def test_patterns_match_our_names_and_transformers_names():
    assert ignored_modules(MODULES, ["lm_head"]) == {"lm_head"}
    assert ignored_modules(MODULES, ["model.layers.*.mlp.down_proj"]) == {"layers.0.mlp.down_proj",
                                                                          "layers.1.mlp.down_proj"}
    assert ignored_modules(MODULES, ["layers.1.*"]) == {"layers.1.mlp.down_proj"}
    assert ignored_modules(MODULES, ["re:.*down_proj$", "embed_tokens"]) == {
        "layers.0.mlp.down_proj", "layers.1.mlp.down_proj", "embed_tokens"}
    # a fused node goes when every transformers module in it matches, or its own name does
    assert ignored_modules(MODULES, [r"re:.*self_attn\.[qkv]_proj"]) == {"layers.0.attn.qkv_proj"}
    assert ignored_modules(MODULES, ["layers.0.attn.qkv_proj"]) == {"layers.0.attn.qkv_proj"}
    assert ignored_modules(MODULES, []) == set()
    # re: matches at the start of the name, as compressed-tensors does; globs match whole names
    assert IgnorePattern("re:model.layers.0").matches("model.layers.0.mlp.down_proj")
    assert not IgnorePattern("re:layers").matches("model.layers.0.mlp.down_proj")
    assert not IgnorePattern("down_proj").matches("model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("patterns,message", [
    (["re:.*q_proj"], "but not model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj"),
    (["model.layers.0.self_attn.q_proj"], "in the same node layers.0.attn.qkv_proj"),
    (["lm_head", "down_proj"], "--ignore down_proj: matches no weight module"),
    (["re:(("], "not a regular expression"),
    ([""], "empty pattern"),
])
def test_bad_patterns_are_errors(patterns, message):
    with pytest.raises(LowbitError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ignored_modules(MODULES, patterns)


def test_ignored_modules_stay_float_and_the_rest_is_exact(tmp_path, rng):
    """Logits equal transformers on the dequantized weights with the ignored modules left float."""
    torch = pytest.importorskip("torch")
    from tests.test_schemes import dequantized_reference

    model = build_tiny_model("llama", tmp_path / "src")
    options = SchemeOptions(accuracy_level=0, symmetric=False)
    patterns = ("lm_head", "model.layers.*.mlp.down_proj", r"re:model\.layers\.1\.self_attn\.[qkv]_proj$")
    report = convert(str(tmp_path / "src"), tmp_path / "onnx", scheme="w4a16", options=options, ignore=patterns)
    float_modules = ["layers.0.mlp.down_proj", "layers.1.attn.qkv_proj", "layers.1.mlp.down_proj", "lm_head"]
    assert report.quant.ignored == sorted(float_modules)
    assert not {r.module for r in report.quant.layers} & set(float_modules)

    scheme = get_scheme("w4a16", options)
    keep = tuple(QuantRule(m, None) for m in float_modules)
    reference = dequantized_reference(model, dataclasses.replace(scheme, plan=QuantPlan(keep + scheme.plan.rules)))
    ids = rng.integers(3, model.config.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    session = create_session(tmp_path / "onnx")
    logits, _ = session.forward(ids, mask, np.arange(9)[None].repeat(2, 0), session.empty_past(2))
    assert np.abs(logits - expected).max() / np.abs(expected).max() <= 1e-4

    graph = onnx.load(tmp_path / "onnx" / "model.onnx", load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    for module in float_modules:
        assert nodes[module].op_type in ("MatMul", "Gemm")
    hf = {p.key: p.value for p in nodes["layers.0.attn.qkv_proj"].metadata_props}
    assert hf["lowbit.hf_modules"] == ",".join(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    meta = json.loads((tmp_path / "onnx" / "lowbit.json").read_text())
    assert meta["ignore"] == {"patterns": list(patterns), "modules": sorted(float_modules)}


@pytest.mark.skipif(not SAMPLE_MODEL.is_dir(), reason="samples/stories260K-hf missing")
@pytest.mark.parametrize("args,message", [
    (["--scheme", "w4a16", "--ignore", "re:.*q_proj"], "lowbit computes in the same node layers.0.attn.qkv_proj"),
    (["--scheme", "w4a16", "--ignore", "lm_head", "--ignore", "mlp"], "--ignore mlp: matches no weight module"),
    (["--scheme", "q0f32", "--ignore", "lm_head"], "q0f32 quantizes nothing"),
    (["--scheme", "q4f16_1", "--ignore", "re:[z-a]"], "not a regular expression"),
])
def test_cli_rejects_bad_ignore_patterns(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not SAMPLE_MODEL.is_dir(), reason="samples/stories260K-hf missing")
def test_cli_decoder_linears_only(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), "--scheme", "w4a16",
                                       "--ignore", "lm_head", "--ignore", "model.embed_tokens"])
    assert result.exit_code == 0, result.output
    assert "kept in float by --ignore: embed_tokens, lm_head" in result.output
    quantized = json.loads((out / "lowbit.json").read_text())["quantization"]
    assert "lm_head" not in quantized and "embed_tokens" not in quantized
    assert all(name.startswith("layers.") for name in quantized) and len(quantized) == 20
