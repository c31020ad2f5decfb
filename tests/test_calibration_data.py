"""Calibration samples from every supported file format, the default set, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.converter.calibration import DEFAULT_CALIBRATION_FILE, load_calibration_samples
from lowbit.runtime.tokenizer import load_tokenizer
from tests.conftest import SAMPLE_MODEL, SHARED, WIKITEXT

SEED_TASKS = SHARED / "data" / "alpaca_seed_tasks.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SAMPLE_MODEL)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_default_set_ships_and_works_offline(tokenizer):
    assert DEFAULT_CALIBRATION_FILE.is_file()
    assert 3000 <= DEFAULT_CALIBRATION_FILE.stat().st_size <= 6500
    samples = load_calibration_samples(None, tokenizer, num_samples=4, seq_len=64)
    assert len(samples) == 4
    assert all(s.dtype == np.int64 and s.shape == (64,) and s[0] == tokenizer.bos_token_id for s in samples)


def test_plain_text_windows_do_not_overlap(tokenizer, tmp_path):
    text = DEFAULT_CALIBRATION_FILE.read_text()
    everything = load_calibration_samples(None, tokenizer, num_samples=10_000, seq_len=33)
    body = tokenizer.encode(text, add_special_tokens=False)
    assert len(everything) == len(body) // 32  # 32 text tokens after BOS each; the short tail is dropped
    np.testing.assert_array_equal(np.concatenate([s[1:] for s in everything]), body[: 32 * len(everything)])
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time")
    (only,) = load_calibration_samples(short, tokenizer, seq_len=512)
    assert list(only) == tokenizer.encode("Once upon a time")  # a text shorter than one window is one sample


def test_seed_picks_the_same_samples(tokenizer):
    a = load_calibration_samples(None, tokenizer, num_samples=5, seq_len=32, seed=1)
    b = load_calibration_samples(None, tokenizer, num_samples=5, seq_len=32, seed=1)
    c = load_calibration_samples(None, tokenizer, num_samples=5, seq_len=32, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_row_formats(tokenizer, tmp_path):
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add.", "instances": [{"input": "2 + 2", "output": "4"}, {"input": "1 + 5", "output": "6"}]},
        {"text": "The cat sat on the mat."},
        {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello there."}]},
        {"messages": [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Air."}]},
    ]
    expected = ["Name a colour.\n\nBlue.", "Add.\n\n2 + 2\n\n4\n\n1 + 5\n\n6", "The cat sat on the mat.",
                "Hi!\n\nHello there.", "Why is the sky blue?\n\nAir."]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows))
    for path in (jsonl, array):
        samples = load_calibration_samples(path, tokenizer, num_samples=10, seq_len=512)
        assert [list(s) for s in samples] == [tokenizer.encode(t) for t in expected]  # variable lengths kept
    truncated = load_calibration_samples(jsonl, tokenizer, num_samples=10, seq_len=4)
    assert [len(s) for s in truncated] == [4] * 5


def test_shared_seed_tasks(tokenizer):
    if not SEED_TASKS.is_file():
        pytest.skip(f"{SEED_TASKS} not present")
    samples = load_calibration_samples(SEED_TASKS, tokenizer, num_samples=16, seq_len=128, seed=3)
    assert len(samples) == 16 and all(2 <= len(s) <= 128 and s[0] == tokenizer.bos_token_id for s in samples)


def test_shared_wikitext(tokenizer):
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} not present")
    samples = load_calibration_samples(WIKITEXT, tokenizer, num_samples=8, seq_len=256)
    assert len(samples) == 8 and all(s.shape == (256,) for s in samples)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.txt", None, "no such calibration file"),
        ("empty.txt", b"  \n", "the calibration file is empty"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "not UTF-8 text"),
        ("bad.jsonl", b'{"text": "ok"}\n\n{"text": oops}\n', "line 3 is not JSON"),
        ("unknown.jsonl", b'{"text": "ok"}\n{"prompt": "x"}\n', "line 2: none of the known fields"),
        ("wrongtype.jsonl", b'{"text": 5}\n', "line 1: 'text' must be a string"),
        ("turns.jsonl", b'{"conversations": "hi"}\n', "line 1: 'conversations' must be a list of objects"),
        ("list.json", b'[{"text": "a"}, 3]', "element 1: expected a JSON object, got int"),
        ("broken.json", b'[{"text": "a"}', "not valid JSON"),
        ("blank.jsonl", b'{"text": ""}\n', "no row has any text"),
    ],
)
def test_bad_files(name, content, message, tokenizer, tmp_path):
    from lowbit.errors import LowbitError

    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LowbitError, match=message) as error:
        load_calibration_samples(path, tokenizer)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


@pytest.mark.parametrize("options,message", [({"num_samples": 0}, "num_samples must be a positive integer"),
                                             ({"seq_len": 1}, "seq_len must be an integer >= 2")])
def test_bad_sizes(options, message, tokenizer):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=message):
        load_calibration_samples(None, tokenizer, **options)


def test_tokenizer_from_a_folder():
    samples = load_calibration_samples(None, SAMPLE_MODEL, num_samples=2, seq_len=16)
    assert len(samples) == 2


def test_long_plain_text_is_tokenized_piece_by_piece(tokenizer, tmp_path):
    """A text over TEXT_CHUNK characters is tokenized in pieces cut at blank lines (else line ends), so the
    tokenizer never holds a whole large file's encoding; the pieces join back to the text. With this
    SentencePiece tokenizer the tokens equal the whole text's where each piece starts with a space (as WikiText's
    lines do); otherwise a piece's first word is tokenized as after a space, a token or two apart per piece."""
    from lowbit.converter.calibration.data import TEXT_CHUNK, text_pieces, text_tokens

    paragraphs = DEFAULT_CALIBRATION_FILE.read_text().split("\n\n")
    rng = np.random.default_rng(5)
    text = "\n\n ".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), 4 * TEXT_CHUNK // 400))
    assert len(text) > 2 * TEXT_CHUNK
    pieces = text_pieces(text)
    assert "".join(pieces) == text and len(pieces) >= 3
    assert all(len(p) <= TEXT_CHUNK and p.endswith("\n\n") for p in pieces[:-1])
    assert text_pieces("x" * 10, size=4) == ["xxxx", "xxxx", "xx"]  # no line end: cut at the limit
    assert text_pieces("ab\ncd\nef", size=4) == ["ab\n", "cd\n", "ef"]
    whole = np.asarray(tokenizer.encode(text, add_special_tokens=False))
    np.testing.assert_array_equal(text_tokens(tokenizer, text), whole)
    unspaced = text.replace("\n\n ", "\n\n")
    extra = len(text_tokens(tokenizer, unspaced)) - len(tokenizer.encode(unspaced, add_special_tokens=False))
    assert extra != 0 and abs(extra) <= 2 * (len(text_pieces(unspaced)) - 1)
    path = tmp_path / "long.txt"
    path.write_text(text)
    samples = load_calibration_samples(path, tokenizer, num_samples=10_000, seq_len=65)
    np.testing.assert_array_equal(np.concatenate([s[1:] for s in samples]), whole[: 64 * len(samples)])
