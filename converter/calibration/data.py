"""Calibration samples: token-id arrays read from a text, JSONL or JSON file, or the default set that ships here.

Formats (chosen by the file's suffix):

- `.jsonl` / `.ndjson`: one JSON object a line (blank lines skipped); `.json`: a JSON array of such objects,
  or JSON lines when the file does not start with `[`. A row is read by the first field of `ROW_FORMATS` it
  has: `text`; ShareGPT `conversations: [{from, value}]`; chat `messages: [{role, content}]`; a seed task
  `instruction` + `instances: [{input, output}]`; Alpaca `instruction` / `input` / `output`. The strings of a
  row are joined with blank lines.
- anything else: plain UTF-8 text, tokenized and cut into non-overlapping windows. A text longer than
  `TEXT_CHUNK` characters is tokenized a piece at a time, each piece ending at a blank line (else a line end)
  before the limit: the tokenizer's own output for a whole megabyte-sized text takes hundreds of MB (WikiText-2
  test, 1.3 MB: 509 MB peak, 125 MB piecewise). Only a piece's first word can differ from a whole-text encoding
  (a SentencePiece tokenizer reads it as after a space; WikiText's lines start with one, so there none does).

Rows stay separate samples: a row is one document (an instruction and its answer, a conversation), so each
sample starts the way a prompt does (with the tokenizer's BOS) and attention never crosses two unrelated rows.
A row longer than `seq_len` tokens is cut to its first `seq_len`; a shorter one is kept at its own length.
Samples run one at a time (batch 1), so lengths may differ at no cost. Plain text has no row boundaries: it is
cut into windows of `seq_len` tokens, each led by BOS when the tokenizer adds one; a shorter tail is dropped
unless it is the only window.

The default set (`default_calibration.txt`, about 5 KB: short stories, questions and answers, instructions, a
little code, factual prose) was written for lowbit by the project and ships under the project's licence (MIT).
It lets calibration run offline with no file given; a few thousand tokens are enough for activation ranges,
while GPTQ-style Hessians want more and more varied text (pass a file).

When the source has more samples than `num_samples`, `seed` picks which (the same ones every time); when it has
fewer, all are returned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lowbit.errors import LowbitError
from lowbit.runtime.tokenizer import Tokenizer, load_tokenizer

DEFAULT_CALIBRATION_FILE = Path(__file__).with_name("default_calibration.txt")
DEFAULT_SEQ_LEN = 512
JSON_LINES_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}


class RowError(ValueError):
    """A row that has a known field of the wrong shape (the message names the field)."""


def _string(row: dict, key: str) -> str:
    value = row.get(key, "")
    if not isinstance(value, str):
        raise RowError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _dicts(row: dict, key: str) -> list[dict]:
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RowError(f"'{key}' must be a list of objects")
    return value


def _join(parts) -> str:
    return "\n\n".join(p for p in parts if p.strip())


def _seed_task(row: dict) -> str:
    return _join([_string(row, "instruction"),
                  *(_string(i, k) for i in _dicts(row, "instances") for k in ("input", "output"))])


# field that identifies the row's format -> the row's text (checked in this order: seed tasks have `instruction`)
ROW_FORMATS: dict[str, Callable[[dict], str]] = {
    "text": lambda row: _string(row, "text"),
    "conversations": lambda row: _join(_string(turn, "value") for turn in _dicts(row, "conversations")),
    "messages": lambda row: _join(_string(message, "content") for message in _dicts(row, "messages")),
    "instances": _seed_task,
    "instruction": lambda row: _join(_string(row, k) for k in ("instruction", "input", "output")),
}


def row_text(row: object) -> str:
    """The text of one JSON row; RowError when it is not an object or has no known field."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    key = next((k for k in ROW_FORMATS if k in row), None)
    if key is None:
        raise RowError(f"none of the known fields ({', '.join(ROW_FORMATS)})")
    return ROW_FORMATS[key](row)


def read_text(path: Path) -> str:
    if not path.exists():
        raise LowbitError(f"{path}: no such calibration file")
    if not path.is_file():
        raise LowbitError(f"{path}: not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LowbitError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise LowbitError(f"{path}: the calibration file is empty")
    return text


def json_row_texts(path: Path, text: str) -> list[str]:
    """The texts of the rows of a JSON array or JSON-lines file (rows with no text are left out)."""
    if path.suffix.lower() in JSON_SUFFIXES and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise LowbitError(f"{path}: not valid JSON ({getattr(e, 'msg', e.__class__.__name__)})") from None
        located = [(f"element {i}", row) for i, row in enumerate(rows)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {number}", json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as e:
                raise LowbitError(f"{path}: line {number} is not JSON ({getattr(e, 'msg', 'too deep')})") from None
    texts = []
    for where, row in located:
        try:
            texts.append(row_text(row))
        except RowError as e:
            raise LowbitError(f"{path}: {where}: {e}") from None
    return [t for t in texts if t.strip()]


def _pick(count: int, num_samples: int, seed: int) -> list[int]:
    """Indices of the items to use: all of them, or `num_samples` of them drawn by `seed` (in source order)."""
    if count <= num_samples:
        return list(range(count))
    return sorted(np.random.default_rng(seed).choice(count, num_samples, replace=False).tolist())


def _bos_prefix(tokenizer: Tokenizer) -> list[int]:
    """[BOS] when the tokenizer puts it in front of encoded text, else []."""
    bos = tokenizer.bos_token_id
    adds = bos is not None and tokenizer.encode("a")[:1] == [bos] and tokenizer.encode("a", False)[:1] != [bos]
    return [bos] if adds else []


TEXT_CHUNK = 1 << 16  # characters of plain text tokenized at a time


def text_pieces(text: str, size: int = TEXT_CHUNK) -> list[str]:
    """`text` in pieces of at most `size` characters, each cut after a blank line, else after a line end, else at
    the limit; they join back to `text`."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind("\n\n", start, end - 1)
        cut = cut + 2 if cut > start else text.rfind("\n", start, end) + 1
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]]


def text_tokens(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The text's token ids (no special tokens), int64, tokenized piece by piece (`text_pieces`)."""
    parts = [np.asarray(tokenizer.encode(piece, add_special_tokens=False), np.int64) for piece in text_pieces(text)]
    return np.concatenate(parts)


def text_windows(tokens, prefix: list[int], seq_len: int) -> list[list[int]]:
    """Non-overlapping windows of seq_len tokens (prefix + seq_len - len(prefix) text tokens); a short tail is
    dropped unless it is the only window. `tokens`: a list or a 1-D array of ids."""
    body = seq_len - len(prefix)
    windows = [prefix + list(tokens[start:start + body]) for start in range(0, len(tokens), body)]
    if len(windows) > 1 and len(windows[-1]) < seq_len:
        windows.pop()
    return windows


def load_calibration_samples(
    path: str | Path | None,
    tokenizer: Tokenizer | str | Path,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> list[np.ndarray]:
    """Calibration samples, each an int64 array of token ids (1 <= length <= seq_len), at most num_samples.

    path: a text, JSONL or JSON file (see the module docstring); None: the default set that ships with lowbit
    (`DEFAULT_CALIBRATION_FILE`). tokenizer: a lowbit.runtime Tokenizer, or a model folder to load one from.
    Raises LowbitError, naming the file, for a missing, unreadable, empty, non-UTF-8 or malformed file.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise LowbitError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise LowbitError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    path = DEFAULT_CALIBRATION_FILE if path is None else Path(path)
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES or suffix in JSON_SUFFIXES:
        texts = json_row_texts(path, text)
        if not texts:
            raise LowbitError(f"{path}: no row has any text")
        samples = [tokenizer.encode(texts[i])[:seq_len] for i in _pick(len(texts), num_samples, seed)]
    else:
        windows = text_windows(text_tokens(tokenizer, text), _bos_prefix(tokenizer), seq_len)
        samples = [windows[i] for i in _pick(len(windows), num_samples, seed)]
    samples = [np.asarray(s, dtype=np.int64) for s in samples if len(s)]
    if not samples:
        raise LowbitError(f"{path}: the tokenizer gives no tokens for it")
    return samples


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class CalibrationSettings:
    """Which samples calibrate: a file (None: the set that ships with lowbit), how many, how long, which."""

    data: Path | None = None
    num_samples: int = 128
    seq_len: int | None = None  # None: min(DEFAULT_SEQ_LEN, the model's context length)
    seed: int = 0

    def __post_init__(self):
        for name, low in (("num_samples", 1), ("seq_len", 2), ("seed", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise LowbitError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")

    def samples(self, tokenizer: Tokenizer | str | Path, context_length: int) -> tuple[list[np.ndarray], int]:
        """(the samples, the sequence length they were cut to) for a model of `context_length` positions."""
        seq_len = self.seq_len or min(DEFAULT_SEQ_LEN, context_length)
        if seq_len > context_length:
            raise LowbitError(f"--seq-len {seq_len} exceeds the model's context length ({context_length})")
        return load_calibration_samples(self.data, tokenizer, self.num_samples, seq_len, self.seed), seq_len

    def record(self, samples: list[np.ndarray], seq_len: int) -> dict:
        """What lowbit.json records of a calibration: the file and its hash, samples, tokens, seq-len, seed."""
        return {"data": str(Path(self.data).resolve()) if self.data else "lowbit default set",
                "sha256": file_sha256(self.data or DEFAULT_CALIBRATION_FILE), "samples": len(samples),
                "tokens": int(sum(len(s) for s in samples)), "seq_len": seq_len, "seed": self.seed}
