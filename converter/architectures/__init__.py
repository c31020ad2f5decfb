"""Architecture registry: one small module per architecture, registered on import."""

from lowbit.converter.architectures import gemma2, gpt2, llama, mistral, phi3, qwen2, qwen3  # noqa: F401
from lowbit.converter.architectures.base import ARCHITECTURES, Architecture, DecoderSpec, WeightMap, get_architecture

__all__ = ["ARCHITECTURES", "Architecture", "DecoderSpec", "WeightMap", "get_architecture"]
