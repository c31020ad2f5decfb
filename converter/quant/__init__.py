"""Weight-only quantization: pure numpy math (`affine`), per-layer plans (`plan`), and the
graph rewrite pass (`rewrite`) that swaps float MatMul/Gemm/Gather for quantized nodes."""
