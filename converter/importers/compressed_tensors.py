"""compressed-tensors checkpoints (llm-compressor's output, `quant_method: compressed-tensors`).

The config's `config_groups` give each group of modules (`targets`: a class name such as `Linear`, a module name,
or `re:` + a regex) its weight arguments (`num_bits`, `type` int/float, `symmetric`, `strategy` tensor/channel/group,
`group_size`); `ignore` lists modules left float; `format` (global, or per group under `mixed-precision`) names the
compressor. Per quantized module `p` (N outputs, K inputs; docs/importers.md cites the library):
- `pack-quantized`: `p.weight_packed` int32 [N, ceil(K * bits / 32)], signed codes + 2^(bits-1) as a dense
  little-endian bitstream along K; `p.weight_shape` [N, K]; asymmetric group/channel zero points
  `p.weight_zero_point` int32 [ceil(N * bits / 32), G] packed the same way along N;
- `int-quantized` / `naive-quantized`: `p.weight` int8 [N, K] signed codes, `p.weight_zero_point` int8;
- `float-quantized` (or `naive-quantized` float weights): `p.weight` float8_e4m3fn [N, K];
- `p.weight_scale` [N, G] (group), [N, 1] (channel) or [1] (tensor); `p.weight_g_idx` [K] (older group act-order).
weight = (q - zero_point) * scale, q and zero_point signed; here as unsigned codes q + 2^(bits-1).

float8 weights are stored as they are (DequantizeLinear from float8 e4m3, `dq_fp8_e4m3`). Static float8
activations per tensor (`input_activations` float 8-bit, strategy tensor, not dynamic; llm-compressor's FP8 preset)
are reproduced: `p.input_scale` [1] becomes the scale of the input's QuantizeLinear/DequantizeLinear (`qdq_fp8_e4m3`,
the largest one where q/k/v or gate/up are fused); other activation quantization (dynamic per token, as FP8_DYNAMIC
and W8A8; integer) is recorded and the activations stay float.
"""

from __future__ import annotations

import re

import numpy as np

from lowbit.converter.importers import (
    ImportedLinear,
    QuantFormat,
    float_array,
    register_importer,
    require_dtype,
    require_shape,
)
from lowbit.converter.importers.bitstream import unpack_dense
from lowbit.errors import LowbitError

FORMATS_SUPPORTED = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
STRATEGIES = ("tensor", "channel", "group")


@register_importer("compressed-tensors")
def compressed_tensors(config: dict, where: str) -> QuantFormat:
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise LowbitError(f"{where}: config_groups must be a non-empty object")
    default_format = config.get("format")
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise LowbitError(f"{where}: quantization_status {status!r} (a compressed checkpoint is 'compressed')")
    schemes = []
    for name, group in groups.items():
        schemes.append(_scheme(name, group, default_format, where))
    ignore = config.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise LowbitError(f"{where}: ignore must be a list of module names")
    formats = sorted({s["format"] for s in schemes})
    record = {"format": "compressed-tensors", "version": config.get("version"), "formats": formats,
              "groups": {s["name"]: {k: s[k] for k in ("bits", "type", "symmetric", "strategy", "group_size",
                                                       "format", "activations")} for s in schemes},
              "ignore": ignore, "config": where}
    return QuantFormat("compressed-tensors", f"compressed-tensors {'+'.join(formats)}", record,
                       lambda checkpoint: _linears(checkpoint, schemes, ignore))


def _scheme(name: str, group, default_format, where: str) -> dict:
    if not isinstance(group, dict):
        raise LowbitError(f"{where}: config group {name} must be an object")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise LowbitError(f"{where}: config group {name} quantizes no weights (weight-only imports)")
    fmt = group.get("format") or default_format
    if fmt not in FORMATS_SUPPORTED:
        raise LowbitError(f"{where}: config group {name}: format {fmt!r} is not supported "
                          f"(known: {', '.join(FORMATS_SUPPORTED)})")
    bits, kind = weights.get("num_bits"), weights.get("type", "int")
    strategy, group_size = weights.get("strategy"), weights.get("group_size")
    symmetric = weights.get("symmetric", True)
    if kind == "int" and bits not in range(2, 9):
        raise LowbitError(f"{where}: config group {name}: {bits!r}-bit integer weights are not supported (2..8)")
    if kind == "float" and bits != 8:
        raise LowbitError(f"{where}: config group {name}: {bits!r}-bit float weights are not supported (float8)")
    if kind not in ("int", "float"):
        raise LowbitError(f"{where}: config group {name}: weight type {kind!r} is not supported")
    if strategy not in STRATEGIES or (kind == "float" and strategy == "group"):
        raise LowbitError(f"{where}: config group {name}: strategy {strategy!r} is not supported "
                          f"({'tensor, channel' if kind == 'float' else ', '.join(STRATEGIES)})")
    if strategy == "group" and (not isinstance(group_size, int) or group_size < 1):
        raise LowbitError(f"{where}: config group {name}: group_size must be positive, got {group_size!r}")
    if fmt == ("pack-quantized" if kind == "float" else "float-quantized") or (kind, fmt) == ("float", "int-quantized"):
        raise LowbitError(f"{where}: config group {name}: {kind} weights cannot be stored as {fmt}")
    if kind == "float" and not symmetric:
        raise LowbitError(f"{where}: config group {name}: asymmetric float8 weights are not supported")
    targets = group.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise LowbitError(f"{where}: config group {name}: targets must be a list of names")
    return {"name": name, "format": fmt, "bits": bits, "type": kind, "symmetric": bool(symmetric),
            "strategy": strategy, "group_size": group_size if strategy == "group" else None, "targets": targets,
            "activations": _activations(name, group.get("input_activations"), kind, where)}


def _activations(name: str, args, weight_type: str, where: str) -> str | None:
    """`static fp8` (float8 e4m3 per tensor with a stored `input_scale`, reproduced as Q/DQ with that scale), a
    description of activation quantization that stays float here (dynamic, or integer), or None."""
    if args is None:
        return None
    if not isinstance(args, dict):
        raise LowbitError(f"{where}: config group {name}: input_activations must be an object")
    kind, bits, strategy = args.get("type", "int"), args.get("num_bits"), args.get("strategy")
    dynamic = args.get("dynamic", False)
    if (kind, bits, strategy, dynamic, args.get("symmetric", True), weight_type) == \
            ("float", 8, "tensor", False, True, "float"):
        return STATIC_FP8
    mode = "dynamic" if dynamic else "static"
    return f"{kind}{bits} {mode} per-{strategy} (activations kept float)"


STATIC_FP8 = "fp8 static per-tensor"


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == "Linear"  # the class name every quantized linear has


def _linears(checkpoint, schemes: list[dict], ignore: list[str]) -> dict[str, ImportedLinear]:
    linears = {}
    for name in checkpoint.names():
        if not name.endswith(".weight_scale"):
            continue
        prefix = name[: -len(".weight_scale")]
        if any(_matches(prefix, t) for t in ignore if t != "Linear"):
            continue
        scheme = next((s for s in schemes if any(_matches(prefix, t) for t in s["targets"])), None)
        if scheme is None:
            raise LowbitError(f"tensor {name}: no config group targets module {prefix}")
        linears[prefix] = _linear(checkpoint, prefix, scheme)
    return linears


def _linear(checkpoint, prefix: str, s: dict) -> ImportedLinear:
    bits, offset = s["bits"], 2 ** (s["bits"] - 1)
    scale_name, zp_name, g_idx_name = f"{prefix}.weight_scale", f"{prefix}.weight_zero_point", f"{prefix}.weight_g_idx"
    if s["format"] == "pack-quantized":
        packed, shape_name = f"{prefix}.weight_packed", f"{prefix}.weight_shape"
        for t in (packed, shape_name):
            if t not in checkpoint:
                raise LowbitError(f"checkpoint has no tensor {t} (pack-quantized stores weight_packed, weight_shape "
                                  "and weight_scale)")
        require_dtype(checkpoint, packed, ("I32",))
        n, k = (int(v) for v in np.asarray(checkpoint.read(shape_name)).reshape(-1)[:2])
        words = checkpoint.shape(packed)[-1]
        dense = -(-k * bits // 32)
        legacy = -(-k // (32 // bits))  # older releases: 32 // bits codes a word, the rest of it unused
        if tuple(checkpoint.shape(packed)) not in ((n, dense), (n, legacy)):
            raise LowbitError(f"tensor {packed}: shape {list(checkpoint.shape(packed))}, expected [{n}, {dense}] "
                              f"({n} x {k} {bits}-bit codes, weight_shape)")
        per_word = None if words == dense else 32 // bits

        def read_codes():
            words_array = checkpoint.read(packed)
            if per_word is None:
                return unpack_dense(words_array, bits, k, axis=1)
            return _unpack_sparse(words_array, bits, per_word, k)

        tensors = [packed, shape_name]
    else:
        weight = f"{prefix}.weight"
        if weight not in checkpoint:
            raise LowbitError(f"checkpoint has no tensor {weight} ({s['format']})")
        shape = tuple(checkpoint.shape(weight))
        if len(shape) != 2:
            raise LowbitError(f"tensor {weight}: shape {list(shape)} is not a matrix")
        n, k = shape
        require_dtype(checkpoint, weight, ("F8_E4M3",) if s["type"] == "float" else ("I8",))

        def read_codes():
            values = checkpoint.read(weight)
            if s["type"] == "float":
                return values.view(np.uint8)
            return (values.astype(np.int16) + offset).astype(np.uint8)

        tensors = [weight]
    if scale_name not in checkpoint:
        raise LowbitError(f"checkpoint has no tensor {scale_name}")
    group = s["group_size"] if s["strategy"] == "group" else k
    groups = -(-k // group)
    scale_shape = tuple(checkpoint.shape(scale_name))
    expected = {"group": [(n, groups)], "channel": [(n, 1)], "tensor": [(1,), (), (1, 1)]}[s["strategy"]]
    if scale_shape not in expected:
        raise LowbitError(f"tensor {scale_name}: shape {list(scale_shape)}, expected {list(expected[0])} "
                          f"({s['strategy']} scales of a {n} x {k} weight)")
    tensors.append(scale_name)

    def read_scales():
        return np.broadcast_to(float_array(checkpoint, scale_name).reshape(-1, groups), (n, groups))

    symmetric_zeros = s["symmetric"] or zp_name not in checkpoint
    if not s["symmetric"] and zp_name not in checkpoint:
        raise LowbitError(f"checkpoint has no tensor {zp_name} (asymmetric weights store zero points)")
    if not symmetric_zeros:
        tensors.append(zp_name)
        zp_packed = s["format"] == "pack-quantized" and s["strategy"] != "tensor" and \
            checkpoint.dtype_name(zp_name) == "I32"
        if zp_packed:
            require_shape(checkpoint, zp_name, (-(-n * bits // 32), groups), f"{n} packed {bits}-bit zero points")
        elif int(np.prod(checkpoint.shape(zp_name))) not in (n * groups, 1):
            raise LowbitError(f"tensor {zp_name}: shape {list(checkpoint.shape(zp_name))} does not match its scales")

    def read_zeros():
        if s["type"] == "float":
            return np.zeros((n, 1), np.int16)
        if symmetric_zeros:
            return np.full((n, groups), offset, np.int16)
        raw = checkpoint.read(zp_name)
        if zp_packed:
            return unpack_dense(raw, bits, n, axis=0).astype(np.int16)  # already offset by 2^(bits-1)
        signed = np.broadcast_to(np.asarray(raw).reshape(-1, groups), (n, groups))
        return np.rint(signed.astype(np.float32)).astype(np.int16) + offset

    def read():
        return np.ascontiguousarray(read_codes()), read_scales(), read_zeros()

    read_g_idx = None
    if g_idx_name in checkpoint:
        tensors.append(g_idx_name)
        read_g_idx = lambda: checkpoint.read(g_idx_name).astype(np.int64)  # noqa: E731
    element = "e4m3" if s["type"] == "float" else None
    read_input_scale = None
    if s["activations"] == STATIC_FP8:
        input_scale = f"{prefix}.input_scale"
        if input_scale not in checkpoint:
            raise LowbitError(f"checkpoint has no tensor {input_scale} (static float8 activations store one)")
        if int(np.prod(checkpoint.shape(input_scale))) != 1:
            raise LowbitError(f"tensor {input_scale}: shape {list(checkpoint.shape(input_scale))}, expected one value "
                              "(per-tensor activations)")
        tensors.append(input_scale)

        def read_input_scale():
            value = float(float_array(checkpoint, input_scale).reshape(-1)[0])
            if not (np.isfinite(value) and value > 0):
                raise LowbitError(f"tensor {input_scale}: {value} is not a positive scale")
            return value

    return ImportedLinear(prefix, n, k, bits, group, read, read_zeros, tuple(tensors), read_g_idx, element,
                          read_input_scale)


def _unpack_sparse(words: np.ndarray, bits: int, per_word: int, k: int) -> np.ndarray:
    """Older pack-quantized: `per_word` codes a word along the last axis, value j at bit j * bits."""
    lines = np.asarray(words).astype("<i4", copy=False).view("<u4")
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    values = (lines[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return values.reshape(*lines.shape[:-1], -1)[..., :k].astype(np.uint8)
