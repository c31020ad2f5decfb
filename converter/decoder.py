"""The shared decoder template: one graph that serves prefill and cached decode.

Inputs and outputs use the names Optimum and onnxruntime-genai expect:
`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value` ->
`logits`, `present.{i}.key/value`, with KV tensors laid out [batch, kv_heads, seq, head_dim].
Self-attention comes from the builder the target prefers among those that support the spec
(converter/attention.py); the rest of the layer is the same for every builder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.converter.architectures.base import DecoderSpec, WeightMap
from lowbit.converter.attention import choose_attention
from lowbit.errors import LowbitError
from lowbit.converter.graph import GraphBuilder, ir_dtype, lazy_tensor, set_hf_modules
from lowbit.converter.weights import WeightSource

OPSET = 21


@dataclass(frozen=True)
class Target:
    """What a deployment target lets the builder emit."""

    name: str
    contrib_ops: bool  # ORT's SimplifiedLayerNormalization (RMSNorm), Skip*LayerNormalization, RotaryEmbedding
    attention: tuple[str, ...]  # attention builders (attention.ATTENTION), most preferred first
    description: str
    logits_to_keep: bool = False  # an optional `logits_to_keep` input: logits of the last k positions only


LOGITS_TO_KEEP = "logits_to_keep"  # int64 scalar graph input, default 0 (every position), as transformers names it


TARGETS = {
    "ort": Target("ort", True, ("gqa", "standard"),
                  "ONNX Runtime (CPU/CUDA): ORT-specific fused ops where they apply", logits_to_keep=True),
    "tensorrt": Target("tensorrt", False, ("standard",), "TensorRT: standard ONNX ops only (opset 21)"),
}


def _silu(b: GraphBuilder, x):
    return b.op("Mul", x, b.op("Sigmoid", x))


ACTIVATIONS = {
    "silu": _silu,
    "swish": _silu,
    "relu": lambda b, x: b.op("Relu", x),
    "gelu": lambda b, x: b.op("Gelu", x),
    "gelu_new": lambda b, x: b.op("Gelu", x, approximate="tanh"),
    "gelu_fast": lambda b, x: b.op("Gelu", x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda b, x: b.op("Gelu", x, approximate="tanh"),
}


LAYER_INPUTS = "lowbit.layer_inputs"  # model metadata: [[residual, normed] value names] entering each layer, then final


def _name_boundary(hidden: ir.Value, x: ir.Value, prefix: str) -> list[str]:
    """Names the residual stream and its normed copy where they enter a decoder layer (or the final norm's
    output), so layer-by-layer calibration can cut the graph there."""
    hidden.name, x.name = f"{prefix}.residual", f"{prefix}.normed"
    return [hidden.name, x.name]


class DecoderGraph:
    """Builds the decoder for one spec, weight map, dtype and target."""

    def __init__(self, spec: DecoderSpec, weights: WeightSource, dtype, target: Target,
                 unfuse: frozenset[str] = frozenset()):
        """`unfuse`: fused modules (`layers.0.attn.qkv_proj`) to emit as one MatMul per part, concatenated."""
        self.spec = spec
        self.unfuse = unfuse
        self.w = weights
        self.names: WeightMap = weights.names
        self.dtype = np.dtype(dtype)
        self.ir_dtype = ir_dtype(self.dtype)
        self.target = target
        self.attention = choose_attention(spec, target.attention)  # a class from attention.ATTENTION
        if spec.activation not in ACTIVATIONS:
            raise LowbitError(f"activation '{spec.activation}' is not supported (supported: {', '.join(ACTIVATIONS)})")
        opsets = {"": OPSET}
        if target.contrib_ops:
            opsets["com.microsoft"] = 1
        self.b = GraphBuilder(f"lowbit_{spec.model_type}", opsets)

    # ------------------------------------------------------------------ weights

    def _weight(self, name: str, shape, load, transposed_source=None) -> ir.Value:
        return self.b.initializer(lazy_tensor(name, self.dtype, tuple(shape), load, transposed_source))

    def linear(self, x, name: str, prefixes, layer: int | None = None):
        if name in self.unfuse and not isinstance(prefixes, str) and len(prefixes) > 1:
            # one node per part (a recipe quantizes them differently), concatenated as the fused node's output
            stem = name.rsplit(".", 1)[0]
            parts = [self.linear(x, f"{stem}.{p.rsplit('.', 1)[-1]}", p, layer) for p in prefixes]
            return self.b.op("Concat", *parts, axis=-1)
        lin = self.w.linear(prefixes, layer)
        dtype = self.dtype
        w = self._weight(f"{name}.weight", (lin.in_features, lin.out_features), lin.in_out,
                         transposed_source=lambda: np.asarray(lin.out_in(), dtype=dtype))
        y = self.b.op("MatMul", x, w, node_name=name)  # the module name quantization plans match
        prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
        set_hf_modules(y.producer(), [p.format(i=layer) for p in prefixes])
        if lin.bias is not None:
            y = self.b.op("Add", y, self._weight(f"{name}.bias", (lin.out_features,), lin.bias))
        return y

    def _norm_weights(self, name: str, prefix: str, layer: int | None, offset: float):
        weight, bias, size = self.w.norm(prefix, layer, offset)
        w = self._weight(f"{name}.weight", (size,), weight)
        return w, (self._weight(f"{name}.bias", (size,), bias) if bias else None)

    def norm(self, x, name: str, prefix: str, layer: int | None = None, offset: float = 0.0):
        return self._apply_norm(x, *self._norm_weights(name, prefix, layer, offset))

    def _residual_norm(self, residual, delta, name: str, prefix: str, layer: int | None = None, offset: float = 0.0):
        """(residual + delta, norm(residual + delta)); one fused ORT node on the ort target."""
        w, bias = self._norm_weights(name, prefix, layer, offset)
        if not self.target.contrib_ops:
            total = self.b.op("Add", residual, delta)
            return total, self._apply_norm(total, w, bias)
        eps = self.spec.norm_eps
        if self.spec.norm == "layer":
            normed, _, _, total = self.b.ops("SkipLayerNormalization", residual, delta, w, bias, domain="com.microsoft",
                                             epsilon=eps, num_outputs=4)
        else:
            normed, _, _, total = self.b.ops("SkipSimplifiedLayerNormalization", residual, delta, w,
                                             domain="com.microsoft", epsilon=eps, num_outputs=4)
        return total, normed

    def _apply_norm(self, x, w, bias):
        b, eps = self.b, self.spec.norm_eps
        if self.spec.norm == "layer":
            return b.op("LayerNormalization", x, w, bias, axis=-1, epsilon=eps, stash_type=1)
        if self.target.contrib_ops:
            return b.op("SimplifiedLayerNormalization", x, w, axis=-1, epsilon=eps, stash_type=1)
        x32 = self.to_float32(x)
        variance = b.op("ReduceMean", b.op("Mul", x32, x32), b.i64(-1), keepdims=1)
        inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", variance, b.const(eps, np.float32))))
        return b.op("Mul", self.from_float32(b.op("Mul", x32, inv)), w)

    def to_float32(self, x):
        return x if self.dtype == np.float32 else self.b.op("Cast", x, to=ir.DataType.FLOAT)

    def from_float32(self, x):
        return x if self.dtype == np.float32 else self.b.op("Cast", x, to=self.ir_dtype)

    def scalar(self, value):
        return self.b.const(value, self.dtype)

    # ------------------------------------------------------------------ blocks

    def _mlp(self, i, x):
        b, s, n = self.b, self.spec, self.names
        act = ACTIVATIONS[s.activation]
        if s.gated_mlp:
            gate_up = self.linear(x, f"layers.{i}.mlp.gate_up_proj", n.up, i)
            gate, up = b.ops("Split", gate_up, b.i64(s.intermediate_size, s.intermediate_size), axis=-1, num_outputs=2)
            hidden = b.op("Mul", act(b, gate), up)
        else:
            hidden = act(b, self.linear(x, f"layers.{i}.mlp.fc_proj", n.up, i))
        return self.linear(hidden, f"layers.{i}.mlp.down_proj", n.down, i)

    def _lm_head(self, hidden, embed_table):
        b, s = self.b, self.spec
        if not s.tie_word_embeddings and self.names.lm_head and self.w.has(self.names.lm_head):
            return self.linear(hidden, "lm_head", self.names.lm_head)
        # Tied (or no lm_head in the checkpoint): reuse the [vocab, hidden] embedding table through Gemm(transB=1), stored once.
        flat = b.op("Reshape", hidden, b.i64(-1, s.hidden_size))
        logits = b.op("Gemm", flat, embed_table, transB=1, node_name="lm_head")
        set_hf_modules(logits.producer(), ["lm_head"])
        out_shape = b.op("Concat", b.op("Shape", hidden, end=2), b.i64(s.vocab_size), axis=0)
        return b.op("Reshape", logits, out_shape)

    def _last_positions(self, hidden):
        """hidden[:, -k:] for the `logits_to_keep` input k; its default 0 keeps every position (-0 = 0), so
        pipelines that do not know the input (onnxruntime-genai, Optimum) get logits for all positions."""
        b = self.b
        keep = b.overridable(LOGITS_TO_KEEP, np.array(0, np.int64))
        start = b.op("Neg", b.op("Unsqueeze", keep, b.i64(0)))
        return b.op("Slice", hidden, start, b.i64(np.iinfo(np.int64).max), b.i64(1), node_name="logits_to_keep")

    # ------------------------------------------------------------------ whole model

    def build(self) -> ir.Model:
        b, s, n = self.b, self.spec, self.names
        dt = self.ir_dtype
        input_ids = b.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        attention_mask = b.input("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
        position_ids = b.input("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        kv_shape = ["batch_size", s.num_kv_heads, "past_sequence_length", s.head_dim]
        pasts = [
            (b.input(f"past_key_values.{i}.key", dt, kv_shape), b.input(f"past_key_values.{i}.value", dt, kv_shape))
            for i in range(s.num_layers)
        ]

        embed_shape, embed_load = self.w.tensor(f"{n.embed}.weight")
        embed_table = self._weight("embed_tokens.weight", embed_shape, embed_load)
        hidden = b.op("Gather", embed_table, input_ids, axis=0, node_name="embed_tokens")
        set_hf_modules(hidden.producer(), [n.embed])
        if s.embedding_scale is not None:
            hidden = b.op("Mul", hidden, self.scalar(s.embedding_scale))
        if n.position_embed:
            pos_shape, pos_load = self.w.tensor(f"{n.position_embed}.weight")
            table = self._weight("embed_positions.weight", pos_shape, pos_load)
            positions = b.op("Gather", table, position_ids, axis=0, node_name="embed_positions")
            set_hf_modules(positions.producer(), [n.position_embed])
            hidden = b.op("Add", hidden, positions)

        attention = self.attention(self, input_ids, attention_mask, position_ids)
        off = s.norm_weight_offset
        presents = []
        x = self.norm(hidden, "layers.0.attn_norm", n.attn_norm, 0, off)
        boundaries = [_name_boundary(hidden, x, "layers.0")]
        for i in range(s.num_layers):
            with b.scope(f"layers.{i}"):
                attn, pk, pv = attention(i, x, *pasts[i])
                if s.sandwich_norm:
                    attn = self.norm(attn, f"layers.{i}.post_attn_norm", n.post_attn_norm, i, off)
                hidden, x = self._residual_norm(hidden, attn, f"layers.{i}.mlp_norm", n.mlp_norm, i, off)
                mlp = self._mlp(i, x)
                if s.sandwich_norm:
                    mlp = self.norm(mlp, f"layers.{i}.post_mlp_norm", n.post_mlp_norm, i, off)
                if i + 1 < s.num_layers:
                    hidden, x = self._residual_norm(hidden, mlp, f"layers.{i + 1}.attn_norm", n.attn_norm, i + 1, off)
                else:
                    hidden, x = self._residual_norm(hidden, mlp, "final_norm", n.final_norm, None, off)
                presents.append((pk, pv))
            boundaries.append(_name_boundary(hidden, x, f"layers.{i + 1}" if i + 1 < s.num_layers else "final_norm"))

        hidden = x
        if self.target.logits_to_keep:
            hidden = self._last_positions(hidden)
        logits = self._lm_head(hidden, embed_table)
        if s.final_logit_softcap:
            cap = self.scalar(s.final_logit_softcap)
            logits = b.op("Mul", b.op("Tanh", b.op("Div", logits, cap)), cap)

        logits_length = "logits_sequence_length" if self.target.logits_to_keep else "sequence_length"
        b.output(logits, "logits", dt, ["batch_size", logits_length, s.vocab_size])
        present_shape = ["batch_size", s.num_kv_heads, "total_sequence_length", s.head_dim]
        for i, (pk, pv) in enumerate(presents):
            b.output(pk, f"present.{i}.key", dt, present_shape)
            b.output(pv, f"present.{i}.value", dt, present_shape)
        model = ir.Model(b.graph, ir_version=10, producer_name="lowbit")
        model.metadata_props[LAYER_INPUTS] = json.dumps(boundaries)
        return model
