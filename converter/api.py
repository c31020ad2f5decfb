"""The conversion entry point of the Python API (`lowbit.convert`) and of `lowbit convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lowbit.converter.algorithms.pipeline import AlgorithmSpec, GPTQSettings, effective_algorithm
from lowbit.converter.calibration import CalibrationSettings
from lowbit.converter.export import ConversionReport
from lowbit.converter.export import convert as export_folder
from lowbit.converter.schemes import SchemeOptions, get_scheme, scheme_from_quant_config
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
    smoothquant_alpha: float | None = None,
    recipe: str | Path | None = None,
    emit: str | None = None,
    quant_config: str | Path | None = None,
    overwrite: bool = False,
    requantize: bool = False,
    progress: Callable | None = None,
    calibration_progress: Callable[[str], Callable[[int, int], None]] | None = None,
) -> ConversionReport:
    """Convert `model` (a local Hugging Face folder or a hub id) into the ONNX folder `output`.

    scheme: a name from docs/schemes.md (default q0f32), or None with `quant_config`, a DashInfer
    quantization config JSON. group_size, symmetric, accuracy_level, dtype, pad and clip_search override
    the scheme's preset. ignore: --ignore patterns (globs, `re:` regexes; our or transformers' module
    names) whose modules stay float. algo: "rtn" (round to nearest), "gptq" or "awq", calibrated on `calib_data`
    (a text/JSONL/JSON file; None: the set that ships with lowbit) with `num_samples` samples of at most
    `seq_len` tokens (None: min(512, context)) picked by `calib_seed`; GPTQ's `damp` and `act_order`;
    `sequential` (False: every layer calibrated on float inputs). The schemes with static activation scales
    (e4m3_e4m3_f16, e5m2_e5m2_f16, w8a8-static) take the same calibration options for their activation scales.
    smoothquant_alpha: SmoothQuant's migration strength α in [0, 1] for schemes that quantize activations
    (w8a8, w8a8-static, the FP8 codes), calibrated on the same data. recipe: an llm-compressor style recipe file
    (YAML/JSON, docs/recipes.md) instead of a scheme: quantization per module, its modifiers' algorithms.
    emit: "compressed-tensors" (with `recipe`) also writes the quantized checkpoint as compressed-tensors
    safetensors in `output`/compressed-tensors (docs/recipes.md).
    target: "ort" or "tensorrt".
    overwrite: replace an output folder that lowbit wrote (one holding lowbit.json); any other non-empty folder
    is an error. progress: called as progress(tensor, info) for each tensor written. calibration_progress:
    called as calibration_progress(stage) for each calibration pass; returns a callback(done, total).
    A GPTQ, AWQ or compressed-tensors checkpoint is imported with its own integers and scales (docs/importers.md):
    scheme None takes the scheme it implies; requantize: requantize it symmetrically for target "tensorrt" where it
    is asymmetric (otherwise an error).
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
    # scheme None: q0f32, or the scheme a pre-quantized checkpoint implies (the exporter checks the options then)
    scheme_obj = get_scheme(scheme or "q0f32", options if scheme is not None else SchemeOptions(pad=pad), target)
    algo = effective_algorithm(scheme_obj, algo)  # e.g. q4f16_awq is AWQ by definition
    # FP8 schemes calibrate activation scales themselves, so they take the calibration options too; a recipe's
    # modifiers decide what is calibrated (the exporter checks the recipe against the other options)
    if recipe is None and (calibration != CalibrationSettings() or algo != "rtn"):
        static = scheme_obj.plan is not None and scheme_obj.plan.static_activations()
        if algo != "rtn" and _float8_weights(scheme_obj):
            raise LowbitError(f"--algo {algo} is for integer weights; {scheme_obj.name} rounds its float8 weights "
                              "to nearest")
        if algo == "rtn" and smoothquant_alpha is None and not scheme_obj.calibrates_at_conversion:
            later = " (a *_max_calibrate folder takes them in `lowbit calibrate`)" if static else ""
            raise LowbitError("calibration options (--calib-data, --num-samples, --seq-len, --calib-seed) need a "
                              "calibrated --algo (gptq, awq), --smoothquant-alpha or a scheme with static activation "
                              f"scales{later}")
    if algo != "gptq" and (damp != 0.01 or act_order):
        raise LowbitError("--damp and --act-order are GPTQ options: add --algo gptq")
    if algo == "rtn" and not sequential and recipe is None:
        raise LowbitError("--independent applies to calibrated algorithms: add --algo gptq or awq")
    algorithm = AlgorithmSpec(algo, calibration, GPTQSettings(damp, act_order=act_order), sequential=sequential,
                              smoothquant_alpha=smoothquant_alpha)
    return export_folder(str(model), output, scheme, target, overwrite, progress, options, tuple(ignore),
                         algorithm, calibration_progress, requantize, None if recipe is None else Path(recipe),
                         emit)


def _float8_weights(scheme) -> bool:
    from lowbit.affine import FLOAT8_RULES

    return scheme.plan is not None and any(r.quant is not None and r.quant.weight.rule in FLOAT8_RULES
                                           for r in scheme.plan.rules)
