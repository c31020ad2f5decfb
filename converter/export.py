"""`lowbit convert`: checkpoint -> output folder, written to a temporary directory and moved
into place only when everything succeeded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import onnx_ir as ir

import lowbit
from lowbit.converter.architectures import DecoderSpec, get_architecture
from lowbit.converter.calibrate_folder import METADATA_KEY as ACTIVATION_CALIBRATION
from lowbit.converter.calibrate_folder import calibrate_staging, imported_scales
from lowbit.converter.checkpoint import Checkpoint, dir_size, resolve_model_dir
from lowbit.converter.decoder import TARGETS, DecoderGraph
from lowbit.converter.emit import EmitContext, check_emit
from lowbit.converter.emit import emit as emit_checkpoint
from lowbit.errors import LowbitError
from lowbit.converter.genai import genai_config
from lowbit.converter.importers import detect as detect_import
from lowbit.converter.recipe_conversion import (
    apply_recipe, modules_to_unfuse, recipe_for_conversion, recipe_placeholder,
)
from lowbit.converter.algorithms.pipeline import (ALGORITHMS, AlgorithmSpec, ModelInput, effective_algorithm,
                                                 run_algorithms)
from lowbit.converter.algorithms.smoothquant import smooth_model
from lowbit.converter.quant.rewrite import QuantReport, planned_sites, quantize_model, weight_loader
from lowbit.converter.schemes import SchemeOptions, get_scheme
from lowbit.converter.weights import WeightSource

COPIED_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]


@dataclass
class ConversionReport:
    output: Path
    scheme: str
    target: str
    model_type: str
    seconds: float
    model_bytes: int
    float_weight_bytes: int = 0
    weight_bytes: int = 0
    quant: QuantReport | None = None
    notes: list[str] = field(default_factory=list)


def load_config(model_dir: Path):
    """The transformers config, after checking that we support its model_type."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LowbitError(f"{path}: cannot read ({e.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise LowbitError(f"{path}: not a JSON object")
    model_type = raw.get("model_type")
    if model_type is None:
        raise LowbitError(f"{path}: no model_type")
    if not isinstance(model_type, str):
        raise LowbitError(f"{path}: model_type must be a string, got {model_type!r}")
    arch = get_architecture(model_type)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad config
        message = " ".join(str(e).split()) or e.__class__.__name__  # its messages span lines; ours is one
        raise LowbitError(f"{path}: transformers cannot read it ({message[:400]})") from None
    return arch, config


def prepare_output(output: Path, overwrite: bool) -> None:
    """An output folder may be new, empty, or (with overwrite) one that lowbit wrote: it holds lowbit.json.
    Nothing else is ever replaced, so no command deletes files that lowbit did not write."""
    try:
        if output.is_symlink():
            raise LowbitError(f"{output}: is a symbolic link (give the folder it points to)")
        if output.exists() and not output.is_dir():
            raise LowbitError(f"{output}: exists and is not a directory")
        if output.is_dir() and any(output.iterdir()):
            if not overwrite:
                raise LowbitError(f"{output}: exists and is not empty (use --overwrite)")
            if not (output / "lowbit.json").is_file():
                raise LowbitError(f"{output}: not written by lowbit (no lowbit.json), so --overwrite will not "
                                  "replace it; choose another folder or empty it yourself")
    except OSError as e:
        raise LowbitError(f"{output}: cannot use as output folder ({e.strerror or e.__class__.__name__})") from None


def convert(
    model: str,
    output: str | Path,
    scheme: str | None = None,
    target: str = "ort",
    overwrite: bool = False,
    progress: Callable | None = None,
    options: SchemeOptions | None = None,
    ignore: tuple[str, ...] = (),
    algorithm: AlgorithmSpec | None = None,
    calibration_progress: Callable[[str], object] | None = None,
    requantize: bool = False,
    recipe: Path | None = None,
    emit: str | None = None,
) -> ConversionReport:
    """`lowbit convert`. `scheme`: None is q0f32, or the scheme a pre-quantized checkpoint implies (importers);
    `algorithm`: --algo and its settings (default round to nearest); `calibration_progress(stage label)` gives a
    per-sample callback for each calibration pass; `requantize`: a pre-quantized checkpoint TensorRT cannot take
    as it is (asymmetric) is requantized symmetrically instead of refused; `recipe`: an llm-compressor style recipe
    file (converter/recipes) that sets the quantization per module instead of a scheme; `emit`: also write the
    quantized checkpoint in that format into a subfolder (converter/emit: "compressed-tensors", with a recipe)."""
    with tempfile.TemporaryDirectory(prefix="lowbit-algorithm-") as work:  # an algorithm's files, until written
        return _convert(model, output, scheme, target, overwrite, progress, options or SchemeOptions(),
                        tuple(ignore), algorithm or AlgorithmSpec(), calibration_progress, Path(work), requantize,
                        recipe, emit)


def _convert(model, output, scheme, target, overwrite, progress, options, ignore, algorithm: AlgorithmSpec,
             calibration_progress, work: Path, requantize: bool = False,
             recipe_path: Path | None = None, emit: str | None = None) -> ConversionReport:
    start = time.perf_counter()
    output = Path(os.path.abspath(output))  # `.` and `..` spelled out: staging goes beside the real folder
    if target not in TARGETS:
        raise LowbitError(f"unknown target '{target}' (known: {', '.join(TARGETS)})")
    recipe = None
    if recipe_path is not None:  # read and validated before the checkpoint is
        recipe = recipe_for_conversion(recipe_path, scheme, ignore, algorithm)
    check_emit(emit, recipe_path is not None)
    if scheme is not None:
        get_scheme(scheme, options, target)  # a bad name or option fails before the checkpoint is read
    source = resolve_model_dir(model)
    arch, config = load_config(source)
    checkpoint, imported = Checkpoint(source), detect_import(source)  # GPTQ, AWQ, compressed-tensors: imported
    # the stored types of the checkpoint's float tensors (headers only): the runtime reads float32 weights that came
    # from bfloat16 at half width (runtime/narrow_float_weights.py)
    source_float_dtypes = sorted({checkpoint.dtype_name(n) for n in checkpoint.names() if checkpoint.is_float(n)})
    if imported is not None:
        checkpoint = imported.view(checkpoint, arch.weights.conv1d)
        scheme_obj = imported.scheme(scheme, options, target, algorithm, requantize)
        scheme = scheme_obj.name
    elif requantize:
        raise LowbitError("--requantize applies to pre-quantized checkpoints (GPTQ, AWQ, compressed-tensors)")
    elif recipe is not None:
        scheme, scheme_obj = "recipe", recipe_placeholder(options)
    else:
        scheme = scheme or "q0f32"
        scheme_obj = get_scheme(scheme, options, target)
    if ignore and not scheme_obj.plan:
        raise LowbitError(f"--ignore keeps modules of a quantizing scheme in float; {scheme} quantizes nothing")
    algorithm = replace(algorithm, name=effective_algorithm(scheme_obj, algorithm.name))
    run_algorithm = ALGORITHMS[algorithm.name]
    if run_algorithm is not None and not scheme_obj.plan:
        raise LowbitError(f"--algo {algorithm.name} quantizes weights; {scheme} quantizes nothing")
    prepare_output(output, overwrite)
    spec: DecoderSpec = arch.spec(config)
    weights = WeightSource(checkpoint, arch.weights)
    weights.check(spec)  # shapes and dtypes from the headers, before anything is built or written
    decoder = DecoderGraph(spec, weights, scheme_obj.dtype, TARGETS[target])
    graph = decoder.build()
    if recipe is not None:  # q/k/v or gate/up that the recipe quantizes differently: one node each
        unfuse = modules_to_unfuse(recipe, graph, options, target)
        if unfuse:
            decoder = DecoderGraph(spec, weights, scheme_obj.dtype, TARGETS[target], unfuse=unfuse)
            graph = decoder.build()
    float_bytes = _weight_bytes(graph)
    quant, quantized, quantized_floats, algorithm_record = None, None, None, {"name": algorithm.name}
    recipe_run = None
    if recipe is not None:  # the plan needs the graph's modules (and their transformers names)
        recipe_run = apply_recipe(recipe, recipe_path, graph, options, target)
        scheme_obj = recipe_run.scheme
        algorithm_record = {"name": "+".join(recipe_run.algorithms) or "rtn"}
    if imported is not None:  # the checkpoint's own integers and scales: one exact rule and loader per module
        scheme_obj, quantized = imported.plan(graph, weights, scheme_obj, target)
    # SmoothQuant: a graph -> graph pass on the float model, before any quantization; one strength for the
    # quantized-activation linears (--smoothquant-alpha), or one per module that a recipe's mappings name
    smoothing = recipe_run.smoothquant if recipe_run is not None else algorithm.smoothquant_alpha
    if smoothing is not None and smoothing != {}:
        if not scheme_obj.plan:
            raise LowbitError(f"--smoothquant-alpha smooths activations for quantization; {scheme} quantizes nothing")
        sites, _ = planned_sites(graph, scheme_obj.plan, ignore)
        algorithm_record["smoothquant"] = smooth_model(
            graph, sites, smoothing, algorithm.calibration, source, spec.max_position_embeddings,
            spec.gated_mlp, work, calibration_progress("smoothquant") if calibration_progress else None)
    # calibrated algorithm -> the modules it runs on (None: every planned one); a recipe's modifiers name theirs
    # (several algorithms in one model), and the modules of no such modifier are rounded to nearest
    jobs = dict(recipe_run.algorithms) if recipe_run is not None else \
        {algorithm.name: None} if ALGORITHMS[algorithm.name] is not None else {}
    if scheme_obj.plan and jobs:
        sites, _ = planned_sites(graph, scheme_obj.plan, ignore)
        by_algorithm = {name: [(site, layer) for site, layer in sites if modules is None or site.module in modules]
                        for name, modules in jobs.items()}
        inputs = ModelInput(lambda site: weight_loader(site)(), source, scheme_obj.dtype, spec.max_position_embeddings,
                            spec)
        result = run_algorithms(graph, by_algorithm, inputs, algorithm, work, calibration_progress,
                                recipe_run.settings if recipe_run is not None else None, rounded=sites)
        quantized, quantized_floats = result.weights, result.float_weights
        algorithm_record = {**result.record, **{k: v for k, v in algorithm_record.items() if k != "name"}}
    if scheme_obj.plan:
        quant = quantize_model(graph, scheme_obj.plan, target, scheme_obj.dtype, ignore, quantized, quantized_floats)
    if imported is not None:
        imported.tag(graph)
    if recipe_run is not None:
        recipe_run.tag(graph)
    weight_bytes = _weight_bytes(graph)

    created = [p for p in output.parents if not p.exists()]  # removed again if the conversion fails
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as e:
        raise LowbitError(f"{output.parent}: cannot create the output folder there "
                          f"({e.strerror or e.__class__.__name__})") from None
    try:
        # two writer threads: lazy tensors (reads, casts, quantization) run in numpy, which releases the GIL
        _save(graph, staging / "model.onnx", progress)
        if quant is not None:
            quant.resolve_shared()
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        if recipe_run is not None:  # the recipe as resolved, in compressed-tensors' schema (docs/recipes.md)
            hf_config = json.loads((staging / "config.json").read_text())
            hf_config["quantization_config"] = recipe_run.quantization_config
            (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        genai = genai_config(spec, arch.genai_type, source, share_buffer=decoder.attention.shares_kv_buffer)
        (staging / "genai_config.json").write_text(json.dumps(genai, indent=2))
        if imported is not None and imported.input_scales:  # the checkpoint's own static activation scales
            activation_record = imported_scales(staging, imported.input_scales, scheme)
        else:
            activation_record = calibrate_staging(staging, scheme_obj, algorithm.calibration, source,
                                                  spec.max_position_embeddings, calibration_progress)
        emitted = None
        if emit is not None:  # the checkpoint in another format, from the written (and calibrated) model.onnx
            emitted = emit_checkpoint(emit, EmitContext(staging, weights, spec, recipe_run.quantization_config))
        session_config = {}
        if quant is not None and quant.qdq_accuracy_level() is not None:
            session_config["session.qdq_matmulnbits_accuracy_level"] = str(quant.qdq_accuracy_level())
        if quant is not None and target == "ort":  # TensorRT must see the Q/DQ nodes as they are
            session_config.update(quant.session_config())
        metadata = {
            "lowbit_version": lowbit.__version__,
            "scheme": scheme,
            "scheme_description": scheme_obj.description,
            "target": target,
            "source": str(model),
            "model_type": spec.model_type,
            "dtype": scheme_obj.dtype.name,
            "source_float_dtypes": source_float_dtypes,
            "float_weight_bytes": float_bytes,
            "weight_bytes": weight_bytes,
            "ort_session_config": session_config,
            "quantization": quant.as_dict() if quant else {},
            "ignore": {"patterns": list(ignore), "modules": quant.ignored if quant else []},
            "algorithm": algorithm_record,
            "versions": _versions(),
        }
        if imported is not None:
            metadata["import"] = imported.record
        if recipe_run is not None:
            metadata["recipe"] = recipe_run.record
        if activation_record is not None:  # static activation scales (FP8): measured here, or left for calibrate
            metadata[ACTIVATION_CALIBRATION] = activation_record
        if emitted is not None:
            metadata["emit"] = emitted
        (staging / "lowbit.json").write_text(json.dumps(metadata, indent=2))
        prepare_output(output, overwrite)  # again: the folder may have changed while we converted
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # nearest first; each is empty unless someone else wrote there meanwhile
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return ConversionReport(
        output, scheme, target, spec.model_type, time.perf_counter() - start, dir_size(output), float_bytes,
        weight_bytes, quant, notes=list(imported.notes) if imported is not None else [],
    )


def _save(graph: ir.Model, path: Path, progress: Callable | None) -> None:
    """ir.save; a LowbitError from a lazy tensor (NaN in a weight, a truncated read) comes out as itself, also
    from the small tensors that onnx_ir serializes inline and whose errors it wraps in SerdeError."""
    try:
        ir.save(graph, path, external_data="model.onnx.data", callback=progress, max_workers=2,
                max_in_flight_bytes=256 << 20)
    except ir.serde.SerdeError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, LowbitError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnx", "onnx-ir", "onnxruntime", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
