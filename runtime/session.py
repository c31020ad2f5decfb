"""ONNX Runtime sessions over a converted folder, with KV-cache bookkeeping."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime import fast_paths

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

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
    vocab_size: int
    context_length: int
    output_names: list[str] = field(default_factory=list)
    next_past_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.next_past_names = [n.replace("present.", "past_key_values.", 1) for n in self.output_names]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        feeds = {}
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = np.zeros(shape, self.kv_dtype)
            feeds[f"past_key_values.{i}.value"] = np.zeros(shape, self.kv_dtype)
        return feeds

    def forward(self, input_ids, attention_mask, position_ids, past: dict) -> tuple[np.ndarray, dict]:
        """Logits [B, S, V] and the next step's past (present outputs renamed)."""
        batch, seq = input_ids.shape
        if batch > 1 and seq > 1 and attention_mask.shape[1] > seq:
            # several new tokens on top of a past: ORT's GroupQueryAttention takes that for batch 1 only
            return self._forward_stepwise(input_ids, attention_mask, position_ids, past)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **past}
        outputs = self.session.run(self.output_names, feeds)
        new_past = dict(zip(self.next_past_names, outputs))
        return new_past.pop("logits"), new_past

    def _forward_stepwise(self, input_ids, attention_mask, position_ids, past: dict):
        seq, past_length = input_ids.shape[1], attention_mask.shape[1] - input_ids.shape[1]
        logits = []
        for j in range(seq):
            step, past = self.forward(input_ids[:, j:j + 1], attention_mask[:, :past_length + j + 1],
                                      position_ids[:, j:j + 1], past)
            logits.append(step)
        return np.concatenate(logits, axis=1), past


def create_session(model_dir: str | Path, provider: str = "cpu", threads: int | None = None) -> DecoderSession:
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
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    metadata_path = model_dir / "lowbit.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else None
    # e.g. the accuracy level ORT's DQ+MatMul -> MatMulNBits fusion should use
    for key, value in (metadata or {}).get("ort_session_config", {}).items():
        options.add_session_config_entry(key, value)
    providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    try:
        # lowbit.MatMulBlockwise nodes run as MatMulNBits, repacked at load (runtime/fast_paths.py)
        session = fast_paths.inference_session(model_dir, options, providers, metadata)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise LowbitError(f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    decoder = config["decoder"]
    past = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    return DecoderSession(
        session=session,
        model_dir=model_dir,
        num_layers=decoder["num_hidden_layers"],
        num_kv_heads=decoder["num_key_value_heads"],
        head_dim=decoder["head_size"],
        kv_dtype=np.dtype(ORT_DTYPES[past.type]),
        vocab_size=config["vocab_size"],
        context_length=config["context_length"],
    )

