"""AWQ GEMM checkpoints (AutoAWQ `version: gemm`) import with their own integers: the dequantized weights equal a
plain reference of the published layout bit for bit, and the ONNX logits equal transformers' on those weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lowbit.cli import main
from lowbit.converter.api import convert
from lowbit.converter.checkpoint import Checkpoint
from lowbit.converter.importers import detect
from lowbit.runtime.inspect import inspect_model
from tests.conftest import build_tiny_model
from tests.test_import_gptq import LINEARS, TOLERANCE, assert_clean_failure, logits_error

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's WQLinear_GEMM.pack: nibble j of a word holds column AWQ_ORDER[j]


def pack_awq(values: np.ndarray) -> np.ndarray:
    """[rows, N] 4-bit ints -> int32 [rows, N / 8], plain Python following AutoAWQ's packing loop."""
    rows, n = values.shape
    out = np.zeros((rows, n // 8), np.uint32)
    for r in range(rows):
        for col in range(n // 8):
            word = 0
            for j in range(8):
                word |= int(values[r, col * 8 + AWQ_ORDER[j]]) << (4 * j)
            out[r, col] = word
    return out.view(np.int32)


def write_awq(model, directory, rng, group):
    """An AWQ GEMM checkpoint of `model`'s shape; `model` gets the dequantized weights (the reference)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected = {}
    for prefix in [f"model.layers.{i}.{m}" for i in range(model.config.num_hidden_layers) for m in LINEARS]:
        n, k = state.pop(f"{prefix}.weight").shape
        groups = k // group
        codes = rng.integers(0, 16, (k, n))  # AWQ stores W.T: [K, N]
        zeros = rng.integers(0, 16, (groups, n))
        scales = rng.uniform(0.002, 0.02, (groups, n)).astype(np.float16)
        g = np.arange(k) // group
        dense = ((codes - zeros[g]).astype(np.float32) * scales[g].astype(np.float32)).T.copy()
        expected[prefix] = dense
        state[f"{prefix}.qweight"] = torch.from_numpy(pack_awq(codes))
        state[f"{prefix}.qzeros"] = torch.from_numpy(pack_awq(zeros))
        state[f"{prefix}.scales"] = torch.from_numpy(scales)
        with torch.no_grad():
            model.get_submodule(prefix).weight.copy_(torch.from_numpy(dense))
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": None}
    (directory / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("group", [16])
def test_awq_gemm_import_is_exact(group, tmp_path, rng):
    source = tmp_path / "awq"
    model = build_tiny_model("llama", source)
    expected = write_awq(model, source, rng, group)
    view = detect(source).view(Checkpoint(source))
    for prefix, dense in expected.items():
        assert np.array_equal(view.read_float32(f"{prefix}.weight"), dense), prefix
    out = tmp_path / "onnx"
    report = convert(str(source), out, accuracy_level=0)
    assert report.scheme == "w4a16"
    assert {r.format for r in report.quant.layers} == {"matmulnbits"}
    assert all(r.max_rel_error == 0.0 for r in report.quant.layers)
    assert inspect_model(out)["quantized"]["layers.1.mlp.down_proj"]["import"] == "awq gemm"
    assert json.loads((out / "lowbit.json").read_text())["import"]["format"] == "awq"
    assert logits_error(model, out, rng) <= TOLERANCE


def test_awq_gemv_is_refused(tmp_path, rng):
    source = tmp_path / "awq"
    model = build_tiny_model("llama", source)
    write_awq(model, source, rng, 16)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out)])
    assert_clean_failure(result, out, "AWQ version 'gemv' is not supported")
