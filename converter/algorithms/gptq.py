"""GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers").

One layer at a time, numpy in and numpy out. Given a weight W [N, K] (output × input features) and the Hessian of the
layer's squared output error, H = (2/n) Σ xᵀx over the n calibration rows x of the layer's input, the columns of W are
quantized one after the other, and each column's rounding error is pushed onto the columns not yet quantized so that
the output error ‖XWᵀ − XQᵀ‖² stays small. The math is in docs/algorithms.md.

The codes, scales and zero points follow `lowbit.affine` exactly (its rules, storage rounding and padding): a group's
parameters come from `RULES[rule].params` and are rounded for storage by `lowbit.affine._encode`, and every column is
coded with `_encode`'s float32 operations, so the result is a `QuantizedWeight` that every storage format packs
unchanged. NVFP4 (rule `nvfp4`) does the same with `lowbit.nvfp4`'s functions: one global scale from the whole weight,
an FP8 scale per block of 16, e2m1 codes. Each rule family is a column coder (`COLUMN_CODERS`). Work memory
is one float64 copy of W, one K × K float64 matrix beside H (two with act-order or padding, and numpy's
copy during the Cholesky factorization) and two [block, N] float64 buffers.

Speed (benchmarks/gptq_speed.py): the per-column work is a dozen numpy operations on one column of N values, with
rank-one updates only inside sub-blocks of SUB_BLOCK columns; the rest is BLAS: Cholesky and triangular inverse
(K³), the lazy block updates (N·K²/2 multiply-adds) and round-to-nearest's error trace (a syrk, N·K²/2). GPTQ's own
error comes from its losses (`_error_from_losses`) instead of a second trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit import nvfp4
from lowbit.affine import (
    CLIP_RATIOS,
    FLOAT4_RULES,
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

SUB_BLOCK = 64  # inside a block, columns update each other one by one within sub-blocks of this many columns


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
    if quant.rule not in COLUMN_CODERS:
        raise LowbitError(f"GPTQ rounds to integer grids and NVFP4, not rule {quant.rule} (round it to nearest)")

    diagonal = np.diag(hessian).copy()
    dead = diagonal == 0  # inputs that are always zero: no information, quantize their weights as 0
    h_diagonal = np.where(dead, 1.0, diagonal)
    perm = np.argsort(-h_diagonal, kind="stable") if act_order else np.arange(k)
    damping = damp * np.mean(h_diagonal)
    h_diagonal += damping
    # padded columns (K up to a multiple of g) are zero weights with a unit, uncoupled Hessian row: dead inputs
    order = np.concatenate([perm, np.arange(k, kp)])
    if act_order or kp != k:
        hp = np.eye(kp)
        hp[:k, :k] = hessian[np.ix_(perm, perm)] if act_order else hessian
        hp[np.diag_indices(k)] = h_diagonal[perm]
        m = _reversed_cholesky(hp, damp)
        del hp
    else:  # no copy of H: its diagonal is damped for the factorization and given back, bit for bit
        if not hessian.flags.writeable:
            hessian = hessian.copy()
        try:
            hessian[np.diag_indices(k)] = h_diagonal
            m = _reversed_cholesky(hessian, damp)
        finally:
            hessian[np.diag_indices(k)] = diagonal
    u = _invert_lower(m)[::-1, ::-1]  # in place: m's memory becomes U's
    del m
    wt = np.zeros((kp, n))  # the weights being updated, transposed: column `order[t]` of W is row t
    wt[:k] = weight[:, perm].T
    wt[:k][dead[perm]] = 0

    groups = kp // g
    coder = COLUMN_CODERS[quant.rule](weight, quant, groups, g, scale_dtype)
    if act_order:  # every group's parameters from the original (dead-zeroed) weights, before any update
        padded = np.empty((n, kp), np.float32)
        padded[:, order] = wt.T
        coder.set_groups(slice(None), padded.reshape(n, groups, g))
        del padded
    group_of = order // g
    codes_t = np.empty((kp, n), np.uint8)
    losses = np.zeros(n)
    diag = np.diag(u).copy()
    sub = min(SUB_BLOCK, block_size)
    q = np.empty(n, np.float32)
    scratch = np.empty((min(block_size, kp), n))  # products before they are subtracted: no allocation per column
    for i1 in range(0, kp, block_size):
        i2 = min(i1 + block_size, kp)
        errors = np.empty((i2 - i1, n))
        # sub-blocks: rank-one updates inside one, then one matrix product for the rest of the block, so a column
        # is up to date when it is reached; without act_order every group starts a sub-block, so its columns
        # within the block are up to date when its parameters are computed
        cuts = set(range(i1, i2, sub)) | {i2}
        if not act_order:
            cuts |= set(range(-(-i1 // g) * g, i2, g))
        cuts = sorted(cuts)
        for s1, s2 in zip(cuts[:-1], cuts[1:]):
            if not act_order and s1 % g == 0:  # the group's first column: parameters from its current weights
                current = wt[s1 : s1 + g]
                if s1 + g > i2:  # columns past this block still lack this block's updates so far
                    current = current.copy()
                    current[i2 - s1 :] -= u[i1:s1, i2 : s1 + g].T @ errors[: s1 - i1]
                j = s1 // g
                coder.set_groups(slice(j, j + 1), current.T.astype(np.float32)[:, None, :])
            for t in range(s1, s2):
                coder.code(wt[t], group_of[t], codes_t[t], q)  # codes_t[t]: the codes; q: their float32 values
                error = errors[t - i1]
                np.subtract(wt[t], q, out=error)
                error /= diag[t]
                if t + 1 < s2:
                    update = np.multiply(u[t, t + 1 : s2, None], error, out=scratch[: s2 - t - 1])
                    wt[t + 1 : s2] -= update
            if s2 < i2:
                wt[s2:i2] -= np.matmul(u[s1:s2, s2:i2].T, errors[s1 - i1 : s2 - i1], out=scratch[: i2 - s2])
        losses += np.einsum("ij,ij->j", errors, errors)
        wt[i2:] -= u[i1:i2, i2:].T @ errors  # the lazy batch update of the columns after the block
    del wt, u

    codes = np.empty((n, kp), np.uint8)
    codes[:, order] = codes_t.T
    quantized = coder.quantized(codes, k)
    error = _error_from_losses(weight, coder.padded_values(codes), hessian, dead, damping, float(losses.sum()))
    if error is None:
        error = output_error(weight, quantized, hessian)
    rtn = quantize(weight, quant, scale_dtype)
    return GPTQResult(quantized, losses / 2, error, output_error(weight, rtn, hessian))


def output_error(weight: np.ndarray, quantized: QuantizedWeight, hessian: np.ndarray) -> float:
    """trace((W − Q) H (W − Q)ᵀ) = Σ_ij H_ij (ΔᵀΔ)_ij: one symmetric rank-N product (BLAS syrk), float64 throughout
    (the difference of two float32 values is exact)."""
    delta = weight.astype(np.float64)
    delta -= dequantize(quantized)
    gram = delta.T @ delta  # the same array on both sides: numpy calls syrk, half a general product
    return float(np.vdot(gram, hessian))


def _error_from_losses(weight: np.ndarray, values: np.ndarray, hessian: np.ndarray, dead: np.ndarray,
                       damping: float, total: float) -> float | None:
    """trace((W − Q) H (W − Q)ᵀ) without a K × K product, from GPTQ's Σ e² (`total`, all rows): U H_d Uᵀ = I makes
    Σ_t e_t² = Δ H_d Δᵀ per row, for Δ = W − Q with the dead inputs' weights zeroed and H_d the matrix GPTQ
    factored: H + λI on the live inputs, 1 + λ on the dead ones and 1 on the padding, these two uncoupled. So the
    error is Σ e² − λ‖Δ_live‖² − (1 + λ)‖Δ_dead‖² − ‖Δ_padding‖² (Δ is 0 there except with a float zero point).
    None where that is not accurate to about 1e-12 relative: dead inputs whose H rows are not zero (not uncoupled),
    or a difference that cancels more than one decimal digit (the damping dominates an almost singular H). `values`:
    the dequantized weight [N, K_padded], padding kept."""
    if dead.any() and (hessian[dead].any() or hessian[:, dead].any()):
        return None
    k = weight.shape[1]
    delta = -values.astype(np.float64)
    delta[:, :k] += np.where(dead, np.float32(0), weight)
    squares = np.einsum("ij,ij->j", delta, delta)  # per input
    error = total - damping * squares[:k][~dead].sum() - (1 + damping) * squares[:k][dead].sum() - squares[k:].sum()
    return float(error) if error >= 0.1 * total else None


def inverse_cholesky_upper(h: np.ndarray, damp: float | None = None) -> np.ndarray:
    """U, upper triangular with a positive diagonal, such that H⁻¹ = UᵀU (the upper Cholesky factor of H⁻¹).

    With J the reversal of the index order, J H J = M Mᵀ (Cholesky, M lower) gives H = R Rᵀ with R = J M J upper,
    so H⁻¹ = R⁻ᵀR⁻¹ and U = R⁻¹ = J M⁻¹ J: one factorization, and H⁻¹ is never formed.
    """
    return _invert_lower(_reversed_cholesky(h, damp))[::-1, ::-1]


def _reversed_cholesky(h: np.ndarray, damp: float | None) -> np.ndarray:
    """M, lower triangular, with J H J = M Mᵀ; a one-line error where H is not positive definite."""
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
    return m


def _invert_lower(m: np.ndarray) -> np.ndarray:
    """M⁻¹ for a lower triangular M, in place (M's memory holds the result, which is returned), by halves:
    [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹CA⁻¹, D⁻¹]]. Matrix products only: about K³/3 multiply-adds, a fifth of
    what `np.linalg.inv` (LU) spends, and no K × K temporary (the largest is C·A⁻¹, a quarter of M)."""
    k = len(m)
    if k <= 64:
        m[...] = np.tril(np.linalg.inv(m))
        return m
    h = k // 2
    _invert_lower(m[:h, :h])
    _invert_lower(m[h:, h:])
    m[h:, :h] = -(m[h:, h:] @ (m[h:, :h] @ m[:h, :h]))
    return m


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


class _AffineColumns:
    """`lowbit.affine`'s integer rules (`RULES`): per group a scale s and zero point z from the rule (and the clip
    search), rounded for storage by `_encode`; a column's codes clamp(round(w / s) + z) (float zero point:
    clamp(round(w / s + z))) and values (q − z)·s, in float32 as `_encode` and `lowbit.affine.dequantize` have them."""

    def __init__(self, weight: np.ndarray, quant: WeightQuant, groups: int, g: int, scale_dtype):
        n = weight.shape[0]
        self.quant, self.g, self.scale_dtype = quant, g, scale_dtype
        self.integer_zero_point, self.qmax = quant.integer_zero_point, np.float32(2**quant.bits - 1)
        self.scales = np.empty((n, groups), scale_dtype)
        self.zero_points = np.empty((n, groups), np.uint8 if self.integer_zero_point else scale_dtype)
        # per group (rows), the float32 scale and zero point that code its columns
        self.s32, self.z32 = np.empty((groups, n), np.float32), np.empty((groups, n), np.float32)

    def set_groups(self, j: slice, groups: np.ndarray) -> None:
        """Parameters of the groups j from their float32 weights [N, J, g]."""
        scale, lo = _group_params(groups, self.quant, self.scale_dtype)
        _, stored, zero = _encode(np.zeros(scale.shape + (1,), np.float32), scale, lo, self.quant, self.scale_dtype)
        self.scales[:, j], self.zero_points[:, j] = stored, zero
        self.s32[j], self.z32[j] = stored.T, zero.T

    def code(self, column: np.ndarray, j: int, codes: np.ndarray, q: np.ndarray) -> None:
        """Codes of one float64 column [N] of group j into `codes` (uint8 [N]), their values into `q` (float32)."""
        s, z = self.s32[j], self.z32[j]
        np.divide(column, s, out=q, dtype=np.float32, casting="same_kind")
        if self.integer_zero_point:
            np.rint(q, out=q)
            q += z
        else:
            q += z
            np.rint(q, out=q)
        np.maximum(q, np.float32(0), out=q)  # np.clip, without its Python overhead
        np.minimum(q, self.qmax, out=q)
        codes[...] = q
        q -= z
        q *= s

    def quantized(self, codes: np.ndarray, k: int) -> QuantizedWeight:
        return QuantizedWeight(codes, self.scales, self.zero_points, self.quant.bits, self.g, k)

    def padded_values(self, codes: np.ndarray) -> np.ndarray:
        """(q − z)·s [N, K_padded] float32, as `lowbit.affine.dequantize` computes it, padding kept."""
        n = codes.shape[0]
        grouped = codes.reshape(n, self.scales.shape[1], -1).astype(np.float32)
        values = (grouped - self.zero_points.astype(np.float32)[..., None]) * self.scales.astype(np.float32)[..., None]
        return values.reshape(n, -1)


class _NVFP4Columns:
    """NVFP4 (`lowbit.nvfp4`), as llm-compressor's GPTQ runs compressed-tensors' tensor_group strategy: one global
    scale gs from the whole weight as given, before any update (`nvfp4.global_scale`); per block of 16 an FP8 e4m3
    scale s from its weights (`nvfp4.block_scales`); a column's codes the e2m1 rounding of w / (s / gs)
    (`nvfp4.to_e2m1_codes`) and values e2m1 · (s / gs), float32: `lowbit.affine.quantize`'s layout for rule nvfp4."""

    def __init__(self, weight: np.ndarray, quant: WeightQuant, groups: int, g: int, scale_dtype):
        n = weight.shape[0]
        self.quant, self.g = quant, g
        self.gs = nvfp4.global_scale(weight)
        self.scales = np.empty((n, groups), nvfp4.SCALE_DTYPE)
        self.steps = np.empty((groups, n), np.float32)  # per group (rows): s / gs in float32

    def set_groups(self, j: slice, groups: np.ndarray) -> None:
        stored = nvfp4.block_scales(groups, self.gs)
        self.scales[:, j] = stored
        self.steps[j] = (stored.astype(np.float32) / self.gs).T

    def code(self, column: np.ndarray, j: int, codes: np.ndarray, q: np.ndarray) -> None:
        step = self.steps[j]
        np.divide(column, step, out=q, dtype=np.float32, casting="same_kind")
        codes[...] = nvfp4.to_e2m1_codes(q)
        np.multiply(nvfp4.E2M1[codes], step, out=q)

    def quantized(self, codes: np.ndarray, k: int) -> QuantizedWeight:
        return QuantizedWeight(codes, self.scales, np.zeros((codes.shape[0], 1), np.uint8), 4, self.g, k,
                               nvfp4.ELEMENT, self.gs)

    def padded_values(self, codes: np.ndarray) -> np.ndarray:
        return nvfp4.dequantize(codes, self.scales, self.gs)


# rule -> how GPTQ computes a group's parameters and codes a column with them (the float8 rules have none)
COLUMN_CODERS = {**{rule: _AffineColumns for rule in RULES}, **{rule: _NVFP4Columns for rule in FLOAT4_RULES}}
