"""Folding per-input-channel scales into lowbit's graphs, for SmoothQuant and AWQ: x Wᵀ = (x / s)(W·diag(s))ᵀ.

Where each decoder linear's input comes from: the layer's input norm for q/k/v, the post-attention norm for gate/up
or a plain MLP's first linear (fused into one node or not), and in gated MLPs the up projection for down_proj
(down's input is silu(gate)·up, linear in up's rows). Module names are lowbit's (`layers.3.attn.q_proj`); the kind
is the last part. The edits keep the graph's initializers lazy: nothing is computed until the model is written.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.converter.algorithms.awq import fold_into_linear_rows, fold_into_norm, scale_weight
from lowbit.converter.graph import lazy_tensor
from lowbit.converter.quant.formats import Site
from lowbit.converter.quant.rewrite import weight_loader

NORM_BEFORE = {"qkv_proj": "attn_norm", "q_proj": "attn_norm", "k_proj": "attn_norm", "v_proj": "attn_norm",
               "gate_up_proj": "mlp_norm", "gate_proj": "mlp_norm", "up_proj": "mlp_norm", "fc_proj": "mlp_norm"}
UP_BEFORE_DOWN = ("gate_up_proj", "up_proj")  # the producers of down_proj's input, fused first


def kind_of(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def up_rows(kind: str, rows: int) -> slice:
    """The rows of an up projection (UP_BEFORE_DOWN) whose outputs are down_proj's input channels: the second half
    of a fused gate_up_proj, all of an up_proj."""
    return slice(rows // 2, None) if kind == "gate_up_proj" else slice(None)


def norm_initializers(initializers, layer: int | str, norm: str) -> tuple[str, ...]:
    """The names of a layer's norm weight (and bias, where it has one) among the graph's initializers."""
    return tuple(name for name in (f"layers.{layer}.{norm}.weight", f"layers.{layer}.{norm}.bias")
                 if name in initializers)


def fold_norm(value: ir.Value, s: np.ndarray) -> None:
    """The graph's norm weight (or bias) initializer, divided by s when it is written (stays lazy)."""
    tensor = value.const_value
    value.const_value = lazy_tensor(value.name, tensor.dtype.numpy(), tuple(tensor.shape),
                                    lambda: fold_into_norm(tensor.numpy(), s))


def rescale_weight(site: Site, columns: np.ndarray | None = None, rows: tuple[slice, np.ndarray] | None = None):
    """The site's weight initializer becomes W·diag(columns) (and rows[0] of it divided by rows[1]), lazily."""
    load, tensor = weight_loader(site), site.weight.const_value

    def scaled() -> np.ndarray:
        w = load()
        if columns is not None:
            w = scale_weight(w, columns)
        if rows is not None:
            w = w.copy()
            w[rows[0]] = fold_into_linear_rows(w[rows[0]], rows[1])
        return w

    site.weight.const_value = lazy_tensor(site.weight.name, tensor.dtype.numpy(), tuple(tensor.shape),
                                          lambda: scaled().T, transposed_source=scaled)
