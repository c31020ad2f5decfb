"""GPTQ and AWQ on NVFP4 weights (llm-compressor's GPTQModifier and AWQModifier with the NVFP4A16 scheme).

Tiers: `gptq_quantize` with rule nvfp4 equals the paper's algorithm written plainly here (full inverse Hessian, one
column at a time, no blocks) code for code, scale for scale, with dynamic groups and with act-order's static groups,
with padding and dead inputs; with act-order it equals llm-compressor's own `quantize_weight` loop transcribed in
torch on compressed-tensors' functions, value for value; its output error is below round-to-nearest NVFP4's. AWQ's
scale search quantizes W·diag(s) with the global scale of the scaled weight; its clip search is refused on NVFP4.
End to end, a recipe with AWQ + NVFP4A16 on attention and GPTQ + NVFP4A16 on the MLP converts tiny Llama and
stories260K, runs on ORT, and with --independent its stored bytes equal the algorithms on the float model's
statistics.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lowbit
from lowbit import nvfp4
from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.converter.algorithms import awq_clip_search, awq_quantize, awq_search, gptq_quantize, quantize_clipped
from lowbit.converter.algorithms.awq import fold_into_norm, scale_weight
from lowbit.converter.calibration import calibrate_statistics, load_calibration_samples
from lowbit.custom_ops import nvfp4 as nvfp4_ops
from lowbit.errors import LowbitError
from tests.conftest import SAMPLE_MODEL, build_tiny_model
from tests.test_fp8 import CALIBRATION_TEXT, onnx_logits, write_char_tokenizer
from tests.test_gptq import reference_setup

NVFP4 = WeightQuant(4, 16, "nvfp4")


def reference_gptq_nvfp4(weight, hessian, damp=0.01, act_order=False):
    """The paper's GPTQ, plainly: the full inverse Hessian H⁻¹, updated after each column by removing it (H⁻¹ −
    H⁻¹_{:,t} H⁻¹_{t,:} / H⁻¹_tt), the column's error (w − q) / H⁻¹_tt pushed onto the later columns, float64
    weights. NVFP4 group parameters: the global scale gs from the whole weight as given; a block's FP8 scale from its
    current weights at its first column (act_order: from the original weights, static groups); a column's codes
    the e2m1 rounding of float32(w) / (s / gs). Returns codes [N, K_padded], FP8 scales, gs and the losses."""
    f32 = np.float32
    n, k = weight.shape
    kp = -(-k // 16) * 16
    gs = nvfp4.global_scale(weight)
    w, h, perm = reference_setup(weight, hessian, damp, act_order)
    big_w, big_h = np.zeros((n, kp)), np.eye(kp)  # padding: zero weights, unit uncoupled Hessian rows
    big_w[:, :k], big_h[:k, :k] = w, h
    scales = np.zeros((n, kp // 16), nvfp4.SCALE_DTYPE)
    if act_order:
        scales[:] = nvfp4.block_scales(big_w.astype(f32).reshape(n, -1, 16), gs)
    order = np.concatenate([perm, np.arange(k, kp)])
    big_w, hinv = big_w[:, order], np.linalg.inv(big_h[np.ix_(order, order)])
    codes, losses = np.zeros((n, kp), np.uint8), np.zeros(n)
    for t in range(kp):
        column = order[t]
        j = column // 16
        if not act_order and column % 16 == 0:
            scales[:, j] = nvfp4.block_scales(big_w[:, t : t + 16].astype(f32)[:, None, :], gs)[:, 0]
        step = scales[:, j].astype(f32) / gs
        codes[:, column] = nvfp4.to_e2m1_codes(big_w[:, t].astype(f32) / step)
        delta = big_w[:, t] - nvfp4.E2M1[codes[:, column]] * step
        big_w[:, t + 1 :] -= np.outer(delta / hinv[t, t], hinv[t, t + 1 :])
        losses += delta**2 / hinv[t, t] / 2
        hinv -= np.outer(hinv[:, t], hinv[t, :]) / hinv[t, t]
    return codes, scales, gs, losses


def random_layer(rng, n, k, rows=None):
    """W [N, K] float32 (rows at random magnitudes, a few outlier weights) and H = 2/n XᵀX for correlated inputs X
    with a few outlier channels."""
    rows = rows or 2 * k
    x = rng.standard_normal((rows, k)) @ (rng.standard_normal((k, k)) * 0.3 + np.eye(k))
    x[:, rng.choice(k, 3, replace=False)] *= 8.0
    w = rng.standard_normal((n, k)) * rng.uniform(0.02, 0.5, (n, 1))
    w[rng.integers(0, n, 4), rng.integers(0, k, 4)] *= 12
    return w.astype(np.float32), 2.0 / rows * (x.T @ x)


# (N, K, block): K a multiple of 16 and not (padded), blocks of 128, smaller than K, and not a multiple of 16 (a
# block straddles groups)
CASES = [(24, 96, 128), (40, 172, 64), (16, 256, 48), (33, 100, 32), (64, 160, 128)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("n,k,block", CASES)
def test_gptq_nvfp4_equals_the_plain_reference(n, k, block, act_order, rng):
    w, h = random_layer(rng, n, k)
    result = gptq_quantize(w, h, NVFP4, block_size=block, act_order=act_order)
    codes, scales, gs, losses = reference_gptq_nvfp4(w, h, act_order=act_order)
    qw = result.quantized
    assert np.array_equal(qw.codes, codes)
    assert qw.scales.dtype == nvfp4.SCALE_DTYPE and np.array_equal(qw.scales.view(np.uint8), scales.view(np.uint8))
    assert qw.global_scale == gs == quantize(w, NVFP4).global_scale  # the whole original weight's
    np.testing.assert_allclose(result.losses, losses, rtol=1e-9)
    # exactly lowbit.affine.quantize's layout for nvfp4: every storage format packs it unchanged
    rtn = quantize(w, NVFP4)
    assert (qw.bits, qw.group_size, qw.k, qw.element, qw.codes.shape, qw.scales.shape) == \
        (rtn.bits, rtn.group_size, rtn.k, rtn.element, rtn.codes.shape, rtn.scales.shape)
    assert np.array_equal(qw.zero_points, rtn.zero_points) and qw.zero_points.dtype == rtn.zero_points.dtype
    assert not np.array_equal(qw.codes, rtn.codes)
    if act_order:  # static groups: round-to-nearest's scales
        assert np.array_equal(qw.scales.view(np.uint8), rtn.scales.view(np.uint8))
    np.testing.assert_array_equal(nvfp4_ops.reference_weight(nvfp4_ops.pack(qw)), dequantize(qw))


def test_gptq_nvfp4_with_dead_inputs_equals_the_reference(rng):
    w, h = random_layer(rng, 20, 120)
    dead = rng.choice(120, 5, replace=False)
    h[dead, :] = 0
    h[:, dead] = 0
    for act_order in (False, True):
        result = gptq_quantize(w, h, NVFP4, block_size=32, act_order=act_order)
        codes, scales, gs, _ = reference_gptq_nvfp4(w, h, act_order=act_order)
        assert np.array_equal(result.quantized.codes, codes)
        assert np.array_equal(result.quantized.scales.view(np.uint8), scales.view(np.uint8))
        assert not result.quantized.codes[:, dead].any()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_nvfp4_has_lower_output_error_than_round_to_nearest(act_order, rng):
    w, h = random_layer(rng, 96, 256, rows=512)
    result = gptq_quantize(w, h, NVFP4, act_order=act_order)

    def trace(qw):
        delta = w.astype(np.float64) - dequantize(qw)
        return float(np.trace(delta @ h @ delta.T))

    gptq_error, rtn_error = trace(result.quantized), trace(quantize(w, NVFP4))
    np.testing.assert_allclose(result.error, gptq_error, rtol=1e-9)
    np.testing.assert_allclose(result.rtn_error, rtn_error, rtol=1e-9)
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


def llmcompressor_gptq_nvfp4(weight, hessian, blocksize=128, percdamp=0.01):
    """llm-compressor's GPTQ `quantize_weight` (src/llmcompressor/modifiers/gptq/gptq_quantize.py, main at
    ab1ba3e) for the tensor_group strategy with actorder "weight"/"static" (GPTQModifier's default), line for line
    in torch on compressed-tensors' functions: its observer's global scale and FP8 block scales from the whole
    weight before the loop, the permutation by decreasing diag H, dead inputs, dampening, cholesky → cholesky_inverse
    → upper cholesky, blocks with rank-one updates inside, and every column through compressed-tensors'
    `fake_quantize` with the group's scale and the global scale. One change: GPTQ_PRECISION float64 (llm-compressor:
    float32), each column cast to float32 for `fake_quantize` (lowbit's precision). Returns the dequantized W
    float32, the FP8 scales' bits and the global scale."""
    torch = pytest.importorskip("torch")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, fake_quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam

    args = QuantizationArgs.model_validate(PRESET_SCHEMES["NVFP4A16"]["weights"])
    column_args = args.model_copy(update={"strategy": QuantizationStrategy.CHANNEL})
    w32 = torch.from_numpy(weight)
    global_scale = generate_gparam(w32.min(), w32.max())
    scale, zero_point = compute_dynamic_scales_and_zp(w32, args, module=None, global_scale=global_scale)
    W, H = w32.to(torch.float64), torch.from_numpy(hessian).clone()
    num_columns = W.shape[1]
    g_idx = torch.arange(num_columns, dtype=torch.int) // args.group_size
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    g_idx = g_idx[perm]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, num_columns, blocksize):
        i2 = min(i1 + blocksize, num_columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            group_index = g_idx[i1 + i]
            q = fake_quantize(w.to(torch.float32), scale[:, group_index], zero_point[:, group_index], column_args,
                              global_scale=global_scale).to(torch.float64)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    W = W[:, torch.argsort(perm)]
    return W.to(torch.float32).numpy(), scale.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), global_scale.item()


@pytest.mark.parametrize("n,k,block", [(24, 96, 128), (40, 176, 64), (32, 256, 48)])
def test_gptq_nvfp4_act_order_equals_llm_compressor(n, k, block, rng):
    w, h = random_layer(rng, n, k)
    values, scale_bits, gs = llmcompressor_gptq_nvfp4(w, h, blocksize=block)
    qw = gptq_quantize(w, h, NVFP4, block_size=block, act_order=True).quantized
    assert qw.global_scale == np.float32(gs)
    assert np.array_equal(qw.scales.view(np.uint8), scale_bits)
    assert np.array_equal(dequantize(qw), values)


def test_awq_search_on_nvfp4_requantizes_the_scaled_weight(rng):
    """Each α's loss quantizes W·diag(s) with NVFP4, global scale from the scaled weight (as llm-compressor's
    observer recomputes it): the search's errors equal a direct evaluation, and α = 0 (s = 1) is round to nearest."""
    w, h = random_layer(rng, 48, 64)
    x_mean_abs = rng.uniform(0.1, 3.0, 64)
    search = awq_search([w], h, x_mean_abs, NVFP4, grid=8)
    for alpha, error in zip(search.alphas, search.errors):
        s = (x_mean_abs**alpha) / np.sqrt((x_mean_abs**alpha).max() * (x_mean_abs**alpha).min())
        scaled = scale_weight(w, s)
        q = quantize(scaled, NVFP4)
        assert q.global_scale == nvfp4.global_scale(scaled)
        delta = dequantize(q) / s - w.astype(np.float64)
        np.testing.assert_allclose(error, np.sum((delta @ h) * delta), rtol=1e-9)
    rtn = dequantize(quantize(w, NVFP4)) - w.astype(np.float64)
    np.testing.assert_allclose(search.errors[0], np.sum((rtn @ h) * rtn), rtol=1e-9)
    result = awq_quantize([w[:16], w[16:]], h, x_mean_abs, NVFP4, grid=8, clip=False)
    assert [q.global_scale for q in result.quantized] == [nvfp4.global_scale(scale_weight(p, result.scales))
                                                          for p in (w[:16], w[16:])]
    assert result.error <= result.rtn_error


def test_awq_clip_search_is_refused_on_nvfp4(rng):
    w, h = random_layer(rng, 16, 32)
    for call in (lambda: awq_clip_search(w, h, NVFP4), lambda: quantize_clipped(w, np.ones((16, 2)), NVFP4),
                 lambda: awq_quantize([w], h, np.ones(32), NVFP4, grid=4)):
        with pytest.raises(LowbitError, match="clip search is for integer grids, not rule nvfp4") as info:
            call()
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ whole models

RECIPE = """quant_stage:
  quant_modifiers:
    AWQModifier:
      duo_scaling: false
      n_grid: 10
      mappings:
        - smooth_layer: "re:.*input_layernorm$"
          balance_layers: ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]
    QuantizationModifier:
      ignore: [lm_head]
      scheme: NVFP4A16
      targets: ["re:.*self_attn\\\\.(q|k|v|o)_proj$"]
    GPTQModifier:
      ignore: [lm_head]
      bypass_divisibility_checks: true
      dampening_frac: 0.02
      scheme: NVFP4A16
      targets: ["re:.*mlp\\\\.(gate|up|down)_proj$"]
"""
SETTINGS = dict(num_samples=4, seq_len=32, calib_seed=5)


def initializers(folder) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}


def assert_stored(stored: dict[str, np.ndarray], module: str, qw) -> None:
    arrays = nvfp4_ops.pack(qw)
    assert np.array_equal(stored[f"{module}.qweight"], arrays.packed), module
    assert np.array_equal(stored[f"{module}.scales"].view(np.uint8), arrays.scales.view(np.uint8)), module
    assert stored[f"{module}.global_scale"] == arrays.global_scale, module


def tiny_llama(tmp_path):
    build_tiny_model("llama", tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    return tmp_path / "src"


@pytest.mark.parametrize("source", ["tiny-llama", "stories260K"])
def test_awq_and_gptq_nvfp4_recipe_converts_runs_and_equals_the_algorithms(source, rng, tmp_path):
    """Both pipelines convert and run on ORT (every quantized node NVFP4); with --independent, layer 0's q/k/v are
    NVFP4 of W·diag(s) for AWQ's s on the float model's statistics (1/s in the input norm) and its gate/up and
    down_proj (K padded on stories260K) are `gptq_quantize` on the float model's Hessians (act-order, llm-compressor's
    default), byte for byte; every GPTQ layer's error is below round-to-nearest's."""
    if source == "stories260K":
        if not SAMPLE_MODEL.is_dir():
            pytest.skip("samples/stories260K-hf missing")
        src = SAMPLE_MODEL
    else:
        src = tiny_llama(tmp_path)
    data = tmp_path / "calib.txt"
    data.write_text(CALIBRATION_TEXT)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    lowbit.convert(src, tmp_path / "float", scheme="q0f32")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = rng.integers(3, min(vocab, 49), (2, 16))
    reference = onnx_logits(tmp_path / "float", ids)
    for sequential in (True, False):
        out = tmp_path / ("sequential" if sequential else "independent")
        report = lowbit.convert(src, out, recipe=recipe, calib_data=data, sequential=sequential, **SETTINGS)
        assert {r.format for r in report.quant.layers} == {"nvfp4_unpack"}
        got = onnx_logits(out, ids)
        assert np.isfinite(got).all()
        assert 0 < np.abs(got - reference).max() <= 0.25 * np.abs(reference).max()  # quantized, not broken
        record = json.loads((out / "lowbit.json").read_text())["algorithm"]
        assert record["name"] == "awq+gptq"
        gptq_errors = record["algorithms"]["gptq"]["layer_output_error"]
        assert gptq_errors and all(e["gptq"] < e["rtn"] for e in gptq_errors.values())
        assert all(e["awq"] <= e["rtn"] for e in record["algorithms"]["awq"]["layer_output_error"].values())

    stored, floats = initializers(tmp_path / "independent"), initializers(tmp_path / "float")
    samples = load_calibration_samples(data, src, SETTINGS["num_samples"], SETTINGS["seq_len"], SETTINGS["calib_seed"])
    modules = ["layers.0.attn.qkv_proj", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj"]
    stats = calibrate_statistics(tmp_path / "float" / "model.onnx", modules, ["hessian", "mean_abs_per_channel"],
                                 samples)
    qkv = modules[0]
    w, h = np.ascontiguousarray(floats[f"{qkv}.weight"].T), stats[qkv]["hessian"]
    s = awq_search([w], h, stats[qkv]["mean_abs_per_channel"], NVFP4, grid=10, duo_scaling=False).scales
    assert_stored(stored, qkv, quantize(scale_weight(w, s), NVFP4))
    assert np.array_equal(stored["layers.0.attn_norm.weight"], fold_into_norm(floats["layers.0.attn_norm.weight"], s))
    for module in modules[1:]:
        w = np.ascontiguousarray(floats[f"{module}.weight"].T)
        result = gptq_quantize(w, stats[module]["hessian"], NVFP4, damp=0.02, block_size=128, act_order=True)
        assert_stored(stored, module, result.quantized)
