"""The Python blocks of docs/api.md run as written (from a folder laid out like the repository root)."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "samples").symlink_to(REPO / "samples")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "out/stories260K-q4 q4f16_1" in out
    assert "prompt tokens of the second turn came from the KV cache" in out
    assert "error: no/such/folder: no model.onnx" in out


def test_calibration_example_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "samples").symlink_to(REPO / "samples")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "calibration.md").read_text(), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/calibration.md", "exec"), {})  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "down_proj input: absmax" in out and "hessian (172, 172)" in out
