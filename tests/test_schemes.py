"""Schemes end to end: quantized ONNX logits equal transformers run on the dequantized weights,
every scheme runs on stories260K, perplexity ordering, CLI options and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from lowbit.errors import LowbitError
from lowbit.converter.export import convert
from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.converter.schemes import SchemeOptions, dashinfer_scheme_name, get_scheme
from lowbit.cli import main
from lowbit.runtime.session import create_session
from lowbit.runtime.tokenizer import load_tokenizer
from tests.conftest import SAMPLE_MODEL, WIKITEXT, build_tiny_model

torch = pytest.importorskip("torch")

MODULE_OF = {  # our module name pattern -> HF parameter names of that module
    "attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.o_proj": ["self_attn.o_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down_proj": ["mlp.down_proj"],
}


def dequantized_reference(model, scheme):
    """A copy of the HF model whose weights went through quantize -> dequantize as the plan says."""
    import copy

    ref = copy.deepcopy(model)
    plan = scheme.plan
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for i in range(ref.config.num_hidden_layers):
            for module, hf_names in MODULE_OF.items():
                layer = plan.lookup(f"layers.{i}.{module}")
                if layer is None:  # kept in float
                    continue
                for hf in hf_names:
                    p = params[f"model.layers.{i}.{hf}.weight"]
                    p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), layer.weight, scheme.dtype))))
        head, embed = plan.lookup("lm_head"), plan.lookup("embed_tokens")
        table = params["model.embed_tokens.weight"].numpy().copy()
        if ref.config.tie_word_embeddings and (head is not None) != (embed is not None):
            ref.lm_head.weight = torch.nn.Parameter(torch.from_numpy(table.copy()))  # untie: one side stays float
            params["lm_head.weight"] = ref.lm_head.weight
        if embed is not None:
            params["model.embed_tokens.weight"].copy_(torch.from_numpy(dequantize(quantize(table, embed.weight, scheme.dtype))))
        if head is not None:
            w = params["lm_head.weight"].detach().numpy().copy() if "lm_head.weight" in params else table
            ref.lm_head.weight.data = torch.from_numpy(dequantize(quantize(w, head.weight, scheme.dtype)))
    return ref


@pytest.mark.parametrize("arch_id", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme,extra", [
    ("q4f32_1", {"accuracy_level": 0}),
    ("a16w4", {"accuracy_level": 0}),
    ("a16w8", {"accuracy_level": 0}),
    ("a16w8-minmax", {"accuracy_level": 0}),
    ("a16w4-g16", {"accuracy_level": 0}),
    ("w4a16", {"accuracy_level": 0, "symmetric": False}),
    ("w2a16", {"accuracy_level": 0, "group_size": 16}),
    ("w3a16", {"group_size": 24, "accuracy_level": 0}),
    # the default, int8 activations (accuracy level 4): the activations' own rounding, about 1% of the logits
    ("q4f32_1", {}),
    ("a16w8", {}),
    ("a16w4", {}),
    ("w2a16", {"group_size": 16}),
])
def test_quantized_logits_equal_transformers_on_dequantized_weights(arch_id, scheme, extra, tmp_path, rng):
    """Float compute (accuracy level 0) gives the dequantized weights' logits to 1e-4; int8 compute to 3e-2."""
    source = tmp_path / "src"
    model = build_tiny_model(arch_id, source)
    options = SchemeOptions(**extra)
    out = tmp_path / "onnx"
    report = convert(str(source), out, scheme=scheme, options=options)
    assert report.quant.layers and all(r.max_rel_error is not None for r in report.quant.layers)
    ref = dequantized_reference(model, get_scheme(scheme, options))
    ids = rng.integers(3, model.config.vocab_size, (2, 11))
    mask = np.ones_like(ids)
    positions = np.arange(11)[None].repeat(2, 0)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        float_logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    session = create_session(out)
    logits, _ = session.forward(ids, mask, positions, session.empty_past(2))
    scale = np.abs(expected).max()
    tolerance = 1e-4 if extra.get("accuracy_level") == 0 else 3e-2
    assert np.abs(logits - expected).max() / scale <= tolerance
    assert np.abs(float_logits - expected).max() / scale > 1e-4  # quantization did change the model


def test_every_scheme_runs_on_stories260k(tmp_path):
    from lowbit.runtime.generate import SamplingConfig, generate_text

    for scheme in ["q4f16_1", "q4f32_1", "q3f16_1", "a16w8", "a16w4", "a16w8-g128", "a16w4-g32", "a16w8-minmax",
                   "w4a16", "w8a16", "w2a16"]:
        out = tmp_path / scheme
        convert(str(SAMPLE_MODEL), out, scheme=scheme)
        text = generate_text(create_session(out), load_tokenizer(out), ["Once upon a time"],
                             SamplingConfig(max_new_tokens=8))[0]
        assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 8
        meta = json.loads((out / "lowbit.json").read_text())
        assert meta["scheme"] == scheme and meta["weight_bytes"] < meta["float_weight_bytes"]


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="../shared/data/wikitext2_test.txt not present")
def test_quality_ordering_on_stories260k(tmp_path):
    """8-bit within 1% PPL of fp32; 4-bit g32 closer to fp32 than per-channel 4-bit; 3-bit worse than 4-bit.

    "Closer" is the mean KL divergence from the fp32 model's next-token distribution: on this
    TinyStories model WikiText-2 is out of domain, and its PPL gap does not rank 4-bit schemes
    the way weight SQNR and KL do (see docs/performance.md).
    """
    from lowbit.runtime.evaluate import log_softmax

    tokenizer = load_tokenizer(SAMPLE_MODEL)
    ids = np.asarray(tokenizer.encode(WIKITEXT.read_text()[:150000]), np.int64)[: 512 * 40]
    windows = ids.reshape(-1, 512)

    def log_probs(scheme, **options):
        out = tmp_path / f"{scheme}{sorted(options.items())}"
        convert(str(SAMPLE_MODEL), out, scheme=scheme, options=SchemeOptions(**options))
        session = create_session(out)
        positions = np.arange(512)[None]
        return np.stack([log_softmax(session.forward(w[None], np.ones((1, 512), np.int64), positions,
                                                     session.empty_past(1))[0][0]) for w in windows])

    def ppl(logp):
        return float(np.exp(-np.take_along_axis(logp[:, :-1], windows[:, 1:, None], -1).mean()))

    def kl(logp):
        return float((np.exp(base) * (base - logp)).sum(-1).mean())

    base = log_probs("q0f32")
    w8, w4_g32, w4_channel = log_probs("a16w8"), log_probs("a16w4-g32"), log_probs("a16w4")
    w4_mlc, w3_mlc = log_probs("q4f16_1"), log_probs("q3f16_1")
    assert abs(ppl(w8) - ppl(base)) / ppl(base) < 0.01
    assert kl(w4_g32) < kl(w4_channel)
    assert kl(w3_mlc) > kl(w4_mlc) and ppl(w3_mlc) > ppl(w4_mlc) > ppl(base)


def test_dashinfer_quant_config(tmp_path):
    assert dashinfer_scheme_name({"quant_method": "instant_quant", "weight_format": "int8"}) == "a16w8"
    assert dashinfer_scheme_name({"quant_method": "instant_quant", "weight_format": "uint4",
                                  "group_size": 128}) == "a16w4-g128"
    for bad, message in [({"quant_method": "gptq", "weight_format": "int8"}, "quant_method"),
                         ({"quant_method": "instant_quant", "weight_format": "int3"}, "weight_format"),
                         ({"quant_method": "instant_quant", "weight_format": "int8", "x": 1}, "unknown keys"),
                         ({"quant_method": "instant_quant", "weight_format": "int8", "group_size": 0}, "group_size")]:
        with pytest.raises(LowbitError, match=message):
            dashinfer_scheme_name(bad)
    config = tmp_path / "quant.json"
    config.write_text(json.dumps({"quant_method": "instant_quant", "weight_format": "uint4", "group_size": 32}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), "--quant-config", str(config)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "lowbit.json").read_text())["scheme"] == "a16w4-g32"
    assert "max relative weight error" in result.output


def test_no_pad_error_names_the_layer_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), "--scheme", "w4a16",
                                       "--no-pad"])
    assert result.exit_code == 2
    assert re.fullmatch(r"error: layers\.0\.mlp\.down_proj: K=172 is not a multiple of the group size 32 and "
                        r"padding is disabled\n", result.output)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_scheme_options(tmp_path):
    out = tmp_path / "out"
    for args, message in [(["--scheme", "q4f16_1", "--group-size", "64"], "fixes its own group-size"),
                          (["--scheme", "w4a16", "--target", "tensorrt", "--group-size", "32"], "tensorrt"),
                          (["--scheme", "q3f16_1", "--target", "tensorrt"], "cannot store 3-bit"),
                          (["--scheme", "w4a16", "--accuracy-level", "9"], "accuracy-level"),
                          (["--scheme", "w4a16", "--quant-config", "x.json"], "either --scheme or --quant-config")]:
        result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_tensorrt_w4a16_uses_standard_ops_only(tmp_path):
    out = tmp_path / "trt"
    convert(str(SAMPLE_MODEL), out, scheme="w4a16", target="tensorrt", options=SchemeOptions(group_size=64))
    import onnx

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {n.domain for n in model.graph.node} == {""}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 5 * 4 + 1  # every decoder linear and lm_head; TensorRT has no quantized Gather
    onnx.checker.check_model(str(out / "model.onnx"))
    result = CliRunner().invoke(main, ["run", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "10"])
    assert result.exit_code == 0 and result.output.startswith("Once upon a time")


def test_inspect_lists_quantized_nodes(tmp_path):
    out = tmp_path / "q"
    convert(str(SAMPLE_MODEL), out, scheme="q4f32_1")
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0
    assert re.search(r"embed_tokens\s+com.microsoft.GatherBlockQuantized\s+4-bit g32 symmetric", result.output)
    assert re.search(r"layers.4.mlp.down_proj\s+com.microsoft.MatMulNBits\s+4-bit g32 symmetric\s+matmulnbits\s+"
                     r"int8 compute", result.output)
    assert "smaller" in result.output
    convert(str(SAMPLE_MODEL), out, scheme="a16w8", options=SchemeOptions(accuracy_level=0), overwrite=True)
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert re.search(r"layers.4.mlp.down_proj\s+com.microsoft.MatMulNBits\s+8-bit per-channel asymmetric\s+"
                     r"matmulnbits\s+float compute", result.output), result.output


def test_tied_embedding_is_stored_once(tmp_path):
    import onnx

    out = tmp_path / "q"
    report = convert(str(SAMPLE_MODEL), out, scheme="q4f32_1")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = {i.name for i in model.graph.initializer}
    assert "lm_head.qweight" in names and "embed_tokens.qweight" not in names and "embed_tokens.weight" not in names
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[gather.input[0]].op_type == "Reshape" and producers[gather.input[0]].input[0] == "lm_head.qweight"
    embed = next(r for r in report.quant.layers if r.module == "embed_tokens")
    head = next(r for r in report.quant.layers if r.module == "lm_head")
    assert embed.shares == "lm_head" and embed.quant_bytes == 0 and embed.max_rel_error == head.max_rel_error


def test_tied_3bit_embedding_is_stored_once(tmp_path, rng):
    """q3f16_1's embedding (GatherBlockwise) reads lm_head's MatMulBlockwise words, scales and zero points,
    and the model still gives the dequantized weights' logits (float16 activations: 5e-3 of the logits' scale)."""
    import onnx

    model = build_tiny_model("qwen2", tmp_path / "src")  # tied embeddings
    out = tmp_path / "q3"
    report = convert(str(tmp_path / "src"), out, scheme="q3f16_1", options=SchemeOptions(accuracy_level=0))
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert not any(i.name.startswith("embed_tokens.") for i in graph.initializer)
    gather = next(n for n in graph.node if n.op_type == "GatherBlockwise")
    assert [gather.input[0], *gather.input[2:]] == ["lm_head.qweight", "lm_head.scales", "lm_head.qzeros"]
    embed = next(r for r in report.quant.layers if r.module == "embed_tokens")
    assert embed.shares == "lm_head" and embed.quant_bytes == 0
    with torch.no_grad():  # float16 schemes quantize the weights as rounded to float16 (MLC's order)
        for param in model.parameters():
            param.copy_(param.half().float())
    ref = dequantized_reference(model, get_scheme("q3f16_1"))
    ids = rng.integers(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids)).logits.numpy()
    session = create_session(out)
    logits, _ = session.forward(ids, np.ones_like(ids), np.arange(9)[None].repeat(2, 0), session.empty_past(2))
    assert np.abs(logits.astype(np.float32) - expected).max() / np.abs(expected).max() <= 5e-3


def test_generic_symmetric_is_full_range_and_clip_search_is_an_option():
    plan = get_scheme("w4a16").plan
    assert plan.lookup("layers.0.mlp.down_proj").weight == WeightQuant(4, 32, "symmetric_full")
    searched = get_scheme("w4a16", SchemeOptions(clip_search=True)).plan.lookup("lm_head").weight
    assert searched == WeightQuant(4, 32, "symmetric_full", clip_search=True)
    assert get_scheme("w4a16", target="tensorrt").plan.lookup("layers.0.attn.o_proj").weight.rule == "symmetric"
    dashinfer = get_scheme("a16w4-g32", SchemeOptions(symmetric=True, clip_search=True)).plan
    assert dashinfer.lookup("layers.1.attn.qkv_proj").weight == WeightQuant(4, 32, "symmetric", clip_search=True)
    for name in ("q4f16_1", "q3f16_1"):
        with pytest.raises(LowbitError, match="fixes its own clip-search"):
            get_scheme(name, SchemeOptions(clip_search=True))
    with pytest.raises(LowbitError, match="fixes its own symmetric"):
        get_scheme("q4f32_1", SchemeOptions(symmetric=False))
