"""Perplexity over a text file with a sliding window (the Hugging Face perplexity recipe).

Windows of `seq_len` tokens start every `stride` tokens; in each window only the tokens not
scored by the previous window count (the first token of the text is never scored). This is
exactly `exp(sum(nll) / count)` of transformers' `labels`-based loss with the same windows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.session import DecoderSession


ROWS = 256  # logit rows turned into float64 at a time


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    stride: int
    kl: float | None = None  # with a reference: mean KL(P_reference || P) per scored token, nats
    kl_p99: float | None = None  # its 99th percentile over the scored tokens
    top1: float | None = None  # fraction of scored tokens whose argmax agrees with the reference's

    def as_dict(self) -> dict:
        return asdict(self)


def read_text_file(path: str | Path) -> str:
    """An evaluation text: a UTF-8 file with some text in it (anything else is a LowbitError naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise LowbitError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise LowbitError(f"{path}: the evaluation text is empty")
    return text


def check_windows(total: int, seq_len: int, stride: int) -> None:
    """What a sliding-window evaluation needs: >= 2 tokens, seq_len >= 2, 1 <= stride <= seq_len."""
    if not (isinstance(seq_len, (int, np.integer)) and isinstance(stride, (int, np.integer))
            and seq_len >= 2 and 1 <= stride <= seq_len):
        raise LowbitError(f"need seq_len >= 2 and 1 <= stride <= seq_len (got seq_len {seq_len}, stride {stride})")
    if total < 2:
        raise LowbitError("the evaluation text has fewer than 2 tokens: nothing to score")


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


def _window_logits(session: DecoderSession, ids: np.ndarray) -> np.ndarray:
    """Logits [length, vocab] of one window from a fresh context."""
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]
    logits, _ = session.forward(ids, np.ones_like(ids), positions, session.empty_past(1))
    return logits[0]


def perplexity(session: DecoderSession, token_ids: np.ndarray, seq_len: int, stride: int, progress=None,
               reference: DecoderSession | None = None) -> PerplexityResult:
    """Sliding-window perplexity; with `reference` (a session over the same vocabulary, possibly `session`
    itself) also KL(P_reference || P) and top-1 agreement at every scored position, as llama.cpp's
    `perplexity --kl-divergence` reports them. Each window's logits are scored in blocks of ROWS rows and
    dropped: memory follows one window, plus one float per scored token for the KL percentile."""
    check_windows(len(token_ids), seq_len, stride)
    nll = 0.0
    agree = count = n_windows = 0
    kls: list[np.ndarray] = []
    spans = list(windows(len(token_ids), seq_len, stride))
    for begin, end, new in progress(spans) if progress else spans:
        ids = token_ids[None, begin:end].astype(np.int64)
        first = max(end - begin - new, 1) - 1  # logit row i predicts ids[i + 1]; rows >= first are new
        logits = _window_logits(session, ids)[first:-1]
        targets = ids[0, first + 1:]
        ref = None
        if reference is not None:
            ref = logits if reference is session else _window_logits(reference, ids)[first:-1]
        for r in range(0, len(targets), ROWS):
            rows = slice(r, r + ROWS)
            logp = log_softmax(logits[rows])
            nll -= float(logp[np.arange(logp.shape[0]), targets[rows]].sum())
            if ref is not None:
                kls.append(kl_divergence(ref[rows], logits[rows]))
                agree += int(top1_agreement(ref[rows], logits[rows]).sum())
        count += len(targets)
        n_windows += 1
    kl = kl_p99 = top1 = None
    if reference is not None:
        per_token = np.concatenate(kls)  # float64, one per scored token
        kl, kl_p99, top1 = float(per_token.mean()), float(np.percentile(per_token, 99)), agree / count
    return PerplexityResult(float(np.exp(nll / count)), nll, count, n_windows, seq_len, stride, kl, kl_p99, top1)


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_reference || P) in nats for each position: softmax over the last axis of both, float64."""
    ref, logp = log_softmax(reference_logits), log_softmax(logits)
    p = np.exp(ref)
    with np.errstate(invalid="ignore"):  # p == 0 terms are 0, even where both log-probs are -inf
        terms = np.where(p > 0, p * (ref - logp), 0.0)
    return np.maximum(terms.sum(-1), 0.0)


def top1_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """For each position, whether both distributions put their maximum on the same token."""
    return np.argmax(reference_logits, -1) == np.argmax(logits, -1)


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
