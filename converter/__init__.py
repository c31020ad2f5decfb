"""lowbit converter: Hugging Face checkpoints -> (quantized) ONNX decoder graphs."""

__version__ = "0.1.0"
