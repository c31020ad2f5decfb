"""The installed package: one top-level name (`lowbit`), every module inside it, and the API working from
a wheel installed outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO, SAMPLE_MODEL

SOURCE_FOLDERS = {"lowbit": "lowbit", "converter": "lowbit/converter", "custom_ops": "lowbit/custom_ops",
                  "runtime": "lowbit/runtime"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("lowbit-*.whl")
    return path


def test_wheel_holds_only_lowbit_and_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"lowbit", wheel.name.split("-py")[0] + ".dist-info"}
    expected = {
        f"{installed}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, installed in SOURCE_FOLDERS.items()
        for path in (REPO / folder).rglob("*.py")
    }
    assert expected <= set(names), sorted(expected - set(names))


def test_installed_wheel_works_from_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = f"""
import importlib, sys
import lowbit
assert lowbit.__file__.startswith({str(target)!r}), lowbit.__file__
for name in ("converter", "runtime", "custom_ops"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(name + " is importable as a top-level package")
lowbit.convert({str(SAMPLE_MODEL)!r}, "out", scheme="q4f32_1")
print(lowbit.load("out").generate("Once upon a time", max_new_tokens=8))
"""
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    result = subprocess.run([sys.executable, "-m", "lowbit", "inspect", "out"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "scheme q4f32_1" in result.stdout, result.stderr


def test_runtime_never_imports_the_converter():
    """A converted folder deploys with the runtime alone: no module of runtime/ names the converter."""
    for path in (REPO / "runtime").rglob("*.py"):
        text = path.read_text()
        assert "lowbit.converter" not in text and "from converter" not in text, path
    for path in (REPO / "custom_ops").rglob("*.py"):
        assert "lowbit.converter" not in path.read_text(), path
