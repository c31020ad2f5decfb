"""Strict checks of what comes in, one test per class of bad input: which weight files are read, tensor
shapes and values, numeric options and data files, config values, and what --overwrite may replace.
Each failure is one `error:` line, exit code 2, and nothing left behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from lowbit.cli import main
from lowbit.converter.checkpoint import Checkpoint, weight_format
from tests.conftest import SAMPLE_MODEL

try:  # imported before any in-process `convert`, which keeps torch out of a process that has not loaded it
    import torch
except ImportError:
    torch = None


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, *fragments, out=None):
    """One `error:` line naming each fragment, exit code 2, no traceback, no output or staging folder."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if out is not None:
        assert not out.exists()
        assert not out.parent.exists() or not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def model(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(SAMPLE_MODEL, copy)
    return copy


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def converted_bytes(folder):
    return (folder / "model.onnx").read_bytes(), (folder / "model.onnx.data").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    assert cli("convert", SAMPLE_MODEL, "-o", out).exit_code == 0
    return out


# ------------------------------------------------------------------------ which files are read


def test_undeclared_safetensors_are_ignored(model, tmp_path, reference):
    tensors = load_file(model / "model.safetensors")
    save_file({k: np.full_like(v, np.nan) for k, v in tensors.items()}, model / "consolidated.safetensors")
    save_file({"model.norm.weight": np.zeros(7, np.float32)}, model / "adapter_model.safetensors")
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert result.exit_code == 0, result.output
    assert converted_bytes(out) == converted_bytes(reference)


def test_sharded_checkpoint_with_index(model, tmp_path, reference):
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, model / file)
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"model.norm.weight": np.zeros(64, np.float32)}, model / "consolidated.safetensors")
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert result.exit_code == 0, result.output
    assert converted_bytes(out) == converted_bytes(reference)

    (model / "model-00002-of-00002.safetensors").unlink()  # the index names a missing shard
    out2 = tmp_path / "out2"
    assert_error(cli("convert", model, "-o", out2), "model-00002-of-00002.safetensors", "missing", out=out2)
    (model / "model.safetensors.index.json").unlink()  # no index: numbered shards must all be there
    assert_error(cli("convert", model, "-o", out2), "model-00002-of-00002.safetensors", "missing", out=out2)


def test_index_placing_a_tensor_in_the_wrong_shard(model, tmp_path):
    index = {"weight_map": {n: "model.safetensors" for n in load_file(model / "model.safetensors")}}
    index["weight_map"]["model.extra.weight"] = "model.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_error(cli("convert", model, "-o", out), "model.extra.weight", out=out)


def test_weight_format_follows_declared_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "consolidated.safetensors").write_bytes(b"")
    assert weight_format(folder) is None
    (folder / "pytorch_model.bin").write_bytes(b"")
    assert weight_format(folder) == "bin"  # an adapter or a copy does not make it a safetensors checkpoint
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert weight_format(folder) == "safetensors"


def test_bin_checkpoint_beside_an_adapter(model, tmp_path, reference):
    if torch is None:
        pytest.skip("torch is not installed")
    tensors = load_file(model / "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, model / "pytorch_model.bin")
    (model / "model.safetensors").rename(model / "adapter_model.safetensors")
    assert Checkpoint(model).names() == list(tensors)
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert result.exit_code == 0, result.output
    assert converted_bytes(out)[1] == converted_bytes(reference)[1]


def test_sharded_bin_checkpoint_with_index(model, tmp_path, reference):
    if torch is None:
        pytest.skip("torch is not installed")
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), start=1):
        file = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: torch.from_numpy(tensors[n]) for n in part}, model / file)
        weight_map.update({n: file for n in part})
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (model / "model.safetensors").unlink()
    out = tmp_path / "out"
    result = cli("convert", model, "-o", out)
    assert result.exit_code == 0, result.output
    assert converted_bytes(out)[1] == converted_bytes(reference)[1]


# ------------------------------------------------------------------------ shapes, dtypes and values


def test_shape_mismatch_names_tensor_and_both_shapes(model, tmp_path):
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:16]
    save_file(tensors, model / "model.safetensors")
    out = tmp_path / "out"
    assert_error(cli("convert", model, "-o", out), "model.layers.1.self_attn.k_proj.weight", "[16, 64]", "[32, 64]",
                 out=out)


def test_config_disagreeing_with_checkpoint(model, tmp_path):
    out = tmp_path / "out"
    edit_config(model, intermediate_size=100)
    assert_error(cli("convert", model, "-o", out), "gate_proj.weight", "[172, 64]", "[100, 64]", out=out)
    edit_config(model, intermediate_size=172, num_hidden_layers=3)  # the checkpoint has 5 layers
    assert_error(cli("convert", model, "-o", out), "layer 3", "num_hidden_layers", out=out)


def test_integer_weights_are_refused(model, tmp_path):
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].view(np.int32)
    save_file(tensors, model / "model.safetensors")
    out = tmp_path / "out"
    assert_error(cli("convert", model, "-o", out), "model.norm.weight", "I32", out=out)


@pytest.mark.parametrize("scheme", ["q0f32", "q4f16_1"])
@pytest.mark.parametrize("value", [np.nan, -np.inf])
@pytest.mark.parametrize("name", [
    "model.layers.2.mlp.up_proj.weight",  # written to model.onnx.data by a writer thread
    "model.layers.0.input_layernorm.weight",  # small: serialized inline into model.onnx
])
def test_non_finite_weights(model, tmp_path, scheme, value, name):
    tensors = load_file(model / "model.safetensors")
    tensors[name].reshape(-1)[5] = value
    save_file(tensors, model / "model.safetensors")
    out = tmp_path / "out"
    assert_error(cli("convert", model, "-o", out, "--scheme", scheme), name, "NaN", out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the staging folder is gone too
    nested = tmp_path / "a" / "b" / "out"
    assert_error(cli("convert", model, "-o", nested, "--scheme", scheme), name, out=nested)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # so are the parents it created


@pytest.mark.parametrize("damage,message", [
    (lambda h: h.update({"model.norm.weight": {**h["model.norm.weight"], "dtype": "Q4"}}), "unsupported dtype"),
    (lambda h: h.update({"model.norm.weight": {**h["model.norm.weight"], "shape": [-1, -64]}}), "shape"),
    (lambda h: h.update({"model.norm.weight": {**h["model.norm.weight"], "data_offsets": [5, 1]}}), "data_offsets"),
    (lambda h: h.update({"model.norm.weight": {**h["model.norm.weight"], "data_offsets": [0, 256]}}), "overlaps"),
    (lambda h: h.update({"model.norm.weight": [1, 2]}), "not an object"),
])
def test_corrupt_safetensors_header(model, tmp_path, damage, message):
    path = model / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    damage(header)
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    path.write_bytes(data[:8] + raw + data[8 + length:])
    out = tmp_path / "out"
    assert_error(cli("convert", model, "-o", out), "model.safetensors", message, out=out)


def test_wrong_header_length(model, tmp_path):
    """Safetensors pads its header with spaces, so a header length a few bytes short still parses; the data
    must then end exactly where the file does, or every tensor would be read from shifted offsets."""
    path = model / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert data[8 + length - 3:8 + length] == b"   "
    path.write_bytes((length - 3).to_bytes(8, "little") + data[8:])
    out = tmp_path / "out"
    assert_error(cli("convert", model, "-o", out), "model.safetensors", "3 bytes after the last tensor", out=out)


# ------------------------------------------------------------------------ group sizes


def test_group_larger_than_k_is_exactly_per_channel(tmp_path):
    """a16w4 is per-channel; with a group larger than every K (64, 172) it must be the same graph and the same
    bytes, not K zero-padded up to the group (which changes the min/max rule and the storage)."""
    per_channel, big_group = tmp_path / "pc", tmp_path / "g"
    for scheme in ("a16w4", "a16w8-minmax"):
        assert cli("convert", SAMPLE_MODEL, "-o", per_channel, "--scheme", scheme, "--overwrite").exit_code == 0
        result = cli("convert", SAMPLE_MODEL, "-o", big_group, "--scheme", scheme, "--group-size", "4096",
                     "--overwrite")
        assert result.exit_code == 0, result.output
        assert converted_bytes(big_group) == converted_bytes(per_channel)
        quant = json.loads((big_group / "lowbit.json").read_text())["quantization"]
        assert all("per-channel" in layer["quant"] for layer in quant.values())


@pytest.mark.parametrize("value", ["0", "-32", "x", "1.5"])
def test_group_size_must_be_a_positive_integer(tmp_path, value):
    out = tmp_path / "out"
    assert_error(cli("convert", SAMPLE_MODEL, "-o", out, "--scheme", "w4a16", "--group-size", value), "--group-size",
                 out=out)


def test_group_in_scheme_name_must_be_positive(tmp_path):
    out = tmp_path / "out"
    assert_error(cli("convert", SAMPLE_MODEL, "-o", out, "--scheme", "a16w4-g0"), "group size must be positive",
                 out=out)


# ------------------------------------------------------------------------ numeric options and data files


@pytest.mark.parametrize("args,fragment", [
    (["run", "{out}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", "{out}", "--prompt", "hi", "--max-new-tokens", "100000000000000000000"], "context length"),
    (["run", "{out}", "--prompt", "hi", "--sample", "--temperature", "nan"], "--temperature"),
    (["run", "{out}", "--prompt", "hi", "--sample", "--top-p", "inf"], "--top-p"),
    (["run", "{out}", "--prompt", "hi", "--sample", "--seed", "-1"], "--seed"),
    (["eval", "{out}", "--data", "{data}", "--seq-len", "1"], "--seq-len"),
    (["eval", "{out}", "--data", "{data}", "--stride", "0"], "--stride"),
    (["eval", "{out}", "--data", "{data}", "--seq-len", "8", "--stride", "9"], "stride <= seq_len"),
    (["eval", "{out}", "--data", "{data}", "--max-tokens", "-5"], "--max-tokens"),
    (["eval", "{out}", "--data", "{data}", "--seq-len", "x"], "--seq-len"),
    (["bench", "{out}", "--prompt-len", "0"], "--prompt-len"),
    (["bench", "{out}", "--prompt-len", "600"], "context length"),
    (["bench", "{out}", "--new-tokens", "-1"], "--new-tokens"),
    (["bench", "{out}", "--repeats", "0"], "--repeats"),
    (["bench", "{out}", "--threads", "0"], "--threads"),
    (["bench", "{out}", "--threads", "1000000000"], "--threads"),
    (["convert", "{model}", "-o", "{new}", "--accuracy-level", "7"], "--accuracy-level"),
])
def test_numeric_options(reference, tmp_path, args, fragment):
    data = tmp_path / "data.txt"
    data.write_text("Once upon a time there was a cat. " * 20)
    values = dict(out=reference, data=data, model=SAMPLE_MODEL, new=tmp_path / "new")
    result = cli(*[a.format(**values) for a in args])
    assert_error(result, fragment)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("content,fragment", [
    (b"", "empty"),
    (b"  \n\t\n", "empty"),
    (b"\xff\xfeabc", "not UTF-8"),
])
def test_evaluation_text_files(reference, tmp_path, content, fragment):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    assert_error(cli("eval", reference, "--data", data), str(data), fragment)


def test_evaluation_text_must_be_a_file(reference, tmp_path):
    assert_error(cli("eval", reference, "--data", tmp_path), "no such file")


def test_too_few_tokens_is_an_error_not_a_division_by_zero(reference):
    from lowbit.errors import LowbitError
    from lowbit.runtime.evaluate import perplexity
    from lowbit.runtime.session import create_session

    session = create_session(reference)
    with pytest.raises(LowbitError, match="fewer than 2 tokens"):
        perplexity(session, np.array([1], np.int64), 8, 8)


# ------------------------------------------------------------------------ config.json values


@pytest.mark.parametrize("changes,fragment", [
    ({"hidden_size": 60}, "hidden"),  # not divisible by 8 heads
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": "512"}, "vocab_size"),
    ({"hidden_size": 64.0}, "hidden_size"),
    ({"max_position_embeddings": 10**30}, "max_position_embeddings"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"head_dim": 0}, "head_dim"),
    ({"sliding_window": -3}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
    ({"model_type": ["llama"]}, "model_type"),
    ({"hidden_size": ...}, "model.embed_tokens.weight"),  # the class default (4096) disagrees with the weights
])
def test_config_values(model, tmp_path, changes, fragment):
    edit_config(model, **changes)
    out = tmp_path / "out"
    assert_error(cli("convert", model, "-o", out), fragment, out=out)


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe{}", b"{", b'"llama"'])
def test_config_file_that_is_not_a_json_object(model, tmp_path, content):
    (model / "config.json").write_bytes(content)
    out = tmp_path / "out"
    assert_error(cli("convert", model, "-o", out), "config.json", out=out)


# ------------------------------------------------------------------------ --overwrite


def test_overwrite_replaces_only_folders_lowbit_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_error(cli("convert", SAMPLE_MODEL, "-o", out, "--overwrite"), "not written by lowbit")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    (out / "notes.txt").unlink()
    assert cli("convert", SAMPLE_MODEL, "-o", out, "--overwrite").exit_code == 0  # empty: fine
    assert cli("convert", SAMPLE_MODEL, "-o", out, "--overwrite", "--scheme", "q4f32_1").exit_code == 0
    assert json.loads((out / "lowbit.json").read_text())["scheme"] == "q4f32_1"

    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    assert_error(cli("convert", SAMPLE_MODEL, "-o", link, "--overwrite"), "symbolic link")
    assert (out / "model.onnx").is_file()

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert_error(cli("convert", SAMPLE_MODEL, "-o", blocker, "--overwrite"), "not a directory")
    assert_error(cli("convert", SAMPLE_MODEL, "-o", blocker / "out"), "cannot create")
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "link", "out"]
