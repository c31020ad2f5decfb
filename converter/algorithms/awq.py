"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

One group of linears that share an input at a time, numpy in and numpy out. Input channel k of the shared input is
scaled down by s_k and the weight columns up by s_k, so the float product is unchanged, X Wᵀ = (X/s)(W·diag(s))ᵀ, but
the rounding of W·diag(s) protects the columns of the salient (large-activation) channels. s = mean|x|^α is searched
over a grid of α, then each group's range is shrunk where that lowers its output error (the clip search). The 1/s goes
into the op before the linears (a norm's weight, or the rows of the previous linear), so the graph gains no node.

Output errors are computed exactly from the Hessian of the shared input, H = (2/n) Σ xᵀx (the `hessian` observer):
‖X Wᵀ − X Ŵᵀ‖² = (n/2) · trace(ΔW H ΔWᵀ), so no activation is stored. Codes, scales and zero points are
`lowbit.affine.quantize`'s for the scaled (and clipped) weights: every storage format packs them unchanged. The math,
and what matches AutoAWQ and llm-compressor, is in docs/algorithms.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from lowbit.affine import (
    FLOAT4_RULES,
    RULES,
    QuantizedWeight,
    WeightQuant,
    _encode,
    dequantize,
    group_size_for,
    padded_k,
    quantize,
)
from lowbit.errors import LowbitError

SCALE_FLOOR = 1e-4  # AutoAWQ's clamp of the candidate scales (and of w_mean's denominator offset)


@dataclass(frozen=True)
class AWQScales:
    """The scale search of one group of linears."""

    scales: np.ndarray  # [K] float64: s of the chosen α; inputs x/s, weights W·diag(s)
    alpha: float  # the chosen α
    alphas: np.ndarray  # [grid] float64: the candidates i / grid
    errors: np.ndarray  # [grid] float64: Σ_i trace(ΔW_i H ΔW_iᵀ) per candidate (alphas[0] = 0, no duo: RTN's)

    @property
    def error(self) -> float:
        return float(self.errors[int(np.flatnonzero(self.alphas == self.alpha)[0])])


@dataclass(frozen=True)
class AWQResult:
    scales: np.ndarray  # [K] float64: fold 1/s into the op before the linears (`fold_into_norm`,
    # `fold_into_linear_rows`)
    quantized: tuple[QuantizedWeight, ...]  # one per linear: W_i·diag(s), clipped where asked
    clip_max: tuple[np.ndarray | None, ...]  # one per linear: the clip search's max |w| per group [N, G], or None
    search: AWQScales
    error: float  # Σ_i trace(ΔW_i H ΔW_iᵀ), ΔW_i = dequant(Q_i)·diag(1/s) − W_i: ‖XWᵀ − (X/s)Qᵀ‖² = (n/2) · error
    rtn_error: float  # the same for `lowbit.affine.quantize(W_i, quant)`, no scales


def awq_scales(x_mean_abs: np.ndarray, alpha: float, w_mean: np.ndarray | None = None) -> np.ndarray:
    """AutoAWQ's candidate s for one α, float64 [K]: mean|x|^α (duo scaling: mean|x|^α / (w_mean^(1−α) + 1e-4)),
    clamped to >= 1e-4, divided by sqrt(max(s) · min(s)); non-finite entries set to 1."""
    x = np.asarray(x_mean_abs, np.float64)
    s = x**alpha if w_mean is None else x**alpha / (np.asarray(w_mean, np.float64) ** (1 - alpha) + SCALE_FLOOR)
    s = np.maximum(s, SCALE_FLOOR)
    s = s / np.sqrt(s.max() * s.min())
    s[~np.isfinite(s)] = 1.0
    return s


def weight_means(weights: list[np.ndarray], quant: WeightQuant | Sequence[WeightQuant]) -> np.ndarray:
    """Duo scaling's w_mean [K] float64: |w| / (max |w| of its group + 1e-6), each linear cut into the groups of its
    own quantization (`quant`: one for all, or one per linear), averaged over all rows of all linears
    (llm-compressor's `_compute_layer_means`)."""
    normalised = []
    for w, q in zip(weights, _per_linear(quant, weights)):
        w = np.asarray(w, np.float64)
        n, k = w.shape
        g, kp = group_size_for(q, k), padded_k(q, k)
        padded = np.zeros((n, kp))
        padded[:, :k] = np.abs(w)
        groups = padded.reshape(n, kp // g, g)
        normalised.append((groups / (groups.max(axis=-1, keepdims=True) + 1e-6)).reshape(n, kp)[:, :k])
    return np.concatenate(normalised).mean(axis=0)


def _per_linear(quant: WeightQuant | Sequence[WeightQuant], weights: list) -> list[WeightQuant]:
    """One WeightQuant per linear: `quant` repeated, or the list given (unfused parts quantized differently)."""
    quants = [quant] * len(weights) if isinstance(quant, WeightQuant) else list(quant)
    if len(quants) != len(weights):
        raise ValueError(f"AWQ: need one quantization per linear ({len(weights)}), got {len(quants)}")
    return quants


def scale_weight(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W·diag(s) as it is quantized: the product in float64, rounded once to float32."""
    return (np.asarray(weight, np.float64) * s).astype(np.float32)


def output_error(delta: np.ndarray, hessian: np.ndarray) -> float:
    """trace(ΔW H ΔWᵀ) in float64 for ΔW [N, K]: (2/n) ‖X ΔWᵀ‖² when H = (2/n) XᵀX. Computed as Σ H ⊙ (ΔWᵀΔW):
    ΔWᵀΔW is one symmetric rank-N update (BLAS syrk, N·K²/2 multiply-adds), half of what ΔW @ H costs."""
    delta = np.ascontiguousarray(delta, np.float64)
    return float((hessian * (delta.T @ delta)).sum())


def awq_search(
    weights: list[np.ndarray],
    hessian: np.ndarray,
    x_mean_abs: np.ndarray,
    quant: WeightQuant | Sequence[WeightQuant],
    *,
    grid: int = 20,
    duo_scaling: bool = False,
    scale_dtype=np.float32,
) -> AWQScales:
    """AWQ's scale search for the linears W_i [N_i, K] that share one input, with the Hessian H [K, K] of that input
    and its mean |x| per channel [K]. For α = i / grid (i = 0 … grid − 1) the candidate s (`awq_scales`) is scored by
    Σ_i trace(ΔW_i H ΔW_iᵀ), ΔW_i = dequant(quantize(W_i·diag(s)))·diag(1/s) − W_i, and the first least score wins.
    Each W_i is quantized as the node that stores it will be (`lowbit.affine.quantize`, its clip search off: AWQ has
    its own): `quant` is one WeightQuant for every linear or one per linear (unfused q/k/v with different settings;
    an NVFP4 linear's global scale is its own)."""
    stacked, hessian = _check(weights, hessian)
    quants = [replace(q, clip_search=False) for q in _per_linear(quant, weights)]
    x_mean_abs = np.asarray(x_mean_abs, np.float64)
    if x_mean_abs.shape != (stacked.shape[1],):
        raise ValueError(f"AWQ: x_mean_abs must have shape ({stacked.shape[1]},), got {x_mean_abs.shape}")
    if not (np.isfinite(x_mean_abs).all() and (x_mean_abs >= 0).all()):
        raise LowbitError("AWQ: the mean |x| per channel has negative or non-finite values")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"AWQ: grid must be a positive integer, got {grid!r}")
    exact = np.split(stacked, np.cumsum([len(w) for w in weights])[:-1])  # each linear, float64: views of `stacked`
    w_mean = weight_means(exact, quants) if duo_scaling else None
    alphas = np.arange(grid) / grid
    errors = np.empty(grid)
    best, best_error = None, np.inf
    for i, alpha in enumerate(alphas):
        s = awq_scales(x_mean_abs, alpha, w_mean)
        errors[i] = sum(output_error(dequantize(quantize(scale_weight(w, s), q, scale_dtype)) / s - w, hessian)
                        for w, q in zip(exact, quants))
        if errors[i] < best_error:  # strict: ties keep the smaller α, NaN never wins
            best, best_error = i, errors[i]
    if best is None:
        raise LowbitError("AWQ: no candidate scale gave a finite output error (non-finite weights?)")
    return AWQScales(awq_scales(x_mean_abs, alphas[best], w_mean), float(alphas[best]), alphas, errors)


def clip_ratios(grid: int = 20, max_shrink: float = 0.5) -> tuple[float, ...]:
    """AutoAWQ's shrink ratios 1 − i / grid for i < int(max_shrink · grid): 1.0, 0.95, …, 0.55 by default."""
    return tuple(1 - i / grid for i in range(int(max_shrink * grid)))


def awq_clip_search(
    weight: np.ndarray,
    hessian: np.ndarray,
    quant: WeightQuant,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype=np.float32,
) -> np.ndarray:
    """AWQ's clip search: max |w| per group, float32 [N, G], for W [N, K] (already scaled) whose input has Hessian H.

    For each ratio r of `clip_ratios`, every group is clamped to ±r · max|w_g| and quantized by the rule; the group's
    error is d H_gg dᵀ, d = dequant − w over the group's columns and H_gg the Hessian's diagonal block for them (groups
    scored separately, as AutoAWQ does). The first least error wins (ratio 1: no clipping). Integer rules only."""
    _check_clip_rule(quant)
    stacked, hessian = _check([weight], hessian)
    if not (isinstance(grid, int) and grid >= 1 and 0 < max_shrink < 1 and int(max_shrink * grid) >= 1):
        raise ValueError(f"AWQ clip search: need grid >= 1 and 0 < max_shrink < 1 with at least one ratio, "
                         f"got grid={grid!r}, max_shrink={max_shrink!r}")
    plain = replace(quant, clip_search=False)
    groups = _groups(stacked.astype(np.float32), quant)  # [N, G, g]
    n, count, g = groups.shape
    k = stacked.shape[1]
    padded = np.zeros((count * g, count * g))
    padded[:k, :k] = hessian
    blocks = np.stack([padded[j * g : (j + 1) * g, j * g : (j + 1) * g] for j in range(count)])  # [G, g, g]
    exact = groups.astype(np.float64).transpose(1, 0, 2)  # [G, N, g]
    original = np.abs(groups).max(axis=-1)  # [N, G] float32
    best_max, best_error = original.copy(), np.full((n, count), np.inf)
    for ratio in clip_ratios(grid, max_shrink):
        max_val = original * np.float32(ratio)
        values = _fake_quantize(np.clip(groups, -max_val[..., None], max_val[..., None]), plain, scale_dtype)
        d = values.astype(np.float64).transpose(1, 0, 2) - exact
        error = ((d @ blocks) * d).sum(axis=-1).T  # [N, G]
        better = error < best_error  # strict: ties keep the wider range
        best_max = np.where(better, max_val, best_max)
        best_error = np.where(better, error, best_error)
    return best_max


def quantize_clipped(weight: np.ndarray, clip_max: np.ndarray, quant: WeightQuant, scale_dtype=np.float32
                     ) -> QuantizedWeight:
    """`lowbit.affine.quantize` of W [N, K] with each group clamped to ±clip_max [N, G] first (quant's clip search
    off). With clip_max = each group's max |w| this is `quantize(W)` bit for bit. Integer rules only."""
    _check_clip_rule(quant)
    weight = np.asarray(weight, np.float32)
    n, k = weight.shape
    groups = _groups(weight, quant)
    clip_max = np.asarray(clip_max, np.float32)
    if clip_max.shape != groups.shape[:2]:
        raise ValueError(f"AWQ: clip_max must have shape {groups.shape[:2]}, got {clip_max.shape}")
    clipped = np.clip(groups, -clip_max[..., None], clip_max[..., None]).reshape(n, -1)[:, :k]
    return quantize(clipped, replace(quant, clip_search=False), scale_dtype)


def awq_quantize(
    weights: list[np.ndarray],
    hessian: np.ndarray,
    x_mean_abs: np.ndarray,
    quant: WeightQuant | Sequence[WeightQuant],
    *,
    grid: int = 20,
    duo_scaling: bool = False,
    clip: bool | list[bool] = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype=np.float32,
) -> AWQResult:
    """AWQ for the linears W_i [N_i, K] that share one input: the scale search, then (where `clip`, one flag for all
    or one per linear; AutoAWQ skips q_proj and k_proj) the clip search on W_i·diag(s) with the Hessian of x/s,
    diag(1/s) H diag(1/s). Returns s and each linear's `QuantizedWeight` of W_i·diag(s). `quant`: one for all the
    linears, or one per linear."""
    stacked, hessian = _check(weights, hessian)
    flags = [clip] * len(weights) if isinstance(clip, bool) else list(clip)
    if len(flags) != len(weights):
        raise ValueError(f"AWQ: clip needs one flag per linear ({len(weights)}), got {len(flags)}")
    quants = _per_linear(quant, weights)
    search = awq_search(weights, hessian, x_mean_abs, quants, grid=grid, duo_scaling=duo_scaling,
                        scale_dtype=scale_dtype)
    s = search.scales
    scaled_hessian = hessian / np.outer(s, s)
    quantized, clip_max = [], []
    for weight, q, flag in zip(weights, quants, flags):
        scaled = scale_weight(weight, s)
        bounds = awq_clip_search(scaled, scaled_hessian, q, grid=clip_grid, max_shrink=max_shrink,
                                 scale_dtype=scale_dtype) if flag else None
        quantized.append(quantize(scaled, replace(q, clip_search=False), scale_dtype) if bounds is None
                         else quantize_clipped(scaled, bounds, q, scale_dtype))
        clip_max.append(bounds)
    error = output_error(np.concatenate([dequantize(q) / s for q in quantized]) - stacked, hessian)
    rtn = np.concatenate([dequantize(quantize(np.asarray(w, np.float32), q, scale_dtype))
                          for w, q in zip(weights, quants)])
    return AWQResult(s, tuple(quantized), tuple(clip_max), search, error, output_error(rtn - stacked, hessian))


def fold_into_norm(norm_weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The norm's weight (or bias) γ [K] feeding the scaled linears, as γ / s, in γ's dtype (computed in float64)."""
    norm_weight = np.asarray(norm_weight)
    return (norm_weight.astype(np.float64) / s).astype(norm_weight.dtype)


def fold_into_linear_rows(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The previous linear's weight [N, K_prev] whose N outputs are the scaled input (up_proj before down_proj), as
    W / s[:, None], in W's dtype (computed in float64). A bias b [N] of that linear becomes b / s (`fold_into_norm`)."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.shape[0] != len(s):
        raise ValueError(f"AWQ: fold_into_linear_rows needs W [{len(s)}, K_prev], got {weight.shape}")
    return (weight.astype(np.float64) / np.asarray(s, np.float64)[:, None]).astype(weight.dtype)


def _check(weights: list[np.ndarray], hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The linears stacked along N, float64, and H float64, with their shapes checked."""
    if not len(weights):
        raise ValueError("AWQ needs at least one weight")
    weights = [np.asarray(w) for w in weights]
    hessian = np.asarray(hessian, np.float64)
    k = weights[0].shape[-1]
    if any(w.ndim != 2 or w.shape[1] != k for w in weights) or hessian.shape != (k, k):
        raise ValueError(f"AWQ needs weights [N_i, K] with one K and H [K, K], got "
                         f"{[w.shape for w in weights]} and {hessian.shape}")
    if not np.isfinite(hessian).all():
        raise LowbitError("AWQ: the input's Hessian has non-finite values (overflow or NaN in the calibration run)")
    return np.concatenate([w.astype(np.float64) for w in weights]), hessian


def _check_clip_rule(quant: WeightQuant) -> None:
    """The clip search shrinks integer grids; NVFP4's blocks hang on a global scale (llm-compressor's AWQ, the one
    that runs NVFP4, has no clip search)."""
    if quant.rule in FLOAT4_RULES or quant.rule not in RULES:
        raise LowbitError(f"AWQ's clip search is for integer grids, not rule {quant.rule}: run AWQ without it "
                          "(clip off; llm-compressor's AWQ has none)")


def _groups(weight: np.ndarray, quant: WeightQuant) -> np.ndarray:
    """Float32 W [N, K] zero-padded along K and cut into groups [N, G, g], as `lowbit.affine.quantize` cuts it."""
    n, k = weight.shape
    g, kp = group_size_for(quant, k), padded_k(quant, k)
    if kp != k:
        weight = np.pad(weight, ((0, 0), (0, kp - k)))
    return np.asarray(weight, np.float32).reshape(n, kp // g, g)


def _fake_quantize(groups: np.ndarray, quant: WeightQuant, scale_dtype) -> np.ndarray:
    """dequant(quantize(groups)) for float32 groups [N, G, g]: the rule's parameters, `lowbit.affine._encode`, and
    (q − z)·s in float32 as `lowbit.affine.dequantize` computes it."""
    scale, lo = RULES[quant.rule].params(groups, quant.bits)
    codes, stored_scale, zero = _encode(groups, scale, lo, quant, scale_dtype)
    return (codes.astype(np.float32) - zero.astype(np.float32)[..., None]) * stored_scale.astype(np.float32)[..., None]
