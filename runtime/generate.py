"""KV-cache generation: greedy or sampled, batched prompts with left padding, EOS stop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.kv_cache import KVCache
from lowbit.runtime.session import DecoderSession


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


def stream_ids(
    session: DecoderSession,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos_ids: set[int] = frozenset(),
    pad_id: int = 0,
    cache: KVCache | None = None,
):
    """Yield the next token of every prompt [B] at each step until all have produced an EOS (which is
    yielded) or `max_new_tokens`; finished rows yield `pad_id`. With `cache`, the prompts continue what the
    cache holds, and the cache is left holding every token fed to the model (the last yielded one is not)."""
    rng = np.random.default_rng(config.seed)
    ids, new_mask = left_pad(prompts, pad_id)
    batch = ids.shape[0]
    needed = (cache.length if cache is not None else 0) + ids.shape[1] + config.max_new_tokens
    if needed > session.context_length:
        raise LowbitError(
            f"prompt ({needed - config.max_new_tokens} tokens) + max new tokens ({config.max_new_tokens}) exceeds "
            f"the model's context length ({session.context_length})"
        )
    cache = cache if cache is not None else KVCache.empty(session, batch, needed)
    cache.reserve(needed)
    mask = np.concatenate([cache.mask, new_mask], axis=1)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, cache.length:]
    finished = np.zeros(batch, bool)
    eos = list(eos_ids)
    for _ in range(config.max_new_tokens):
        logits = cache.forward(ids, mask, positions, logits_to_keep=1)
        tokens = np.where(finished, pad_id, select_tokens(logits[:, -1, :], config, rng))
        yield tokens
        finished |= np.isin(tokens, eos)
        if finished.all():
            return
        ids = tokens[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)


def generate_ids(
    session: DecoderSession,
    prompts: list[list[int]],
    config: SamplingConfig,
    eos_ids: set[int] = frozenset(),
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (stopping at, and including, an EOS token)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), bool)
    for tokens in stream_ids(session, prompts, config, eos_ids, pad_id):
        for row in np.flatnonzero(~finished):
            outputs[row].append(int(tokens[row]))
        finished |= np.isin(tokens, list(eos_ids))
    return outputs


class TextStream:
    """Incremental detokenizer: `push(token)` returns the text that token completes (the first push also
    returns the prompt's text when `include_prompt`). Text is held back
    while it ends in an incomplete UTF-8 sequence (a character split over byte tokens), and each piece is
    the difference of two decodes that start at the same token, so word-initial spaces come out as in one
    whole decode. The pieces concatenate to `tokenizer.decode(ids)`."""

    def __init__(self, tokenizer, prompt: list[int] = (), include_prompt: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt)
        self.prefix_offset = 0
        self.read_offset = 0 if include_prompt else len(self.ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, *tokens: int) -> str:
        self.ids.extend(int(t) for t in tokens)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end, decoded as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


def eos_token_ids(tokenizer, model_dir) -> set[int]:
    """The tokenizer's and generation_config's EOS ids, plus genai_config.json's."""
    import json
    from pathlib import Path

    ids = set(tokenizer.eos_ids)
    path = Path(model_dir) / "genai_config.json"
    if path.is_file():
        eos = json.loads(path.read_text())["model"].get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def generate_text(session, tokenizer, prompts: list[str], config: SamplingConfig) -> list[str]:
    """Prompt plus continuation, decoded together so spacing comes out as the tokenizer intends."""
    encoded = [tokenizer.encode(p) for p in prompts]
    new = generate_ids(session, encoded, config, eos_token_ids(tokenizer, session.model_dir), pad_token_id(tokenizer))
    return [tokenizer.decode(prompt + tokens, skip_special_tokens=True) for prompt, tokens in zip(encoded, new)]
