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

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from lowbit.affine import QuantizedWeight, dequantize, quantize
from lowbit.converter.algorithms.awq import (awq_clip_search, awq_search, fold_into_linear_rows, fold_into_norm,
                                             output_error, quantize_clipped, scale_weight)
from lowbit.converter.algorithms.gptq import gptq_quantize
from lowbit.converter.graph import lazy_tensor
from lowbit.converter.calibration import CalibrationSettings
from lowbit.converter.calibration.layerwise import LayerRunner, capture_value, layer_boundaries
from lowbit.converter.calibration.observers import make_observer
from lowbit.converter.quant.formats import Site
from lowbit.converter.quant.plan import LayerQuant
from lowbit.errors import LowbitError

EXTERNAL_FROM_BYTES = 65
AFTER_LAYERS = 1 << 30  # stage key of modules after the decoder layers (an untied lm_head)
FLOAT_MODEL = "model.onnx"


@dataclass(frozen=True)
class GPTQSettings:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self):
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not (
                math.isfinite(self.damp) and 0 <= self.damp < 1):
            raise LowbitError(f"--damp must be a number in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise LowbitError(f"the GPTQ block size must be a positive integer, got {self.block_size!r}")


@dataclass(frozen=True)
class AWQSettings:
    grid: int = 20  # α = i / grid
    duo_scaling: bool = False
    clip: bool = True  # AutoAWQ's weight-clip search after scaling (never on q and k rows)


@dataclass(frozen=True)
class AlgorithmResult:
    """Loaders of the quantized weights by module, and what lowbit.json records about the run."""

    weights: dict[str, Callable[[], QuantizedWeight]]
    record: dict
    float_weights: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)  # what was quantized (AWQ: scaled)


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

    def save_float(self, module: str, weight: np.ndarray) -> Callable[[], np.ndarray]:
        path = self.folder / f"{module}.float.npy"
        np.save(path, weight)
        return lambda: np.load(path)


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

    def _entry(self, name: str):
        if name not in self.entries:
            raise LowbitError(f"{name}: too small to be rewritten in the calibration model ({EXTERNAL_FROM_BYTES} "
                              "bytes at least); use --independent")
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        location, offset, shape, dtype = self._entry(name)
        return np.array(np.memmap(self.folder / location, dtype=dtype, mode="r", offset=offset, shape=shape))

    def write(self, name: str, value: np.ndarray) -> None:
        location, offset, shape, dtype = self._entry(name)
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
    awq: AWQSettings = AWQSettings()
    sequential: bool = True  # layer l calibrated on the outputs of the quantized layers before it
    smoothquant_alpha: float | None = None  # SmoothQuant before the weight algorithm (algorithms/smoothquant.py)

    def __post_init__(self):
        if self.name not in ALGORITHMS:
            raise LowbitError(f"unknown algorithm '{self.name}' (known: {', '.join(ALGORITHMS)})")
        alpha = self.smoothquant_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not math.isfinite(alpha) or not 0 <= alpha <= 1):
            raise LowbitError(f"--smoothquant-alpha must be a number within [0, 1], got {alpha!r}")


@dataclass(frozen=True)
class ModelInput:
    """What an algorithm needs from the conversion besides the graph."""

    load_weight: Callable[[Site], np.ndarray]  # float [N, K] of a site, as the checkpoint holds it
    tokenizer_folder: Path
    scale_dtype: np.dtype
    context_length: int
    spec: object = None  # the DecoderSpec (AWQ reads projection sizes and the MLP kind)


@dataclass
class _Run:
    """What every calibrated algorithm starts from: samples, the MatMul sites, the float folder, a weight store."""

    samples: list[np.ndarray]
    seq_len: int
    targets: list[tuple[Site, LayerQuant]]
    float_path: Path
    float_weights: "_FloatWeights"
    store: "_WeightStore"

    def record(self, spec: AlgorithmSpec, settings: dict, errors: dict) -> dict:
        return {
            "name": spec.name, "sequential": spec.sequential, **settings,
            "calibration": spec.calibration.record(self.samples, self.seq_len),
            "layer_output_error": errors,  # trace((W - Q) H (W - Q)^T), the algorithm's and round-to-nearest's
        }


def _prepare(model: ir.Model, sites, source: ModelInput, spec: AlgorithmSpec, work: Path) -> _Run:
    samples, seq_len = spec.calibration.samples(source.tokenizer_folder, source.context_length)
    targets = [(site, layer) for site, layer in sites if site.kind == "matmul"]
    if not targets:
        raise LowbitError(f"--algo {spec.name}: the scheme quantizes no MatMul layer")
    float_path = work / "float" / FLOAT_MODEL
    float_path.parent.mkdir(parents=True)
    # weights (norm weights over 64 bytes included) go to the data file, where sequential runs overwrite them in
    # place; shape constants (at most 8 int64) stay inline, where ORT's shape inference reads them
    ir.save(model, float_path, external_data=FLOAT_MODEL + ".data", size_threshold_bytes=EXTERNAL_FROM_BYTES)
    return _Run(samples, seq_len, targets, float_path, _FloatWeights(float_path), _WeightStore(work / "quantized"))


def run_gptq(model: ir.Model, sites: list[tuple[Site, LayerQuant]], source: ModelInput, spec: AlgorithmSpec,
             work: Path, progress: Callable[[str], object] | None = None) -> AlgorithmResult:
    """GPTQ for every (site, plan) in `sites` whose site is a MatMul. Returns the loaders `quantize_model` takes
    instead of round-to-nearest, and the run's record. `progress(label)` gives each stage's per-sample callback."""
    run = _prepare(model, sites, source, spec, work)
    settings = spec.gptq
    loaders, errors = {}, {}

    def quantize_stage(stage, statistics):
        for site, layer in stage:
            try:
                result = gptq_quantize(source.load_weight(site), statistics[site.module]["hessian"], layer.weight,
                                       damp=settings.damp, block_size=settings.block_size,
                                       act_order=settings.act_order, scale_dtype=source.scale_dtype)
            except LowbitError as e:
                raise LowbitError(f"{site.module}: {e}") from None
            loaders[site.module] = run.store.save(site.module, result.quantized)
            errors[site.module] = {"gptq": result.error, "rtn": result.rtn_error}
            if spec.sequential:
                run.float_weights.write(site.weight.name, dequantize(result.quantized).T)

    run_layerwise(run.float_path, stages(run.targets), run.samples, quantize_stage, spec.sequential, progress)
    return AlgorithmResult(loaders, run.record(spec, asdict(settings), errors))


def _concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    first = parts[0]
    return QuantizedWeight(np.concatenate([q.codes for q in parts]), np.concatenate([q.scales for q in parts]),
                           np.concatenate([q.zero_points for q in parts]), first.bits, first.group_size, first.k)


def run_awq(model: ir.Model, sites: list[tuple[Site, LayerQuant]], source: ModelInput, spec: AlgorithmSpec,
            work: Path, progress: Callable[[str], object] | None = None) -> AlgorithmResult:
    """AWQ for every (site, plan) in `sites` whose site is a MatMul, layer by layer (docs/algorithms.md): per-input-
    channel scales searched on each layer's calibration statistics, folded into the op before (the input norm for
    q/k/v, the post-attention norm for gate/up, up_proj's rows for down_proj; o_proj and lm_head keep s = 1),
    then the clip search and quantization of the scaled weights. The folded norm weights replace the graph's."""
    run = _prepare(model, sites, source, spec, work)
    settings, decoder = spec.awq, source.spec
    initializers = model.graph.initializers
    loaders, folded_loaders, errors, alphas = {}, {}, {}, {}

    def norm_names(layer: int, norm: str) -> list[str]:
        return [name for name in (f"layers.{layer}.{norm}.weight", f"layers.{layer}.{norm}.bias")
                if name in initializers]

    def quantize_stage(stage, statistics):
        by_kind = {site.module.rsplit(".", 1)[-1]: (site, layer) for site, layer in stage}
        weights = {site.module: source.load_weight(site) for site, _ in stage}
        index = _stage_key(stage[0][0].module)
        scales, folds = {}, []  # module -> s of its input; (initializer names, s) to divide

        def search(kind: str) -> np.ndarray:
            site, layer = by_kind[kind]
            stats = statistics[site.module]
            found = awq_search([weights[site.module]], stats["hessian"], stats["mean_abs_per_channel"], layer.weight,
                               grid=settings.grid, duo_scaling=settings.duo_scaling, scale_dtype=source.scale_dtype)
            scales[site.module], alphas[site.module] = found.scales, found.alpha
            return found.scales

        for kind, norm in (("qkv_proj", "attn_norm"), ("gate_up_proj", "mlp_norm"), ("fc_proj", "mlp_norm")):
            if kind in by_kind and index != AFTER_LAYERS and norm_names(index, norm):
                folds.append((norm_names(index, norm), search(kind)))
        down_scale = None
        if "down_proj" in by_kind and "gate_up_proj" in by_kind and decoder is not None and decoder.gated_mlp:
            down_scale = search("down_proj")
        for site, layer in stage:
            module, w = site.module, weights[site.module]
            s = scales.get(module)
            if s is not None:
                w = scale_weight(w, s)
            up_rows = slice(w.shape[0] // 2, None) if down_scale is not None and module.endswith("gate_up_proj") \
                else None  # up's rows feed down_proj: they carry its scales
            if up_rows is not None:
                w = w.copy()
                w[up_rows] = fold_into_linear_rows(w[up_rows], down_scale)
            hessian = statistics[module]["hessian"]
            scaled_hessian = hessian if s is None else hessian / np.outer(s, s)
            plain = replace(layer.weight, clip_search=False)
            rows = [w.shape[0]]
            clip = [settings.clip]
            if module.endswith("qkv_proj") and decoder is not None:  # AutoAWQ clips neither q nor k
                q, kv = decoder.num_heads * decoder.head_dim, decoder.num_kv_heads * decoder.head_dim
                rows, clip = [q, kv, kv], [False, False, settings.clip]
            parts, start = [], 0
            for count, flag in zip(rows, clip):
                part = w[start:start + count]
                start += count
                if flag:
                    bounds = awq_clip_search(part, scaled_hessian, layer.weight, scale_dtype=source.scale_dtype)
                    parts.append(quantize_clipped(part, bounds, layer.weight, source.scale_dtype))
                else:
                    parts.append(quantize(part, plain, source.scale_dtype))
            quantized = _concat_rows(parts)
            loaders[module] = run.store.save(module, quantized)
            folded_loaders[module] = run.store.save_float(module, w)
            unscaled = dequantize(quantized) if s is None else dequantize(quantized) / s
            original = weights[module]
            if up_rows is not None:
                unscaled[up_rows] *= down_scale[:, None]
            rtn = dequantize(quantize(original, layer.weight, source.scale_dtype))
            errors[module] = {"awq": output_error(unscaled - original, hessian),
                              "rtn": output_error(rtn - original, hessian)}
            if spec.sequential:
                run.float_weights.write(site.weight.name, dequantize(quantized).T)
        for names, s in folds:
            for name in names:
                _fold_norm(initializers[name], s)
                if spec.sequential:
                    run.float_weights.write(name, fold_into_norm(run.float_weights.read(name), s))

    run_layerwise(run.float_path, stages(run.targets), run.samples, quantize_stage, spec.sequential, progress,
                  observers=("hessian", "mean_abs_per_channel"))
    record = run.record(spec, asdict(settings), errors)
    record["alpha"] = alphas
    return AlgorithmResult(loaders, record, folded_loaders)


def _fold_norm(value: ir.Value, s: np.ndarray) -> None:
    """The graph's norm weight (or bias) initializer, divided by s when it is written (stays lazy)."""
    tensor = value.const_value
    value.const_value = lazy_tensor(value.name, tensor.dtype.numpy(), tuple(tensor.shape),
                                    lambda: fold_into_norm(tensor.numpy(), s))


def run_layerwise(float_path: Path, stages_: list[list[tuple[Site, LayerQuant]]], samples: list[np.ndarray],
                  quantize_stage: Callable[[list, dict], None], sequential: bool,
                  progress: Callable[[str], object] | None = None, observers: tuple[str, ...] = ("hessian",)) -> None:
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
        state = {module: {name: make_observer(name) for name in observers} for module in captures}
        label = "lm_head" if last else f"layer {index}"
        report = progress(label) if progress and stage else None
        next_cache = []
        for i, sample in enumerate(samples):
            values = runner.run(sample, cache[i])
            for module, value in captures.items():
                rows = values[value].reshape(-1, values[value].shape[-1])
                for observer in state[module].values():
                    observer.update(rows)
            next_cache.append(tuple(values[name] for name in following))
            if report:
                report(i + 1, len(samples))
        del runner
        if stage:
            quantize_stage(stage, {module: {name: o.result() for name, o in by_name.items()}
                                   for module, by_name in state.items()})
            del state
            if sequential and not last:  # the next layer sees this layer's quantized outputs
                runner = LayerRunner(folder, proto, inputs, following)
                next_cache = [tuple(runner.run(sample, cache[i]).values()) for i, sample in enumerate(samples)]
                del runner
        cache = next_cache


def effective_algorithm(scheme, algo: str) -> str:
    """The algorithm a conversion runs: `algo`, or the one a scheme is defined with (MLC's q4f16_awq: awq) when
    none is asked for; asking for another is an error."""
    implied = scheme.algorithm
    if implied is None or algo == implied:
        return algo
    if algo != "rtn":
        raise LowbitError(f"scheme {scheme.name} is {implied} by definition; --algo {algo} contradicts it")
    return implied


# --algo: name -> function(model, sites, source, spec, work, progress) -> AlgorithmResult; None: round to nearest
ALGORITHMS: dict[str, Callable | None] = {"rtn": None, "gptq": run_gptq, "awq": run_awq}
