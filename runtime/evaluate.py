"""Perplexity over a text file with a sliding window (the Hugging Face perplexity recipe).

Windows of `seq_len` tokens start every `stride` tokens; in each window only the tokens not
scored by the previous window count (the first token of the text is never scored). This is
exactly `exp(sum(nll) / count)` of transformers' `labels`-based loss with the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.runtime.session import DecoderSession


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    stride: int


def windows(total: int, seq_len: int, stride: int):
    """(begin, end, number of newly scored target positions at the end of the window)."""
    prev_end = 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        yield begin, end, end - prev_end
        prev_end = end
        if end == total:
            break


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def perplexity(session: DecoderSession, token_ids: np.ndarray, seq_len: int, stride: int, progress=None):
    nll_sum, count, n_windows = 0.0, 0, 0
    spans = list(windows(len(token_ids), seq_len, stride))
    for begin, end, new in progress(spans) if progress else spans:
        ids = token_ids[None, begin:end].astype(np.int64)
        length = end - begin
        mask = np.ones_like(ids)
        positions = np.arange(length, dtype=np.int64)[None]
        logits, _ = session.forward(ids, mask, positions, session.empty_past(1))
        logp = log_softmax(logits[0, :-1])
        targets = ids[0, 1:]
        picked = logp[np.arange(length - 1), targets]
        scored = picked[max(length - new, 1) - 1:]  # targets at window positions >= length - new
        nll_sum -= float(scored.sum())
        count += len(scored)
        n_windows += 1
    return PerplexityResult(float(np.exp(nll_sum / count)), nll_sum, count, n_windows, seq_len, stride)


def transformers_perplexity(model, token_ids: np.ndarray, seq_len: int, stride: int) -> tuple[float, int]:
    """The reference: a transformers model's `labels` loss over the same windows, weighted by the
    exact number of scored tokens. Needs torch; used by tests and benchmarks, never by lowbit itself."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, new in windows(len(token_ids), seq_len, stride):
            window = torch.tensor(token_ids[None, begin:end])
            labels = window.clone()
            labels[:, : window.shape[1] - new] = -100
            scored = int((labels[0, 1:] != -100).sum())
            nll += float(model(window, labels=labels).loss) * scored
            count += scored
    return float(np.exp(nll / count)), count
