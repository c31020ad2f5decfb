"""Checkpoints written beside the ONNX folder: `lowbit convert ... --emit FORMAT`, registered by name.

Each emitter is one module with `FOLDER` (the subfolder of the output it writes), `check(recipe_given)` (bad use
is a one-line LowbitError before the checkpoint is read) and `write(context) -> dict` (the record for lowbit.json).
The names are listed here without importing the modules, so the command line stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

EMITTERS = {"compressed-tensors": "lowbit.converter.emit.compressed_tensors"}  # name -> module


@dataclass(frozen=True)
class EmitContext:
    """What an emitter reads: the staging folder (model.onnx written and calibrated), the source checkpoint's
    tensors (`WeightSource`), the decoder spec, and the recipe's compressed-tensors `quantization_config`."""

    staging: Path
    weights: object  # lowbit.converter.weights.WeightSource
    spec: object  # lowbit.converter.architectures.DecoderSpec
    quantization_config: dict


def emitter(name: str):
    if name not in EMITTERS:
        raise LowbitError(f"unknown --emit format '{name}' (known: {', '.join(EMITTERS)})")
    return importlib.import_module(EMITTERS[name])


def check_emit(name: str | None, recipe_given: bool) -> None:
    """Fails with one line when `--emit name` cannot be written for this conversion (before anything is read)."""
    if name is not None:
        emitter(name).check(recipe_given)


def emit(name: str, context: EmitContext) -> dict:
    """Writes `context.staging / FOLDER`; returns the record for lowbit.json."""
    return emitter(name).write(context)
