"""The shared decoder template: one graph that serves prefill and cached decode.

Inputs and outputs use the names Optimum and onnxruntime-genai expect:
`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value` ->
`logits`, `present.{i}.key/value`, with KV tensors laid out [batch, kv_heads, seq, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.converter.architectures.base import DecoderSpec, WeightMap
from lowbit.errors import LowbitError
from lowbit.converter.graph import GraphBuilder, ir_dtype, lazy_tensor
from lowbit.converter.weights import WeightSource

OPSET = 21


@dataclass(frozen=True)
class Target:
    """What a deployment target lets the builder emit."""

    name: str
    contrib_ops: bool  # ORT's SimplifiedLayerNormalization (RMSNorm) and com.microsoft.RotaryEmbedding
    description: str


TARGETS = {
    "ort": Target("ort", True, "ONNX Runtime (CPU/CUDA): ORT-specific fused ops where they apply"),
    "tensorrt": Target("tensorrt", False, "TensorRT: standard ONNX ops only (opset 21)"),
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


class DecoderGraph:
    """Builds the decoder for one spec, weight map, dtype and target."""

    def __init__(self, spec: DecoderSpec, weights: WeightSource, dtype, target: Target):
        self.spec = spec
        self.w = weights
        self.names: WeightMap = weights.names
        self.dtype = np.dtype(dtype)
        self.ir_dtype = ir_dtype(self.dtype)
        self.target = target
        if spec.activation not in ACTIVATIONS:
            raise LowbitError(f"activation '{spec.activation}' is not supported (supported: {', '.join(ACTIVATIONS)})")
        opsets = {"": OPSET}
        if target.contrib_ops:
            opsets["com.microsoft"] = 1
        self.b = GraphBuilder(f"lowbit_{spec.model_type}", opsets)

    # ------------------------------------------------------------------ weights

    def _weight(self, name: str, shape, load, transposed_source=None) -> ir.Value:
        return self.b.initializer(lazy_tensor(name, self.dtype, tuple(shape), load, transposed_source))

    def _linear(self, x, name: str, prefixes, layer: int | None = None):
        lin = self.w.linear(prefixes, layer)
        dtype = self.dtype
        w = self._weight(f"{name}.weight", (lin.in_features, lin.out_features), lin.in_out,
                         transposed_source=lambda: np.asarray(lin.out_in(), dtype=dtype))
        y = self.b.op("MatMul", x, w, node_name=name)  # the module name quantization plans match
        if lin.bias is not None:
            y = self.b.op("Add", y, self._weight(f"{name}.bias", (lin.out_features,), lin.bias))
        return y

    def _norm_weights(self, name: str, prefix: str, layer: int | None, offset: float):
        weight, bias, size = self.w.norm(prefix, layer, offset)
        w = self._weight(f"{name}.weight", (size,), weight)
        return w, (self._weight(f"{name}.bias", (size,), bias) if bias else None)

    def _norm(self, x, name: str, prefix: str, layer: int | None = None, offset: float = 0.0):
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
        x32 = self._to_float32(x)
        variance = b.op("ReduceMean", b.op("Mul", x32, x32), b.i64(-1), keepdims=1)
        inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", variance, b.const(eps, np.float32))))
        return b.op("Mul", self._from_float32(b.op("Mul", x32, inv)), w)

    def _to_float32(self, x):
        return x if self.dtype == np.float32 else self.b.op("Cast", x, to=ir.DataType.FLOAT)

    def _from_float32(self, x):
        return x if self.dtype == np.float32 else self.b.op("Cast", x, to=self.ir_dtype)

    def _scalar(self, value):
        return self.b.const(value, self.dtype)

    # ------------------------------------------------------------------ shared subgraphs

    def _attention_bias(self, input_ids, attention_mask, window: int | None):
        """Additive mask [batch, 1, 1, seq, total]: causal, padding and optional sliding window."""
        b = self.b
        with b.scope("attention_mask"):
            seq = b.op("Gather", b.op("Shape", input_ids), b.i64(1), axis=0)
            total = b.op("Gather", b.op("Shape", attention_mask), b.i64(1), axis=0)
            past = b.op("Sub", total, seq)
            q_pos = b.op("Unsqueeze", b.op("Range", past, total, b.i64(1)), b.i64(1))  # [S, 1]
            k_pos = b.op("Unsqueeze", b.op("Range", b.i64(0), total, b.i64(1)), b.i64(0))  # [1, T]
            allowed = b.op("LessOrEqual", k_pos, q_pos)
            if window is not None:
                allowed = b.op("And", allowed, b.op("Greater", k_pos, b.op("Sub", q_pos, b.i64(window))))
            padding = b.op("Unsqueeze", b.op("Cast", attention_mask, to=ir.DataType.BOOL), b.i64(1, 2, 3))
            allowed = b.op("And", allowed, padding)  # [B, 1, 1, S, T]
            return b.op("Where", allowed, b.const(0.0, np.float32), b.const(np.finfo(np.float32).min, np.float32))

    def _rotary(self, position_ids):
        """A function applying RoPE to [batch, heads, seq, head_dim] tensors."""
        rope = self.spec.rope
        if self.target.contrib_ops and rope.long_inv_freq is None:
            return self._contrib_rotary(position_ids)
        cos, sin = self._rotary_tables(position_ids)
        return lambda x: self._apply_rotary(x, cos, sin)

    def _contrib_rotary(self, position_ids):
        """ORT's RotaryEmbedding: one node per q/k, cos/sin tables [max_positions, rotary_dim / 2]."""
        b, rope = self.b, self.spec.rope
        angles = np.arange(self.spec.max_position_embeddings, dtype=np.float64)[:, None] * rope.inv_freq[None, :]
        angles = angles.astype(np.float32).astype(np.float64)  # HF forms the angle in float32
        cos = b.const(np.cos(angles) * rope.attention_scaling, self.dtype)
        sin = b.const(np.sin(angles) * rope.attention_scaling, self.dtype)
        partial = rope.rotary_dim if rope.rotary_dim != self.spec.head_dim else None
        return lambda x: b.op("RotaryEmbedding", x, position_ids, cos, sin, domain="com.microsoft", interleaved=0,
                              rotary_embedding_dim=partial)

    def _rotary_tables(self, position_ids):
        """cos and sin [batch, 1, seq, rotary_dim] in the model dtype."""
        b, rope = self.b, self.spec.rope
        with b.scope("rotary"):
            inv_freq = b.const(rope.inv_freq.reshape(1, 1, -1), np.float32)
            if rope.long_inv_freq is not None:
                longest = b.op("Add", b.op("ReduceMax", position_ids, keepdims=0), b.i64(1))
                use_long = b.op("Greater", longest, b.i64(rope.original_max_position))
                inv_freq = b.op("Where", use_long, b.const(rope.long_inv_freq.reshape(1, 1, -1), np.float32), inv_freq)
            positions = b.op("Unsqueeze", b.op("Cast", position_ids, to=ir.DataType.FLOAT), b.i64(-1))
            freqs = b.op("Mul", positions, inv_freq)
            angles = b.op("Unsqueeze", b.op("Concat", freqs, freqs, axis=-1), b.i64(1))
            cos, sin = b.op("Cos", angles), b.op("Sin", angles)
            if rope.attention_scaling != 1.0:
                scale = b.const(rope.attention_scaling, np.float32)
                cos, sin = b.op("Mul", cos, scale), b.op("Mul", sin, scale)
            return self._from_float32(cos), self._from_float32(sin)

    def _apply_rotary(self, x, cos, sin):
        b, rd, hd = self.b, self.spec.rope.rotary_dim, self.spec.head_dim
        rotated, passed = (x, None) if rd == hd else b.ops("Split", x, b.i64(rd, hd - rd), axis=-1, num_outputs=2)
        x1, x2 = b.ops("Split", rotated, b.i64(rd // 2, rd // 2), axis=-1, num_outputs=2)
        half = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        out = b.op("Add", b.op("Mul", rotated, cos), b.op("Mul", half, sin))
        return out if passed is None else b.op("Concat", out, passed, axis=-1)

    # ------------------------------------------------------------------ blocks

    def _attention(self, i, x, past_k, past_v, bias, rotary):
        b, s = self.b, self.spec
        hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        n = self.names
        qkv = self._linear(x, f"layers.{i}.attn.qkv_proj", n.qkv, i)
        heads = b.op("Transpose", b.op("Reshape", qkv, b.i64(0, 0, hq + 2 * hkv, d)), perm=[0, 2, 1, 3])
        q, k, v = b.ops("Split", heads, b.i64(hq, hkv, hkv), axis=1, num_outputs=3)  # [B, H, S, D] each
        if s.qk_norm:
            q = self._norm(q, f"layers.{i}.attn.q_norm", n.q_norm, i)
            k = self._norm(k, f"layers.{i}.attn.k_norm", n.k_norm, i)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        present_k = b.op("Concat", past_k, k, axis=2)
        present_v = b.op("Concat", past_v, v, axis=2)

        scale = s.attention_scale if s.attention_scale is not None else d**-0.5
        if s.attention_softcap:
            scale /= s.attention_softcap
        q = b.op("Mul", q, self._scalar(scale))
        # Grouped-query attention without copying K/V: the G query heads that share a KV head form
        # one broadcast batch, q [B, Hkv, G, S, D] x k [B, Hkv, 1, D, T] -> scores [B, Hkv, G, S, T].
        groups = hq // hkv
        q = b.op("Reshape", q, b.i64(0, hkv, groups, -1, d))
        keys = b.op("Transpose", b.op("Unsqueeze", present_k, b.i64(2)), perm=[0, 1, 2, 4, 3])
        scores = self._to_float32(b.op("MatMul", q, keys))
        if s.attention_softcap:
            scores = b.op("Mul", b.op("Tanh", scores), b.const(s.attention_softcap, np.float32))
        probs = self._from_float32(b.op("Softmax", b.op("Add", scores, bias), axis=-1))
        context = b.op("MatMul", probs, b.op("Unsqueeze", present_v, b.i64(2)))  # [B, Hkv, G, S, D]
        context = b.op("Transpose", b.op("Reshape", context, b.i64(0, hq, -1, d)), perm=[0, 2, 1, 3])
        context = b.op("Reshape", context, b.i64(0, 0, hq * d))
        return self._linear(context, f"layers.{i}.attn.o_proj", n.o, i), present_k, present_v

    def _mlp(self, i, x):
        b, s, n = self.b, self.spec, self.names
        act = ACTIVATIONS[s.activation]
        if s.gated_mlp:
            gate_up = self._linear(x, f"layers.{i}.mlp.gate_up_proj", n.up, i)
            gate, up = b.ops("Split", gate_up, b.i64(s.intermediate_size, s.intermediate_size), axis=-1, num_outputs=2)
            hidden = b.op("Mul", act(b, gate), up)
        else:
            hidden = act(b, self._linear(x, f"layers.{i}.mlp.fc_proj", n.up, i))
        return self._linear(hidden, f"layers.{i}.mlp.down_proj", n.down, i)

    def _lm_head(self, hidden, embed_table):
        b, s = self.b, self.spec
        if not s.tie_word_embeddings and self.names.lm_head and self.w.has(self.names.lm_head):
            return self._linear(hidden, "lm_head", self.names.lm_head)
        # Tied (or no lm_head in the checkpoint): reuse the [vocab, hidden] embedding table through Gemm(transB=1), stored once.
        flat = b.op("Reshape", hidden, b.i64(-1, s.hidden_size))
        logits = b.op("Gemm", flat, embed_table, transB=1, node_name="lm_head")
        out_shape = b.op("Concat", b.op("Shape", hidden, end=2), b.i64(s.vocab_size), axis=0)
        return b.op("Reshape", logits, out_shape)

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
        if s.embedding_scale is not None:
            hidden = b.op("Mul", hidden, self._scalar(s.embedding_scale))
        if n.position_embed:
            pos_shape, pos_load = self.w.tensor(f"{n.position_embed}.weight")
            table = self._weight("embed_positions.weight", pos_shape, pos_load)
            hidden = b.op("Add", hidden, b.op("Gather", table, position_ids, axis=0, node_name="embed_positions"))

        biases = {w: self._attention_bias(input_ids, attention_mask, w) for w in set(s.sliding_windows or [None])}
        rotary = self._rotary(position_ids) if s.rope is not None else None
        off = s.norm_weight_offset
        presents = []
        x = self._norm(hidden, "layers.0.attn_norm", n.attn_norm, 0, off)
        for i in range(s.num_layers):
            with b.scope(f"layers.{i}"):
                attn, pk, pv = self._attention(i, x, *pasts[i], biases[s.window(i)], rotary)
                if s.sandwich_norm:
                    attn = self._norm(attn, f"layers.{i}.post_attn_norm", n.post_attn_norm, i, off)
                hidden, x = self._residual_norm(hidden, attn, f"layers.{i}.mlp_norm", n.mlp_norm, i, off)
                mlp = self._mlp(i, x)
                if s.sandwich_norm:
                    mlp = self._norm(mlp, f"layers.{i}.post_mlp_norm", n.post_mlp_norm, i, off)
                if i + 1 < s.num_layers:
                    hidden, x = self._residual_norm(hidden, mlp, f"layers.{i + 1}.attn_norm", n.attn_norm, i + 1, off)
                else:
                    hidden, x = self._residual_norm(hidden, mlp, "final_norm", n.final_norm, None, off)
                presents.append((pk, pv))

        hidden = x
        logits = self._lm_head(hidden, embed_table)
        if s.final_logit_softcap:
            cap = self._scalar(s.final_logit_softcap)
            logits = b.op("Mul", b.op("Tanh", b.op("Div", logits, cap)), cap)

        b.output(logits, "logits", dt, ["batch_size", "sequence_length", s.vocab_size])
        present_shape = ["batch_size", s.num_kv_heads, "total_sequence_length", s.head_dim]
        for i, (pk, pv) in enumerate(presents):
            b.output(pk, f"present.{i}.key", dt, present_shape)
            b.output(pv, f"present.{i}.value", dt, present_shape)
        return ir.Model(b.graph, ir_version=10, producer_name="lowbit")
