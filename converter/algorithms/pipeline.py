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
from lowbit.converter.algorithms.folding import (NORM_BEFORE, UP_BEFORE_DOWN, fold_norm, kind_of, norm_initializers,
                                                rescale_weight, up_rows)
from lowbit.converter.calibration import CalibrationSettings
from lowbit.converter.calibration.layerwise import AFTER_LAYERS, layer_of, walk_layers
from lowbit.converter.calibration.observers import make_observer
from lowbit.converter.quant.formats import Site
from lowbit.converter.quant.plan import LayerQuant
from lowbit.converter.quant.rewrite import weight_sites
from lowbit.errors import LowbitError

EXTERNAL_FROM_BYTES = 65
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
    gptq: GPTQSettings | None = None  # quantize the scaled weight by GPTQ instead (AWQ then GPTQ, as a recipe can)


@dataclass(frozen=True)
class AlgorithmResult:
    """Loaders of the quantized weights by module, and what lowbit.json records about the run."""

    weights: dict[str, Callable[[], QuantizedWeight]]
    record: dict
    float_weights: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)  # what was quantized (AWQ: scaled)


def stages(sites: list[tuple[Site, LayerQuant]]) -> list[list[tuple[Site, LayerQuant]]]:
    by_key: dict[int, list] = {}
    for item in sites:
        by_key.setdefault(layer_of(item[0].module), []).append(item)
    return [by_key[key] for key in sorted(by_key)]


class _WeightStore:
    """Quantized weights as .npz files in the work folder, read back one at a time when the model is written."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, module: str, qw: QuantizedWeight) -> Callable[[], QuantizedWeight]:
        path = self.folder / f"{module}.npz"
        # scales as raw bytes with their dtype's name (np.save cannot write float8); NVFP4's element and global scale
        np.savez(path, codes=qw.codes, scales=qw.scales.view(f"u{qw.scales.itemsize}"),
                 scale_dtype=np.array(qw.scales.dtype.name), zero_points=qw.zero_points,
                 meta=np.array([qw.bits, qw.group_size, qw.k], np.int64), element=np.array(qw.element or ""),
                 global_scale=np.float32(np.nan if qw.global_scale is None else qw.global_scale))

        def load() -> QuantizedWeight:
            with np.load(path) as f:
                bits, group, k = (int(v) for v in f["meta"])
                element, gs = str(f["element"]) or None, f["global_scale"][()]
                return QuantizedWeight(f["codes"], f["scales"].view(np.dtype(str(f["scale_dtype"]))),
                                       f["zero_points"], bits, group, k, element, None if np.isnan(gs) else gs)

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
    planned: frozenset[str] = frozenset()  # every MatMul module the conversion quantizes, by any algorithm


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


@dataclass
class StageAlgorithm:
    """One calibrated algorithm inside a layer-by-layer pass: the statistics each of its modules needs, what it
    does with a stage's statistics, and what it produced so far."""

    name: str
    modules: frozenset[str]
    observers: tuple[str, ...]
    quantize_stage: Callable[[list, dict], None]
    weights: dict[str, Callable[[], QuantizedWeight]] = field(default_factory=dict)
    float_weights: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    errors: dict[str, dict] = field(default_factory=dict)  # trace((W - Q) H (W - Q)^T): the algorithm's and RTN's
    extra: dict = field(default_factory=dict)  # more for the record (AWQ: the α chosen per module)

    def record(self, default: object, settings: dict[str, object]) -> dict:
        """Its settings (one set where its modules share it, else `module_settings`) and its errors."""
        chosen = {module: settings.get(module, default) for module in sorted(self.modules)}
        shared = set(chosen.values())
        listed = asdict(shared.pop()) if len(shared) == 1 else {
            "module_settings": {module: asdict(value) for module, value in chosen.items()}}
        return {**listed, "layer_output_error": self.errors, **self.extra}


def _gptq(run: _Run, model: ir.Model, source: ModelInput, spec: AlgorithmSpec, modules: frozenset[str],
          settings: dict[str, object]) -> StageAlgorithm:
    """GPTQ (algorithms/gptq.py) on each module's input Hessian, with the module's settings."""

    def quantize_stage(stage, statistics):
        for site, layer in stage:
            result = _gptq_weight(site, source.load_weight(site), statistics[site.module]["hessian"], layer,
                                  settings.get(site.module, spec.gptq), source.scale_dtype)
            algorithm.weights[site.module] = run.store.save(site.module, result.quantized)
            algorithm.errors[site.module] = {"gptq": result.error, "rtn": result.rtn_error}
            if spec.sequential:
                run.float_weights.write(site.weight.name, dequantize(result.quantized).T)

    algorithm = StageAlgorithm("gptq", modules, ("hessian",), quantize_stage)
    return algorithm


def _concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    first = parts[0]
    return QuantizedWeight(np.concatenate([q.codes for q in parts]), np.concatenate([q.scales for q in parts]),
                           np.concatenate([q.zero_points for q in parts]), first.bits, first.group_size, first.k)


def _awq_weight(module: str, w: np.ndarray, scaled_hessian: np.ndarray, layer: LayerQuant, clip_search: bool,
                decoder, scale_dtype) -> QuantizedWeight:
    """AWQ's own quantization of a scaled weight: the clip search (never on q and k rows, fused or not, as AutoAWQ),
    else round to nearest."""
    plain = replace(layer.weight, clip_search=False)
    rows, clip = [w.shape[0]], [clip_search and kind_of(module) not in ("q_proj", "k_proj")]
    if kind_of(module) == "qkv_proj" and decoder is not None:
        q, kv = decoder.num_heads * decoder.head_dim, decoder.num_kv_heads * decoder.head_dim
        rows, clip = [q, kv, kv], [False, False, clip_search]
    if not any(clip):  # one call for the whole node: a fused NVFP4 node keeps one global scale
        return quantize(w, plain, scale_dtype)
    parts, start = [], 0
    for count, flag in zip(rows, clip):
        part = w[start:start + count]
        start += count
        if flag:
            bounds = awq_clip_search(part, scaled_hessian, layer.weight, scale_dtype=scale_dtype)
            parts.append(quantize_clipped(part, bounds, layer.weight, scale_dtype))
        else:
            parts.append(quantize(part, plain, scale_dtype))
    return _concat_rows(parts)


def _gptq_weight(site: Site, w: np.ndarray, hessian: np.ndarray, layer: LayerQuant, options: GPTQSettings,
                 scale_dtype):
    try:
        return gptq_quantize(w, hessian, layer.weight, damp=options.damp, block_size=options.block_size,
                             act_order=options.act_order, scale_dtype=scale_dtype)
    except LowbitError as e:
        raise LowbitError(f"{site.module}: {e}") from None


def _awq(run: _Run, model: ir.Model, source: ModelInput, spec: AlgorithmSpec, modules: frozenset[str],
         settings: dict[str, object]) -> StageAlgorithm:
    """AWQ (docs/algorithms.md), layer by layer: per-input-channel scales searched on each layer's calibration
    statistics, folded into the op before (`folding`: the input norm for q/k/v, the post-attention norm for
    gate/up, fused or not, up_proj's rows for down_proj; o_proj and lm_head keep s = 1), then the clip search and
    quantization of the scaled weights. The linears that share an input share one s, searched with each quantized
    as its own node stores it. The folded norm weights replace the graph's. A module's settings: `settings[module]`,
    else `spec.awq`; one search takes the first sharing module's (one AWQ modifier scales them all)."""
    decoder = source.spec
    initializers = model.graph.initializers
    alphas = {}
    float_readers = _float_norm_readers(model, modules, run.planned)

    def quantize_stage(stage, statistics):
        by_kind = {kind_of(site.module): (site, layer) for site, layer in stage}
        weights = {site.module: source.load_weight(site) for site, _ in stage}
        index = layer_of(stage[0][0].module)
        scales, folds = {}, []  # module -> s of its input; (initializer names, s) to divide

        def search(kinds: list[str]) -> np.ndarray:
            sites = [by_kind[kind] for kind in kinds]
            first = sites[0][0].module
            stats, options = statistics[first], settings.get(first, spec.awq)
            found = awq_search([weights[site.module] for site, _ in sites], stats["hessian"],
                               stats["mean_abs_per_channel"], [layer.weight for _, layer in sites],
                               grid=options.grid, duo_scaling=options.duo_scaling, scale_dtype=source.scale_dtype)
            for site, _ in sites:
                scales[site.module], alphas[site.module] = found.scales, found.alpha
            return found.scales

        readers = {}  # norm -> the kinds of this stage that read it
        for kind in by_kind:
            if kind in NORM_BEFORE:
                readers.setdefault(NORM_BEFORE[kind], []).append(kind)
        for norm, kinds in readers.items():
            names = norm_initializers(initializers, index, norm) if index != AFTER_LAYERS else ()
            if names:
                s = search(kinds)
                folds.append((names, s))
                for site in float_readers.get((index, norm), ()):  # float linears reading the norm: W·diag(s)
                    rescale_weight(site, columns=s)
                    if spec.sequential:
                        weight = run.float_weights.read(site.weight.name)
                        run.float_weights.write(site.weight.name, scale_weight(weight.T, s).T)
        up = next((kind for kind in UP_BEFORE_DOWN if kind in by_kind), None)
        down_scale = None
        if "down_proj" in by_kind and up is not None and decoder is not None and decoder.gated_mlp:
            down_scale = search(["down_proj"])
        for site, layer in stage:
            module, w = site.module, weights[site.module]
            options = settings.get(module, spec.awq)
            s = scales.get(module)
            if s is not None:
                w = scale_weight(w, s)
            rows = up_rows(up, w.shape[0]) if down_scale is not None and kind_of(module) == up else None
            if rows is not None:  # up's rows feed down_proj: they carry its scales
                w = w.copy()
                w[rows] = fold_into_linear_rows(w[rows], down_scale)
            hessian = statistics[module]["hessian"]
            scaled_hessian = hessian if s is None else hessian / np.outer(s, s)
            if options.gptq is not None:  # GPTQ on the scaled weight, with the scaled weight's input Hessian
                quantized = _gptq_weight(site, w, scaled_hessian, layer, options.gptq, source.scale_dtype).quantized
            else:
                quantized = _awq_weight(module, w, scaled_hessian, layer, options.clip, decoder, source.scale_dtype)
            algorithm.weights[module] = run.store.save(module, quantized)
            algorithm.float_weights[module] = run.store.save_float(module, w)
            unscaled = dequantize(quantized) if s is None else dequantize(quantized) / s
            original = weights[module]
            if rows is not None:
                unscaled[rows] *= down_scale[:, None]
            rtn = dequantize(quantize(original, layer.weight, source.scale_dtype))
            algorithm.errors[module] = {"awq": output_error(unscaled - original, hessian),
                                        "rtn": output_error(rtn - original, hessian)}
            if spec.sequential:
                run.float_weights.write(site.weight.name, dequantize(quantized).T)
        for names, s in folds:
            for name in names:
                fold_norm(initializers[name], s)
                if spec.sequential:
                    run.float_weights.write(name, fold_into_norm(run.float_weights.read(name), s))

    algorithm = StageAlgorithm("awq", modules, ("hessian", "mean_abs_per_channel"), quantize_stage,
                               extra={"alpha": alphas})
    return algorithm


def _float_norm_readers(model: ir.Model, modules: frozenset[str], planned: frozenset[str]
                        ) -> dict[tuple[int, str], list[Site]]:
    """(layer, norm) -> the float MatMul sites that read a norm whose output AWQ scales for some of `modules`: their
    weights take s so that they compute what they did. A reader that another algorithm quantizes is an error: its
    quantization would not see the scaled weight (AWQ balances every quantized linear reading one norm)."""
    every = {site.module: site for site in weight_sites(model) if site.kind == "matmul"}
    found: dict[tuple[int, str], list[Site]] = {}
    for module in sorted(modules):
        index, norm = layer_of(module), NORM_BEFORE.get(kind_of(module))
        if norm is None or index == AFTER_LAYERS or (index, norm) in found:
            continue
        others = [name for name in every if name not in modules and layer_of(name) == index
                  and NORM_BEFORE.get(kind_of(name)) == norm]
        quantized = [name for name in others if name in planned]
        if quantized:
            raise LowbitError(f"AWQ scales the input of {module} at layers.{index}.{norm}, which "
                              f"{', '.join(quantized)} also read(s) but another modifier quantizes: AWQ must balance "
                              "every quantized linear that reads one norm (add them to the AWQ mapping's balance "
                              "layers)")
        found[(index, norm)] = [every[name] for name in others]
    return found


def _rtn(run: _Run, model: ir.Model, source: ModelInput, spec: AlgorithmSpec, modules: frozenset[str],
         settings: dict[str, object]) -> StageAlgorithm:
    """The planned modules no algorithm takes: rounded to nearest when the model is written. In a sequential
    pass their round-to-nearest weights go into the calibration model when their layer is done, so the layers
    after see every quantized module of the layers before, as llm-compressor's sequential pipeline does."""

    def quantize_stage(stage, statistics):
        if spec.sequential:
            for site, layer in stage:
                weight = source.load_weight(site)
                run.float_weights.write(site.weight.name, dequantize(quantize(weight, layer.weight,
                                                                              source.scale_dtype)).T)

    return StageAlgorithm("rtn", modules, (), quantize_stage)


def run_algorithms(model: ir.Model, sites_by_algorithm: dict[str, list[tuple[Site, LayerQuant]]],
                   source: ModelInput, spec: AlgorithmSpec, work: Path,
                   progress: Callable[[str], object] | None = None,
                   settings: dict[str, object] | None = None,
                   rounded: list[tuple[Site, LayerQuant]] = ()) -> AlgorithmResult:
    """Calibrated algorithms on the MatMul sites each is given (`{"awq": [...], "gptq": [...]}`, in the order the
    recipe's modifiers come), over one calibration set. `settings`: module -> its GPTQSettings / AWQSettings
    where they differ from `spec.gptq` / `spec.awq`. `rounded`: the other planned sites (round to nearest), which a
    sequential pass quantizes in the calibration model too.

    `spec.sequential` (llm-compressor's sequential pipeline): one pass, layer by layer, in which every algorithm
    gathers its statistics for the layer's modules, then all of them quantize, and the next layer is calibrated
    on the outputs of the quantized layers before it. Otherwise (`--independent`, llm-compressor's independent
    pipeline) each algorithm is calibrated on a pass of its own over the float model: no statistics see another
    algorithm's (or its own) quantized weights. Returns the loaders `quantize_model` takes instead of round to
    nearest, and the run's record."""
    settings = settings or {}
    every = [item for sites in sites_by_algorithm.values() for item in sites]
    run = _prepare(model, every, source, spec, work)
    matmuls = {site.module for site, _ in run.targets}
    run.planned = frozenset(matmuls | {site.module for site, _ in rounded if site.kind == "matmul"})
    algorithms = []
    for name, sites in sites_by_algorithm.items():
        if ALGORITHMS.get(name) is None:
            raise LowbitError(f"unknown calibrated algorithm '{name}' (known: "
                              f"{', '.join(n for n, f in ALGORITHMS.items() if f is not None)})")
        modules = frozenset(site.module for site, _ in sites) & matmuls
        if modules:
            algorithms.append(ALGORITHMS[name](run, model, source, spec, modules, settings))
    passes = [list(algorithms)] if spec.sequential else [[algorithm] for algorithm in algorithms]
    taken = {module for algorithm in algorithms for module in algorithm.modules}
    rtn = frozenset(site.module for site, _ in rounded if site.kind == "matmul") - taken
    if spec.sequential and rtn:
        run.targets += [item for item in rounded if item[0].module in rtn]
        passes[0].append(_rtn(run, model, source, spec, rtn, {}))
    for members in passes:
        owner = {module: algorithm for algorithm in members for module in algorithm.modules}

        def quantize_stage(stage, statistics, owner=owner, members=members):
            for algorithm in members:
                part = [item for item in stage if owner[item[0].module] is algorithm]
                if part:
                    algorithm.quantize_stage(part, statistics)

        targets = [item for item in run.targets if item[0].module in owner]
        label = f"{members[0].name} " if len(passes) > 1 else ""
        observers = {module: algorithm.observers for module, algorithm in owner.items() if algorithm.observers}
        run_layerwise(run.float_path, stages(targets), run.samples, quantize_stage, spec.sequential,
                      progress if progress is None or not label else (lambda text, p=label: progress(p + text)),
                      observers=observers)
    weights, floats, records = {}, {}, {}
    for algorithm in algorithms:
        weights.update(algorithm.weights)
        floats.update(algorithm.float_weights)
        records[algorithm.name] = algorithm.record(getattr(spec, algorithm.name), settings)  # spec.gptq, spec.awq
    common = {"sequential": spec.sequential, "calibration": spec.calibration.record(run.samples, run.seq_len)}
    if len(records) == 1:
        ((name, record),) = records.items()
        return AlgorithmResult(weights, {"name": name, **common, **record}, floats)
    pipeline = "sequential" if spec.sequential else "independent"
    return AlgorithmResult(weights, {"name": "+".join(records), "pipeline": pipeline, **common,
                                     "algorithms": records}, floats)


def run_layerwise(float_path: Path, stages_: list[list[tuple[Site, LayerQuant]]], samples: list[np.ndarray],
                  quantize_stage: Callable[[list, dict], None], sequential: bool,
                  progress: Callable[[str], object] | None = None,
                  observers: dict[str, tuple[str, ...]] | None = None) -> None:
    """Walks the decoder one layer at a time (`calibration.layerwise.walk_layers`): for each layer, its MatMul
    inputs' statistics (`observers`: module -> observer names; none for a module left out) over every sample,
    fed the residual stream the layers before produced; `quantize_stage(stage, {module: {observer: result}})`
    quantizes the layer's sites (and, when `sequential`, writes their dequantized weights into the float folder,
    whose next pass then gives the quantized layer's outputs to the layer after it)."""
    import onnx

    by_layer = {layer_of(stage[0][0].module): stage for stage in stages_}

    def make_observers(module: str):
        return {name: make_observer(name) for name in (observers or {}).get(module, ())}

    def finish_layer(index: int, state) -> bool:
        stage = by_layer.get(index) or by_layer[AFTER_LAYERS]
        quantize_stage(stage, {module: {name: o.result() for name, o in by_name.items()}
                               for module, by_name in state.items()})
        return sequential

    def layer_progress(index: int):
        return progress("lm_head" if index not in by_layer else f"layer {index}") if progress else None

    proto = onnx.load(str(float_path), load_external_data=False)
    sites = {key: [site.module for site, _ in stage] for key, stage in by_layer.items()}
    walk_layers(float_path.parent, proto, sites, samples, make_observers, finish_layer, layer_progress,
                reruns=sequential)


def effective_algorithm(scheme, algo: str) -> str:
    """The algorithm a conversion runs: `algo`, or the one a scheme is defined with (MLC's q4f16_awq: awq) when
    none is asked for; asking for another is an error."""
    implied = scheme.algorithm
    if implied is None or algo == implied:
        return algo
    if algo != "rtn":
        raise LowbitError(f"scheme {scheme.name} is {implied} by definition; --algo {algo} contradicts it")
    return implied


# --algo: name -> StageAlgorithm factory (run, model, source, spec, modules, settings) that `run_algorithms` runs;
# None: round to nearest. A calibrated algorithm's default settings are the AlgorithmSpec field of its name.
ALGORITHMS: dict[str, Callable | None] = {"rtn": None, "gptq": _gptq, "awq": _awq}
