"""GPTQ checkpoints (v1, v2, act-order; 2/3/4/8 bits) import with their own integers: the dequantized weights
equal a plain reference bit for bit, and the ONNX logits equal transformers' on those weights."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lowbit.cli import main
from lowbit.converter.api import convert as api_convert
from lowbit.converter.checkpoint import Checkpoint
from lowbit.converter.export import convert
from lowbit.converter.importers import detect
from lowbit.runtime.inspect import inspect_model
from lowbit.runtime.session import create_session
from tests.conftest import build_tiny_model
from tests import test_bad_input as bad_input
from tests.test_bad_input import run_convert

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
TOLERANCE = 1e-4  # of the logits' scale


# ------------------------------------------------------------------------------ independent reference layouts


def pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """[lines, count] ints -> int32 [lines, words]: value i at bit i*bits of the line's little-endian bitstream
    (AutoGPTQ's QuantLinear.pack; 3-bit values straddle words). Plain Python integers, independent of lowbit."""
    words = -(-values.shape[1] * bits // 32)
    out = np.zeros((values.shape[0], words), np.uint32)
    for line, row in enumerate(values):
        acc = 0
        for i, v in enumerate(row):
            acc |= int(v) << (i * bits)
        for w in range(words):
            out[line, w] = (acc >> (32 * w)) & 0xFFFFFFFF
    return out.view(np.int32)


def reference_dequantize(codes, scales, zeros, g_idx):
    """weight[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n]) in float32 (codes [N, K],
    scales and zeros [G, N], the zero points as the kernel uses them)."""
    s = scales.astype(np.float32)[g_idx].T
    z = zeros.astype(np.float32)[g_idx].T
    return (codes.astype(np.float32) - z) * s


def random_linear(rng, n, k, bits, group, perm, zeros_range):
    """Random codes, float16 scales and zero points of one linear; `perm`: act-order's column order (GPTQ
    quantizes column perm[i] i-th, so g_idx[perm[i]] = i // group), None for contiguous groups."""
    g = k if group == -1 else group
    groups = -(-k // g)
    codes = rng.integers(0, 2**bits, (n, k))
    # |weight| like a trained model's whatever the width: finer grids take proportionally smaller scales
    scales = (rng.uniform(0.002, 0.02, (groups, n)) * rng.choice([1, 1.5], (groups, n)) * 2.0 ** (4 - bits))
    scales = scales.astype(np.float16)
    zeros = rng.integers(zeros_range[0], zeros_range[1] + 1, (groups, n))
    g_idx = np.arange(k) // g
    if perm is not None:
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // g
    return codes, scales, zeros, g_idx


def shared_input(prefix: str) -> str:
    """Linears that read the same activations (q/k/v, gate/up) share one act-order permutation, as GPTQ's
    Hessian (hence its column order) is a function of the input alone."""
    for a, b in (("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv"), ("gate_proj", "gu"), ("up_proj", "gu")):
        if prefix.endswith(a):
            return prefix[: -len(a)] + b
    return prefix


def write_gptq(model, directory, rng, bits, group, version=1, act_order=False, symmetric=False, wide=False,
               lm_head=False):
    """A GPTQ checkpoint of `model`'s shape in `directory`; `model` gets the dequantized weights (the reference).
    v1 stores zero - 1; `wide`: some v1 zero points are 2^bits (stored 2^bits - 1)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if symmetric:
        zeros_range = (2 ** (bits - 1), 2 ** (bits - 1))
    elif version == 1:
        zeros_range = (1, 2**bits if wide else 2**bits - 1)
    else:
        zeros_range = (0, 2**bits - 1)
    expected = {}
    prefixes = [f"model.layers.{i}.{m}" for i in range(model.config.num_hidden_layers) for m in LINEARS]
    prefixes += ["lm_head"] if lm_head else []
    perms = {}
    for prefix in prefixes:
        weight = state.pop(f"{prefix}.weight")
        n, k = weight.shape
        perm = perms.setdefault(shared_input(prefix), rng.permutation(k)) if act_order else None
        codes, scales, zeros, g_idx = random_linear(rng, n, k, bits, group, perm, zeros_range)
        if wide:  # at least one in every linear (drawn alone, none came up in about 1 run of 25 at 8 bits)
            zeros.flat[rng.integers(zeros.size)] = 2**bits
        dense = reference_dequantize(codes, scales, zeros, g_idx)
        expected[prefix] = dense
        stored_zeros = zeros - 1 if version == 1 else zeros
        state[f"{prefix}.qweight"] = torch.from_numpy(pack_stream(codes, bits).T.copy())  # [K*bits/32, N]
        state[f"{prefix}.qzeros"] = torch.from_numpy(pack_stream(stored_zeros & (2**bits - 1), bits))
        state[f"{prefix}.scales"] = torch.from_numpy(scales)
        state[f"{prefix}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        with torch.no_grad():
            model.get_submodule(prefix).weight.copy_(torch.from_numpy(dense))
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group,
                                     "desc_act": act_order, "sym": symmetric, "true_sequential": True,
                                     "lm_head": lm_head,
                                     **({"checkpoint_format": "gptq_v2"} if version == 2 else {})}
    (directory / "config.json").write_text(json.dumps(config))
    return expected


def logits_error(model, folder, rng):
    """max |ONNX - transformers| / max |transformers| over a batch prefill and two cached decode steps."""
    ids = rng.integers(3, model.config.vocab_size, (2, 7))
    session = create_session(folder)
    mask = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    logits, past = session.forward(ids, mask, positions, session.empty_past(2))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), use_cache=True)
    expected = out.logits.float().numpy()
    errors = [np.abs(logits - expected).max()]
    nxt = rng.integers(3, model.config.vocab_size, (2, 1))
    mask = np.ones((2, ids.shape[1] + 1), np.int64)
    logits2, _ = session.forward(nxt, mask, positions[:, -1:] + 1, past)
    with torch.no_grad():
        expected2 = model(input_ids=torch.tensor(nxt), past_key_values=out.past_key_values).logits.float().numpy()
    errors.append(np.abs(logits2 - expected2).max())
    scale = max(np.abs(expected).max(), np.abs(expected2).max())
    # the comparison can fail: the decode step's logits are not the prefill's
    assert np.abs(logits2[:, -1] - expected[:, -1]).max() / scale > TOLERANCE
    return max(errors) / scale


def check_dequantized(source, expected):
    """The importer's float view equals the reference dequantization bit for bit."""
    imported = detect(source)
    view = imported.view(Checkpoint(source))
    for prefix, dense in expected.items():
        got = view.read_float32(f"{prefix}.weight")
        assert got.dtype == np.float32 and np.array_equal(got, dense), prefix
    return imported


# ------------------------------------------------------------------------------ tests


CASES = [  # bits, group, version, act_order, symmetric, wide zero points
    (4, 16, 1, False, False, False),
    (4, 16, 1, True, False, False),
    (4, 32, 2, False, False, False),  # down_proj K = 80: the last group is short
    (4, 16, 2, True, False, False),
    (8, 16, 1, False, False, False),
    (8, 16, 2, True, False, False),
    (4, 16, 1, False, True, False),  # symmetric: MatMulNBits without zero points
    (4, 16, 1, True, False, True),  # v1 zero point 16: lowbit's blockwise op
    (8, -1, 1, False, False, True),  # per channel, v1 zero point 256
    (2, 16, 2, False, False, False),
    (3, 16, 1, True, False, False),
    (3, 16, 2, False, True, False),
]


@pytest.mark.parametrize("bits,group,version,act_order,symmetric,wide", CASES)
def test_gptq_import_is_exact(bits, group, version, act_order, symmetric, wide, tmp_path, rng):
    source = tmp_path / "gptq"
    model = build_tiny_model("llama", source)
    expected = write_gptq(model, source, rng, bits, group, version, act_order, symmetric, wide)
    check_dequantized(source, expected)
    out = tmp_path / "onnx"
    report = api_convert(str(source), out, accuracy_level=0)
    assert report.scheme == f"w{bits}a16"
    assert any("implied" in note for note in report.notes)
    layers = {r.module: r for r in report.quant.layers}
    assert len(layers) == 4 * 2 and all(r.max_rel_error == 0.0 for r in layers.values()), layers
    formats = {r.format for r in layers.values()}
    if wide or bits == 3:
        assert "blockwise" in formats
    elif bits in (2, 4, 8) and group in (16, 32, -1):
        assert formats == {"matmulnbits"}
    ops = [n for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
    gathers = [n for n in ops if n.op_type == "Gather" and n.name.endswith(".act_order")]
    assert len(gathers) == (8 if act_order else 0)
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["import"]["format"] == "gptq" and meta["import"]["version"] == version
    assert meta["import"]["desc_act"] == act_order
    info = inspect_model(out)
    label = f"gptq v{version}" + (" act-order" if act_order else "")
    assert info["quantized"]["layers.0.attn.qkv_proj"]["import"] == label
    assert logits_error(model, out, rng) <= TOLERANCE


def test_gptq_quantized_lm_head(tmp_path, rng):
    """GPTQModel's lm_head=true: the untied lm_head is imported like any linear (with act-order)."""
    source = tmp_path / "gptq"
    model = build_tiny_model("llama", source)
    expected = write_gptq(model, source, rng, 4, 16, version=2, act_order=True, lm_head=True)
    check_dequantized(source, expected)
    out = tmp_path / "onnx"
    report = api_convert(str(source), out, accuracy_level=0)
    layers = {r.module: r for r in report.quant.layers}
    assert layers["lm_head"].format == "matmulnbits" and layers["lm_head"].max_rel_error == 0.0
    assert logits_error(model, out, rng) <= TOLERANCE


def test_gptq_import_matches_own_w4a16_layout(tmp_path, rng):
    """Symmetric 4-bit g32 GPTQ is stored exactly like our own w4a16: MatMulNBits without zero points."""
    source = tmp_path / "gptq"
    model = build_tiny_model("llama", source)
    write_gptq(model, source, rng, 4, 32, symmetric=True)
    out = tmp_path / "onnx"
    convert(str(source), out, scheme="w4a16")  # the implied scheme may be named
    nodes = onnx.load(out / "model.onnx", load_external_data=False).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 8 and all(len(n.input) == 3 for n in nbits)  # x, codes, scales: no zero points


def test_gptq_tensorrt_symmetric_is_lossless_and_asymmetric_needs_requantize(tmp_path, rng):
    source = tmp_path / "gptq"
    model = build_tiny_model("llama", source)
    write_gptq(model, source, rng, 4, 64, symmetric=True)
    out = tmp_path / "trt"
    report = convert(str(source), out, target="tensorrt")
    assert {r.format for r in report.quant.layers} == {"dq"}
    assert all(r.max_rel_error == 0.0 for r in report.quant.layers)

    asym = tmp_path / "asym"
    model = build_tiny_model("llama", asym)
    write_gptq(model, asym, rng, 4, 16)
    result = CliRunner().invoke(main, ["convert", str(asym), "-o", str(tmp_path / "x"), "--target", "tensorrt"])
    assert result.exit_code == 2 and "--requantize" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    report = convert(str(asym), tmp_path / "y", target="tensorrt", requantize=True)
    assert {r.format for r in report.quant.layers} == {"dq"}
    assert all(r.max_rel_error > 0 for r in report.quant.layers)  # the added error, reported per layer
    assert any("requantized" in note for note in report.notes)


# ------------------------------------------------------------------------------ bad input


def assert_clean_failure(result, out, message):
    """test_bad_input's check (one `error:` line naming the problem, exit code 2, no staging left), and no folder."""
    bad_input.assert_clean_failure(result, out, message)
    assert not out.exists()


@pytest.fixture
def gptq_folder(tmp_path, rng):
    source = tmp_path / "gptq"
    model = build_tiny_model("llama", source)
    write_gptq(model, source, rng, 4, 16, act_order=True)
    return source


def _edit_config(source, **changes):
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"].update(changes)
    (source / "config.json").write_text(json.dumps(config))


def _edit_tensors(source, edit):
    state = safetensors_torch.load_file(source / "model.safetensors")
    edit(state)
    safetensors_torch.save_file(state, source / "model.safetensors")


def test_unknown_quant_method(gptq_folder, tmp_path):
    _edit_config(gptq_folder, quant_method="squeezellm")
    out = tmp_path / "out"
    assert_clean_failure(run_convert(gptq_folder, "-o", out), out, "unknown quant_method 'squeezellm'")


def test_unsupported_bits(gptq_folder, tmp_path):
    _edit_config(gptq_folder, bits=5)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(gptq_folder, "-o", out), out, "bits must be one of [2, 3, 4, 8], got 5")


def test_qweight_shape_disagrees_with_config(gptq_folder, tmp_path):
    config = json.loads((gptq_folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (gptq_folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(gptq_folder, "-o", out), out, "tensor model.layers.0.mlp.gate_proj.weight "
                         "(dequantized from model.layers.0.mlp.gate_proj.qweight): shape [80, 64] does not match "
                         "config.json (expected [96, 64])")


def test_qweight_rows_disagree_with_g_idx(gptq_folder, tmp_path):
    name = "model.layers.1.mlp.up_proj.qweight"
    _edit_tensors(gptq_folder, lambda s: s.__setitem__(name, s[name][:-1].contiguous()))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(gptq_folder, "-o", out), out, f"tensor {name}: shape")


@pytest.mark.parametrize("tensor", ["scales", "qzeros"])
def test_missing_scales_or_qzeros(gptq_folder, tmp_path, tensor):
    name = f"model.layers.0.self_attn.k_proj.{tensor}"
    _edit_tensors(gptq_folder, lambda s: s.pop(name))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(gptq_folder, "-o", out), out, f"checkpoint has no tensor {name}")


def test_g_idx_not_a_permutation_of_groups(gptq_folder, tmp_path):
    name = "model.layers.0.mlp.down_proj.g_idx"

    def edit(state):
        g_idx = state[name].clone()
        g_idx[g_idx == 1] = 0  # group 0 gets twice its columns, group 1 none
        state[name] = g_idx

    _edit_tensors(gptq_folder, edit)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(gptq_folder, "-o", out), out, "tensor model.layers.0.mlp.down_proj.g_idx is "
                                                                   "not a permutation of groups")


def test_conflicting_scheme_is_an_error(gptq_folder, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_convert(gptq_folder, "-o", out, "--scheme", "q4f16_1"), out,
                         "implies scheme w4a16; --scheme q4f16_1 would requantize it")
    assert_clean_failure(run_convert(gptq_folder, "-o", out, "--algo", "gptq"), out, "already quantized")


def test_quantize_config_json_of_older_autogptq(gptq_folder, tmp_path, rng):
    config = json.loads((gptq_folder / "config.json").read_text())
    quant = config.pop("quantization_config")
    quant.pop("quant_method")
    (gptq_folder / "config.json").write_text(json.dumps(config))
    (gptq_folder / "quantize_config.json").write_text(json.dumps(quant))
    out = tmp_path / "out"
    result = run_convert(gptq_folder, "-o", out, "--accuracy-level", "0")
    assert result.exit_code == 0, result.output
    assert "scheme w4a16 implied" in result.output
    assert json.loads((out / "lowbit.json").read_text())["import"]["config"] == "quantize_config.json"
