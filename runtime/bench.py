"""Prefill and decode throughput, peak RSS and model size of a converted folder."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.kv_cache import KVCache
from lowbit.runtime.session import DecoderSession


@dataclass(frozen=True)
class BenchResult:
    """Tokens per second count every row of the batch."""

    prompt_len: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_mb: float
    model_bytes: int
    batch: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def benchmark(session: DecoderSession, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3,
              batch: int = 1) -> BenchResult:
    """Best of `repeats` runs: a prefill of `batch` rows of `prompt_len` random tokens, then `new_tokens` decode
    steps, through the KV cache generation uses (preallocated and IO-bound where the graph allows) and with the
    logits of the last position only, as generation computes them."""
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats),
                        ("batch", batch)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise LowbitError(f"{name} must be a positive integer, got {value!r}")
    if prompt_len + new_tokens > session.context_length:
        raise LowbitError(f"prompt_len + new_tokens ({prompt_len} + {new_tokens}) exceeds the model's context length "
                          f"({session.context_length})")
    rng = np.random.default_rng(0)
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        ids = rng.integers(0, session.vocab_size, (batch, prompt_len), dtype=np.int64)
        prefill, decode = generation_seconds(session, ids, new_tokens)
        best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, decode)
    return BenchResult(
        prompt_len,
        new_tokens,
        batch * prompt_len / best_prefill,
        batch * new_tokens / best_decode,
        peak_rss_mb(),
        model_bytes(session.model_dir),
        batch,
    )


def generation_seconds(session: DecoderSession, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill of `ids` [B, P] and of `new_tokens` greedy decode steps after it, through the KV cache
    generation makes (preallocated and IO-bound where the graph allows) with last-position logits."""
    batch, prompt_len = ids.shape
    cache = KVCache.empty(session, batch, prompt_len + new_tokens)
    t0 = time.perf_counter()
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int64), ids.shape)
    logits = cache.forward(ids, np.ones_like(ids), positions, logits_to_keep=1)
    t1 = time.perf_counter()
    for step in range(new_tokens):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.ones((batch, prompt_len + step + 1), np.int64)
        logits = cache.forward(token, mask, np.full((batch, 1), prompt_len + step, np.int64), logits_to_keep=1)
    return t1 - t0, time.perf_counter() - t1


def model_bytes(folder: Path) -> int:
    """Bytes of the graph and its external data (`model.onnx*`) in a folder."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.startswith("model.onnx"))
