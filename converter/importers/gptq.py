"""GPTQ checkpoints: AutoGPTQ / Optimum (v1) and GPTQModel (`checkpoint_format` or `format`: `gptq_v2`).

Per quantized linear `p` (N outputs, K inputs, G = ceil(K / group_size) groups; docs/importers.md cites the code):
- `p.qweight` int32 [K * bits / 32, N]: codes packed along K, a dense little-endian bitstream (value k at bit
  k * bits of its column; 2/4/8 bits: 32 / bits codes a word; 3 bits straddle words);
- `p.qzeros` int32 [G, N * bits / 32]: zero points packed the same way along N; v1 stores zero - 1 (so the
  kernels add 1 back: a stored 2^bits - 1 means 2^bits), v2 the zero point itself;
- `p.scales` float16 [G, N]; `p.g_idx` int32 [K] (optional): the group of each input column; `p.bias`.
weight[n, k] = scales[g, n] * (qweight[k, n] - zero[g, n]) with g = g_idx[k].
"""

from __future__ import annotations

import numpy as np

from lowbit.converter.importers import (
    ImportedLinear,
    QuantFormat,
    config_bool,
    config_int,
    float_array,
    register_importer,
    require,
    require_dtype,
    require_shape,
)
from lowbit.converter.importers.bitstream import unpack_dense
from lowbit.errors import LowbitError

BITS = (2, 3, 4, 8)
VERSIONS = {"gptq": 1, "gptq_v2": 2}


@register_importer("gptq")
def gptq(config: dict, where: str) -> QuantFormat:
    bits = config_int(config, "bits", where, allowed=BITS)
    group = config_int(config, "group_size", where, default=-1)
    if group != -1 and group < 1:
        raise LowbitError(f"{where}: group_size must be -1 (per channel) or positive, got {group}")
    desc_act = config_bool(config, "desc_act", where, False)
    sym = config_bool(config, "sym", where, True)
    fmt = config.get("checkpoint_format", config.get("format")) or "gptq"
    if fmt not in VERSIONS:
        raise LowbitError(f"{where}: checkpoint format {fmt!r} is not supported (known: {', '.join(VERSIONS)})")
    pack_dtype = config.get("pack_dtype", "int32")
    if pack_dtype not in ("int32", "torch.int32"):
        raise LowbitError(f"{where}: pack_dtype {pack_dtype!r} is not supported (int32 only)")
    if config.get("dynamic"):
        raise LowbitError(f"{where}: per-module overrides (dynamic) are not supported")
    version = VERSIONS[fmt]
    record = {"format": "gptq", "version": version, "bits": bits, "group_size": group, "desc_act": desc_act,
              "sym": sym, "config": where}
    return QuantFormat("gptq", f"gptq v{version}", record,
                       lambda checkpoint: _linears(checkpoint, bits, group, version == 1))


def _linears(checkpoint, bits: int, group: int, minus_one: bool) -> dict[str, ImportedLinear]:
    linears = {}
    for name in checkpoint.names():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            linears[prefix] = _linear(checkpoint, prefix, bits, group, minus_one)
    return linears


def _linear(checkpoint, prefix: str, bits: int, group: int, minus_one: bool) -> ImportedLinear:
    qweight, qzeros, scales, g_idx = (f"{prefix}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx"))
    rows, n = _matrix(checkpoint, qweight)
    require_dtype(checkpoint, qweight, ("I32",))
    scale_shape = require(checkpoint, scales, "GPTQ stores qweight, qzeros and scales")
    require(checkpoint, qzeros, "GPTQ stores qweight, qzeros and scales")
    if g_idx in checkpoint:
        k = int(np.prod(checkpoint.shape(g_idx)))
    elif rows * 32 % bits == 0:
        k = rows * 32 // bits
    else:
        raise LowbitError(f"tensor {qweight}: {rows} rows do not hold a whole number of {bits}-bit columns")
    if rows != -(-k * bits // 32):
        raise LowbitError(f"tensor {qweight}: shape {[rows, n]} does not hold K = {k} {bits}-bit values per column "
                          f"(expected {-(-k * bits // 32)} rows)")
    g = k if group == -1 else group
    groups = -(-k // g)
    if len(scale_shape) != 2 or scale_shape[1] != n:
        raise LowbitError(f"tensor {scales}: shape {list(scale_shape)}, expected [{groups}, {n}] (qweight has N = {n})")
    require_shape(checkpoint, scales, (groups, n), f"K = {k}, group size {g}")
    require_shape(checkpoint, qzeros, (groups, -(-n * bits // 32)), f"{groups} groups of {n} {bits}-bit zero points")
    require_dtype(checkpoint, qzeros, ("I32",))
    shift = 1 if minus_one else 0

    def read_zeros():
        return unpack_dense(checkpoint.read(qzeros), bits, n, axis=1).T.astype(np.int16) + shift

    def read():
        codes = unpack_dense(checkpoint.read(qweight), bits, k, axis=0).T
        return np.ascontiguousarray(codes), float_array(checkpoint, scales).T, read_zeros()

    read_g_idx = (lambda: checkpoint.read(g_idx).astype(np.int64)) if g_idx in checkpoint else None
    tensors = tuple(t for t in (qweight, qzeros, scales, g_idx) if t in checkpoint)
    return ImportedLinear(prefix, n, k, bits, g, read, read_zeros, tensors, read_g_idx)


def _matrix(checkpoint, name: str) -> tuple[int, int]:
    shape = tuple(checkpoint.shape(name))
    if len(shape) != 2:
        raise LowbitError(f"tensor {name}: shape {list(shape)} is not a matrix")
    return shape
