"""Shared fixtures: tiny random transformers models of every supported architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K-hf"
WIKITEXT = SHARED / "data" / "wikitext2_test.txt"
SAMPLE_MODEL = REPO / "samples" / "stories260K-hf"

SPECIAL_TOKENS = dict(bos_token_id=1, eos_token_id=2)  # config-class defaults (e.g. 32000) lie outside the vocab
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128,
              **SPECIAL_TOKENS)
GQA = dict(num_attention_heads=4, num_key_value_heads=2)

# architecture id -> (config class name, config kwargs)
TINY_CONFIGS = {
    "llama": ("LlamaConfig", {**COMMON, **GQA, "tie_word_embeddings": False}),
    "llama3-rope-tied": (
        "LlamaConfig",
        {
            **COMMON,
            **GQA,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama-mqa-bias": (
        "LlamaConfig",
        {**COMMON, "num_attention_heads": 4, "num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
    ),
    "mistral": ("MistralConfig", {**COMMON, **GQA, "sliding_window": 5, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {**COMMON, **GQA, "tie_word_embeddings": True}),
    "qwen2-untied": ("Qwen2Config", {**COMMON, **GQA, "tie_word_embeddings": False}),  # as Qwen2-7B
    "qwen3": ("Qwen3Config", {**COMMON, **GQA, "head_dim": 16, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {**COMMON, **GQA, "pad_token_id": 0, "tie_word_embeddings": False}),
    "phi3-longrope": (
        "Phi3Config",
        {
            **COMMON,
            **GQA,
            "pad_token_id": 0,
            "original_max_position_embeddings": 8,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [2.0 + 0.3 * i for i in range(8)],
                "original_max_position_embeddings": 8,
            },
        },
    ),
    "gemma2": (
        "Gemma2Config",
        {
            **COMMON,
            **GQA,
            "head_dim": 16,
            "sliding_window": 5,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gpt2": ("GPT2Config", {"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
                            **SPECIAL_TOKENS}),
}


def build_tiny_model(arch_id: str, directory: Path, dtype=None):
    """Save a random-weight model of `arch_id` to `directory` and return the torch model (eval, fp32)."""
    torch = pytest.importorskip("torch")
    import transformers

    class_name, kwargs = TINY_CONFIGS[arch_id]
    config = getattr(transformers, class_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, arch_id)))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: draw them so the test can see them
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """get(arch_id) -> (folder, torch model): each tiny model built once per test module."""
    cache = {}

    def get(arch_id):
        if arch_id not in cache:
            directory = tmp_path_factory.mktemp(arch_id)
            cache[arch_id] = (directory, build_tiny_model(arch_id, directory))
        return cache[arch_id]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng()


def genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` by onnxruntime-genai running `folder` unmodified."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt):]]


def prefill_and_decode(session):
    """Logits of a left-padded batch of 2 (prefill), then of one cached decode step."""
    ids = np.random.default_rng(7).integers(3, session.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    prefill, past = session.forward(ids, mask, positions, session.empty_past(2))
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    decode, _ = session.forward(ids[:, :1], mask, positions[:, -1:] + 1, past)
    return prefill.astype(np.float32), decode.astype(np.float32)


def assert_bound_decode_equals_forward(session, prompt_len: int, capacity: int, steps: int, seed: int) -> None:
    """Greedy steps through the preallocated, IO-bound KV cache generation uses (`capacity` positions, regrown on the
    way when smaller than prompt_len + steps) give the logits of session.forward bit for bit, step by step."""
    from lowbit.runtime.kv_cache import KVCache

    ids = np.random.default_rng(seed).integers(3, session.vocab_size, (1, prompt_len))
    cache = KVCache.empty(session, 1, capacity)
    past = session.empty_past(1)
    token, positions = ids, np.arange(prompt_len)[None]
    for _ in range(steps):
        mask = np.ones((1, positions[0, -1] + 1), np.int64)
        bound = cache.forward(token, mask, positions)
        plain, past = session.forward(token, mask, positions, past)
        assert np.array_equal(bound, plain)
        token = plain[:, -1:].argmax(-1).astype(np.int64)
        positions = positions[:, -1:] + 1


def relative(a, b) -> float:
    """Largest absolute difference of a from b, over b's largest magnitude."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def near_rounding_boundary(scaled: np.ndarray, rounding) -> np.ndarray:
    """Per row of `scaled` [..., K] (activations divided by their quantization scale), whether some value lies so
    near a boundary of the monotone `rounding` (np.rint; a float8 cast back to float32) that another implementation of
    the same float32 math (sums in another order upstream) may round it the other way: within 2e-6 of itself or
    1e-7 (about an ulp) of the row's largest magnitude (a sum's rounding error scales with its terms, not with a small
    result)."""
    scaled = np.asarray(scaled, np.float32)
    margin = np.float32(2e-6) * np.abs(scaled) + np.float32(1e-7) * np.abs(scaled).max(axis=-1, keepdims=True)
    return (rounding(scaled + margin) != rounding(scaled - margin)).any(axis=-1)


def kernel_node_session(op_type: str, inputs: dict[str, np.ndarray], threads: int = 2, **attributes):
    """An ORT session of one `lowbit.cpu` node, input A (float32) -> Y, its other inputs the given initializers (in
    order; a value None is an absent optional input, its name ""), with lowbit's compiled kernel library
    registered."""
    from onnx import helper

    node = helper.make_node(op_type, ["A", *inputs], ["Y"], domain="lowbit.cpu", **attributes)
    return graph_session([node], inputs, threads, {"lowbit.cpu": 1}, kernels=True)


def graph_session(nodes, initializers: dict[str, np.ndarray | None], threads: int = 2, domains: dict | None = None,
                  kernels: bool = False):
    """An ORT CPU session of `nodes` (opset 21, plus `domains`: domain -> version) from input A (float32) to Y, with
    the given initializers (values None are left out); `kernels`: lowbit's compiled kernel library registered."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.custom_ops import kernels as kernel_library

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()
                               if value is not None])
    opsets = [helper.make_opsetid("", 21)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if kernels:
        options.register_custom_ops_library(str(kernel_library.library()))
    return ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
