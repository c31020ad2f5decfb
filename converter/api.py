"""The conversion entry point of the Python API (`lowbit.convert`) and of `lowbit convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lowbit.converter.algorithms.pipeline import AlgorithmSpec, CalibrationSettings, GPTQSettings
from lowbit.converter.export import ConversionReport
from lowbit.converter.export import convert as export_folder
from lowbit.converter.schemes import SchemeOptions, scheme_from_quant_config
from lowbit.errors import LowbitError


def convert(
    model: str | Path,
    output: str | Path,
    scheme: str | None = None,
    *,
    target: str = "ort",
    group_size: int | None = None,
    symmetric: bool | None = None,
    accuracy_level: int | None = None,
    dtype: str | None = None,
    pad: bool = True,
    clip_search: bool = False,
    ignore: tuple[str, ...] | list[str] = (),
    algo: str = "rtn",
    calib_data: str | Path | None = None,
    num_samples: int = 128,
    seq_len: int | None = None,
    calib_seed: int = 0,
    damp: float = 0.01,
    act_order: bool = False,
    sequential: bool = True,
    quant_config: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable | None = None,
    calibration_progress: Callable[[str], Callable[[int, int], None]] | None = None,
) -> ConversionReport:
    """Convert `model` (a local Hugging Face folder or a hub id) into the ONNX folder `output`.

    scheme: a name from docs/schemes.md (default q0f32), or None with `quant_config`, a DashInfer
    quantization config JSON. group_size, symmetric, accuracy_level, dtype, pad and clip_search override
    the scheme's preset. ignore: --ignore patterns (globs, `re:` regexes; our or transformers' module
    names) whose modules stay float. algo: "rtn" (round to nearest) or "gptq", calibrated on `calib_data`
    (a text/JSONL/JSON file; None: the set that ships with lowbit) with `num_samples` samples of at most
    `seq_len` tokens (None: min(512, context)) picked by `calib_seed`; GPTQ's `damp`, `act_order` and
    `sequential` (False: every layer calibrated on float inputs). target: "ort" or "tensorrt".
    overwrite: replace an output folder that lowbit wrote (one holding lowbit.json); any other non-empty folder
    is an error. progress: called as progress(tensor, info) for each tensor written. calibration_progress:
    called as calibration_progress(stage) for each calibration pass; returns a callback(done, total).
    Raises LowbitError for bad input; nothing is left at `output` then.
    """
    if quant_config is not None:
        if scheme is not None:
            raise LowbitError("give either --scheme or --quant-config (scheme= or quant_config=), not both")
        scheme = scheme_from_quant_config(Path(quant_config))
    options = SchemeOptions(group_size, symmetric, accuracy_level, dtype, pad=pad, clip_search=clip_search)
    if isinstance(ignore, str):
        ignore = (ignore,)
    calibration = CalibrationSettings(None if calib_data is None else Path(calib_data), num_samples, seq_len,
                                      calib_seed)
    if algo == "rtn" and calibration != CalibrationSettings():
        raise LowbitError("calibration options (--calib-data, --num-samples, --seq-len, --calib-seed) need a "
                          "calibrated --algo (gptq)")
    if algo != "gptq" and (damp != 0.01 or act_order or not sequential):
        raise LowbitError("--damp, --act-order and --independent are GPTQ options: add --algo gptq")
    algorithm = AlgorithmSpec(algo, calibration, GPTQSettings(damp, act_order=act_order, sequential=sequential))
    return export_folder(str(model), output, scheme or "q0f32", target, overwrite, progress, options, tuple(ignore),
                         algorithm, calibration_progress)
