"""AWQ checkpoints in AutoAWQ's GEMM layout (`version: gemm`; transformers' AwqConfig).

Per quantized linear `p` (N outputs, K inputs, G = K / group_size; docs/importers.md cites the code):
- `p.qweight` int32 [K, N / 8]: 4-bit codes packed along N, eight to a word, nibble j (bits 4j..4j+3) holding
  column `AWQ_ORDER[j]` of its eight, AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7];
- `p.qzeros` int32 [G, N / 8]: zero points packed the same way (stored as they are);
- `p.scales` float16 [G, N]; `p.bias`.
weight[n, k] = scales[k // group_size, n] * (code[k, n] - zero[k // group_size, n]).
"""

from __future__ import annotations

import numpy as np

from lowbit.converter.importers import (
    ImportedLinear,
    QuantFormat,
    config_bool,
    float_array,
    register_importer,
    require,
    require_dtype,
    require_shape,
)
from lowbit.converter.importers.bitstream import interleave_unpack
from lowbit.errors import LowbitError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@register_importer("awq")
def awq(config: dict, where: str) -> QuantFormat:
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4 or isinstance(bits, bool):
        raise LowbitError(f"{where}: AWQ GEMM checkpoints are 4-bit, got bits {bits!r}")
    group = config.get("group_size", config.get("q_group_size", 128))
    if not isinstance(group, int) or isinstance(group, bool) or (group != -1 and group < 1):
        raise LowbitError(f"{where}: group_size must be -1 (per channel) or positive, got {group!r}")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise LowbitError(f"{where}: AWQ version {version!r} is not supported (gemm only)")
    zero_point = config_bool(config, "zero_point", where, True)
    record = {"format": "awq", "version": version, "bits": 4, "group_size": group, "zero_point": zero_point,
              "config": where}
    return QuantFormat("awq", "awq gemm", record, lambda checkpoint: _linears(checkpoint, group))


def _linears(checkpoint, group: int) -> dict[str, ImportedLinear]:
    return {name[: -len(".qweight")]: _linear(checkpoint, name[: -len(".qweight")], group)
            for name in checkpoint.names() if name.endswith(".qweight")}


def _linear(checkpoint, prefix: str, group: int) -> ImportedLinear:
    qweight, qzeros, scales = (f"{prefix}.{t}" for t in ("qweight", "qzeros", "scales"))
    shape = tuple(checkpoint.shape(qweight))
    if len(shape) != 2:
        raise LowbitError(f"tensor {qweight}: shape {list(shape)} is not a matrix")
    require_dtype(checkpoint, qweight, ("I32",))
    k, words = shape
    scale_shape = require(checkpoint, scales, "AWQ stores qweight, qzeros and scales")
    require(checkpoint, qzeros, "AWQ stores qweight, qzeros and scales")
    if len(scale_shape) != 2:
        raise LowbitError(f"tensor {scales}: shape {list(scale_shape)} is not a matrix")
    n = scale_shape[1]
    g = k if group == -1 else group
    groups = -(-k // g)
    if words != -(-n // 8):
        raise LowbitError(f"tensor {qweight}: shape {list(shape)}, expected [{k}, {-(-n // 8)}] "
                          f"(N = {n} from {scales.rsplit('.', 1)[1]}, eight 4-bit codes a word)")
    require_shape(checkpoint, scales, (groups, n), f"K = {k}, group size {g}")
    require_shape(checkpoint, qzeros, (groups, words), f"{groups} groups of {n} packed zero points")
    require_dtype(checkpoint, qzeros, ("I32",))

    def read_zeros():
        return interleave_unpack(checkpoint.read(qzeros), AWQ_ORDER, n).T.astype(np.int16)

    def read():
        codes = interleave_unpack(checkpoint.read(qweight), AWQ_ORDER, n).T
        return np.ascontiguousarray(codes), float_array(checkpoint, scales).T, read_zeros()

    return ImportedLinear(prefix, n, k, 4, g, read, read_zeros, (qweight, qzeros, scales))
