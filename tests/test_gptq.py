"""GPTQ (`lowbit.converter.algorithms.gptq`): bit-exact against a column-by-column reference of the paper, lower
output error than round-to-nearest, and its edge cases (dead inputs, dampening, a Hessian that is not positive
definite)."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.affine import RULES, QuantizedWeight, WeightQuant, dequantize, quantize
from lowbit.converter.algorithms import gptq_quantize, inverse_cholesky_upper
from lowbit.errors import LowbitError


def reference_setup(weight, hessian, damp: float, act_order: bool):
    """GPTQ's preparation in float64: dead inputs (zero Hessian diagonal) get H_jj = 1 and zero weights, the column
    order (decreasing diagonal for act_order), and the dampening (a fraction of the mean diagonal)."""
    k = weight.shape[1]
    h = hessian.astype(np.float64)
    w = weight.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    return w, h, perm


def reference_gptq(weight, hessian, quant, damp=0.01, act_order=False, scale_dtype=np.float32):
    """The paper's algorithm, one column at a time, no blocks and no lazy updates, float64 weights.

    Group parameters are `lowbit.affine.quantize`'s for the group's current weights at its first column (for
    act_order: for the original weights, static groups); each column is then coded with the stored scale s and zero
    point z by the formulas of docs/schemes.md: q = clamp(round(w / s) + z) (float zero point: round(w / s + z))."""
    f32 = np.float32
    n, k = weight.shape
    g = quant.group_size or k
    kp = -(-k // g) * g
    qmax = 2**quant.bits - 1
    group_quant = WeightQuant(quant.bits, g, quant.rule, quant.clip_search)
    w, h, perm = reference_setup(weight, hessian, damp, act_order)
    order = np.concatenate([perm, np.arange(k, kp)])  # padding: zero weights, unit uncoupled Hessian rows
    big_w = np.zeros((n, kp))
    big_w[:, :k] = w
    big_h = np.eye(kp)
    big_h[:k, :k] = h
    big_w, big_h = big_w[:, order], big_h[np.ix_(order, order)]
    u = inverse_cholesky_upper(big_h)  # checked against cholesky(inv(H)) in test_inverse_cholesky_upper
    static = quantize(w.astype(f32), quant, scale_dtype) if act_order else None
    codes = np.zeros((n, kp), np.uint8)
    scales = np.zeros((n, kp // g), scale_dtype)
    zeros = np.zeros((n, kp // g), np.uint8 if RULES[quant.rule].integer_zero_point else scale_dtype)
    losses = np.zeros(n)
    for t in range(kp):
        column = order[t]
        j = column // g
        if static is not None:
            scales[:, j], zeros[:, j] = static.scales[:, j], static.zero_points[:, j]
        elif column % g == 0:
            first = quantize(big_w[:, t : t + g].astype(f32), group_quant, scale_dtype)
            scales[:, j], zeros[:, j] = first.scales[:, 0], first.zero_points[:, 0]
        s, z = scales[:, j].astype(f32), zeros[:, j].astype(f32)
        x = big_w[:, t].astype(f32)
        if RULES[quant.rule].integer_zero_point:
            q = np.clip(np.rint(x / s) + z, 0, qmax)
        else:
            q = np.clip(np.rint(x / s + z), 0, qmax)
        codes[:, column] = q
        error = (big_w[:, t] - (q.astype(f32) - z) * s) / u[t, t]
        big_w[:, t + 1 :] -= error[:, None] * u[t, t + 1 :][None, :]
        losses += error**2 / 2
    return codes, scales, zeros, losses


def random_layer(rng, n, k, rows=None, outliers=3):
    """W [N, K] float32 and H = 2/n XᵀX for correlated inputs X with a few outlier channels."""
    rows = rows or 2 * k
    mixing = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mixing
    x[:, rng.choice(k, outliers, replace=False)] *= 8.0
    w = (rng.standard_normal((n, k)) * rng.uniform(0.02, 0.1, (n, 1))).astype(np.float32)
    return w, x, 2.0 / rows * (x.T @ x)


def assert_same(result, reference, quant, k):
    codes, scales, zeros, losses = reference
    qw = result.quantized
    assert np.array_equal(qw.codes, codes)
    assert np.array_equal(qw.scales, scales) and qw.scales.dtype == scales.dtype
    assert np.array_equal(qw.zero_points, zeros) and qw.zero_points.dtype == zeros.dtype
    np.testing.assert_allclose(result.losses, losses, rtol=1e-9)
    assert (qw.bits, qw.group_size, qw.k) == (quant.bits, quant.group_size or k, k)


# (N, K, bits, group, rule, block_size): K a multiple of the block and not, K not a multiple of the group, blocks
# smaller and larger than groups, groups that straddle blocks (40 in blocks of 128), per channel
CASES = [
    (16, 64, 4, 32, "symmetric", 128),
    (24, 200, 4, 32, "symmetric_full", 64),
    (40, 256, 3, 40, "asymmetric", 128),
    (8, 96, 2, 16, "asymmetric", 32),
    (33, 150, 8, None, "symmetric", 64),
    (64, 384, 4, 128, "symmetric_full", 32),
    (12, 130, 3, None, "asymmetric", 128),
    (20, 192, 4, 64, "minmax_float_zp", 48),
    (150, 256, 4, 32, "symmetric", 128),
    (96, 320, 3, 32, "symmetric_full", 128),
    (48, 100, 2, 32, "symmetric_full", 16),
    (32, 160, 8, 32, "asymmetric", 64),
]


@pytest.mark.parametrize("n,k,bits,group,rule,block", CASES)
def test_blocked_equals_column_by_column_reference(n, k, bits, group, rule, block, rng):
    w, _, h = random_layer(rng, n, k)
    quant = WeightQuant(bits, group, rule)
    result = gptq_quantize(w, h, quant, block_size=block)
    assert_same(result, reference_gptq(w, h, quant), quant, k)


@pytest.mark.parametrize("n,k,bits,group,rule,block", CASES[:8])
def test_act_order_equals_permuted_reference(n, k, bits, group, rule, block, rng):
    w, _, h = random_layer(rng, n, k)
    quant = WeightQuant(bits, group, rule)
    result = gptq_quantize(w, h, quant, block_size=block, act_order=True)
    assert_same(result, reference_gptq(w, h, quant, act_order=True), quant, k)
    # static groups: the scales and zero points are round-to-nearest's, groups contiguous in the original K order
    rtn = quantize(w, quant)
    assert np.array_equal(result.quantized.scales, rtn.scales)
    assert np.array_equal(result.quantized.zero_points, rtn.zero_points)


@pytest.mark.parametrize("bits,group,rule,dtype,act_order", [
    (4, 32, "asymmetric", np.float32, False), (3, 32, "symmetric_full", np.float16, False),
    (4, 40, "symmetric", np.float16, True), (4, None, "minmax_float_zp", np.float32, False),
    (2, 16, "asymmetric", np.float16, True),
])
def test_clip_search_and_float16_scales_equal_reference(bits, group, rule, dtype, act_order, rng):
    w, _, h = random_layer(rng, 24, 150)
    w[3, 7] = 0.9  # an outlier: clipping it pays off
    quant = WeightQuant(bits, group, rule, clip_search=True)
    result = gptq_quantize(w, h, quant, block_size=64, act_order=act_order, scale_dtype=dtype)
    assert_same(result, reference_gptq(w, h, quant, act_order=act_order, scale_dtype=dtype), quant, 150)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("clip_search", [False, True])
def test_diagonal_hessian_is_round_to_nearest(rule, clip_search, rng):
    # uncorrelated inputs: U is diagonal, no error is propagated, every group is quantized as lowbit.affine does
    w = rng.standard_normal((20, 100)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, 100))
    quant = WeightQuant(3, 32, rule, clip_search)
    for act_order in (False, True):
        got = gptq_quantize(w, h, quant, block_size=48, act_order=act_order, scale_dtype=np.float16).quantized
        rtn = quantize(w, quant, np.float16)
        for field in ("codes", "scales", "zero_points"):
            assert np.array_equal(getattr(got, field), getattr(rtn, field)) and getattr(got, field).dtype == getattr(
                rtn, field
            ).dtype


@pytest.mark.parametrize("bits,rule", [(4, "symmetric_full"), (3, "symmetric_full"), (4, "asymmetric"),
                                       (3, "asymmetric")])
def test_lower_output_error_than_round_to_nearest(bits, rule, rng):
    w, x, h = random_layer(rng, 256, 128, rows=512, outliers=4)
    quant = WeightQuant(bits, 32, rule)
    result = gptq_quantize(w, h, quant)
    rtn = quantize(w, quant)

    def output_error(qw: QuantizedWeight) -> float:
        delta = w.astype(np.float64) - dequantize(qw)  # float64: the difference of float32 values is exact
        return float(np.square(x @ delta.T).sum())  # ‖XWᵀ − XQᵀ‖²

    gptq_error, rtn_error = output_error(result.quantized), output_error(rtn)
    np.testing.assert_allclose(result.error * 512 / 2, gptq_error, rtol=1e-9)  # ‖XΔᵀ‖² = (n/2) trace(ΔHΔᵀ)
    np.testing.assert_allclose(result.rtn_error * 512 / 2, rtn_error, rtol=1e-9)
    assert gptq_error < 0.85 * rtn_error, (gptq_error, rtn_error)
    for act_order in (False, True):
        assert gptq_quantize(w, h, quant, act_order=act_order).error < result.rtn_error


@pytest.mark.parametrize("rule", list(RULES))
def test_errors_equal_the_direct_traces(rule, rng):
    # error comes from GPTQ's losses (minus the damping, dead-input and padding terms), rtn_error from a syrk: both
    # equal trace(ΔHΔᵀ) computed directly, with padding (K = 100, g32), dead inputs, act-order, a rank-deficient H
    w, x, _ = random_layer(rng, 24, 100)
    x[:, [3, 50]] = 0.0
    quant = WeightQuant(4, 32, rule)
    coupled = 2.0 / len(x) * (x.T @ x)
    coupled[7, :] *= 0.01
    coupled[:, 7] *= 0.01
    coupled[7, 7] = 0.0  # a zero diagonal with a non-zero row (not a Hessian): the direct trace is used instead
    for h in (2.0 / len(x) * (x.T @ x), 2.0 / 30 * (x[:30].T @ x[:30]), coupled):
        for act_order in (False, True):
            result = gptq_quantize(w, h, quant, block_size=32, act_order=act_order)
            for qw, error in ((result.quantized, result.error), (quantize(w, quant), result.rtn_error)):
                delta = w.astype(np.float64) - dequantize(qw)
                np.testing.assert_allclose(error, ((delta @ h) * delta).sum(), rtol=1e-9)


def test_losses_are_the_damped_quadratic_error(rng):
    # Σ_i err_i² = (W − Q) H_damped (W − Q)ᵀ per row: the updates are exactly a triangular change of basis
    w, _, h = random_layer(rng, 32, 96)
    result = gptq_quantize(w, h, WeightQuant(4, 32, "asymmetric"), damp=0.05, block_size=32)
    damped = h + 0.05 * np.mean(np.diag(h)) * np.eye(96)
    delta = w.astype(np.float64) - dequantize(result.quantized)
    np.testing.assert_allclose(2 * result.losses, ((delta @ damped) * delta).sum(axis=1), rtol=1e-9)


def test_inverse_cholesky_upper(rng):
    # H with a known spectrum (condition number at most 1e4): the reference np.linalg.inv(H) is itself only accurate
    # to about cond(H) · 1e-16, and random_layer's H reaches 1e11 for some seeds (the comparison then measured the
    # reference's error, not ours)
    q, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    h = (q * np.exp(rng.uniform(np.log(1e-2), np.log(1e2), 80))) @ q.T
    h = (h + h.T) / 2
    u = inverse_cholesky_upper(h)
    assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
    expected = np.linalg.cholesky(np.linalg.inv(h)).T  # the reference implementations' cholesky_inverse + cholesky
    np.testing.assert_allclose(u, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    np.testing.assert_allclose(u.T @ u @ h, np.eye(80), rtol=0, atol=1e-9)


def test_dead_inputs_are_quantized_as_zero(rng):
    w, x, _ = random_layer(rng, 24, 96)
    dead = [0, 5, 40, 95]
    x[:, dead] = 0.0  # inputs that never fire: zero Hessian rows and columns
    h = 2.0 / len(x) * (x.T @ x)
    quant = WeightQuant(4, 32, "asymmetric")
    for act_order in (False, True):
        result = gptq_quantize(w, h, quant, block_size=32, act_order=act_order)
        assert_same(result, reference_gptq(w, h, quant, act_order=act_order), quant, 96)
        assert (dequantize(result.quantized)[:, dead] == 0).all()  # 0 is always a code (the range includes 0)


def test_dampening(rng):
    # damp adds damp · mean(diag H) to the diagonal; a rank-deficient H (fewer samples than inputs) needs it
    w, x, _ = random_layer(rng, 16, 64)
    x = x[:20]
    h = 2.0 / 20 * (x.T @ x)
    quant = WeightQuant(4, 32, "symmetric_full")
    damped = h.copy()
    damped[np.diag_indices(64)] += 0.1 * np.mean(np.diag(h))
    a = gptq_quantize(w, h, quant, damp=0.1).quantized
    b = gptq_quantize(w, damped, quant, damp=0.0).quantized
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
    assert not np.array_equal(a.codes, gptq_quantize(w, h, quant, damp=0.01).quantized.codes)
    singular = np.zeros((64, 64))
    singular[:, :] = 1.0  # rank one, no zero diagonal: not positive definite without dampening
    with pytest.raises(LowbitError):
        gptq_quantize(w, singular, quant, damp=0.0)
    assert gptq_quantize(w, singular, quant, damp=0.01).error >= 0


def test_not_positive_definite_is_a_one_line_error(rng):
    w = rng.standard_normal((8, 32)).astype(np.float32)
    with pytest.raises(LowbitError, match="calibration set is too small") as raised:
        gptq_quantize(w, -np.eye(32), WeightQuant(4, 32))
    message = str(raised.value)
    assert "\n" not in message and "more calibration samples" in message and "--damp" in message
    with pytest.raises(LowbitError, match="non-finite"):
        gptq_quantize(w, np.full((32, 32), np.nan), WeightQuant(4, 32))
    with pytest.raises(ValueError):
        gptq_quantize(w, np.eye(31), WeightQuant(4, 32))


def test_deterministic_and_inputs_untouched(rng):
    w, _, h = random_layer(rng, 40, 130)
    w_copy, h_copy = w.copy(), h.copy()
    quant = WeightQuant(3, 40, "asymmetric", clip_search=True)
    first = gptq_quantize(w, h, quant, block_size=64, act_order=True)
    second = gptq_quantize(w, h, quant, block_size=64, act_order=True)
    assert np.array_equal(w, w_copy) and np.array_equal(h, h_copy)
    for field in ("codes", "scales", "zero_points"):
        assert np.array_equal(getattr(first.quantized, field), getattr(second.quantized, field))
    assert np.array_equal(first.losses, second.losses) and first.error == second.error
