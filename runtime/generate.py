"""KV-cache generation: greedy or sampled, batched prompts with left padding, EOS stop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from converter.errors import LowbitError
from runtime.session import DecoderSession


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None


def select_tokens(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits [B, V]."""
    logits = logits.astype(np.float64)
    if not config.do_sample:
        return logits.argmax(-1)
    logits = logits / max(config.temperature, 1e-6)
    if config.top_k:
        kth = np.sort(logits, axis=-1)[:, -min(config.top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if config.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < config.top_p  # always keeps the top token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs])


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(t) for t in token_lists)
    ids = np.full((len(token_lists), width), pad_id, np.int64)
    mask = np.zeros((len(token_lists), width), np.int64)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens):] = tokens
        mask[row, width - len(tokens):] = 1
    return ids, mask


def generate_ids(
    session: DecoderSession,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos_ids: set[int] = frozenset(),
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (stopping at, and including, an EOS token)."""
    rng = np.random.default_rng(config.seed)
    ids, mask = left_pad(prompts, pad_id)
    if ids.shape[1] + config.max_new_tokens > session.context_length:
        raise LowbitError(
            f"prompt ({ids.shape[1]} tokens) + max new tokens ({config.max_new_tokens}) exceeds the model's "
            f"context length ({session.context_length})"
        )
    batch = ids.shape[0]
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    past = session.empty_past(batch)
    finished = np.zeros(batch, bool)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(config.max_new_tokens):
        logits, past = session.forward(ids, mask, positions, past)
        tokens = select_tokens(logits[:, -1, :], config, rng)
        tokens = np.where(finished, pad_id, tokens)
        for row in np.flatnonzero(~finished):
            outputs[row].append(int(tokens[row]))
        finished |= np.isin(tokens, list(eos_ids))
        if finished.all():
            break
        ids = tokens[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return outputs


def eos_token_ids(tokenizer, model_dir) -> set[int]:
    import json
    from pathlib import Path

    ids = set()
    path = Path(model_dir) / "genai_config.json"
    if path.is_file():
        eos = json.loads(path.read_text())["model"].get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generate_text(session, tokenizer, prompts: list[str], config: SamplingConfig) -> list[str]:
    """Prompt plus continuation, decoded together so spacing comes out as the tokenizer intends."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    new = generate_ids(session, encoded, config, eos_token_ids(tokenizer, session.model_dir), pad)
    return [tokenizer.decode(prompt + tokens, skip_special_tokens=True) for prompt, tokens in zip(encoded, new)]
