"""Calibrated weight algorithms in the conversion pipeline: `lowbit convert --algo gptq`.

The float graph is written once to a temporary folder. Its quantized MatMul sites are taken in stages, one
decoder layer at a time (then an untied lm_head). Each stage runs only that layer's subgraph
(`calibration.layerwise`) over the calibration samples in an ONNX Runtime session, fed the residual stream the
previous stage produced for each sample, and accumulates the Hessian of every site's input; each site's weight
is then quantized from it (`gptq.gptq_quantize`). With `sequential` (the default) the stage's dequantized
weights are written over the float ones in the temporary folder and the layer runs again, so the next layer is
calibrated on the outputs of the already-quantized layers, as GPTQ's and llm-compressor's sequential pipelines
do; `independent` passes the float outputs on. Results go to small files in the temporary folder and are read
back when the final model is written, so memory holds one layer's Hessians and weights, one residual stream per
sample, and ORT's copy of one layer, whatever the model's depth.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from lowbit.affine import QuantizedWeight, dequantize
from lowbit.converter.algorithms.gptq import gptq_quantize
from lowbit.converter.calibration import DEFAULT_CALIBRATION_FILE, load_calibration_samples
from lowbit.converter.calibration.layerwise import LayerRunner, capture_value, layer_boundaries
from lowbit.converter.calibration.observers import make_observer
from lowbit.converter.quant.formats import Site
from lowbit.converter.quant.plan import LayerQuant
from lowbit.errors import LowbitError

DEFAULT_SEQ_LEN = 512
AFTER_LAYERS = 1 << 30  # stage key of modules after the decoder layers (an untied lm_head)
FLOAT_MODEL = "model.onnx"


@dataclass(frozen=True)
class CalibrationSettings:
    """Which samples calibrate: a file (None: the set that ships with lowbit), how many, how long, which."""

    data: Path | None = None
    num_samples: int = 128
    seq_len: int | None = None  # None: min(DEFAULT_SEQ_LEN, the model's context length)
    seed: int = 0

    def __post_init__(self):
        for name, low in (("num_samples", 1), ("seq_len", 2), ("seed", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise LowbitError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class GPTQSettings:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    sequential: bool = True

    def __post_init__(self):
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not (
                math.isfinite(self.damp) and 0 <= self.damp < 1):
            raise LowbitError(f"--damp must be a number in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise LowbitError(f"the GPTQ block size must be a positive integer, got {self.block_size!r}")


@dataclass(frozen=True)
class AlgorithmResult:
    """Loaders of the quantized weights by module, and what lowbit.json records about the run."""

    weights: dict[str, Callable[[], QuantizedWeight]]
    record: dict


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stage_key(module: str) -> int:
    """Decoder layer index of a module name (`layers.3.mlp.down_proj` -> 3); lm_head and others come last."""
    parts = module.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else AFTER_LAYERS


def stages(sites: list[tuple[Site, LayerQuant]]) -> list[list[tuple[Site, LayerQuant]]]:
    by_key: dict[int, list] = {}
    for item in sites:
        by_key.setdefault(_stage_key(item[0].module), []).append(item)
    return [by_key[key] for key in sorted(by_key)]


class _WeightStore:
    """Quantized weights as .npz files in the work folder, read back one at a time when the model is written."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, module: str, qw: QuantizedWeight) -> Callable[[], QuantizedWeight]:
        path = self.folder / f"{module}.npz"
        np.savez(path, codes=qw.codes, scales=qw.scales, zero_points=qw.zero_points,
                 meta=np.array([qw.bits, qw.group_size, qw.k], np.int64))

        def load() -> QuantizedWeight:
            with np.load(path) as f:
                bits, group, k = (int(v) for v in f["meta"])
                return QuantizedWeight(f["codes"], f["scales"], f["zero_points"], bits, group, k)

        return load


class _FloatWeights:
    """The temporary float model's weight initializers, writable in place (memory-mapped external data)."""

    def __init__(self, model_path: Path):
        import onnx

        self.folder = model_path.parent
        self.entries = {}
        for tensor in onnx.load(str(model_path), load_external_data=False).graph.initializer:
            info = {e.key: e.value for e in tensor.external_data}
            if "location" in info:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                self.entries[tensor.name] = (info["location"], int(info.get("offset", 0)), tuple(tensor.dims), dtype)

    def write(self, name: str, value: np.ndarray) -> None:
        location, offset, shape, dtype = self.entries[name]
        view = np.memmap(self.folder / location, dtype=dtype, mode="r+", offset=offset, shape=shape)
        view[...] = value.astype(dtype)
        view.flush()
        del view


@dataclass(frozen=True)
class AlgorithmSpec:
    """`--algo` and its settings, as `lowbit convert` and `lowbit.convert` take them."""

    name: str = "rtn"
    calibration: CalibrationSettings = CalibrationSettings()
    gptq: GPTQSettings = GPTQSettings()

    def __post_init__(self):
        if self.name not in ALGORITHMS:
            raise LowbitError(f"unknown algorithm '{self.name}' (known: {', '.join(ALGORITHMS)})")


@dataclass(frozen=True)
class ModelInput:
    """What an algorithm needs from the conversion besides the graph."""

    load_weight: Callable[[Site], np.ndarray]  # float [N, K] of a site, as the checkpoint holds it
    tokenizer_folder: Path
    scale_dtype: np.dtype
    context_length: int


def run_gptq(model: ir.Model, sites: list[tuple[Site, LayerQuant]], source: ModelInput, spec: AlgorithmSpec,
             work: Path, progress: Callable[[str], object] | None = None) -> AlgorithmResult:
    """GPTQ for every (site, plan) in `sites` whose site is a MatMul. Returns the loaders `quantize_model` takes
    instead of round-to-nearest, and the run's record. `progress(label)` gives each stage's per-sample callback."""
    calibration, settings = spec.calibration, spec.gptq
    context_length, scale_dtype = source.context_length, source.scale_dtype
    seq_len = calibration.seq_len or min(DEFAULT_SEQ_LEN, context_length)
    if seq_len > context_length:
        raise LowbitError(f"--seq-len {seq_len} exceeds the model's context length ({context_length})")
    samples = load_calibration_samples(calibration.data, source.tokenizer_folder, calibration.num_samples, seq_len,
                                       calibration.seed)
    targets = [(site, layer) for site, layer in sites if site.kind == "matmul"]
    if not targets:
        raise LowbitError(f"--algo {spec.name}: the scheme quantizes no MatMul layer")
    float_path = work / "float" / FLOAT_MODEL
    float_path.parent.mkdir(parents=True)
    ir.save(model, float_path, external_data=FLOAT_MODEL + ".data")
    float_weights = _FloatWeights(float_path)
    store = _WeightStore(work / "quantized")
    loaders, errors = {}, {}

    def quantize_stage(stage, hessians):
        for site, layer in stage:
            try:
                result = gptq_quantize(source.load_weight(site), hessians[site.module], layer.weight,
                                       damp=settings.damp, block_size=settings.block_size,
                                       act_order=settings.act_order, scale_dtype=scale_dtype)
            except LowbitError as e:
                raise LowbitError(f"{site.module}: {e}") from None
            loaders[site.module] = store.save(site.module, result.quantized)
            errors[site.module] = {"gptq": result.error, "rtn": result.rtn_error}
            if settings.sequential:
                float_weights.write(site.weight.name, dequantize(result.quantized).T)

    run_layerwise(float_path, stages(targets), samples, quantize_stage, settings.sequential, progress)
    data = calibration.data or DEFAULT_CALIBRATION_FILE
    record = {
        "name": "gptq", **asdict(settings),
        "calibration": {"data": str(calibration.data) if calibration.data else "lowbit default set",
                        "sha256": file_sha256(data), "samples": len(samples),
                        "tokens": int(sum(len(s) for s in samples)), "seq_len": seq_len, "seed": calibration.seed},
        "layer_output_error": errors,  # trace((W - Q) H (W - Q)^T) for GPTQ and for round-to-nearest
    }
    return AlgorithmResult(loaders, record)


def run_layerwise(float_path: Path, stages_: list[list[tuple[Site, LayerQuant]]], samples: list[np.ndarray],
                  quantize_stage: Callable[[list, dict], None], sequential: bool,
                  progress: Callable[[str], object] | None = None) -> None:
    """Walks the decoder one layer at a time (`calibration.layerwise`): for each layer, its MatMul inputs' Hessians
    over every sample, fed the residual stream the layers before produced; `quantize_stage(stage, {module:
    hessian})` quantizes the layer's sites (and, when `sequential`, writes their dequantized weights into the
    float folder, whose next pass then gives the quantized layer's outputs to the layer after it)."""
    import onnx

    proto = onnx.load(str(float_path), load_external_data=False)
    boundaries = layer_boundaries(proto)
    by_layer = {_stage_key(stage[0][0].module): stage for stage in stages_}
    folder = float_path.parent
    cache: list[tuple[np.ndarray, ...]] = [()] * len(samples)  # each sample's values at the current boundary
    for index in range(len(boundaries)):
        last = index == len(boundaries) - 1
        stage = by_layer.get(AFTER_LAYERS if last else index, [])
        if last and not stage:
            break
        inputs = list(boundaries[index]) if index else []
        following = [] if last else list(boundaries[index + 1])
        captures = {site.module: capture_value(proto, site.module) for site, _ in stage}
        runner = LayerRunner(folder, proto, inputs, following + list(captures.values()))
        observers = {module: make_observer("hessian") for module in captures}
        label = "lm_head" if last else f"layer {index}"
        report = progress(label) if progress and stage else None
        next_cache = []
        for i, sample in enumerate(samples):
            values = runner.run(sample, cache[i])
            for module, value in captures.items():
                observers[module].update(values[value].reshape(-1, values[value].shape[-1]))
            next_cache.append(tuple(values[name] for name in following))
            if report:
                report(i + 1, len(samples))
        del runner
        if stage:
            quantize_stage(stage, {module: observer.result() for module, observer in observers.items()})
            del observers
            if sequential and not last:  # the next layer sees this layer's quantized outputs
                runner = LayerRunner(folder, proto, inputs, following)
                next_cache = [tuple(runner.run(sample, cache[i]).values()) for i, sample in enumerate(samples)]
                del runner
        cache = next_cache


# --algo: name -> function(model, sites, source, spec, work, progress) -> AlgorithmResult; None: round to nearest
ALGORITHMS: dict[str, Callable | None] = {"rtn": None, "gptq": run_gptq}
