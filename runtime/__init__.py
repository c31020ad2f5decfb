"""lowbit runtime: ONNX Runtime sessions, generation, perplexity and benchmarks."""
