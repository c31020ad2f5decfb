"""Bad input: one-line error, exit code 2, no output folder left behind."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from lowbit.cli import main
from tests.conftest import SAMPLE_MODEL


def run_convert(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def assert_clean_failure(result, out, message):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging leftovers


@pytest.fixture
def model_copy(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(SAMPLE_MODEL, copy)
    return copy


def test_missing_directory(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_convert(tmp_path / "nope", "-o", out), out, "no such directory")


@pytest.mark.parametrize("key,value,message", [
    ("model_type", "bert", "unsupported model_type 'bert'"),
    ("hidden_act", "laplace", "activation 'laplace' is not supported"),
])
def test_unsupported_config_value(model_copy, tmp_path, key, value, message):
    config = json.loads((model_copy / "config.json").read_text())
    config[key] = value
    (model_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(model_copy, "-o", out), out, message)


@pytest.mark.parametrize("keep", [100, 4])
def test_truncated_safetensors(model_copy, tmp_path, keep):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - keep] if keep > 8 else data[:keep])
    out = tmp_path / "out"
    assert_clean_failure(run_convert(model_copy, "-o", out), out, "truncated safetensors")


def test_missing_tensor(model_copy, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model_copy / "model.safetensors")
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, model_copy / "model.safetensors")
    out = tmp_path / "out"
    assert_clean_failure(run_convert(model_copy, "-o", out), out, "model.layers.3.mlp.down_proj.weight")


def test_unknown_scheme(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_convert(SAMPLE_MODEL, "-o", out, "--scheme", "q9f99"), out, "unknown scheme 'q9f99'")


def test_existing_non_empty_output_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run_convert(SAMPLE_MODEL, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only what lowbit wrote (a folder with lowbit.json): never the user's files
    result = run_convert(SAMPLE_MODEL, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "not written by lowbit" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert run_convert(SAMPLE_MODEL, "-o", out).exit_code == 0  # an empty folder is fine
    (out / "extra.txt").write_text("stale")
    result = run_convert(SAMPLE_MODEL, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file() and not (out / "extra.txt").exists()


def test_hub_id_without_network_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert_clean_failure(run_convert("nobody-here/no-such-model", "-o", out), out, "cannot be fetched from the hub")


def test_run_on_missing_folder_and_unavailable_provider(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 2 and "no model.onnx" in result.output
    out = tmp_path / "out"
    assert run_convert(SAMPLE_MODEL, "-o", out).exit_code == 0
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        result = CliRunner().invoke(main, ["run", str(out), "--prompt", "hi", "--provider", "tensorrt"])
        assert result.exit_code == 2 and "not available" in result.output


def test_every_command_has_help():
    for command in ["convert", "run", "eval", "bench", "inspect"]:
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_convert_command_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from lowbit.cli import main\n"
        f"main(['convert', {str(SAMPLE_MODEL)!r}, '-o', {str(out)!r}, '--scheme', 'q4f32_1'], standalone_mode=False)\n"
        "assert sys.modules.get('torch') is None, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "model.onnx").is_file()


def test_run_and_eval_beyond_context_are_clean_errors(tmp_path):
    out = tmp_path / "out"
    assert run_convert(SAMPLE_MODEL, "-o", out).exit_code == 0
    result = CliRunner().invoke(main, ["run", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "600"])
    assert result.exit_code == 2 and "exceeds the model's context length (512)" in result.output
    data = tmp_path / "data.txt"
    data.write_text("Once upon a time there was a cat. " * 50)
    result = CliRunner().invoke(main, ["eval", str(out), "--data", str(data), "--seq-len", "1024"])
    assert result.exit_code == 2 and "exceeds the model's context length (512)" in result.output
    result = CliRunner().invoke(main, ["eval", str(out), "--data", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_a_killed_conversion_leaves_nothing_behind(tmp_path):
    """SIGTERM (`kill`) in the middle of a GPTQ conversion, once the temporary float model and the boundary cache
    exist: the command stops as on Ctrl-C, and neither the output, its staging folder nor any temporary folder
    remains."""
    import os
    import subprocess
    import sys

    out, temp = tmp_path / "out", tmp_path / "tmp"
    temp.mkdir()
    (tmp_path / "calib.txt").write_text("Once upon a time a little dog ran to the park and played with a ball. " * 20)
    code = (
        "import os, signal\n"
        "from lowbit.converter.calibration import layerwise\n"
        "put = layerwise.BoundaryCache.put\n"
        "def killed(self, *args):\n"
        "    put(self, *args)\n"
        "    assert any(p.name.startswith('lowbit-boundaries-') for p in __import__('pathlib').Path("
        f"{str(temp)!r}).iterdir())\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "layerwise.BoundaryCache.put = killed\n"
        "from lowbit.cli import main\n"
        f"main(['convert', {str(SAMPLE_MODEL)!r}, '-o', {str(out)!r}, '--scheme', 'w4a16', '--algo', 'gptq', "
        f"'--calib-data', {str(tmp_path / 'calib.txt')!r}, '--num-samples', '2', '--seq-len', '24'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "TMPDIR": str(temp)})
    assert result.returncode == 1 and "Aborted!" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "tmp"]
    assert [p.name for p in temp.iterdir() if p.name.startswith("lowbit-")] == []  # (ONNX Runtime leaves a .ses)


def test_commands_run_from_a_thread(tmp_path):
    """The SIGTERM handler is installed from the main thread only: a command invoked from another thread (an
    embedding application's worker) gives its own result, not Python's signal error."""
    import threading

    results = []
    command = ["inspect", str(tmp_path / "no")]
    worker = threading.Thread(target=lambda: results.append(CliRunner().invoke(main, command)))
    worker.start()
    worker.join()
    assert results[0].exit_code == 2 and results[0].output.startswith("error:"), results[0].output
