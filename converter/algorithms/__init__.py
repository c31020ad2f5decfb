"""Data-aware weight quantization algorithms: pure numpy functions beside `lowbit.affine`.

Each takes a weight and statistics gathered by `lowbit.converter.calibration` (e.g. a Hessian) and returns a
`lowbit.affine.QuantizedWeight` in the layout `lowbit.affine.quantize` produces, so every storage format packs it
unchanged. See docs/algorithms.md.
"""

from lowbit.converter.algorithms.awq import (
    AWQResult,
    AWQScales,
    awq_clip_search,
    awq_quantize,
    awq_scales,
    awq_search,
    clip_ratios,
    fold_into_linear_rows,
    fold_into_norm,
    quantize_clipped,
)
from lowbit.converter.algorithms.gptq import GPTQResult, gptq_quantize, inverse_cholesky_upper

__all__ = ["GPTQResult", "gptq_quantize", "inverse_cholesky_upper"]
__all__ += ["AWQResult", "AWQScales", "awq_clip_search", "awq_quantize", "awq_scales", "awq_search", "clip_ratios",
            "fold_into_linear_rows", "fold_into_norm", "quantize_clipped"]
