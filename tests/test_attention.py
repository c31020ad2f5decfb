"""Attention builders: which one each target and architecture gets, and GroupQueryAttention's
cases beyond tests/test_architectures.py (a multi-token step on top of a past, shared KV buffers
under onnxruntime-genai)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from lowbit.converter.architectures import get_architecture
from lowbit.converter.attention import ATTENTION, choose_attention
from lowbit.converter.decoder import TARGETS
from lowbit.converter.export import convert
from lowbit.runtime.session import create_session
from tests.conftest import TINY_CONFIGS
from tests.test_architectures import STANDARD_ATTENTION_ON_ORT

torch = pytest.importorskip("torch")


def tiny_spec(arch_id: str):
    import transformers

    class_name, kwargs = TINY_CONFIGS[arch_id]
    config = getattr(transformers, class_name)(**kwargs)
    return get_architecture(config.model_type).spec(config)


@pytest.mark.parametrize("arch_id", list(TINY_CONFIGS))
def test_ort_gets_group_query_attention_where_it_applies(arch_id):
    spec = tiny_spec(arch_id)
    expected = "standard" if arch_id in STANDARD_ATTENTION_ON_ORT else "gqa"
    assert choose_attention(spec, TARGETS["ort"].attention).name == expected
    assert choose_attention(spec, TARGETS["tensorrt"].attention).name == "standard"


@pytest.mark.parametrize("change,reason", [
    (dict(head_dim=8), "head_dim 8"),  # stories260K: ORT's GroupQueryAttention rejects it at run time
    (dict(head_dim=24), "head_dim 24"),
])
def test_group_query_attention_declines_with_a_reason(change, reason):
    spec = dataclasses.replace(tiny_spec("llama"), **change)
    assert reason in ATTENTION["gqa"].unsupported(spec)
    assert choose_attention(spec, TARGETS["ort"].attention).name == "standard"


def test_group_query_attention_declines_partial_rotary_below_16():
    spec = tiny_spec("llama")
    spec = dataclasses.replace(spec, rope=dataclasses.replace(spec.rope, rotary_dim=8))
    assert "rotary_dim 8" in ATTENTION["gqa"].unsupported(spec)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models


@pytest.mark.parametrize("target,op,share", [("ort", "GroupQueryAttention", True), ("tensorrt", "Softmax", False)])
def test_graph_and_genai_config_follow_the_builder(target, op, share, tiny, tmp_path):
    source, model = tiny("llama")
    convert(str(source), tmp_path, target=target)
    ops = [n.op_type for n in onnx.load(tmp_path / "model.onnx", load_external_data=False).graph.node]
    assert ops.count(op) == model.config.num_hidden_layers
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is share


@pytest.mark.parametrize("scheme,tolerance", [("q0f32", 1e-4), ("q0f16", 2e-2)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch_id", ["llama", "mistral", "gemma2", "qwen3"])
def test_chunk_on_top_of_a_past_equals_one_pass(arch_id, batch, scheme, tolerance, tiny, tmp_path, rng):
    """Prefill 6 tokens, feed 4 more at once on top of the cache (chat's path), then decode 2 one by one:
    the logits equal transformers' over the whole left-padded sequence in one pass (windows of 5 are crossed)."""
    source, model = tiny(arch_id)
    convert(str(source), tmp_path, scheme=scheme)
    session = create_session(tmp_path)
    ids = rng.integers(3, model.config.vocab_size, (batch, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1:, :2] = 0  # left padding in rows after the first
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions)).logits.float().numpy()

    logits, past = [], session.empty_past(batch)
    for start, end in [(0, 6), (6, 10), (10, 11), (11, 12)]:
        step, past = session.forward(ids[:, start:end], mask[:, :end], positions[:, start:end], past)
        logits.append(step.astype(np.float32))
    actual = np.concatenate(logits, axis=1)
    real = mask.astype(bool)
    error = np.abs(actual - expected)[real].max() / np.abs(expected).max()
    assert error <= tolerance


def genai_greedy_batch(folder, prompts: np.ndarray, new_tokens: int) -> list[list[int]]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompts.shape[1] + new_tokens, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(prompts.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(row)[prompts.shape[1]:]] for row in range(len(prompts))]


def test_genai_shared_buffer_batch(tiny, tmp_path):
    """A batch under onnxruntime-genai, where GroupQueryAttention writes into the shared KV buffer: the
    tokens are our runtime's, and those of the standard graph (without a shared buffer) under genai for
    rows padded with the pad token (which genai 0.18 does not mask: the rows are compared as fed)."""
    from lowbit.runtime.generate import SamplingConfig, generate_ids

    source, _ = tiny("llama")
    convert(str(source), tmp_path / "gqa")
    convert(str(source), tmp_path / "standard", target="tensorrt")
    prompts = np.array([[5, 17, 33, 8, 9, 40], [21, 3, 11, 12, 13, 7]])
    ours = generate_ids(create_session(tmp_path / "gqa"), prompts.tolist(), SamplingConfig(max_new_tokens=8))
    assert genai_greedy_batch(tmp_path / "gqa", prompts, 8) == ours
    pad = json.loads((tmp_path / "gqa" / "genai_config.json").read_text())["model"]["pad_token_id"]
    padded = np.array([[5, 17, 33, 8, 9, 40], [pad, pad, pad, 11, 12, 13]])
    assert genai_greedy_batch(tmp_path / "gqa", padded, 8) == genai_greedy_batch(tmp_path / "standard", padded, 8)
