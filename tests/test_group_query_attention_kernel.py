"""lowbit.cpu.GroupQueryAttention (custom_ops/group_query_attention.py, custom_ops/kernels/group_query_attention.c)
and the load-time rewrite that uses it (runtime/attention_kernel.py): the numpy reference against ONNX Runtime's own
com.microsoft.GroupQueryAttention, the kernel against the reference, in place and with a growing cache, and
converted folders on the kernel against ORT's node."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.custom_ops import group_query_attention as op
from lowbit.custom_ops import kernels

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason=f"no CPU kernel library: {kernels.unavailable()}")
INT32_INPUTS = ("seqlens_k", "total_sequence_length")
# float32 attention against a float64 reference: a few ulps of the outputs' magnitude (about 1)
TOLERANCE = dict(rtol=1e-5, atol=2e-6)


def run_node(domain: str, feeds: dict, attrs: dict, shared: bool, threads: int = 2):
    """(output, present_key, present_value) of one GroupQueryAttention node in `domain`; `shared`: past and present
    bound to one buffer (IO binding), as generation runs it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names = [name if feeds.get(name) is not None else "" for name in op.INPUTS]
    while not names[-1]:
        names.pop()
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT32 if name in INT32_INPUTS else TensorProto.FLOAT,
                                            None) for name in names if name]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
               for name in ("output", "present_key", "present_value")]
    node = helper.make_node(op.OP_TYPE, names, [o.name for o in outputs], domain=domain, **attrs)
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if domain == op.DOMAIN:
        options.register_custom_ops_library(str(kernels.library()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if not shared:
        return session.run(None, {name: feeds[name] for name in names if name})
    binding = session.io_binding()
    binding.bind_output("output")
    buffers = {name: feeds[name].copy() for name in ("past_key", "past_value")}  # written in place
    for name in names:
        if name:
            binding.bind_cpu_input(name, buffers.get(name, feeds[name]))
    for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
        binding.bind_output(present, "cpu", 0, np.float32, buffers[past].shape, buffers[past].ctypes.data)
    session.run_with_iobinding(binding)
    return [binding.get_outputs()[0].numpy(), buffers["past_key"], buffers["past_value"]]


def make_case(rng, batch=1, seq=1, past=7, capacity=None, heads=(4, 2), d=16, rotary=16, packed=True, window=-1,
              softcap=0.0, padding=0, scale=0.0, bias=True):
    """Feeds and attributes as lowbit's converter wires the node: seqlens_k = T - 1 for every row, padding masked by
    an additive bias at the float32 minimum; `capacity` None: a growing past (exactly the `past` positions), else
    a buffer of that capacity bound as past and present."""
    hq, hkv = heads
    total = past + seq
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    feeds = {"query": normal(batch, seq, (hq + 2 * hkv if packed else hq) * d)}
    if not packed:
        feeds["key"], feeds["value"] = normal(batch, seq, hkv * d), normal(batch, seq, hkv * d)
    length = past if capacity is None else capacity
    feeds["past_key"], feeds["past_value"] = normal(batch, hkv, length, d), normal(batch, hkv, length, d)
    feeds["seqlens_k"] = np.full(batch, total - 1, np.int32)
    feeds["total_sequence_length"] = np.array([total], np.int32)
    attrs = dict(num_heads=hq, kv_num_heads=hkv, scale=scale)
    if rotary:
        angles = rng.random((total + 5, rotary // 2)) * 6
        feeds["cos_cache"], feeds["sin_cache"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        attrs["do_rotary"] = 1
    if bias:
        keep = np.ones((batch, total), bool)
        keep[-1, :padding] = False
        masked = np.where(keep, 0, np.finfo(np.float32).min).astype(np.float32)
        feeds["attention_bias"] = np.ascontiguousarray(np.broadcast_to(masked[:, None, None], (batch, 1, seq, total)))
    if softcap:
        attrs["softcap"] = softcap
    if window > 0:
        attrs["local_window_size"] = window
    return feeds, attrs, capacity is not None


CASES = {
    "decode, shared buffer": dict(seq=1, past=9, capacity=32),
    "decode, growing cache": dict(seq=1, past=9),
    "prompt, shared buffer": dict(seq=13, past=0, capacity=32),
    "prompt, growing cache": dict(seq=13, past=0),
    "continuation": dict(seq=3, past=10, capacity=32),
    "batch, left padding, decode": dict(batch=2, seq=1, past=9, capacity=32, padding=3),
    "batch, left padding, prompt": dict(batch=2, seq=10, past=0, capacity=32, padding=3),
    "sliding window": dict(seq=6, past=10, capacity=32, window=4),
    "sliding window, decode": dict(seq=1, past=10, capacity=32, window=4),
    "softcap": dict(seq=5, past=4, capacity=32, softcap=3.0),
    "softcap, left padding, prompt": dict(batch=2, seq=10, past=0, capacity=32, padding=3, softcap=3.0, window=5),
    "separate query, key, value": dict(seq=4, past=5, capacity=32, packed=False),
    "partial rotary": dict(seq=3, past=5, capacity=32, rotary=16, d=64),
    "no rotary": dict(seq=3, past=5, capacity=32, rotary=0),
    "scale": dict(seq=2, past=5, capacity=32, scale=0.3),
    "no bias": dict(seq=4, past=5, capacity=32, bias=False),
    "SmolLM2 heads, long past": dict(seq=1, past=301, capacity=320, heads=(9, 3), d=64, rotary=64),
    "SmolLM2 heads, prompt": dict(seq=37, past=0, capacity=64, heads=(9, 3), d=64, rotary=64),
    "head size 128, window": dict(seq=2, past=45, capacity=64, heads=(4, 1), d=128, rotary=128, window=20),
}


def reference(feeds, attrs):
    return op.reference(*(feeds.get(name) for name in op.INPUTS if name not in ("position_ids", "attention_bias")),
                        feeds.get("attention_bias"), **attrs)


def assert_matches(got, expected, total: int):
    """Output, and the presents over the positions the step holds (a buffer's later positions are the caller's)."""
    np.testing.assert_allclose(got[0], expected[0], **TOLERANCE)
    for g, e in zip(got[1:], expected[1:]):
        assert g.shape == e.shape
        np.testing.assert_allclose(g[:, :, :total], e[:, :, :total], **TOLERANCE)


@pytest.mark.parametrize("name", CASES)
def test_reference_is_ort_group_query_attention(name):
    """The numpy reference computes what ORT's own node computes, for every way the converter wires it."""
    feeds, attrs, shared = make_case(np.random.default_rng(len(name)), **CASES[name])
    total = int(feeds["total_sequence_length"][0])
    assert_matches(run_node("com.microsoft", feeds, attrs, shared), reference(feeds, attrs), total)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_reference(name, threads):
    feeds, attrs, shared = make_case(np.random.default_rng(len(name) + 100), **CASES[name])
    total = int(feeds["total_sequence_length"][0])
    got = run_node(op.DOMAIN, feeds, attrs, shared, threads)
    assert_matches(got, reference(feeds, attrs), total)
    if shared:  # in place: the past's other positions are left as they were
        first = total - feeds["query"].shape[1]
        for buffer, past in zip(got[1:], (feeds["past_key"], feeds["past_value"])):
            assert np.array_equal(buffer[:, :, :first], past[:, :, :first])
            assert np.array_equal(buffer[:, :, total:], past[:, :, total:])


@needs_kernel
def test_kernel_refuses_lengths_it_cannot_place():
    """seqlens_k below the new tokens' count: an error from the node, not a read before the buffer."""
    feeds, attrs, shared = make_case(np.random.default_rng(0), seq=4, past=3, capacity=16)
    feeds["seqlens_k"] = np.array([2], np.int32)
    with pytest.raises(Exception, match="seqlens_k"):
        run_node(op.DOMAIN, feeds, attrs, shared)


def _rewrite_count(folder, monkeypatch, **environment) -> tuple[int, int]:
    """(lowbit.cpu attention nodes, ORT attention nodes) in the session the runtime opens over `folder`."""
    from lowbit.runtime import attention_kernel
    from lowbit.runtime.session import create_session

    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    kernels._cached_build.cache_clear()
    seen = {}
    original = attention_kernel.rewrite

    def spy(graph):
        moved = original(graph)
        seen["moved"] = len(moved)
        seen["left"] = sum(n.op_type == op.OP_TYPE and n.domain != op.DOMAIN for n in graph.node)
        return moved

    monkeypatch.setattr(attention_kernel, "rewrite", spy)
    create_session(folder, threads=2)
    kernels._cached_build.cache_clear()
    return seen.get("moved", 0), seen.get("left", 0)


@needs_kernel
def test_rewrite_moves_float32_attention_only(tiny_models, tmp_path, monkeypatch):
    """Each float32 attention node of a converted folder moves to lowbit.cpu; LOWBIT_KERNELS=0,
    LOWBIT_ATTENTION_KERNEL=0 and a float16 graph kept in float16 (LOWBIT_CPU_FLOAT32=0) keep ORT's node."""
    import lowbit

    source, _ = tiny_models("qwen2")
    for scheme in ("q0f32", "q0f16"):
        lowbit.convert(str(source), tmp_path / scheme, scheme=scheme)
    assert _rewrite_count(tmp_path / "q0f32", monkeypatch) == (2, 0)
    assert _rewrite_count(tmp_path / "q0f16", monkeypatch) == (2, 0)  # computed in float32 on the CPU
    assert _rewrite_count(tmp_path / "q0f16", monkeypatch, LOWBIT_CPU_FLOAT32="0") == (0, 2)
    assert _rewrite_count(tmp_path / "q0f32", monkeypatch, LOWBIT_KERNELS="0") == (0, 0)  # not even read
    monkeypatch.delenv("LOWBIT_KERNELS")
    assert _rewrite_count(tmp_path / "q0f32", monkeypatch, LOWBIT_ATTENTION_KERNEL="0") == (0, 0)


@needs_kernel
@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])  # separate q, k, v (head norms); softcap and sliding window
def test_folder_on_the_kernel_matches_ort_attention(arch, tiny_models, tmp_path, monkeypatch):
    """A left-padded batch's prefill and a cached decode step: the logits of ORT's node to float32 rounding."""
    import lowbit
    from lowbit.runtime import attention_kernel
    from lowbit.runtime.session import create_session
    from tests.conftest import prefill_and_decode

    source, _ = tiny_models(arch)
    lowbit.convert(str(source), tmp_path / "m", scheme="q0f32")
    ours = prefill_and_decode(create_session(tmp_path / "m", threads=2))
    monkeypatch.setattr(attention_kernel, "kernel_applies", lambda shares_kv_buffer, metadata: False)
    theirs = prefill_and_decode(create_session(tmp_path / "m", threads=2))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, **TOLERANCE)
