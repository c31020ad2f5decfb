"""lowbit converter: Hugging Face checkpoints -> (quantized) ONNX decoder graphs."""
