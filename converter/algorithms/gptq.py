"""GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers").

One layer at a time, numpy in and numpy out. Given a weight W [N, K] (output × input features) and the Hessian of the
layer's squared output error, H = (2/n) Σ xᵀx over the n calibration rows x of the layer's input, the columns of W are
quantized one after the other, and each column's rounding error is pushed onto the columns not yet quantized so that
the output error ‖XWᵀ − XQᵀ‖² stays small. The math is in docs/algorithms.md.

The codes, scales and zero points follow `lowbit.affine` exactly (its rules, storage rounding and padding): a group's
parameters come from `RULES[rule].params` and every column is encoded by `lowbit.affine._encode`, so the result is a
`QuantizedWeight` that every storage format packs unchanged. Work memory is one float64 copy of W and two K × K
float64 matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.affine import (
    CLIP_RATIOS,
    RULES,
    QuantizedWeight,
    WeightQuant,
    _encode,
    _squared_error,
    dequantize,
    group_size_for,
    padded_k,
    quantize,
)
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class GPTQResult:
    quantized: QuantizedWeight
    losses: np.ndarray  # [N] float64: GPTQ's objective per row, ½ Σ_i ((w_i − q_i) / U_ii)², w_i as updated
    error: float  # trace((W − Q) H (W − Q)ᵀ) with H as given: ‖XWᵀ − XQᵀ‖² = (n/2) · error
    rtn_error: float  # the same for round-to-nearest, `lowbit.affine.quantize(W, quant)`


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    quant: WeightQuant,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype=np.float32,
) -> GPTQResult:
    """GPTQ-quantize W [N, K] with the Hessian H [K, K] of its input; codes laid out as `lowbit.affine.quantize`'s.

    `damp`: H += damp · mean(diag H) · I. `block_size`: columns per lazy batch update (the result does not depend on
    it beyond float64 rounding). `act_order`: columns in order of decreasing diag H, with static groups (every group's
    scale and zero point from the original weights), so groups stay contiguous in K.
    """
    weight = np.asarray(weight, np.float32)
    hessian = np.asarray(hessian, np.float64)
    if weight.ndim != 2 or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"GPTQ needs W [N, K] and H [K, K], got {weight.shape} and {hessian.shape}")
    if block_size < 1 or not damp >= 0:
        raise ValueError(f"block_size must be positive and damp non-negative, got {block_size} and {damp}")
    if not np.isfinite(hessian).all():
        raise LowbitError("GPTQ: the layer's Hessian has non-finite values (overflow or NaN in the calibration run)")
    n, k = weight.shape
    g, kp = group_size_for(quant, k), padded_k(quant, k)

    h = hessian.copy()
    w = weight.astype(np.float64)
    dead = np.diag(h) == 0  # inputs that are always zero: no information, quantize their weights as 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # padded columns (K up to a multiple of g) are zero weights with a unit, uncoupled Hessian row: dead inputs
    order = np.concatenate([perm, np.arange(k, kp)])
    hp = np.eye(kp)
    hp[:k, :k] = h[np.ix_(perm, perm)]
    u = inverse_cholesky_upper(hp, damp)
    wt = np.zeros((kp, n))  # the weights being updated, transposed: column `order[t]` of W is row t
    wt[:k] = w[:, perm].T

    groups = kp // g
    static = None
    if act_order:  # every group's parameters from the original (dead-zeroed) weights, before any update
        padded = np.zeros((n, kp), np.float32)
        padded[:, :k] = w
        static = _group_params(padded.reshape(n, groups, g), quant, scale_dtype)
    params: list = [None] * groups
    codes = np.empty((n, kp), np.uint8)
    scales = np.empty((n, groups), scale_dtype)
    zero_points = np.empty((n, groups), np.uint8 if quant.integer_zero_point else scale_dtype)
    losses = np.zeros(n)
    diag = np.diag(u)
    for i1 in range(0, kp, block_size):
        i2 = min(i1 + block_size, kp)
        errors = np.empty((i2 - i1, n))
        for t in range(i1, i2):
            column = order[t]
            j = column // g
            if params[j] is None:
                if static is not None:
                    params[j] = tuple(None if p is None else p[:, j : j + 1] for p in static)
                else:  # the group's first column (t == column): parameters from its current weights
                    current = wt[t : t + g]
                    if t + g > i2:  # columns past this block still lack this block's updates so far
                        current = current.copy()
                        current[i2 - t :] -= u[i1:t, i2 : t + g].T @ errors[: t - i1]
                    params[j] = _group_params(current.T.astype(np.float32)[:, None, :], quant, scale_dtype)
            scale, lo = params[j]
            code, stored_scale, zero = _encode(wt[t].astype(np.float32)[:, None, None], scale, lo, quant, scale_dtype)
            codes[:, column] = code[:, 0, 0]
            scales[:, j], zero_points[:, j] = stored_scale[:, 0], zero[:, 0]
            value = (code[:, 0, 0].astype(np.float32) - zero[:, 0].astype(np.float32)) * stored_scale[:, 0].astype(
                np.float32
            )  # as lowbit.affine.dequantize
            error = (wt[t] - value) / diag[t]
            wt[t + 1 : i2] -= u[t, t + 1 : i2, None] * error
            errors[t - i1] = error
            losses += error * error
        wt[i2:] -= u[i1:i2, i2:].T @ errors  # the lazy batch update of the columns after the block

    quantized = QuantizedWeight(codes, scales, zero_points, quant.bits, g, k)
    rtn = quantize(weight, quant, scale_dtype)
    exact = weight.astype(np.float64)
    deltas = np.concatenate([exact - dequantize(quantized), exact - dequantize(rtn)])  # float64: no rounding
    traces = ((deltas @ hessian) * deltas).sum(axis=1)
    return GPTQResult(quantized, losses / 2, float(traces[:n].sum()), float(traces[n:].sum()))


def inverse_cholesky_upper(h: np.ndarray, damp: float | None = None) -> np.ndarray:
    """U, upper triangular with a positive diagonal, such that H⁻¹ = UᵀU (the upper Cholesky factor of H⁻¹).

    With J the reversal of the index order, J H J = M Mᵀ (Cholesky, M lower) gives H = R Rᵀ with R = J M J upper,
    so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = J M⁻¹ J: one factorization, and H⁻¹ is never formed.
    """
    try:
        m = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        m = None
    if m is None or not np.isfinite(m).all():
        larger = f" (it was {damp})" if damp is not None else ""
        raise LowbitError(
            f"GPTQ: the layer's Hessian ({h.shape[0]}x{h.shape[0]}) is not positive definite even after dampening: "
            f"the calibration set is too small for it; use more calibration samples or a larger --damp{larger}"
        )
    return _invert_lower(m)[::-1, ::-1]


def _invert_lower(m: np.ndarray) -> np.ndarray:
    """M⁻¹ for a lower triangular M, by halves: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹CA⁻¹, D⁻¹]]. Matrix products
    only: about K³/3 multiply-adds, a fifth of what `np.linalg.inv` (LU) spends."""
    k = len(m)
    if k <= 64:
        return np.tril(np.linalg.inv(m))
    h = k // 2
    out = np.zeros_like(m)
    out[:h, :h], out[h:, h:] = _invert_lower(m[:h, :h]), _invert_lower(m[h:, h:])
    out[h:, :h] = -(out[h:, h:] @ (m[h:, :h] @ out[:h, :h]))
    return out


def _group_params(groups: np.ndarray, quant: WeightQuant, scale_dtype):
    """(scale, range minimum or None) [N, G] float32 for float32 groups [N, G, g], by the rule, and with
    `quant.clip_search` the shrink ratio of `lowbit.affine`'s search: same candidates, same choice."""
    scale, lo = RULES[quant.rule].params(groups, quant.bits)
    if not quant.clip_search:
        return scale, lo
    best_error = _squared_error(groups, *_encode(groups, scale, lo, quant, scale_dtype))
    best_scale, best_lo = scale, lo
    for ratio in CLIP_RATIOS[1:]:
        ratio = np.float32(ratio)
        candidate_scale, candidate_lo = scale * ratio, None if lo is None else lo * ratio
        error = _squared_error(groups, *_encode(groups, candidate_scale, candidate_lo, quant, scale_dtype))
        better = error < best_error  # strict: ties keep the wider range
        best_scale = np.where(better, candidate_scale, best_scale)
        best_lo = None if lo is None else np.where(better, candidate_lo, best_lo)
        best_error = np.minimum(error, best_error)
    return best_scale, best_lo
