"""`lowbit convert MODEL -o OUT --recipe R.yaml --emit compressed-tensors`: the quantized checkpoint as
compressed-tensors safetensors (what llm-compressor saves and vLLM serves), in `OUT/compressed-tensors/`.

Every tensor of the source checkpoint is written under its own name, except the weights of the linears the recipe
quantizes, which become their config group's compressed parameters (`FORMATS`, by compressed-tensors format name):

- `pack-quantized` (integer weights, float activations): `weight_packed` int32 [N, ceil(K·bits/32)] (codes + 2^(b−1)
  as a dense little-endian bitstream along K), `weight_scale` [N, G] / [N, 1], `weight_shape` [N, K], and for
  asymmetric weights `weight_zero_point` packed the same way along N;
- `int-quantized` / `naive-quantized` (integer weights with integer activations): `weight` int8 [N, K],
  `weight_scale`, `weight_zero_point` int8 for asymmetric weights;
- `float-quantized` (FP8 e4m3 weights): `weight` float8_e4m3fn [N, K], `weight_scale` [N, 1] or [1];
- `nvfp4-pack-quantized`: `weight_packed` uint8 [N, K / 2], `weight_scale` float8_e4m3fn [N, K / 16],
  `weight_global_scale` [1];
- static activations add `input_scale` [1] (and `input_zero_point` int8 [1] where asymmetric: ONNX Runtime's
  uint8 zero point z as z − 128, the same (q − z)·s); NVFP4 activations (tensor_group, dynamic local) add
  `input_global_scale` float32 [1], the calibrated gs the graph holds.

The integers and scales are read back from the written model.onnx (`graph_weights`), after calibration: exactly
what the graph computes with (round to nearest, GPTQ, AWQ alike), with fused q/k/v and gate/up split back into the
transformers modules each node records (`lowbit.hf_modules`). Float tensors that the conversion changed (AWQ and
SmoothQuant fold their scales into norm weights and into rows of the linear before) are written as the graph holds
them, in the graph's dtype, less the norm offset the graph adds (Gemma's 1 + w); the others are the source's bytes.
One tensor is read at a time (safetensors_writer). config.json carries the recipe's `quantization_config` with
`quantization_status: compressed`; the tokenizer files are copied. Architectures whose checkpoint stores Conv1D
([in, out]) weights, quantized embeddings and a quantized lm_head tied to the embedding are one-line errors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.affine import QuantizedWeight
from lowbit.converter.emit import EmitContext
from lowbit.converter.emit.graph_weights import read_activation, read_input_global_scale, read_weight
from lowbit.converter.emit.safetensors_writer import SafetensorsWriter
from lowbit.converter.graph import hf_modules
from lowbit.converter.importers.bitstream import pack_dense
from lowbit.errors import LowbitError

FOLDER = "compressed-tensors"
STATUS = "compressed"
FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
         "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def check(recipe_given: bool) -> None:
    if not recipe_given:
        raise LowbitError("--emit compressed-tensors needs --recipe (the checkpoint's config groups are the "
                          "recipe's; a --scheme has no compressed-tensors config here)")


# ------------------------------------------------------------------------------ formats


@dataclass(frozen=True)
class CompressedFormat:
    """One compressed-tensors format: a module's compressed weight parameters (local names, as its compressor
    stores them) from the graph's QuantizedWeight rows of that module and the group's `weights` arguments."""

    name: str
    weight: Callable[[QuantizedWeight, dict, str], dict[str, np.ndarray]]


FORMATS: dict[str, CompressedFormat] = {}


def register_format(*names: str):
    def wrap(fn):
        for name in names:
            FORMATS[name] = CompressedFormat(name, fn)
        return fn

    return wrap


def _grid(qw: QuantizedWeight, args: dict, module: str):
    """(signed codes int16 [N, K], scales, signed zero points int16) on compressed-tensors' grid for `args`:
    scales [N, G] (group), [N, 1] (channel) or [1] (tensor)."""
    bits, strategy = args["num_bits"], args.get("strategy")
    k = qw.k
    if qw.element is None and qw.bits != bits:  # e.g. 2-bit codes stored as 4-bit ones: shift back
        shift = 2 ** (qw.bits - 1) - 2 ** (bits - 1)
        qw = replace(qw, codes=qw.codes - np.uint8(shift), zero_points=qw.zero_points - np.uint8(shift), bits=bits)
    offset = 0 if qw.element is not None else 2 ** (bits - 1)
    codes = qw.codes[:, :k].astype(np.int16) - offset
    scales, zeros = qw.scales, qw.zero_points.astype(np.int16) - offset
    if strategy == "group":
        g = args["group_size"]
        if k % g:
            raise LowbitError(f"{module}: K={k} is not a multiple of the group size {g}, which compressed-tensors "
                              "requires")
        if qw.group_size != g:
            raise LowbitError(f"{module}: the graph stores groups of {qw.group_size}, the config says {g}")
        return codes, scales, zeros
    keep = (slice(None), slice(0, 1))
    if not (np.array_equal(scales, np.repeat(scales[keep], scales.shape[1], 1)) and
            np.array_equal(zeros, np.repeat(zeros[keep], zeros.shape[1], 1))):
        raise LowbitError(f"{module}: the graph's scales differ within a row, not per {strategy}")
    scales, zeros = scales[keep], zeros[keep]
    if strategy == "tensor":
        if np.unique(scales).size != 1 or np.unique(zeros).size != 1:
            raise LowbitError(f"{module}: the graph's scales differ between rows, not per tensor")
        scales, zeros = scales[:1, 0], zeros[:1, 0]
    return codes, np.ascontiguousarray(scales), zeros


def _zero_points(zeros: np.ndarray, args: dict, module: str) -> np.ndarray | None:
    """None for symmetric weights (whose zero points must be 0 then), else the signed zero points."""
    if args.get("symmetric", True):
        if np.any(zeros):
            raise LowbitError(f"{module}: symmetric weights with nonzero zero points in the graph")
        return None
    return zeros


def _pack_rows(values: np.ndarray, bits: int, axis: int = 1) -> np.ndarray:
    """compressed-tensors' pack_to_int32: unsigned values (< 2^bits) as a dense little-endian bitstream of int32
    words along `axis`, ceil(count · bits / 32) per line."""
    if 32 % bits:
        return pack_dense(values, bits, axis)
    lines = np.moveaxis(np.asarray(values, np.uint32), axis, -1)
    per, count = 32 // bits, lines.shape[-1]
    padded = np.zeros((*lines.shape[:-1], -(-count // per) * per), np.uint32)
    padded[..., :count] = lines
    grouped = padded.reshape(*lines.shape[:-1], -1, per)
    words = grouped[..., 0].copy()
    for j in range(1, per):
        words |= grouped[..., j] << np.uint32(bits * j)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


@register_format("pack-quantized")
def _pack_quantized(qw: QuantizedWeight, args: dict, module: str) -> dict[str, np.ndarray]:
    if qw.element is not None or args.get("type") != "int":
        raise LowbitError(f"{module}: pack-quantized stores integer weights")
    bits = args["num_bits"]
    codes, scales, zeros = _grid(qw, args, module)
    out = {"weight_packed": _pack_rows(codes + 2 ** (bits - 1), bits), "weight_scale": scales,
           "weight_shape": np.array(codes.shape, np.int64)}
    zeros = _zero_points(zeros, args, module)
    if zeros is not None:
        out["weight_zero_point"] = _pack_rows(zeros + 2 ** (bits - 1), bits, axis=0)
    return out


@register_format("int-quantized", "naive-quantized", "float-quantized")
def _naive_quantized(qw: QuantizedWeight, args: dict, module: str) -> dict[str, np.ndarray]:
    codes, scales, zeros = _grid(qw, args, module)
    if args.get("type") == "float":
        if qw.element != "e4m3" or args["num_bits"] != 8:
            raise LowbitError(f"{module}: compressed-tensors' float weights are float8 e4m3, not {qw.element}")
        weight = codes.astype(np.uint8).view(ml_dtypes.float8_e4m3fn)
    elif qw.element is None:
        weight = codes.astype(np.int8)
    else:
        raise LowbitError(f"{module}: float8 weights in an integer config group")
    out = {"weight": weight, "weight_scale": scales}
    zeros = _zero_points(zeros, args, module)
    if zeros is not None:
        out["weight_zero_point"] = zeros.astype(np.int8)
    return out


@register_format("nvfp4-pack-quantized")
def _nvfp4_pack_quantized(qw, args: dict, module: str) -> dict[str, np.ndarray]:
    """FP4 e2m1 codes two a byte (`weight_packed` uint8 [N, K / 2], column 2j in the low nibble), FP8 e4m3
    `weight_scale` [N, K / 16] and `weight_global_scale` [1]: values e2m1 · scale / global scale, as lowbit.nvfp4."""
    from lowbit import nvfp4

    k = qw.scales.shape[1] * args.get("group_size", nvfp4.GROUP)
    if not hasattr(qw, "global_scale") or k != qw.codes.shape[1] or args.get("group_size") != nvfp4.GROUP:
        raise LowbitError(f"{module}: nvfp4-pack-quantized stores NVFP4 weights in groups of {nvfp4.GROUP} "
                          "along a K that they divide")
    return {"weight_packed": nvfp4.pack(qw.codes), "weight_scale": qw.scales,
            "weight_global_scale": np.array([qw.global_scale], np.float32)}


def _activation_params(activation, args: dict | None, module: str, global_scale=None) -> dict[str, np.ndarray]:
    if args and args.get("strategy") == "tensor_group" and args.get("dynamic") == "local":
        if global_scale is None:
            raise LowbitError(f"{module}: the config has NVFP4 input activations, the graph no input global scale")
        return {"input_global_scale": global_scale}
    if not args or args.get("dynamic", False) is not False:
        return {}
    if activation is None:
        raise LowbitError(f"{module}: the config has static input activations, the graph no input scale")
    scale, zero_point = activation
    out = {"input_scale": scale}
    if not args.get("symmetric", True):
        out["input_zero_point"] = np.array([zero_point], np.int8)
    elif zero_point:
        raise LowbitError(f"{module}: symmetric input activations with zero point {zero_point} in the graph")
    return out


# ------------------------------------------------------------------------------ the checkpoint


def _rows(qw, start: int, stop: int):
    """Rows start:stop of a QuantizedWeight (or NVFP4Weight)."""
    fields = [f for f in ("codes", "scales", "zero_points") if hasattr(qw, f)]
    return replace(qw, **{f: getattr(qw, f)[start:stop] for f in fields})


def _initializer(model: ir.Model, name: str) -> Callable[[], np.ndarray] | None:
    value = model.graph.initializers.get(name)
    return None if value is None or value.const_value is None else value.const_value.numpy


def _tensors(model: ir.Model, module: str) -> Callable[[str], np.ndarray | None]:
    """The node's initializers `{module}.{suffix}` (its format's parts) as numpy, or None."""

    def tensor(suffix: str) -> np.ndarray | None:
        load = _initializer(model, f"{module}.{suffix}")
        return None if load is None else load()

    return tensor


def _parts(weights, node: ir.Node) -> list[tuple[str, str | None, int]]:
    """(transformers module, its weight's name in the checkpoint or None, its rows) per part of a node."""
    checkpoint, conv1d = weights.checkpoint, weights.names.conv1d
    parts = []
    for module in hf_modules(node):
        real = weights.resolve(f"{module}.weight", required=False)
        rows = None if real is None else checkpoint.shape(real)[1 if conv1d else 0]
        parts.append((module, real, rows))
    return parts


def _graph_floats(model: ir.Model, weights, spec) -> dict[str, tuple[Callable[[], np.ndarray], float]]:
    """Checkpoint tensor -> (the graph's value of it, the offset the graph added): float linear weights (from the
    graph's [K, N] / [N, K] initializers), linear biases, embeddings and norms."""
    found: dict[str, tuple[Callable[[], np.ndarray], float]] = {}
    conv1d = weights.names.conv1d
    for node in model.graph:
        parts = _parts(weights, node)
        if not parts or any(real is None for _, real, _ in parts):
            continue
        starts = np.cumsum([0] + [rows for _, _, rows in parts])
        bias = _initializer(model, f"{node.name}.bias")
        quantized = "lowbit.format" in node.metadata_props
        weight_input = node.inputs[0] if node.op_type == "Gather" else node.inputs[1] if len(node.inputs) > 1 else None
        weight = None if quantized or weight_input is None or weight_input.const_value is None or conv1d \
            else weight_input.const_value.numpy
        k_major = node.op_type == "MatMul"
        for (module, real, _), start, stop in zip(parts, starts[:-1], starts[1:]):
            if weight is not None:
                found[real] = ((lambda w=weight, a=start, b=stop: w()[:, a:b].T) if k_major else
                               (lambda w=weight, a=start, b=stop: w()[a:b]), 0.0)
            bias_name = weights.resolve(f"{module}.bias", required=False)
            if bias is not None and bias_name is not None:
                found[bias_name] = (lambda v=bias, a=start, b=stop: v()[a:b], 0.0)
    names, offset = weights.names, spec.norm_weight_offset
    norms = [("final_norm", names.final_norm, None, offset)]
    for i in range(spec.num_layers):
        norms += [(f"layers.{i}.attn_norm", names.attn_norm, i, offset), (f"layers.{i}.mlp_norm", names.mlp_norm, i,
                                                                          offset),
                  (f"layers.{i}.post_attn_norm", names.post_attn_norm, i, offset),
                  (f"layers.{i}.post_mlp_norm", names.post_mlp_norm, i, offset),
                  (f"layers.{i}.attn.q_norm", names.q_norm, i, 0.0), (f"layers.{i}.attn.k_norm", names.k_norm, i, 0.0)]
    for graph_name, template, layer, norm_offset in norms:
        if template is None:
            continue
        for suffix, added in (("weight", norm_offset), ("bias", 0.0)):
            load = _initializer(model, f"{graph_name}.{suffix}")
            real = weights.resolve(f"{template.format(i=layer)}.{suffix}", required=False)
            if load is not None and real is not None:
                found[real] = (load, added)
    return found


def _config(context: EmitContext, renames: dict[str, str]) -> dict:
    config = json.loads((context.staging / "config.json").read_text())
    quant = json.loads(json.dumps(context.quantization_config))
    quant["quantization_status"] = STATUS
    for group in quant["config_groups"].values():
        group["targets"] = [renames.get(t, t) for t in group["targets"]]
    quant["ignore"] = [renames.get(t, t) for t in quant.get("ignore", [])]
    config["quantization_config"] = quant
    return config


def write(context: EmitContext) -> dict:
    weights, spec = context.weights, context.spec
    checkpoint = weights.checkpoint
    groups = {module: group for group in context.quantization_config["config_groups"].values()
              for module in group["targets"]}
    folder = context.staging / FOLDER
    folder.mkdir()
    model = ir.load(context.staging / "model.onnx")
    writer = SafetensorsWriter(folder)
    replaced, renames, modules = set(), {}, 0
    for node in model.graph:
        fmt = node.metadata_props.get("lowbit.format")
        parts = _parts(weights, node) if fmt is not None else []
        if not parts:
            continue
        if node.op_type in ("Gather", "GatherBlockQuantized", "GatherBlockwise"):
            raise LowbitError(f"{node.name}: quantized embeddings are not written as compressed-tensors (add "
                              "Embedding modules to the recipe's ignore)")
        if weights.names.conv1d:
            raise LowbitError(f"{spec.model_type}: the checkpoint stores Conv1D [in, out] weights; compressed-tensors "
                              "compresses Linear modules")
        for module, real, _ in parts:
            if real is None:
                raise LowbitError(f"{module}: has no weight of its own in the checkpoint (tied to the embedding); "
                                  "add it to the recipe's ignore to write compressed-tensors")
            if module not in groups:
                raise LowbitError(f"{module}: quantized in the graph, but no config group targets it")
        first = groups[parts[0][0]]["weights"]
        tensor = _tensors(model, node.name)
        qw = read_weight(fmt, node, tensor, first.get("group_size") if first.get("strategy") == "group" else None)
        activation = read_activation(node.name, tensor)
        input_global_scale = read_input_global_scale(node.name, tensor)
        start = 0
        for module, real, rows in parts:
            group = groups[module]
            if group["format"] not in FORMATS:
                raise LowbitError(f"{module}: compressed-tensors format {group['format']} is not written yet "
                                  f"(written: {', '.join(FORMATS)})")
            arrays = FORMATS[group["format"]].weight(_rows(qw, start, start + rows), group["weights"], module)
            arrays.update(_activation_params(activation, group.get("input_activations"), module, input_global_scale))
            prefix = real[: -len(".weight")]
            renames[module] = prefix
            for local, array in arrays.items():
                writer.add(f"{prefix}.{local}", array)
            replaced.add(real)
            modules += 1
            start += rows
        if start != qw.codes.shape[0]:
            raise LowbitError(f"{node.name}: {qw.codes.shape[0]} rows in the graph, {start} in its transformers "
                              "modules")
        del qw
    floats = _graph_floats(model, weights, spec)
    changed = []
    for name in checkpoint.names():
        if name in replaced:
            continue
        array = checkpoint.read(name)
        graph = floats.get(name)
        if graph is not None:
            load, offset = graph
            value = np.asarray(load())
            expected = (array.astype(np.float32) + np.float32(offset)).astype(value.dtype)
            if value.shape != array.shape:
                raise LowbitError(f"{name}: shape {list(array.shape)} in the checkpoint, {list(value.shape)} in "
                                  "the graph")
            if not np.array_equal(expected, value):  # scaled by AWQ / SmoothQuant: as the graph computes with it
                array = (value.astype(np.float32) - np.float32(offset)).astype(value.dtype) if offset else value
                changed.append(name)
        writer.add(name, array)
    files = writer.close()
    renames = {m: p for m, p in renames.items() if m != p}
    (folder / "config.json").write_text(json.dumps(_config(context, renames), indent=2))
    for name in FILES:
        if (context.staging / name).is_file():
            shutil.copy2(context.staging / name, folder / name)
    return {"format": "compressed-tensors", "folder": FOLDER, "files": files, "quantized_modules": modules,
            "from_graph": changed}
