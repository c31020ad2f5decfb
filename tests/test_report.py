"""`lowbit report`: the numbers (KL, top-1, perplexity, sizes), the page, its rendering, and bad input."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import lowbit
from lowbit.cli import main
from lowbit.runtime.bench import model_bytes
from lowbit.runtime.evaluate import kl_divergence, top1_agreement
from lowbit.runtime.report import measure, write_files
from lowbit.runtime.session import create_session
from lowbit.runtime.tokenizer import load_tokenizer
from tests.conftest import SAMPLE_MODEL

pytest.importorskip("matplotlib")  # the `report` extra (part of `test`)

SCHEMES = ["q0f32", "q4f16_1", "a16w8"]
TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
    "One day, she saw a big red ball in the park. She ran to get it, but a small dog got there first. "
    "The dog was happy and wagged its tail. Lily laughed and threw the ball for the dog. "
    "They played all day long, and when the sun went down, Lily went home with a big smile. "
    "Her mom made soup for dinner, and Lily told her about her new friend. "
    "The next morning, Lily went back to the park. The dog was waiting for her by the tree. "
) * 3
WINDOWS = ["--seq-len", "64", "--max-tokens", "300", "--prompt-len", "16", "--new-tokens", "8", "--repeats", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for scheme in SCHEMES:
        lowbit.convert(SAMPLE_MODEL, root / scheme, scheme=scheme)
    (root / "data.txt").write_text(TEXT)
    return root


@pytest.fixture(scope="module")
def page(folders):
    """One CLI run over the three folders, the fp32 one also the reference."""
    html, raw = folders / "report.html", folders / "report.json"
    result = CliRunner().invoke(main, ["report", *(str(folders / s) for s in SCHEMES), "--data",
                                       str(folders / "data.txt"), "--reference", str(folders / "q0f32"),
                                       "-o", str(html), "--json", str(raw), *WINDOWS])
    assert result.exit_code == 0, result.output
    return html, raw


def plain_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    return (p * np.log(p / q)).sum(-1)


def test_kl_helper_equals_plain_numpy(rng):
    a, b = rng.normal(size=(2, 5, 11)) * 3
    np.testing.assert_allclose(kl_divergence(a, b), plain_kl(a, b), rtol=1e-12, atol=1e-15)
    assert (kl_divergence(a, a) == 0).all()
    assert (kl_divergence(a, b) > 0).all()
    np.testing.assert_array_equal(top1_agreement(a, b), a.argmax(-1) == b.argmax(-1))
    assert top1_agreement(a, a).all()
    masked = a.copy()  # a token impossible under both: contributes 0, not nan
    masked[:, 3] = -np.inf
    b_masked = b.copy()
    b_masked[:, 3] = -np.inf
    keep = [i for i in range(11) if i != 3]
    np.testing.assert_allclose(kl_divergence(masked, b_masked), plain_kl(a[:, keep], b[:, keep]), rtol=1e-12)
    assert np.isinf(kl_divergence(a, b_masked)).all()  # the reference gives mass where the model gives none


def test_numbers(folders):
    paths = [folders / s for s in SCHEMES]
    report = measure(paths, TEXT, folders / "q0f32", seq_len=64, stride=32, max_tokens=300, prompt_len=16,
                     new_tokens=8, repeats=1)
    by_scheme = {r.scheme: r for r in report.results}
    assert list(by_scheme) == SCHEMES
    ref, q4, w8 = (by_scheme[s] for s in SCHEMES)
    assert ref.is_reference and ref.kl == 0.0 and ref.top1 == 1.0
    assert q4.kl > w8.kl > 0 and 0 < q4.top1 < 1 and 0 < w8.top1 <= 1
    for r, path in zip(report.results, paths):
        expected = lowbit.load(path).perplexity(TEXT, seq_len=64, stride=32, max_tokens=300)
        assert r.perplexity == pytest.approx(expected.perplexity, rel=1e-9)
        assert (r.tokens, r.windows) == (expected.tokens, expected.windows)
        assert r.model_bytes == model_bytes(path)
        assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0
    assert ref.model_bytes > w8.model_bytes > q4.model_bytes


def test_kl_equals_a_plain_computation_over_the_windows(folders):
    """Non-overlapping windows of 64: each scores its first 63 positions; KL and top-1 by hand."""
    ids = np.asarray(load_tokenizer(folders / "q0f32").encode(TEXT), np.int64)[:256]
    sessions = [create_session(folders / s) for s in ("q0f32", "q4f16_1")]
    kls, agree = [], []
    for begin in range(0, 256, 64):
        window = ids[None, begin:begin + 64]
        ref, q = (s.forward(window, np.ones_like(window), np.arange(64)[None], s.empty_past(1))[0][0, :-1]
                  for s in sessions)
        kls.append(plain_kl(ref.astype(np.float64), q.astype(np.float64)))
        agree.append(ref.argmax(-1) == q.argmax(-1))
    report = measure([folders / "q4f16_1"], TEXT, folders / "q0f32", seq_len=64, max_tokens=256, prompt_len=4,
                     new_tokens=2, repeats=1)
    (result,) = report.results
    assert result.tokens == 4 * 63
    assert result.kl == pytest.approx(np.concatenate(kls).mean(), rel=1e-9)
    assert result.kl_p99 == pytest.approx(np.percentile(np.concatenate(kls), 99), rel=1e-9)
    assert result.top1 == pytest.approx(np.concatenate(agree).mean(), abs=1e-12)
    # lowbit eval --reference: the same numbers through the API and the CLI
    model = lowbit.load(folders / "q4f16_1")
    direct = model.perplexity(TEXT, seq_len=64, max_tokens=256, reference=folders / "q0f32")
    assert (direct.kl, direct.kl_p99, direct.top1, direct.tokens) == (result.kl, result.kl_p99, result.top1, 4 * 63)
    cli = CliRunner().invoke(main, ["eval", str(folders / "q4f16_1"), "--data", str(folders / "data.txt"),
                                    "--seq-len", "64", "--max-tokens", "256", "--reference", str(folders / "q0f32"),
                                    "--json"])
    assert cli.exit_code == 0, cli.output
    numbers = json.loads(cli.stdout.strip().splitlines()[-1])  # stderr says which kernels run
    assert numbers["kl"] == pytest.approx(result.kl, rel=1e-12) and numbers["top1"] == result.top1
    assert numbers["kl_p99"] == pytest.approx(result.kl_p99, rel=1e-12)
    alone = model.perplexity(TEXT, seq_len=64, max_tokens=256)
    assert alone.perplexity == direct.perplexity and alone.kl is None and alone.top1 is None


def test_page_and_json(folders, page):
    html_path, json_path = page
    text = html_path.read_text()
    assert '<meta name="generator" content="lowbit report">' in text
    pngs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [alt for alt, _ in pngs] == ["size vs quality", "size vs speed"]
    for _, data in pngs:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"https?://|src=\"(?!data:)|href=", text)  # self-contained
    table = text[text.index('<table id="numbers">'):text.index("</table>")]
    assert table.count("<tr>") == 4 and "q4f16_1" in table and "(reference)" in table
    numbers = json.loads(json_path.read_text())
    assert numbers["generator"] == "lowbit report"
    assert [r["scheme"] for r in numbers["results"]] == SCHEMES
    ref, q4, w8 = numbers["results"]
    assert ref["kl"] == 0.0 and ref["top1"] == 1.0 and q4["kl"] > 0 and w8["kl"] > 0
    assert f"{q4['perplexity']:.4f}" in table and f"{q4['kl']:.5f}" in table
    assert numbers["settings"]["seq_len"] == 64 and numbers["machine"]["cores"] >= 1
    assert "lowbit report " in text and "--reference" in text and numbers["date"] in text


def test_page_renders_in_chromium(page, tmp_path):
    """The page as a browser draws it: both plots' areas hold every folder's colour and are not blank."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                    page[0].as_uri()], capture_output=True, timeout=180, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    rgb = imread(shot)[..., :3]
    # the plots' frames: rows holding a long run of dark pixels (axis spines), in 4 groups (top, bottom) x 2
    dark = rgb.max(-1) < 0.35

    def longest_run(row):
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max(initial=0)

    spine_rows = [y for y in np.flatnonzero(dark.sum(1) > 250) if longest_run(dark[y]) > 250]
    groups = np.split(np.array(spine_rows), np.flatnonzero(np.diff(spine_rows) > 3) + 1)
    assert len(groups) == 4, f"expected two plots' frames, found spine rows {spine_rows}"
    for top, bottom in ((groups[0], groups[1]), (groups[2], groups[3])):
        area = rgb[top.max() + 2:bottom.min() - 1]
        assert area.shape[0] > 150
        assert (area.min(-1) < 0.9).mean() > 0.01  # not blank
        assert len(np.unique((area * 31).round().reshape(-1, 3), axis=0)) > 20
        for i in range(len(SCHEMES)):  # every folder's point (and legend marker) in its colour
            colour = np.array(to_rgb(f"C{i}"))
            assert (np.abs(area - colour).max(-1) < 0.03).sum() > 50, f"no C{i} points"


def error_of(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def report_cli(folders, out, *args, reference=None):
    extra = ["--reference", str(reference)] if reference else []
    return CliRunner().invoke(main, ["report", *map(str, args), "-o", str(out), *extra, *WINDOWS])


def assert_nothing_written(directory, out):
    assert not out.exists()
    assert not [p for p in directory.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_input(folders, tmp_path):
    out = tmp_path / "report.html"
    data = folders / "data.txt"
    q0 = folders / "q0f32"
    assert "no model.onnx" in error_of(report_cli(folders, out, q0, tmp_path / "nope", "--data", data))
    assert "no such file" in error_of(report_cli(folders, out, q0, "--data", tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text(" \n")
    assert "empty" in error_of(report_cli(folders, out, q0, "--data", tmp_path / "empty.txt"))
    assert "no such folder" in error_of(report_cli(folders, tmp_path / "no" / "r.html", q0, "--data", data))
    assert "is a folder" in error_of(report_cli(folders, tmp_path, q0, "--data", data))
    # a reference whose tokenizer encodes the text differently (no BOS)
    other = tmp_path / "no-bos"
    shutil.copytree(q0, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    message = error_of(report_cli(folders, out, folders / "q4f16_1", "--data", data, reference=other))
    assert "encodes the text differently" in message
    assert_nothing_written(tmp_path, out)


def test_reference_with_another_vocabulary(folders, tmp_path):
    from tests.conftest import build_tiny_model

    build_tiny_model("llama", tmp_path / "tiny-hf")  # vocab 96, the sample has 512
    lowbit.convert(tmp_path / "tiny-hf", tmp_path / "tiny", scheme="q0f32")
    out = tmp_path / "report.html"
    message = error_of(report_cli(folders, out, folders / "q0f32", "--data", folders / "data.txt",
                                  reference=tmp_path / "tiny"))
    assert "vocabulary of 512 tokens" in message and "has 96" in message
    assert_nothing_written(tmp_path, out)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):  # the sample's tokenizer
        if (folders / "q0f32" / name).is_file():
            shutil.copy(folders / "q0f32" / name, tmp_path / "tiny" / name)
    result = CliRunner().invoke(main, ["eval", str(folders / "q0f32"), "--data", str(folders / "data.txt"),
                                       "--reference", str(tmp_path / "tiny")])
    assert result.exit_code == 2 and "KL needs the same vocabulary" in error_of(result)


def test_existing_output_files(folders, tmp_path):
    out = tmp_path / "index.html"
    out.write_text("someone else's page")
    args = (folders / "q4f16_1", "--data", folders / "data.txt")
    assert "not written by lowbit report" in error_of(report_cli(folders, out, *args))
    assert out.read_text() == "someone else's page"
    out.unlink()
    assert report_cli(folders, out, *args).exit_code == 0
    assert "lowbit report" in out.read_text()
    out.write_text(out.read_text().replace("</body>", "<!-- old --></body>"))
    assert report_cli(folders, out, *args).exit_code == 0  # our own page is replaced
    assert "<!-- old -->" not in out.read_text()
    raw = tmp_path / "numbers.json"
    raw.write_text("{}")
    assert "numbers.json: exists" in error_of(report_cli(folders, out, *args, "--json", raw))
    assert raw.read_text() == "{}"


def test_a_failed_write_leaves_no_staged_files(tmp_path, monkeypatch):
    import os

    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        os.rename(src, dst)

    monkeypatch.setattr("lowbit.runtime.report.os.replace", failing_replace)
    with pytest.raises(OSError):
        write_files({tmp_path / "a.html": "a", tmp_path / "b.json": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html"]  # no staged leftovers


def test_without_matplotlib_one_error_line(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "report.html"
    message = error_of(report_cli(folders, out, folders / "q4f16_1", "--data", folders / "data.txt"))
    assert "pip install 'lowbit[report]'" in message
    assert_nothing_written(tmp_path, out)


def test_other_commands_do_not_import_matplotlib(folders):
    code = ("import sys\nfrom lowbit.cli import main\n"
            f"main(['inspect', {str(folders / 'q4f16_1')!r}], standalone_mode=False)\n"
            "main(['report', '--help'], standalone_mode=False)\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
