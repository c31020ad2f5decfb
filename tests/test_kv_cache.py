"""The generation loop's KV caches (runtime/kv_cache.py) and the graph's `logits_to_keep` input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lowbit.converter.export import convert
from lowbit.converter.schemes import SchemeOptions
from lowbit.errors import LowbitError
from lowbit.runtime.generate import SamplingConfig, generate_ids, stream_ids
from lowbit.runtime.kv_cache import BoundKVCache, GrowingKVCache, KVCache
from lowbit.runtime.session import LOGITS_TO_KEEP, create_session
from tests.conftest import COMMON, GQA

torch = pytest.importorskip("torch")

CONTEXT = 320


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    """A tiny random llama (GroupQueryAttention on the ort target) with room for 200+ generated tokens."""
    import transformers

    source = tmp_path_factory.mktemp("long_llama")
    config = transformers.LlamaConfig(**{**COMMON, **GQA, "max_position_embeddings": CONTEXT})
    torch.manual_seed(7)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(source, safe_serialization=True)
    folders = {"source": source}
    for target in ("ort", "tensorrt"):
        folders[target] = tmp_path_factory.mktemp(f"long_llama_{target}")
        convert(str(source), folders[target], target=target)
    return folders


def plain_greedy(session, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens through session.forward alone: a growing past, all positions' logits."""
    ids = np.array([prompt], np.int64)
    mask, positions = np.ones_like(ids), np.arange(len(prompt))[None]
    logits, past = session.forward(ids, mask, positions, session.empty_past(1))
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        logits, past = session.forward(np.array([[tokens[-1]]]), mask, np.array([[mask.shape[1] - 1]]), past)
    return tokens


def test_bound_cache_generates_the_plain_tokens_over_200_steps_and_regrows(long_llama, rng):
    session = create_session(long_llama["ort"])
    assert session.shares_kv_buffer and session.has_logits_to_keep
    prompt = rng.integers(3, 96, 7).tolist()
    expected = plain_greedy(session, prompt, 200)

    cache = KVCache.empty(session, 1, capacity=16)  # far below 7 + 200: regrows several times
    assert isinstance(cache, BoundKVCache) and cache.capacity == 16
    config = SamplingConfig(max_new_tokens=100)
    first = [int(t[0]) for t in stream_ids(session, [prompt], config, cache=cache)]
    assert cache.capacity >= cache.length == len(prompt) + 99  # the last token is yielded, not fed
    second = [int(t[0]) for t in stream_ids(session, [[first[-1]]], config, cache=cache)]
    assert first + second == expected
    # as the generation loop makes it (capacity reserved up front), the same tokens
    assert generate_ids(session, [prompt], SamplingConfig(max_new_tokens=200)) == [expected]
    # a different prompt gives different tokens: the comparison can fail
    assert plain_greedy(session, [3 + (p - 2) % 93 for p in prompt], 200) != expected  # every token shifted by 1


def test_bound_cache_refuses_more_than_the_context(long_llama):
    session = create_session(long_llama["ort"])
    cache = KVCache.empty(session, 1, capacity=8)
    with pytest.raises(LowbitError, match="context length"):
        cache.reserve(CONTEXT + 1)
    ids = np.ones((1, CONTEXT + 1), np.int64)
    with pytest.raises(LowbitError, match="context length"):
        cache.forward(ids, np.ones_like(ids), np.arange(CONTEXT + 1)[None])
    assert cache.length == 0  # nothing was fed
    with pytest.raises(LowbitError, match="does not cover"):
        cache.forward(ids[:, :4], np.ones((1, 5), np.int64), np.arange(4)[None])


def test_truncated_cache_continues_as_a_fresh_one(long_llama, rng):
    """Chat's path: forget the end of the cache, feed different tokens there, and the logits are those of
    one pass over the new sequence (stale entries past the new length are never read)."""
    session = create_session(long_llama["ort"])
    ids = rng.integers(3, 96, (1, 12))
    cache = KVCache.empty(session, 1, capacity=12)
    cache.forward(ids, np.ones_like(ids), np.arange(12)[None])
    cache.truncate(8)
    new = rng.integers(3, 96, (1, 3))
    continued = cache.forward(new, np.ones((1, 11), np.int64), np.arange(8, 11)[None])
    whole = np.concatenate([ids[:, :8], new], axis=1)
    fresh, _ = session.forward(whole, np.ones_like(whole), np.arange(11)[None], session.empty_past(1))
    np.testing.assert_allclose(continued, fresh[:, 8:], rtol=0, atol=1e-5)


def test_batch_continuation_on_the_bound_cache(long_llama, rng):
    """Two left-padded rows, then several tokens at once on top of the cache (fed one position at a time)."""
    session = create_session(long_llama["ort"])
    ids = rng.integers(3, 96, (2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    cache = KVCache.empty(session, 2)
    first = cache.forward(ids[:, :6], mask[:, :6], positions[:, :6])
    rest = cache.forward(ids[:, 6:], mask, positions[:, 6:], logits_to_keep=2)
    plain, _ = session.forward(ids, mask, positions, session.empty_past(2))
    real = mask.astype(bool)
    np.testing.assert_allclose(first[real[:, :6]], plain[:, :6][real[:, :6]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(rest, plain[:, -2:], rtol=0, atol=1e-5)


def test_logits_to_keep_is_an_optional_input(long_llama, rng):
    """On the ort target the graph takes `logits_to_keep` with a default of 0 (all positions), so pipelines
    that do not feed it see the usual logits; the tensorrt graph has no such input, and the runtime slices."""
    import onnxruntime as ort

    model = onnx.load(long_llama["ort"] / "model.onnx", load_external_data=False)
    default = next(i for i in model.graph.initializer if i.name == LOGITS_TO_KEEP)
    assert onnx.numpy_helper.to_array(default) == 0 and LOGITS_TO_KEEP in [i.name for i in model.graph.input]

    options = ort.SessionOptions()
    options.log_severity_level = 3
    raw = ort.InferenceSession(str(long_llama["ort"] / "model.onnx"), options)
    assert LOGITS_TO_KEEP not in [i.name for i in raw.get_inputs()]  # not required
    ids = rng.integers(3, 96, (2, 9))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(9)[None].repeat(2, 0)}
    feeds.update(create_session(long_llama["ort"]).empty_past(2))
    everything = raw.run(["logits"], feeds)[0]
    assert everything.shape == (2, 9, 96)
    for keep in (1, 4, 9):
        np.testing.assert_array_equal(raw.run(["logits"], {**feeds, LOGITS_TO_KEEP: np.array(keep)})[0],
                                      everything[:, -keep:])

    standard = create_session(long_llama["tensorrt"])
    assert not standard.has_logits_to_keep and not standard.shares_kv_buffer
    cache = KVCache.empty(standard, 2)
    assert isinstance(cache, GrowingKVCache)
    last = cache.forward(ids, np.ones_like(ids), np.arange(9)[None].repeat(2, 0), logits_to_keep=3)
    full, _ = standard.forward(ids, np.ones_like(ids), np.arange(9)[None].repeat(2, 0), standard.empty_past(2))
    np.testing.assert_array_equal(last, full[:, -3:])


# ------------------------------------------------------------------ prompt session (float32 MatMulNBits for prompts)


@pytest.fixture(scope="module")
def long_llama_w4(long_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("long_llama_w4")
    convert(str(long_llama["source"]), folder, scheme="w4a16", options=SchemeOptions(group_size=32))
    return folder


def test_prompt_session_opens_on_the_first_long_prompt_and_shares_the_cache(long_llama, long_llama_w4, rng,
                                                                           tmp_path, monkeypatch):
    """Steps of PROMPT_MIN_TOKENS or more run on a second session whose MatMulNBits compute in float32; it
    writes the same KV buffers the decode session reads. The bound cache equals the plain path that makes the
    same choice, and the prompt's logits are those of the folder converted with float32 compute. (On ORT's
    kernels on a CPU without VNNI; with VNNI or lowbit's int8 kernel there is no prompt session,
    test_no_prompt_session_where_it_would_not_help.)"""
    from lowbit.custom_ops import kernels
    from lowbit.runtime.session import PROMPT_MIN_TOKENS

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    session = create_session(long_llama_w4)
    assert session.open_prompt_session is not None and session._prompt_session is None
    short = rng.integers(3, 96, (1, PROMPT_MIN_TOKENS - 1))
    KVCache.empty(session, 1).forward(short, np.ones_like(short), np.arange(short.shape[1])[None])
    assert session._prompt_session is None  # short prompts: the decode session
    ids = rng.integers(3, 96, (1, PROMPT_MIN_TOKENS + 8))
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1])[None]
    cache = KVCache.empty(session, 1)
    bound = [cache.forward(ids, mask, positions)]
    assert session._prompt_session is not None and session.ort_session(ids.shape[1]) is session._prompt_session
    plain, past = session.forward(ids, mask, positions, session.empty_past(1), prompts=True)
    expected = [plain]
    for step in range(5):
        token = np.array([[int(bound[-1][0, -1].argmax())]])
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        bound.append(cache.forward(token, mask, np.array([[mask.shape[1] - 1]])))
        logits, past = session.forward(token, mask, np.array([[mask.shape[1] - 1]]), past, prompts=True)
        expected.append(logits)
    for a, b in zip(bound, expected):
        np.testing.assert_array_equal(a, b)

    # the prompt session is the folder converted with --accuracy-level 1; eval's path (prompts=False) is not
    level1 = tmp_path / "level1"
    convert(str(long_llama["source"]), level1, scheme="w4a16", options=SchemeOptions(group_size=32, accuracy_level=1))
    float_compute = create_session(level1, prompt_session=False)
    reference, _ = float_compute.forward(ids, np.ones_like(ids), positions, float_compute.empty_past(1))
    np.testing.assert_array_equal(plain, reference)
    int8, _ = session.forward(ids, np.ones_like(ids), positions, session.empty_past(1))
    assert not np.array_equal(int8, plain)


def test_no_prompt_session_where_it_would_not_help(long_llama, long_llama_w4, monkeypatch):
    from lowbit.custom_ops import kernels

    assert create_session(long_llama["ort"]).open_prompt_session is None  # float weights
    assert create_session(long_llama_w4, prompt_session=False).open_prompt_session is None
    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: True)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert create_session(long_llama_w4).open_prompt_session is None  # int8 kernels prefill faster with VNNI
    if kernels.library() is not None:  # lowbit's int8 kernel prefills faster than the prompt session without VNNI
        monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
        monkeypatch.delenv(kernels.ENV_SWITCH)
        assert create_session(long_llama_w4).open_prompt_session is None
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        assert create_session(long_llama_w4).open_prompt_session is not None  # ORT's int8 kernel: a prompt session


def test_accuracy_level_rewrite_counts_matmulnbits_nodes(long_llama_w4):
    from lowbit.runtime import fast_paths

    graph = onnx.load(long_llama_w4 / "model.onnx", load_external_data=False).graph
    levels = {onnx.helper.get_attribute_value(a) for n in graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    assert fast_paths.set_accuracy_level(graph, 1) == sum(n.op_type == "MatMulNBits" for n in graph.node) > 0
    levels = [[onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "accuracy_level"]
              for n in graph.node if n.op_type == "MatMulNBits"]
    assert all(level == [1] for level in levels)


def test_inspect_counts_nodes_per_layer(long_llama):
    """`lowbit inspect` says how many nodes each decoder layer has (GroupQueryAttention graph: 11 as written)."""
    from click.testing import CliRunner

    from lowbit.cli import main
    from lowbit.runtime.inspect import inspect_model

    info = inspect_model(long_llama["ort"])
    layers = {k: v for k, v in info["nodes_per_layer"].items() if k != "other"}
    assert layers == {"layers.0": 11, "layers.1": 11}
    assert sum(info["nodes_per_layer"].values()) == info["nodes"]
    standard = inspect_model(long_llama["tensorrt"])["nodes_per_layer"]
    assert standard["layers.0"] > 11  # attention spelled out in standard ops
    result = CliRunner().invoke(main, ["inspect", str(long_llama["ort"])])
    assert "11 per decoder layer (2 layers)" in result.output, result.output


@pytest.mark.parametrize("quant,fmt,level,expected", [
    ("4-bit g32 symmetric_full", "matmulnbits", 4, 1),  # w4a16
    ("4-bit g32 symmetric", "matmulnbits", 4, 1),  # q4f32_1 / q4f16_1
    ("4-bit g32 symmetric", "matmulnbits", 0, None),  # float compute already
    ("4-bit g64 asymmetric", "matmulnbits", 4, None),  # zero points: float32 packing costs several bytes a weight
    ("4-bit per-channel asymmetric", "matmulnbits", 4, None),
    ("8-bit g32 symmetric_full", "matmulnbits", 4, None),
    ("3-bit g40 symmetric", "blockwise", 4, None),
    ("8-bit per-channel symmetric", "dynamic_quantize_matmul", 0, None),
])
def test_which_folders_get_a_prompt_session(quant, fmt, level, expected):
    """Without VNNI: float32 compute for long prompts on symmetric 4-bit folders. With VNNI: never (the int8
    kernels prefill faster)."""
    from lowbit.runtime.fast_paths import prompt_accuracy_level

    metadata = {"quantization": {"layers.0.attn.qkv_proj": {"quant": quant, "format": fmt, "accuracy_level": level}}}
    assert prompt_accuracy_level(metadata, vnni=False, int8_kernel=False) == expected
    assert prompt_accuracy_level(metadata, vnni=True, int8_kernel=False) is None
    assert prompt_accuracy_level(metadata, vnni=False, int8_kernel=True) is None
    for vnni in (False, True):
        assert prompt_accuracy_level(None, vnni, False) is None
        assert prompt_accuracy_level({"quantization": {}}, vnni, False) is None


def test_bound_buffers_live_where_the_provider_computes(long_llama, rng, monkeypatch):
    """On CUDA the buffers are GPU memory (host buffers bound to a GPU session would be copied to the device and
    back, and the node would no longer write into the buffer it reads); TensorRT keeps the growing cache. The
    device path, run here with each device allocation standing in as a separate host copy: the tokens of the plain
    loop over 60 steps, through two regrows that read the held positions back from the "device"."""
    from dataclasses import replace

    import onnxruntime as ort

    session = create_session(long_llama["ort"])
    host = KVCache.empty(session, 1)
    assert isinstance(host, BoundKVCache) and host.device == "cpu"
    assert isinstance(KVCache.empty(replace(session, provider="tensorrt"), 1), GrowingKVCache)

    plain_value, devices = ort.OrtValue.ortvalue_from_numpy, []

    def ortvalue_from_numpy(array, device_type="cpu", device_id=0):
        if device_type == "cpu":
            return plain_value(array)
        devices.append(device_type)
        copy = np.array(array)  # memory of its own, as a device copy has; kept alive by the OrtValue's owner below
        value = plain_value(copy)
        kept.append(copy)
        return value

    kept = []
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(ortvalue_from_numpy))
    prompt = rng.integers(3, 96, 5).tolist()
    expected = plain_greedy(session, prompt, 60)
    cache = KVCache.empty(replace(session, provider="cuda"), 1, capacity=16)
    assert isinstance(cache, BoundKVCache) and cache.device == "cuda" and cache.capacity == 16
    config = SamplingConfig(max_new_tokens=30)
    first = [int(t[0]) for t in stream_ids(session, [prompt], config, cache=cache)]
    assert cache.capacity == 35 and cache.length == 34  # regrown before the prompt: nothing held yet
    second = [int(t[0]) for t in stream_ids(session, [[first[-1]]], config, cache=cache)]
    assert first + second == expected
    assert cache.capacity == 70 and devices.count("cuda") == 3 * 2 * session.num_layers  # 16 -> 35 -> 70

def test_batched_benchmark_steps_on_the_bound_cache(long_llama):
    """`lowbit bench --batch`: a batch of prompts, then decode steps, through the bound cache."""
    from lowbit.runtime.bench import benchmark

    session = create_session(long_llama["ort"])
    result = benchmark(session, prompt_len=9, new_tokens=5, repeats=1, batch=3)
    assert result.batch == 3 and result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    with pytest.raises(LowbitError, match="batch must be a positive integer"):
        benchmark(session, batch=0)
