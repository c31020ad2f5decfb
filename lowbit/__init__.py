"""lowbit: Hugging Face language models -> (quantized) ONNX graphs, and a runtime for them.

    import lowbit
    lowbit.convert("samples/stories260K-hf", "out/stories260K", scheme="q4f16_1", overwrite=True)
    model = lowbit.load("out/stories260K")
    print(model.generate("Once upon a time", max_new_tokens=40))

`lowbit.converter`, `lowbit.runtime` and `lowbit.custom_ops` are imported only when used, so
`import lowbit` stays light and a converted folder deploys with the runtime alone.
"""

from lowbit.errors import LowbitError

__version__ = "0.1.0"
__all__ = ["LowbitError", "__version__", "convert", "load"]


def convert(model, output, scheme: str | None = None, **options):
    """Convert a Hugging Face checkpoint (local folder or hub id) into an ONNX folder (scheme None: q0f32, or the one
    a GPTQ/AWQ/compressed-tensors checkpoint implies); see
    `lowbit.converter.api.convert` for the options. Returns a `ConversionReport`."""
    from lowbit.converter.api import convert as _convert

    return _convert(model, output, scheme, **options)


def load(folder, provider: str = "cpu", threads: int | None = None):
    """Open a converted folder: a `lowbit.runtime.model.Model` with generate, stream, perplexity and bench."""
    from lowbit.runtime.model import Model

    return Model.load(folder, provider, threads)
