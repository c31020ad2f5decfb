"""Pre-quantized checkpoints, imported without requantizing: GPTQ (v1, v2, act-order), AWQ GEMM, compressed-tensors.

`detect(model_dir)` reads `quantization_config` from config.json (or AutoGPTQ's quantize_config.json) and returns
an `Import` built by the importer registered for its `quant_method`, or None for a float checkpoint. An importer
(one module per format: gptq.py, awq.py, compressed_tensors.py) turns the config into a `QuantFormat`, which lists
the checkpoint's quantized linears (`ImportedLinear`: shapes from the headers, integers unpacked by its own numpy
unpacker only when read). From those, `Import`:

- shows the converter a float checkpoint (`QuantizedCheckpoint`: `{module}.weight` is the checkpoint's own
  dequantization, computed when read), so the float graph is built and checked as for any model;
- implies the scheme (`scheme`) and, per module, the storage that holds the checkpoint's integers, scales and zero
  points exactly (`layer_quant`): MatMulNBits (2/4/8 bits, blocks 16-256), DequantizeLinear, lowbit's blockwise op
  (3 bits, other groups, GPTQ v1's zero point 2^bits), float8 DequantizeLinear;
- hands `quantize_model` the `QuantizedWeight` of each module, so nothing is rounded again;
- act-order (`g_idx` not `column // group_size`): permutes K once, the weight's columns by the permutation that
  makes the groups contiguous and the MatMul's input by a Gather along its last axis (x[..., perm] @ W[:, perm].T
  = x @ W.T), so the kernel sees contiguous groups.

docs/importers.md describes each on-disk layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from lowbit.affine import QuantizedWeight, WeightQuant
from lowbit.converter.graph import TRANSPOSED_SOURCE, hf_modules, lazy_tensor
from lowbit.converter.quant.formats import static_fp8
from lowbit.converter.quant.plan import LayerQuant, QuantPlan, QuantRule
from lowbit.errors import LowbitError

IMPORT_METADATA = "lowbit.import"  # node metadata: the source format of an imported module ("gptq v1 act-order")


@dataclass(frozen=True)
class ImportedLinear:
    """One quantized linear of a checkpoint. `read()` gives (codes uint8 [N, K] in the checkpoint's column order,
    scales [N, G] float, zero points int16 [N, G]) with weight = (code - zero) * scale; `read_zeros()` the zero
    points alone (cheap: chooses the storage); `read_g_idx()` the group of each column (None: column // group)."""

    prefix: str  # the checkpoint's module name (`model.layers.0.self_attn.q_proj`)
    n: int
    k: int
    bits: int
    group_size: int  # effective: K for one group per row
    read: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]
    read_zeros: Callable[[], np.ndarray]
    tensors: tuple[str, ...]  # the checkpoint tensors that hold it (hidden from the float view)
    read_g_idx: Callable[[], np.ndarray] | None = None
    element: str | None = None  # float8 weights ("e4m3"): codes are float8 bit patterns, zero points 0
    read_input_scale: Callable[[], float] | None = None  # static float8 activations: the checkpoint's input_scale

    @property
    def groups(self) -> int:
        return -(-self.k // self.group_size)


@dataclass
class QuantFormat:
    """A parsed quantization config: what `lowbit.json` records and how to find the quantized linears."""

    name: str  # "gptq", "awq", "compressed-tensors"
    label: str  # node metadata and summary: "gptq v1 act-order"
    record: dict  # lowbit.json "import"
    find: Callable[[object], dict[str, ImportedLinear]]  # checkpoint -> {prefix: linear}, headers only

    def linears(self, checkpoint) -> dict[str, ImportedLinear]:
        return self.find(checkpoint)


IMPORTERS: dict[str, Callable[[dict, str], QuantFormat]] = {}


def register_importer(*methods: str):
    """Registers a factory (config dict, where it was read) -> QuantFormat under each `quant_method`."""

    def decorate(factory):
        for method in methods:
            IMPORTERS[method] = factory
        return factory

    return decorate


def read_quant_config(model_dir: Path) -> tuple[dict, str] | None:
    """(quantization config, where it was read) of a checkpoint, or None for a float one."""
    config_path = model_dir / "config.json"
    try:
        raw = json.loads(config_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # load_config reports an unreadable config.json
    quant = raw.get("quantization_config") if isinstance(raw, dict) else None
    if quant is not None:
        if not isinstance(quant, dict):
            raise LowbitError(f"{config_path}: quantization_config must be a JSON object")
        return quant, f"{config_path.name} quantization_config"
    legacy = model_dir / "quantize_config.json"  # AutoGPTQ's exports before transformers carried the config
    if legacy.is_file():
        try:
            quant = json.loads(legacy.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise LowbitError(f"{legacy}: cannot read ({e.__class__.__name__})") from None
        if not isinstance(quant, dict):
            raise LowbitError(f"{legacy}: not a JSON object")
        return {"quant_method": "gptq", **quant}, legacy.name
    return None


def detect(model_dir: Path) -> Import | None:
    """The importer of a pre-quantized checkpoint (config parsed and checked), or None for a float checkpoint."""
    found = read_quant_config(model_dir)
    if found is None:
        return None
    quant, where = found
    method = quant.get("quant_method", quant.get("method"))
    _load_importers()
    factory = IMPORTERS.get(method) if isinstance(method, str) else None
    if factory is None:
        raise LowbitError(f"{where}: unknown quant_method {method!r} (known: {', '.join(sorted(IMPORTERS))})")
    return Import(factory(quant, where))


def _load_importers() -> None:
    from lowbit.converter.importers import awq, compressed_tensors, gptq  # noqa: F401 - they register themselves


# ------------------------------------------------------------------------------ shared helpers for importers


def config_int(config: dict, key: str, where: str, allowed=None, default=None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or (allowed is not None and value not in allowed):
        choice = f" one of {list(allowed)}" if allowed is not None else " an integer"
        raise LowbitError(f"{where}: {key} must be{choice}, got {value!r}")
    return value


def config_bool(config: dict, key: str, where: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise LowbitError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def require(checkpoint, name: str, what: str) -> tuple[int, ...]:
    """The shape of a tensor the format needs; a missing one is an error naming it."""
    if name not in checkpoint:
        raise LowbitError(f"checkpoint has no tensor {name} ({what})")
    return tuple(checkpoint.shape(name))


def require_shape(checkpoint, name: str, expected: tuple[int, ...], why: str) -> None:
    found = tuple(checkpoint.shape(name))
    if found != tuple(expected):
        raise LowbitError(f"tensor {name}: shape {list(found)}, expected {list(expected)} ({why})")


def require_dtype(checkpoint, name: str, allowed: tuple[str, ...]) -> None:
    dtype = checkpoint.dtype_name(name)
    if dtype not in allowed:
        raise LowbitError(f"tensor {name}: dtype {dtype}, expected {' or '.join(allowed)}")


def float_array(checkpoint, name: str) -> np.ndarray:
    """A scale tensor in float32 (exact for float16/bfloat16/float32), checked finite."""
    return checkpoint.read_float32(name)


# ------------------------------------------------------------------------------ act-order and exact weights


def permutation(linear: ImportedLinear) -> np.ndarray | None:
    """The column order that makes `linear`'s groups contiguous (None: they already are). Its g_idx must give
    each group exactly as many columns as a contiguous split would (a permutation of groups)."""
    if linear.read_g_idx is None:
        return None
    g_idx = np.asarray(linear.read_g_idx()).reshape(-1)
    k, g = linear.k, linear.group_size
    if g_idx.shape[0] != k:
        raise LowbitError(f"tensor {linear.prefix}.g_idx: {g_idx.shape[0]} entries, expected K = {k}")
    contiguous = np.arange(k) // g
    if np.array_equal(g_idx, contiguous):
        return None
    counts = np.bincount(np.clip(g_idx, 0, linear.groups), minlength=linear.groups + 1)
    expected = np.bincount(contiguous, minlength=linear.groups + 1)
    if g_idx.min() < 0 or g_idx.max() >= linear.groups or not np.array_equal(counts, expected):
        bad = int(np.flatnonzero(counts != expected)[0])
        raise LowbitError(f"tensor {linear.prefix}.g_idx is not a permutation of groups: group {bad} has "
                          f"{counts[bad]} columns, expected {expected[bad]} (group size {g}, K = {k})")
    return np.argsort(g_idx, kind="stable")


def zero_kind(linear: ImportedLinear) -> str:
    """"float8", "centered" (every zero point 2^(bits-1): stored without one), "integer" (within the codes' range)
    or "wide" (GPTQ v1's 2^bits, beyond what an unsigned `bits`-bit zero point holds)."""
    if linear.element is not None:
        return "float8"
    zeros = linear.read_zeros()
    if zeros.size and (zeros.min() < 0 or zeros.max() > 2**linear.bits):
        raise LowbitError(f"{linear.prefix}: zero points outside 0..{2 ** linear.bits}")
    if np.all(zeros == 2 ** (linear.bits - 1)):
        return "centered"
    return "integer" if zeros.max(initial=0) < 2**linear.bits else "wide"


def quantized_weight(linear: ImportedLinear, perm: np.ndarray | None, scale_dtype) -> QuantizedWeight:
    """The checkpoint's codes, scales and zero points as a QuantizedWeight, columns in kernel order (`perm`)."""
    codes, scales, zeros = linear.read()
    if perm is not None:
        codes = codes[:, perm]
    kp = linear.groups * linear.group_size
    if kp != linear.k:  # the last group is short: padded codes meet zero activations (MatMulNBits' K)
        codes = np.pad(codes, ((0, 0), (0, kp - linear.k)))
    stored = np.asarray(scales, np.float32).astype(scale_dtype)
    if not np.array_equal(stored.astype(np.float32), scales):
        raise LowbitError(f"{linear.prefix}: its scales are not exact in {np.dtype(scale_dtype).name} "
                          "(convert with --dtype float32)")
    if linear.element is not None:
        return QuantizedWeight(np.ascontiguousarray(codes), stored, np.zeros_like(zeros, np.uint8), 8, linear.k,
                               linear.k, linear.element)
    if zeros.max(initial=0) < 2**linear.bits:
        zeros = zeros.astype(np.uint8)
    else:  # GPTQ v1's 2^bits: stored as a float zero point (lowbit's blockwise op)
        zeros = zeros.astype(scale_dtype)
    return QuantizedWeight(np.ascontiguousarray(codes), stored, zeros, linear.bits, linear.group_size, linear.k)


def dequantized(linear: ImportedLinear) -> np.ndarray:
    """float32 [N, K], columns in the checkpoint's order: (code - zero) * scale of each column's group."""
    codes, scales, zeros = linear.read()
    if linear.element is not None:
        from lowbit.fp8 import FLOAT8

        return codes.view(FLOAT8[linear.element].dtype).astype(np.float32) * scales.astype(np.float32)
    g_idx = np.arange(linear.k) // linear.group_size
    if linear.read_g_idx is not None:
        g_idx = np.asarray(linear.read_g_idx()).reshape(-1)
    values = codes.astype(np.float32) - zeros.astype(np.float32)[:, g_idx]
    values *= scales.astype(np.float32)[:, g_idx]
    if not np.isfinite(values).all():
        raise LowbitError(f"{linear.prefix}: dequantized weight holds NaN or Inf values")
    return values


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Fused projections (q, k, v): one weight whose rows are the parts' rows."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    zeros = [p.zero_points for p in parts]
    if len({z.dtype for z in zeros}) > 1:
        zeros = [z.astype(first.scales.dtype) for z in zeros]
    return QuantizedWeight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                           np.concatenate(zeros), first.bits, first.group_size, first.k, first.element)


# ------------------------------------------------------------------------------ the float view


class QuantizedCheckpoint:
    """A checkpoint whose quantized linears read as float `{prefix}.weight` (dequantized when read); everything
    else is the underlying checkpoint's. `conv1d`: GPT-2's [in, out] layout."""

    def __init__(self, base, linears: dict[str, ImportedLinear], conv1d: bool = False):
        self.base, self.linears, self.conv1d = base, linears, conv1d
        self._hidden = {t for lin in linears.values() for t in lin.tensors}
        self._weights = {f"{p}.weight": lin for p, lin in linears.items()}

    def names(self) -> list[str]:
        return [n for n in self.base.names() if n not in self._hidden] + list(self._weights)

    def __contains__(self, name: str) -> bool:
        return name in self._weights or (name not in self._hidden and name in self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        lin = self._weights.get(name)
        if lin is None:
            return self.base.shape(name)
        return (lin.k, lin.n) if self.conv1d else (lin.n, lin.k)

    def is_float(self, name: str) -> bool:
        return name in self._weights or self.base.is_float(name)

    def dtype_name(self, name: str) -> str:
        return "F32" if name in self._weights else self.base.dtype_name(name)

    def origin(self, name: str) -> str:
        """How errors name a tensor: a dequantized weight by the tensor it comes from (`p.weight (from p.qweight)`)."""
        lin = self._weights.get(name)
        return f"{name} (dequantized from {lin.tensors[0]})" if lin is not None else name

    def read(self, name: str) -> np.ndarray:
        lin = self._weights.get(name)
        if lin is None:
            return self.base.read(name)
        weight = dequantized(lin)
        return np.ascontiguousarray(weight.T) if self.conv1d else weight

    def read_float32(self, name: str) -> np.ndarray:
        return self.read(name) if name in self._weights else self.base.read_float32(name)


# ------------------------------------------------------------------------------ the import


TENSORRT_GROUPS = (64, 128)


@dataclass
class Import:
    format: QuantFormat
    linears: dict[str, ImportedLinear] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)  # our module -> label, filled by `plan`
    notes: list[str] = field(default_factory=list)
    accuracy_level: int = 4  # MatMulNBits accuracy_level of the imported modules (set by `scheme`)
    requantize: bool = False  # --requantize: TensorRT gets symmetric INT4 requantized from the dequantized weights
    input_scales: dict[str, float] = field(default_factory=dict)  # our module -> static activation scale, by `plan`

    @property
    def record(self) -> dict:
        return {**self.format.record, "modules": len(self.modules)}

    def view(self, checkpoint, conv1d: bool = False) -> QuantizedCheckpoint:
        """The float view of `checkpoint` (tensors of every quantized linear checked from the headers)."""
        self.linears = self.format.linears(checkpoint)
        if not self.linears:
            raise LowbitError(f"{self.format.label} checkpoint without any quantized tensor")
        return QuantizedCheckpoint(checkpoint, self.linears, conv1d)

    def scheme(self, requested: str | None, options, target: str, algorithm, requantize: bool):
        """The scheme the checkpoint implies (name, compute dtype, a provisional plan that `plan` fills in).
        A different --scheme, group/symmetry options or a weight algorithm would requantize: errors."""
        from lowbit.converter.schemes import DTYPES, DEFAULT_ACCURACY_LEVEL, Scheme

        name = self.implied_name()
        what = f"{self.format.label} checkpoint"
        if requested is not None and requested != name:
            raise LowbitError(f"{what} implies scheme {name}; --scheme {requested} would requantize it "
                              "(drop --scheme)")
        given_options = (("group-size", options.group_size is not None),
                         ("symmetric", options.symmetric is not None), ("clip-search", options.clip_search))
        for flag, given in given_options:
            if given:
                raise LowbitError(f"--{flag}: the {what} fixes its own quantization; drop that option")
        if algorithm.name != "rtn":
            raise LowbitError(f"--algo {algorithm.name}: the {what} is already quantized")
        if getattr(algorithm, "smoothquant_alpha", None) is not None:
            raise LowbitError(f"--smoothquant-alpha rescales float weights; the {what} is already quantized")
        if requantize and target != "tensorrt":
            raise LowbitError("--requantize applies to --target tensorrt (which takes symmetric INT4 only)")
        self.accuracy_level = DEFAULT_ACCURACY_LEVEL if options.accuracy_level is None else options.accuracy_level
        self.requantize = requantize
        self.notes.append(f"imported {what}: scheme {name} implied; the checkpoint's integers and scales are "
                          "kept as they are")
        for group, info in self.format.record.get("groups", {}).items():
            if "kept float" in (info.get("activations") or ""):
                self.notes.append(f"config group {group} quantizes activations {info['activations']}")
        return Scheme(name, DTYPES[options.dtype or "float32"], f"imported {what} ({name}), not requantized",
                      QuantPlan(()))

    def implied_name(self) -> str:
        """`w{bits}a16` (integer weights of one width), `w8a16-fp8` (float8 weights), `w8a8-fp8` (float8 weights
        and static float8 activations) or `mixed`."""
        kinds = {("w8a8-fp8" if lin.read_input_scale else "w8a16-fp8") if lin.element else f"w{lin.bits}a16"
                 for lin in self.linears.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def plan(self, graph: ir.Model, weights, scheme, target: str):
        """Our modules <- the checkpoint's linears (through each node's transformers names): act-order
        permutations applied to the graph, a plan with one exact rule per module, the QuantizedWeight loaders."""
        from lowbit.converter.quant.rewrite import weight_sites

        rules, loaders = [], {}
        for site in weight_sites(graph):
            parts = []
            for hf in hf_modules(site.node):
                real = weights.resolve(f"{hf}.weight", required=False)
                prefix = real[: -len(".weight")] if real else None
                parts.append(self.linears.get(prefix))
            if not parts or all(p is None for p in parts):
                continue  # a float module of the checkpoint (embedding, lm_head, modules_to_not_convert)
            if any(p is None for p in parts):
                raise LowbitError(f"{site.module}: fused projections mix quantized and float weights "
                                  f"({', '.join(hf_modules(site.node))})")
            layer, loader, label = self._module(site, parts, scheme.dtype, target)
            rules.append(QuantRule(_literal(site.module), layer))
            if loader is not None:
                loaders[site.module] = loader
            self.modules[site.module] = label
        plan = QuantPlan(tuple(rules) + (QuantRule("*", None),))
        return replace(scheme, plan=plan), loaders

    def _module(self, site, parts: list[ImportedLinear], dtype, target: str):
        first = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size, p.element, p.read_input_scale is None) != \
                    (first.bits, first.group_size, first.element, first.read_input_scale is None):
                raise LowbitError(f"{site.module}: fused projections are quantized differently "
                                  f"({first.prefix}: {_describe(first)}; {p.prefix}: {_describe(p)})")
        perms = [permutation(p) for p in parts]
        if any(not _same(perms[0], q) for q in perms[1:]):
            raise LowbitError(f"{site.module}: fused projections have different act-order permutations (g_idx)")
        perm = perms[0]
        kinds = {zero_kind(p) for p in parts}
        kind = "wide" if "wide" in kinds else "integer" if "integer" in kinds else kinds.pop()
        label = self.format.label + (" act-order" if perm is not None else "")
        if perm is not None:
            _permute_input(site, perm, dtype)
        group = None if first.group_size >= first.k else first.group_size
        if target == "tensorrt" and group is None and first.k in TENSORRT_GROUPS:
            group = first.k  # one group per row is one block of K: TensorRT's blocked INT4
        if target == "tensorrt" and kind != "float8" and not (kind == "centered" and first.bits == 4
                                                              and group in TENSORRT_GROUPS):
            if not self.requantize:
                raise LowbitError(f"target tensorrt takes symmetric INT4 in groups of 64 or 128; {site.module} is "
                                  f"{_describe(first, kind)} (add --requantize to requantize it symmetrically, "
                                  "with the added error reported)")
            g = group if group in TENSORRT_GROUPS else 128
            self.notes.append(f"{site.module}: requantized to 4-bit g{g} symmetric for TensorRT (the added error is "
                              "its max rel err)")
            return LayerQuant(WeightQuant(4, g, "symmetric")), None, label + " requantized"
        static = first.read_input_scale is not None
        layer = layer_quant(kind, first.bits, group, self.accuracy_level, static_activations=static)
        if static:
            # fused projections read one input: the largest of their scales covers each one's range (as vLLM fuses)
            self.input_scales[site.module] = max(p.read_input_scale() for p in parts)

        def load(parts=parts, perm=perm):
            return concat_rows([quantized_weight(p, perm, dtype) for p in parts])

        return layer, load, label

    def tag(self, graph: ir.Model) -> None:
        """Records the source format on each imported module's node (shown by `lowbit inspect`)."""
        for node in graph.graph:
            label = self.modules.get(node.name)
            if label is not None:
                node.metadata_props[IMPORT_METADATA] = label


def layer_quant(kind: str, bits: int, group: int | None, accuracy_level: int,
                static_activations: bool = False) -> LayerQuant:
    """The plan entry whose storage holds the checkpoint's values exactly (float8 weights with static float8
    activations: Q/DQ on the input too, its scale the checkpoint's input_scale, written by `Import.input_scales`)."""
    if kind == "float8" and static_activations:
        return LayerQuant(WeightQuant(8, None, "fp8_e4m3"), format="qdq_fp8_e4m3", activation=static_fp8("e4m3"))
    if kind == "float8":
        return LayerQuant(WeightQuant(8, None, "fp8_e4m3"), format="dq_fp8_e4m3")
    if kind == "centered":
        return LayerQuant(WeightQuant(bits, group, "symmetric"), accuracy_level=accuracy_level)
    if kind == "integer":
        return LayerQuant(WeightQuant(bits, group, "asymmetric"), accuracy_level=accuracy_level)
    # zero point 2^bits: only lowbit's blockwise op (float zero points) holds it
    return LayerQuant(WeightQuant(bits, group, "asymmetric"), format="blockwise", accuracy_level=accuracy_level)


def _describe(linear: ImportedLinear, kind: str | None = None) -> str:
    if linear.element:
        return f"float8 {linear.element}" + (" with static float8 activations" if linear.read_input_scale else "")
    group = "per-channel" if linear.group_size >= linear.k else f"group {linear.group_size}"
    zeros = {"centered": " symmetric", "integer": " asymmetric", "wide": " asymmetric (zero point 2^bits)"}
    return f"{linear.bits}-bit {group}{zeros.get(kind, '')}"


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _literal(module: str) -> str:
    """A plan pattern matching exactly `module` (fnmatch: brackets escape the special characters)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in module)


def _permute_input(site, perm: np.ndarray, dtype) -> None:
    """x @ W.T == x[..., perm] @ W[:, perm].T: a Gather on the node's input, the weight's columns reordered."""
    if site.kind == "gather":
        raise LowbitError(f"{site.module}: act-order (a permuted g_idx) on an embedding table is not supported")
    node, old = site.node, site.weight
    if len(old.uses()) > 1:
        raise LowbitError(f"{site.module}: act-order on a weight shared with another node is not supported")
    graph = node.graph
    index = ir.Value(name=f"{site.module}.act_order", const_value=ir.tensor(perm.astype(np.int64)))
    graph.register_initializer(index)
    gather = ir.node("Gather", [site.x, index], {"axis": -1}, name=f"{site.module}.act_order")
    graph.insert_before(node, gather)
    node.replace_input_with(0, gather.outputs[0])
    tensor = old.const_value
    if site.kind == "matmul":  # W [K, N]; its [N, K] rows come from the checkpoint's loader
        rows = tensor.meta.get(TRANSPOSED_SOURCE) or (lambda: np.asarray(tensor.numpy()).T)
        new = lazy_tensor(old.name, dtype, tuple(tensor.shape), lambda: rows()[:, perm].T,
                          transposed_source=lambda: rows()[:, perm])
    else:  # Gemm(transB=1): W [N, K]
        new = lazy_tensor(old.name, dtype, tuple(tensor.shape), lambda: np.asarray(tensor.numpy())[:, perm])
    graph.initializers.pop(old.name)
    value = ir.Value(name=old.name, shape=old.shape, type=old.type, const_value=new)
    node.replace_input_with(1, value)
    graph.register_initializer(value)
