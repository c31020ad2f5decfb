"""AWQ (`lowbit.converter.algorithms.awq`): the Hessian-based scale and clip searches choose what references on
explicit activations choose (written from the paper and AutoAWQ), folding the scales is exact in float, and AWQ
lowers the output error versus round-to-nearest."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.converter.algorithms import (
    awq_clip_search,
    awq_quantize,
    awq_search,
    clip_ratios,
    fold_into_linear_rows,
    fold_into_norm,
    quantize_clipped,
)
from lowbit.converter.calibration import make_observer
from lowbit.errors import LowbitError


def activations(rng, n, k, outliers=3):
    """Correlated inputs with a few outlier channels, as the inputs of a decoder's linears look."""
    x = rng.standard_normal((n, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    x[:, rng.choice(k, outliers, replace=False)] *= 15
    return x


def weights(rng, rows, k):
    return [(0.05 * rng.standard_normal((n, k))).astype(np.float32) for n in rows]


def hessian(x):
    return 2.0 / len(x) * x.T @ x


def reference_scales(x_mean, alpha, w_mean=None):
    """AutoAWQ's `_compute_best_scale` candidate, written out."""
    if w_mean is None:
        s = np.clip(x_mean**alpha, 1e-4, None)
    else:
        s = np.clip(x_mean**alpha / (w_mean ** (1 - alpha) + 1e-4), 1e-4, None)
    s = s / np.sqrt(s.max() * s.min())
    s[~np.isfinite(s)] = 1
    return s


def reference_w_mean(ws, group):
    """AutoAWQ's w_mean: |w| over the group's max |w| (+1e-6), averaged over the rows of all linears."""
    w = np.abs(np.concatenate(ws).astype(np.float64))
    n, k = w.shape
    kp = -(-k // group) * group
    padded = np.zeros((n, kp))
    padded[:, :k] = w
    g = padded.reshape(n, -1, group)
    return (g / (g.max(axis=-1, keepdims=True) + 1e-6)).reshape(n, kp)[:, :k].mean(axis=0)


def reference_search(ws, x, quant, grid=20, duo=False):
    """The search of the paper and AutoAWQ on stored activations X: for α = i / grid, s from mean |x|, Q the
    quantized W·diag(s), loss mean((X Wᵀ − (X/s) Qᵀ)²) over every output of every linear; first least loss wins."""
    x_mean = np.abs(x).mean(axis=0)
    w = np.concatenate(ws).astype(np.float64)
    w_mean = reference_w_mean(ws, quant.group_size or w.shape[1]) if duo else None
    exact = x @ w.T
    losses, candidates = [], []
    for i in range(grid):
        s = reference_scales(x_mean, i / grid, w_mean)
        q = dequantize(quantize((w * s).astype(np.float32), quant)).astype(np.float64)
        losses.append(np.mean((exact - (x / s) @ q.T) ** 2))
        candidates.append(s)
    best = int(np.argmin(losses))  # the first minimum, as AutoAWQ's strict `loss < best_error`
    return best / grid, candidates[best], np.array(losses)


SEARCH_CASES = [  # bits, rule, rows of the linears sharing the input, K, duo scaling
    (4, "symmetric_full", [48], 96, False),
    (4, "asymmetric", [40, 24, 24], 96, False),
    (3, "symmetric_full", [40, 24, 24], 64, False),
    (3, "asymmetric", [48], 64, False),
    (4, "symmetric", [40, 24, 24], 80, False),  # K not a multiple of the group: padded as lowbit.affine pads
    (4, "asymmetric", [40, 24, 24], 96, True),
    (3, "symmetric_full", [48], 64, True),
]


@pytest.mark.parametrize("bits,rule,rows,k,duo", SEARCH_CASES)
def test_search_matches_reference_on_activations(bits, rule, rows, k, duo, rng):
    x = activations(rng, 400, k)
    ws = weights(rng, rows, k)
    quant = WeightQuant(bits, 32, rule)
    alpha, scales, losses = reference_search(ws, x, quant, duo=duo)
    result = awq_search(ws, hessian(x), np.abs(x).mean(axis=0), quant, duo_scaling=duo)
    assert result.alpha == alpha
    np.testing.assert_array_equal(result.scales, scales)
    np.testing.assert_array_equal(result.alphas, np.arange(20) / 20)
    # trace(ΔW H ΔWᵀ) = (2/n) ‖X ΔWᵀ‖² = 2 · (rows in all) · the mean squared output error
    ratio = result.errors / losses
    np.testing.assert_allclose(ratio / (2 * sum(rows)), 1.0, rtol=1e-9, atol=0)
    assert result.error == result.errors.min()


def test_search_of_fused_weights_equals_search_of_parts(rng):
    x = activations(rng, 300, 64)
    ws = weights(rng, [32, 16, 16], 64)
    quant = WeightQuant(4, 32, "asymmetric")
    for duo in (False, True):
        parts = awq_search(ws, hessian(x), np.abs(x).mean(axis=0), quant, duo_scaling=duo)
        fused = awq_search([np.concatenate(ws)], hessian(x), np.abs(x).mean(axis=0), quant, duo_scaling=duo)
        assert parts.alpha == fused.alpha
        np.testing.assert_array_equal(parts.scales, fused.scales)
        np.testing.assert_allclose(parts.errors, fused.errors, rtol=1e-12)


def test_alpha_zero_is_round_to_nearest(rng):
    x = activations(rng, 300, 64)
    ws = weights(rng, [48], 64)
    quant = WeightQuant(4, 32, "symmetric_full", clip_search=True)  # AWQ's searches ignore lowbit's clip search
    result = awq_search(ws, hessian(x), np.abs(x).mean(axis=0), quant)
    plain = WeightQuant(4, 32, "symmetric_full")
    delta = dequantize(quantize(ws[0], plain)).astype(np.float64) - ws[0]
    np.testing.assert_allclose(result.errors[0], 2 / len(x) * np.sum((x @ delta.T) ** 2), rtol=1e-9)


def reference_clip(weight, x, quant, grid=20, max_shrink=0.5):
    """AutoAWQ's `_compute_best_clip` on stored activations, one ratio at a time: each group clamped to ±r·max|w|,
    quantized, its error the mean over tokens of (x_g · (q_g − w_g))², the first least error per group wins. Returns
    the clip bounds and `lowbit.affine.quantize` of the weight clamped to them."""
    n, k = weight.shape
    g = quant.group_size
    kp = -(-k // g) * g
    w = np.zeros((n, kp), np.float32)
    w[:, :k] = weight
    xp = np.zeros((len(x), kp))
    xp[:, :k] = x
    groups = w.reshape(n, -1, g)
    original = np.abs(groups).max(axis=-1)
    best_max = original.copy()
    best_error = np.full(original.shape, np.inf)
    for i in range(int(max_shrink * grid)):
        max_val = original * np.float32(1 - i / grid)
        clamped = np.clip(groups, -max_val[..., None], max_val[..., None]).reshape(n, kp)
        q = dequantize(quantize(clamped, quant)).astype(np.float64)
        for j in range(kp // g):
            cols = slice(j * g, (j + 1) * g)
            error = np.mean((xp[:, cols] @ (q[:, cols] - w[:, cols]).T) ** 2, axis=0)  # [N]
            better = error < best_error[:, j]
            best_max[better, j] = max_val[better, j]
            best_error[better, j] = error[better]
    clamped = np.clip(groups, -best_max[..., None], best_max[..., None]).reshape(n, kp)[:, :k]
    return best_max, quantize(clamped, quant)


@pytest.mark.parametrize("bits,rule,k", [(4, "symmetric_full", 96), (4, "asymmetric", 96), (3, "symmetric", 80),
                                         (3, "asymmetric", 64), (4, "minmax_float_zp", 64)])
def test_clip_search_matches_brute_force(bits, rule, k, rng):
    x = activations(rng, 300, k)
    weight = weights(rng, [40], k)[0]
    weight[rng.random(weight.shape) < 0.02] *= 6  # weight outliers: clipping pays off in some groups
    quant = WeightQuant(bits, 32, rule)
    best_max, expected = reference_clip(weight, x, quant)
    clip_max = awq_clip_search(weight, hessian(x), quant)
    np.testing.assert_array_equal(clip_max, best_max)
    got = quantize_clipped(weight, clip_max, quant)
    for name in ("codes", "scales", "zero_points"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))
    assert (got.group_size, got.k, got.bits) == (expected.group_size, expected.k, expected.bits)
    original = np.abs(np.pad(weight, ((0, 0), (0, -k % 32))).reshape(40, -1, 32)).max(axis=-1)
    assert (clip_max < original).any() and (clip_max <= original).all()


@pytest.mark.parametrize("rule", ["symmetric", "symmetric_full", "asymmetric", "minmax_float_zp"])
def test_unclipped_is_round_to_nearest_bit_for_bit(rule, rng):
    weight = weights(rng, [24], 80)[0]
    quant = WeightQuant(4, 32, rule)
    original = np.abs(np.pad(weight, ((0, 0), (0, 16))).reshape(24, 3, 32)).max(axis=-1)
    for scale_dtype in (np.float32, np.float16):
        got, expected = quantize_clipped(weight, original, quant, scale_dtype), quantize(weight, quant, scale_dtype)
        for name in ("codes", "scales", "zero_points"):
            np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


def test_clip_ratios_are_autoawqs():
    assert clip_ratios() == tuple(1 - i / 20 for i in range(10))
    assert clip_ratios()[0] == 1.0 and clip_ratios()[-1] == pytest.approx(0.55)


def rms_norm(x, gamma, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gamma


def test_folding_is_exact_in_float(rng):
    k, hidden = 64, 96
    x = activations(rng, 50, k)
    gamma = 1 + 0.1 * rng.standard_normal(k)
    s = np.exp(rng.standard_normal(k))  # any positive scales
    w = weights(rng, [40], k)[0].astype(np.float64)
    # input norm -> linear: γ/s, then W·diag(s)
    expected = rms_norm(x, gamma) @ w.T
    np.testing.assert_allclose(rms_norm(x, fold_into_norm(gamma, s)) @ (w * s).T, expected, rtol=1e-12, atol=1e-12)
    f32 = rms_norm(x.astype(np.float32), fold_into_norm(gamma.astype(np.float32), s)) @ (w * s).astype(np.float32).T
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # up_proj -> down_proj: up's rows / s, down's columns · s
    up, gate = (0.1 * rng.standard_normal((hidden, k)) for _ in range(2))
    down = 0.1 * rng.standard_normal((k, hidden))
    t = np.exp(rng.standard_normal(hidden))

    def mlp(u, d):
        g = x @ gate.T
        return (g / (1 + np.exp(-g)) * (x @ u.T)) @ d.T

    np.testing.assert_allclose(mlp(fold_into_linear_rows(up, t), down * t), mlp(up, down), rtol=1e-12, atol=1e-12)
    assert fold_into_linear_rows(up.astype(np.float16), t).dtype == np.float16


@pytest.mark.parametrize("bits,rule", [(4, "symmetric_full"), (4, "asymmetric"), (3, "asymmetric")])
def test_awq_lowers_output_error_versus_rtn(bits, rule, rng):
    k = 128
    x = activations(rng, 1024, k, outliers=4)
    ws = weights(rng, [64, 32, 32], k)
    quant = WeightQuant(bits, 32, rule)
    result = awq_quantize(ws, hessian(x), np.abs(x).mean(axis=0), quant, clip=[False, False, True])
    s = result.scales
    assert result.error < 0.6 * result.rtn_error  # measured 0.27–0.44 over 45 random draws
    # the returned errors are the output errors on the activations
    exact = x @ np.concatenate(ws).astype(np.float64).T
    folded = (x / s) @ np.concatenate([dequantize(q) for q in result.quantized]).astype(np.float64).T
    np.testing.assert_allclose(result.error, 2 / len(x) * np.sum((exact - folded) ** 2), rtol=1e-9)
    rtn = x @ np.concatenate([dequantize(quantize(w, quant)) for w in ws]).astype(np.float64).T
    np.testing.assert_allclose(result.rtn_error, 2 / len(x) * np.sum((exact - rtn) ** 2), rtol=1e-9)
    # q and k are not clipped: plain round-to-nearest of W·diag(s)
    assert result.clip_max[0] is None and result.clip_max[1] is None and result.clip_max[2].shape == (32, 4)
    scaled = (ws[0].astype(np.float64) * s).astype(np.float32)
    np.testing.assert_array_equal(result.quantized[0].codes, quantize(scaled, quant).codes)


def test_mean_abs_observer_feeds_awq(rng):
    x = activations(rng, 256, 64).astype(np.float32)
    observers = {name: make_observer(name) for name in ("hessian", "mean_abs_per_channel")}
    for chunk in np.array_split(x, 3):
        for observer in observers.values():
            observer.update(chunk)
    ws = weights(rng, [32], 64)
    quant = WeightQuant(4, 32, "symmetric_full")
    got = awq_search(ws, observers["hessian"].result(), observers["mean_abs_per_channel"].result(), quant)
    x64 = x.astype(np.float64)
    alpha, scales, _ = reference_search(ws, x64, quant)
    assert got.alpha == alpha
    np.testing.assert_allclose(got.scales, scales, rtol=1e-12)


def test_inputs_unchanged_and_deterministic(rng):
    x = activations(rng, 200, 64)
    ws = weights(rng, [32, 16], 64)
    h, m = hessian(x), np.abs(x).mean(axis=0)
    copies = [w.copy() for w in ws], h.copy(), m.copy()
    quant = WeightQuant(4, 32, "asymmetric")
    first, second = (awq_quantize(ws, h, m, quant) for _ in range(2))
    for w, c in zip(ws, copies[0]):
        np.testing.assert_array_equal(w, c)
    np.testing.assert_array_equal(h, copies[1])
    np.testing.assert_array_equal(m, copies[2])
    for a, b in zip(first.quantized, second.quantized):
        np.testing.assert_array_equal(a.codes, b.codes)


def test_bad_input(rng):
    ws = weights(rng, [8], 64)
    quant = WeightQuant(4, 32)
    h, m = np.eye(64), np.ones(64)
    with pytest.raises(ValueError, match="one K"):
        awq_search([ws[0], np.ones((4, 32), np.float32)], h, m, quant)
    with pytest.raises(ValueError, match="x_mean_abs"):
        awq_search(ws, h, np.ones(32), quant)
    with pytest.raises(LowbitError, match="non-finite"):
        awq_search(ws, h * np.nan, m, quant)
    with pytest.raises(LowbitError, match="negative or non-finite"):
        awq_search(ws, h, -m, quant)
    with pytest.raises(ValueError, match="grid"):
        awq_search(ws, h, m, quant, grid=0)
    with pytest.raises(ValueError, match="max_shrink"):
        awq_clip_search(ws[0], h, quant, max_shrink=1.0)
    with pytest.raises(ValueError, match="one flag per linear"):
        awq_quantize(ws, h, m, quant, clip=[True, False])
    with pytest.raises(ValueError, match="fold_into_linear_rows"):
        fold_into_linear_rows(np.ones((3, 4)), np.ones(4))


def test_search_with_a_setting_per_linear(rng):
    """Unfused parts quantized differently (q/k int4 g32, v int8 per channel): each candidate quantizes each part by
    its own setting and duo scaling normalises each part over its own groups (llm-compressor's
    `_compute_layer_means`); the loss on stored activations, written out, picks the same α and s."""
    x = activations(rng, 300, 64)
    ws = weights(rng, [32, 16, 16], 64)
    quants = [WeightQuant(4, 32, "symmetric"), WeightQuant(4, 32, "symmetric"), WeightQuant(8, None, "symmetric")]
    x_mean = np.abs(x).mean(axis=0)
    # each part normalised over its own groups, then the mean over all 64 rows
    w_mean = sum(reference_w_mean([w], q.group_size or 64) * len(w) for w, q in zip(ws, quants)) / 64
    for duo in (False, True):
        losses, candidates = [], []
        for i in range(20):
            s = reference_scales(x_mean, i / 20, w_mean if duo else None)
            outputs = [np.mean((x @ w.T.astype(np.float64)
                                - (x / s) @ dequantize(quantize((w * s).astype(np.float32), q)).astype(np.float64).T)
                               ** 2) * len(w) for w, q in zip(ws, quants)]
            losses.append(sum(outputs))
            candidates.append(s)
        best = int(np.argmin(losses))
        result = awq_search(ws, hessian(x), x_mean, quants, duo_scaling=duo)
        assert result.alpha == best / 20
        np.testing.assert_allclose(result.scales, candidates[best], rtol=1e-12)
        one = awq_search(ws, hessian(x), x_mean, quants[0], duo_scaling=duo)
        assert not np.allclose(result.errors, one.errors)  # the per-part settings change the measure
    with pytest.raises(ValueError, match="one quantization per linear"):
        awq_search(ws, hessian(x), x_mean, quants[:2])
