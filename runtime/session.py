"""ONNX Runtime sessions over a converted folder, with KV-cache bookkeeping."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime import fast_paths

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

FUSION_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"  # ORT's DQ + MatMul -> MatMulNBits fusion
ALLOW_SPINNING = "session.intra_op.allow_spinning"
PROMPT_MIN_TOKENS = 32  # from here on a prompt session's float32 MatMulNBits beat int8 ones (docs/targets.md#prompts)
LOGITS_TO_KEEP = "logits_to_keep"  # optional graph input (docs/targets.md): logits of the last k positions only

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class DecoderSession:
    """An ORT session plus what the generation loop needs to know about its KV cache."""

    session: object
    model_dir: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: np.dtype
    logits_dtype: np.dtype
    vocab_size: int
    context_length: int
    shares_kv_buffer: bool = False  # the attention writes into a past of fixed capacity (runtime/kv_cache.py)
    provider: str = "cpu"  # PROVIDERS key
    has_logits_to_keep: bool = False  # the graph takes `logits_to_keep` (logits of the last positions only)
    open_prompt_session: Callable[[], object] | None = None  # opens the graph with float32 MatMulNBits (create_session)
    _prompt_session: object | None = None
    output_names: list[str] = field(default_factory=list)
    next_past_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.next_past_names = [n.replace("present.", "past_key_values.", 1) for n in self.output_names]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return {past: np.zeros(shape, self.kv_dtype) for past, _ in self.kv_names()}

    def kv_names(self) -> list[tuple[str, str]]:
        """(past input, present output) names, layer by layer, key then value."""
        return [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}") for i in range(self.num_layers)
                for kv in ("key", "value")]

    def feeds(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0) -> dict[str, np.ndarray]:
        """The graph's non-KV inputs; `logits_to_keep` only where the graph takes it (and it is not 0, its
        default)."""
        feeds = {"input_ids": np.ascontiguousarray(input_ids, np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, np.int64)}
        if logits_to_keep and self.has_logits_to_keep:
            feeds[LOGITS_TO_KEEP] = np.array(logits_to_keep, np.int64)
        return feeds

    def keep_last(self, logits: np.ndarray, logits_to_keep: int) -> np.ndarray:
        """The last `logits_to_keep` positions (all for 0), whether or not the graph sliced them already."""
        return logits[:, -logits_to_keep:] if logits_to_keep and logits.shape[1] > logits_to_keep else logits

    def ort_session(self, new_tokens: int, prompts: bool = True):
        """The ORT session for a step of `new_tokens`: the prompt session from PROMPT_MIN_TOKENS on where there is
        one and `prompts` allows it."""
        if prompts and self.open_prompt_session is not None and new_tokens >= PROMPT_MIN_TOKENS:
            if self._prompt_session is None:  # opened on first use: start-up and short generations never pay for it
                self._prompt_session = self.open_prompt_session()
            return self._prompt_session
        return self.session

    def forward(self, input_ids, attention_mask, position_ids, past: dict, logits_to_keep: int = 0,
                prompts: bool = False) -> tuple[np.ndarray, dict]:
        """Logits [B, S, V] (the last `logits_to_keep` positions only, if not 0) and the next step's past
        (present outputs renamed). `prompts`: long steps may run on the prompt session."""
        if run_stepwise(input_ids, attention_mask):
            state = {"past": past}

            def step(ids, mask, positions, keep):
                logits, state["past"] = self.forward(ids, mask, positions, state["past"], keep, prompts)
                return logits

            return stepwise(step, input_ids, attention_mask, position_ids, logits_to_keep), state["past"]
        feeds = {**self.feeds(input_ids, attention_mask, position_ids, logits_to_keep), **past}
        outputs = self.ort_session(input_ids.shape[1], prompts).run(self.output_names, feeds)
        new_past = dict(zip(self.next_past_names, outputs))
        return self.keep_last(new_past.pop("logits"), logits_to_keep), new_past


def run_stepwise(input_ids: np.ndarray, attention_mask: np.ndarray) -> bool:
    """Several new tokens on top of a past in a batch: ORT's GroupQueryAttention takes that for batch 1 only,
    so such a call is fed one position at a time."""
    batch, seq = input_ids.shape
    return batch > 1 and seq > 1 and attention_mask.shape[1] > seq


def stepwise(step, input_ids, attention_mask, position_ids, logits_to_keep: int) -> np.ndarray:
    """Feed new positions one at a time through `step(ids, mask, positions, logits_to_keep)`."""
    seq, past_length = input_ids.shape[1], attention_mask.shape[1] - input_ids.shape[1]
    logits = np.concatenate([
        step(input_ids[:, j:j + 1], attention_mask[:, :past_length + j + 1], position_ids[:, j:j + 1],
             1 if logits_to_keep else 0)
        for j in range(seq)], axis=1)
    return logits[:, -logits_to_keep:] if logits_to_keep else logits


def create_session(model_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                   session_config: dict[str, str] | None = None, prompt_session: bool = True) -> DecoderSession:
    """`session_config`: ORT session config entries on top of the folder's own (lowbit.json). `prompt_session`:
    on the CPU, where the folder has symmetric 4-bit grouped MatMulNBits with int8 activations that run on ORT's
    kernels (not lowbit's int8 kernel) on a CPU without VNNI, also open the graph
    with float32 compute for prompts of PROMPT_MIN_TOKENS or more (faster there; its packed weights cost about the
    4-bit weights' size again in memory), on the first such prompt (fast_paths.prompt_accuracy_level). Generation
    and `lowbit bench` use it; `forward` (perplexity) does not."""
    model_dir = Path(model_dir)
    model_path = model_dir / "model.onnx"
    if not model_path.is_file():
        raise LowbitError(f"{model_dir}: no model.onnx (is this a `lowbit convert` output folder?)")
    if provider not in PROVIDERS:
        raise LowbitError(f"unknown provider '{provider}' (known: {', '.join(PROVIDERS)})")
    import onnxruntime as ort

    ep = PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        raise LowbitError(
            f"provider '{provider}' ({ep}) is not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu for cuda/tensorrt"
        )
    metadata_path = model_dir / "lowbit.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else None
    # e.g. the accuracy level ORT's DQ+MatMul -> MatMulNBits fusion should use
    config_entries = {**(metadata or {}).get("ort_session_config", {}), **(session_config or {})}
    providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    prompt_level = fast_paths.prompt_accuracy_level(metadata) if prompt_session and provider == "cpu" else None
    genai = json.loads((model_dir / "genai_config.json").read_text())
    shares_kv_buffer = bool(genai.get("search", {}).get("past_present_share_buffer"))
    try:
        # lowbit.MatMulBlockwise nodes run as MatMulNBits, repacked at load (runtime/fast_paths.py)
        session = fast_paths.inference_session(model_dir, _options(ort, threads, config_entries), providers, metadata,
                                               shares_kv_buffer=shares_kv_buffer)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise LowbitError(f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None

    def open_prompt_session():
        entries = dict(config_entries)
        if FUSION_ACCURACY_LEVEL in entries:
            entries[FUSION_ACCURACY_LEVEL] = str(prompt_level)
        entries[ALLOW_SPINNING] = "0"  # its pool threads must not spin on after a prompt: decode needs the cores
        return fast_paths.inference_session(model_dir, _options(ort, threads, entries), providers, metadata,
                                            accuracy_level=prompt_level, shares_kv_buffer=shares_kv_buffer)
    config, decoder = genai["model"], genai["model"]["decoder"]
    past = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    return DecoderSession(
        session=session,
        model_dir=model_dir,
        num_layers=decoder["num_hidden_layers"],
        num_kv_heads=decoder["num_key_value_heads"],
        head_dim=decoder["head_size"],
        kv_dtype=np.dtype(ORT_DTYPES[past.type]),
        logits_dtype=np.dtype(ORT_DTYPES[next(o for o in session.get_outputs() if o.name == "logits").type]),
        vocab_size=config["vocab_size"],
        context_length=config["context_length"],
        shares_kv_buffer=shares_kv_buffer,
        provider=provider,
        has_logits_to_keep=any(i.name == LOGITS_TO_KEEP for i in session.get_overridable_initializers()),
        open_prompt_session=open_prompt_session if prompt_level is not None else None,
    )


def _options(ort, threads: int | None, config_entries: dict[str, str]):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    for key, value in config_entries.items():
        options.add_session_config_entry(key, value)
    return options

