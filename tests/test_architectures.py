"""Every architecture: ONNX logits equal transformers' for a padded prefill and cached decode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lowbit.converter.export import convert
from lowbit.runtime.kv_cache import BoundKVCache, KVCache
from lowbit.runtime.session import create_session
from tests.conftest import TINY_CONFIGS, build_tiny_model, genai_greedy

torch = pytest.importorskip("torch")

PREFILL, DECODE_STEPS, BATCH = 9, 5, 3
STANDARD_ATTENTION_ON_ORT = {"phi3-longrope"}  # longrope; the rest get GroupQueryAttention (tests/test_attention.py)


def reference_logits(model, ids, mask, steps, next_tokens):
    """transformers logits for a prefill and `steps` cached decode steps."""
    out = []
    with torch.no_grad():
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        result = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions),
            use_cache=True,
        )
        out.append(result.logits.float().numpy())
        past = result.past_key_values
        for step in range(steps):
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            result = model(
                input_ids=torch.tensor(next_tokens[:, step:step + 1]), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions), past_key_values=past, use_cache=True,
            )
            out.append(result.logits.float().numpy())
            past = result.past_key_values
    return out


def onnx_logits(session, ids, mask, steps, next_tokens):
    out = []
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, past = session.forward(ids, mask, positions, session.empty_past(ids.shape[0]))
    out.append(logits.astype(np.float32))
    for step in range(steps):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, past = session.forward(next_tokens[:, step:step + 1], mask, positions, past)
        out.append(logits.astype(np.float32))
    return out


def cache_logits(session, ids, mask, steps, next_tokens, logits_to_keep):
    """onnx_logits through the generation loop's KV cache (preallocated and IO-bound on shared-buffer graphs),
    with a capacity smaller than the sequence so that the cache regrows on the way."""
    cache = KVCache.empty(session, ids.shape[0], capacity=ids.shape[1] + 1)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    out = [cache.forward(ids, mask, positions, logits_to_keep).astype(np.float32)]
    for step in range(steps):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        out.append(cache.forward(next_tokens[:, step:step + 1], mask, positions, logits_to_keep).astype(np.float32))
    return out


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
@pytest.mark.parametrize("scheme,tolerance", [("q0f32", 1e-4), ("q0f16", 2e-2)])
@pytest.mark.parametrize("arch_id", list(TINY_CONFIGS))
def test_logits_match_transformers(arch_id, scheme, tolerance, target, tiny_models, tmp_path, rng):
    source, model = tiny_models(arch_id)
    out = tmp_path / "onnx"
    convert(str(source), out, scheme=scheme, target=target)
    session = create_session(out)
    ops = {n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    assert ("GroupQueryAttention" in ops) == (target == "ort" and arch_id not in STANDARD_ATTENTION_ON_ORT)

    vocab = model.config.vocab_size
    ids = rng.integers(3, vocab, (BATCH, PREFILL), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in the batch
    mask[2, :1] = 0
    next_tokens = rng.integers(3, vocab, (BATCH, DECODE_STEPS), dtype=np.int64)

    expected = reference_logits(model, ids, mask, DECODE_STEPS, next_tokens)
    actual = onnx_logits(session, ids, mask, DECODE_STEPS, next_tokens)
    scale = max(np.abs(e).max() for e in expected)
    prefill_rows = mask.astype(bool)  # padded query rows carry no meaning
    errors = [np.abs(actual[0] - expected[0])[prefill_rows].max()]
    errors += [np.abs(a - e).max() for a, e in zip(actual[1:], expected[1:])]
    assert max(errors) / scale <= tolerance, (errors, scale)
    # the check must be able to fail: a different model's logits are far away
    assert np.abs(actual[1] - expected[2]).max() / scale > tolerance

    # the generation loop's path: the same logits, all positions or only the last one
    assert isinstance(KVCache.empty(session, 1), BoundKVCache) == (target == "ort" and arch_id not in
                                                                    STANDARD_ATTENTION_ON_ORT)
    all_positions = cache_logits(session, ids, mask, DECODE_STEPS, next_tokens, 0)
    last_position = cache_logits(session, ids, mask, DECODE_STEPS, next_tokens, 1)
    for plain, cached, last in zip(actual, all_positions, last_position):
        np.testing.assert_array_equal(cached[prefill_rows[:, -plain.shape[1]:]] if cached.shape[1] > 1 else cached,
                                      plain[prefill_rows[:, -plain.shape[1]:]] if plain.shape[1] > 1 else plain)
        np.testing.assert_array_equal(last, plain[:, -1:])


def test_pytorch_model_bin_checkpoint(tmp_path, rng):
    """Where a checkpoint has only pytorch_model.bin (read with torch), the export is the same."""
    source = tmp_path / "src"
    model = build_tiny_model("qwen2", source)
    for f in source.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    out = tmp_path / "onnx"
    convert(str(source), out)
    ids = rng.integers(3, model.config.vocab_size, (1, 8), dtype=np.int64)
    mask = np.ones_like(ids)
    expected = reference_logits(model, ids, mask, 0, ids)[0]
    actual = onnx_logits(create_session(out), ids, mask, 0, ids)[0]
    assert np.abs(actual - expected).max() / np.abs(expected).max() <= 1e-4


@pytest.mark.parametrize("arch_id", list(TINY_CONFIGS))
def test_onnxruntime_genai_runs_every_architecture(arch_id, tiny_models, tmp_path):
    """The output folder runs unmodified in onnxruntime-genai, with our runtime's greedy tokens."""
    from lowbit.runtime.generate import SamplingConfig, generate_ids

    source, _ = tiny_models(arch_id)
    out = tmp_path / "onnx"
    convert(str(source), out)
    prompt = [5, 17, 33, 8, 9, 40]
    ours = generate_ids(create_session(out), [prompt], SamplingConfig(max_new_tokens=8), eos_ids={2})[0]
    theirs = genai_greedy(out, prompt, 8)
    assert theirs == ours[: len(theirs)] and len(theirs) >= min(len(ours), 8) - 1
