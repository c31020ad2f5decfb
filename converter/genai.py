"""genai_config.json so the output folder runs unmodified in onnxruntime-genai."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.converter.architectures import DecoderSpec


def _first(token):
    return token[0] if isinstance(token, list) else token


def genai_config(spec: DecoderSpec, genai_type: str, source: Path, share_buffer: bool = False) -> dict:
    """`share_buffer`: the graph's attention writes the new positions into a past allocated at the
    maximum length (GroupQueryAttention), so onnxruntime-genai may pass one buffer as past and present."""
    generation = {}
    if (source / "generation_config.json").is_file():
        generation = json.loads((source / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", spec.eos_token_id)
    pad = spec.pad_token_id if spec.pad_token_id is not None else _first(eos)
    context = spec.max_position_embeddings
    config = {
        "model": {
            "bos_token_id": spec.bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": genai_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    # onnxruntime-genai rejects null token ids: leave out the ones the checkpoint does not set
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config["model"][key] is None:
            del config["model"][key]
    return config
