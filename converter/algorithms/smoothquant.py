"""SmoothQuant (Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models"): `lowbit convert --smoothquant-alpha A`.

Activation outliers sit in a few input channels; weights have none. Input channel j of a linear's input x is
divided by s_j and the weight's column j multiplied by it, so x Wᵀ = (x / s)(W·diag(s))ᵀ is unchanged while the
activation's range flattens and the weight's grows:

    s_j = max|x_j|^α / max|W_j|^(1−α)     (paper eq. 4; max|W_j| over the rows of every linear sharing x)

clamped to at least 1e-5 (mit-han-lab/smoothquant's and llm-compressor's MINIMUM_SMOOTHING_SCALE); a channel that
is zero in x or in every weight keeps s = 1. The 1/s goes into the op that produces x, so the graph gains no node:
the input norm's weight (and bias) for q/k/v, the post-attention norm's for gate/up (or the MLP's first linear),
and, in gated MLPs, up_proj's rows for down_proj (down's input is silu(gate)·up, linear in up) — the mappings of
llm-compressor's defaults plus AutoAWQ's up→down. o_proj keeps s = 1 (its input comes from attention, where a
per-channel scale does not fold exactly under grouped KV heads).

`smooth_model` is a graph -> graph pass on the float model before any weight quantization: max|x_j| is measured
once on the float model through ONNX Runtime (the `absmax_per_channel` observer, one sample at a time), the site
weights become lazy W·diag(s) and the norm weights lazy γ / s, so round to nearest, GPTQ, AWQ and the static
activation calibration that follow all see the smoothed model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from lowbit.converter.algorithms.folding import (NORM_BEFORE, UP_BEFORE_DOWN, fold_norm, kind_of, norm_initializers,
                                                 rescale_weight, up_rows)
from lowbit.converter.calibration import CalibrationSettings, calibrate_layerwise
from lowbit.converter.quant.formats import Site
from lowbit.converter.quant.plan import LayerQuant
from lowbit.converter.quant.rewrite import weight_loader, weight_sites
from lowbit.errors import LowbitError

MINIMUM_SMOOTHING_SCALE = 1e-5
OBSERVER = "absmax_per_channel"
FLOAT_MODEL = "model.onnx"


def smoothing_scales(activation_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s [K] float64 = max|x_j|^α / max_i max_n |W_i[n, j]|^(1−α), at least 1e-5; 1 where x_j or the weights'
    column j is all zero. `weights`: the [N_i, K] weights of the linears that share the input."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be within [0, 1], got {alpha}")
    x = np.asarray(activation_absmax, np.float64)
    w = np.max([np.abs(np.asarray(weight, np.float64)).max(axis=0) for weight in weights], axis=0)
    if x.shape != w.shape:
        raise ValueError(f"SmoothQuant: activation statistics for {x.shape[0]} channels, weights of {w.shape[0]}")
    with np.errstate(divide="ignore", invalid="ignore"):
        s = x**alpha / w ** (1.0 - alpha)
    s = np.maximum(s, MINIMUM_SMOOTHING_SCALE)
    s[(x == 0) | (w == 0) | ~np.isfinite(s)] = 1.0
    return s


@dataclass(frozen=True)
class Smoothing:
    """One input shared by linears: the sites that read it, and where 1/s goes."""

    sites: tuple[Site, ...]
    norm: tuple[str, ...] = ()  # initializer names of the producing norm's weight (and bias)
    rows_of: Site | None = None  # or: the linear whose rows produce it (up_proj, or gate_up_proj's up half)
    rows: slice | None = None  # which of its rows (None: all)


def smoothings(model: ir.Model, sites: list[tuple[Site, LayerQuant]], gated_mlp: bool,
               modules: set[str] | None = None) -> list[Smoothing]:
    """The inputs to smooth: those of the planned MatMul sites with quantized activations (or those in `modules`,
    whatever their activations) that a norm or the up projection produces. A norm's output is smoothed for every
    linear that reads it (q/k/v, gate/up, fused or not), quantized or float alike, so the function stays."""
    chosen = {site.module for site, layer in sites if site.kind == "matmul" and (
        layer.activation if modules is None else site.module in modules)}
    every = {site.module: site for site in weight_sites(model) if site.kind == "matmul"}
    initializers = model.graph.initializers
    found, seen = [], set()
    for module in (name for name in every if name in chosen):
        parts = module.split(".")
        if len(parts) != 4 or parts[0] != "layers":
            continue
        index, kind = parts[1], parts[3]
        norm = NORM_BEFORE.get(kind)
        if norm is not None and (index, norm) not in seen:
            seen.add((index, norm))
            names = norm_initializers(initializers, index, norm)
            readers = tuple(site for name, site in every.items() if name.startswith(f"layers.{index}.")
                            and NORM_BEFORE.get(kind_of(name)) == norm)
            if names:
                found.append(Smoothing(readers, norm=names))
        elif kind == "down_proj" and gated_mlp:
            up = next((every[n] for n in (f"layers.{index}.mlp.{k}" for k in UP_BEFORE_DOWN) if n in every), None)
            if up is not None and f"{up.module}.bias" not in initializers:
                found.append(Smoothing((every[module],), rows_of=up, rows=up_rows(kind_of(up.module), up.n)))
    return found


def smooth_model(model: ir.Model, sites: list[tuple[Site, LayerQuant]], alpha: float | dict[str, float],
                 calibration: CalibrationSettings, tokenizer_folder: Path, context_length: int, gated_mlp: bool,
                 work: Path, progress: Callable[[int, int], None] | None = None) -> dict:
    """Smooths `model` in place (lazily) and returns the record for lowbit.json. `alpha`: one strength for every
    quantized-activation linear (`--smoothquant-alpha`), or module -> strength for exactly those modules (a
    recipe's SmoothQuantModifier mappings; each must be fed by a norm or by up_proj)."""
    per_module = isinstance(alpha, dict)
    targets = smoothings(model, sites, gated_mlp, set(alpha) if per_module else None)
    if per_module:
        missing = sorted(set(alpha) - {site.module for target in targets for site in target.sites})
        if missing:
            raise LowbitError(f"SmoothQuant: {', '.join(missing)} has no norm or up projection before it to absorb "
                              "the scales (lowbit smooths q/k/v, gate/up and down_proj)")
    if not targets:
        raise LowbitError("--smoothquant-alpha: no quantized-activation linear is fed by a norm or a linear that "
                          "could absorb its scales (the scheme must quantize activations)")
    samples, seq_len = calibration.samples(tokenizer_folder, context_length)
    float_path = work / "smoothquant" / FLOAT_MODEL
    float_path.parent.mkdir(parents=True)
    ir.save(model, float_path, external_data=FLOAT_MODEL + ".data")
    modules = [target.sites[0].module for target in targets]  # the linears of a target read one input
    statistics = calibrate_layerwise(float_path, modules, [OBSERVER], samples, progress)
    for path in float_path.parent.iterdir():  # the float copy is no longer needed: free the disk now
        path.unlink()
    strengths = set(alpha.values()) if per_module else {alpha}
    record = {"alpha": next(iter(strengths)) if len(strengths) == 1 else alpha,
              "calibration": calibration.record(samples, seq_len), "scales": {}}
    initializers = model.graph.initializers
    for target in targets:
        site = target.sites[0]
        strength = next(alpha[t.module] for t in target.sites if t.module in alpha) if per_module else alpha
        s = smoothing_scales(statistics[site.module][OBSERVER], [weight_loader(t)() for t in target.sites], strength)
        for t in target.sites:
            rescale_weight(t, columns=s)
        for name in target.norm:
            fold_norm(initializers[name], s)
        if target.rows_of is not None:
            rescale_weight(target.rows_of, rows=(target.rows or slice(None), s))
        record["scales"][site.module] = {"min": float(s.min()), "max": float(s.max())}
    return record
