"""Attention builders: one per way of spelling a decoder layer's self-attention in ONNX.

A target lists the builders it may use, in order of preference (`Target.attention`); the first
whose `unsupported(spec)` returns no reason is used for the whole graph (`choose_attention`).
A builder is made once per graph from the graph inputs, which is where shared subgraphs (masks,
rotary tables, sequence lengths) are built, and then called once per layer:

    attention(i, x, past_k, past_v) -> (output, present_k, present_v)

Both builders keep the graph interface of docs/architectures.md: KV tensors [batch, kv_heads,
seq, head_dim] under the same names, `attention_mask` over past + current positions (0 = padding,
anywhere in the row), and positions from `position_ids`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from lowbit.converter.architectures.base import DecoderSpec

if TYPE_CHECKING:
    from lowbit.converter.decoder import DecoderGraph


def rotary_caches(spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, rotary_dim / 2] (float64), attention scaling included: the tables
    of ORT's RotaryEmbedding and of GroupQueryAttention's `do_rotary`."""
    rope = spec.rope
    angles = np.arange(spec.max_position_embeddings, dtype=np.float64)[:, None] * rope.inv_freq[None, :]
    angles = angles.astype(np.float32).astype(np.float64)  # HF forms the angle in float32
    return np.cos(angles) * rope.attention_scaling, np.sin(angles) * rope.attention_scaling


class StandardAttention:
    """MatMul/Softmax with an additive mask (causal, padding, sliding window) built from
    `attention_mask`; the present KV is the past with the new positions concatenated. Any head
    size, any rope, any target."""

    name = "standard"
    shares_kv_buffer = False  # present is a new, longer tensor: onnxruntime-genai must not share buffers

    @staticmethod
    def unsupported(spec: DecoderSpec) -> str | None:
        return None

    def __init__(self, g: DecoderGraph, input_ids, attention_mask, position_ids):
        self.g = g
        spec = g.spec
        self.biases = {w: self._bias(input_ids, attention_mask, w) for w in set(spec.sliding_windows or [None])}
        self.rotary = self._rotary(position_ids) if spec.rope is not None else None

    def _bias(self, input_ids, attention_mask, window: int | None):
        """Additive mask [batch, 1, 1, seq, total]: causal, padding and optional sliding window."""
        b = self.g.b
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
        g = self.g
        if g.target.contrib_ops and g.spec.rope.long_inv_freq is None:
            return self._contrib_rotary(position_ids)
        cos, sin = self._rotary_tables(position_ids)
        return lambda x: self._apply_rotary(x, cos, sin)

    def _contrib_rotary(self, position_ids):
        """ORT's RotaryEmbedding: one node per q/k, cos/sin tables [max_positions, rotary_dim / 2]."""
        g, b = self.g, self.g.b
        cos, sin = (b.const(t, g.dtype) for t in rotary_caches(g.spec))
        rope = g.spec.rope
        partial = rope.rotary_dim if rope.rotary_dim != g.spec.head_dim else None
        return lambda x: b.op("RotaryEmbedding", x, position_ids, cos, sin, domain="com.microsoft", interleaved=0,
                              rotary_embedding_dim=partial)

    def _rotary_tables(self, position_ids):
        """cos and sin [batch, 1, seq, rotary_dim] in the model dtype."""
        g, b, rope = self.g, self.g.b, self.g.spec.rope
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
            return g.from_float32(cos), g.from_float32(sin)

    def _apply_rotary(self, x, cos, sin):
        b, rd, hd = self.g.b, self.g.spec.rope.rotary_dim, self.g.spec.head_dim
        rotated, passed = (x, None) if rd == hd else b.ops("Split", x, b.i64(rd, hd - rd), axis=-1, num_outputs=2)
        x1, x2 = b.ops("Split", rotated, b.i64(rd // 2, rd // 2), axis=-1, num_outputs=2)
        half = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        out = b.op("Add", b.op("Mul", rotated, cos), b.op("Mul", half, sin))
        return out if passed is None else b.op("Concat", out, passed, axis=-1)

    def __call__(self, i, x, past_k, past_v):
        g, b, s, n = self.g, self.g.b, self.g.spec, self.g.names
        hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        qkv = g.linear(x, f"layers.{i}.attn.qkv_proj", n.qkv, i)
        heads = b.op("Transpose", b.op("Reshape", qkv, b.i64(0, 0, hq + 2 * hkv, d)), perm=[0, 2, 1, 3])
        q, k, v = b.ops("Split", heads, b.i64(hq, hkv, hkv), axis=1, num_outputs=3)  # [B, H, S, D] each
        if s.qk_norm:
            q = g.norm(q, f"layers.{i}.attn.q_norm", n.q_norm, i)
            k = g.norm(k, f"layers.{i}.attn.k_norm", n.k_norm, i)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        present_k = b.op("Concat", past_k, k, axis=2)
        present_v = b.op("Concat", past_v, v, axis=2)

        scale = s.attention_scale if s.attention_scale is not None else d**-0.5
        if s.attention_softcap:
            scale /= s.attention_softcap
        q = b.op("Mul", q, g.scalar(scale))
        # Grouped-query attention without copying K/V: the G query heads that share a KV head form
        # one broadcast batch, q [B, Hkv, G, S, D] x k [B, Hkv, 1, D, T] -> scores [B, Hkv, G, S, T].
        groups = hq // hkv
        q = b.op("Reshape", q, b.i64(0, hkv, groups, -1, d))
        keys = b.op("Transpose", b.op("Unsqueeze", present_k, b.i64(2)), perm=[0, 1, 2, 4, 3])
        scores = g.to_float32(b.op("MatMul", q, keys))
        if s.attention_softcap:
            scores = b.op("Mul", b.op("Tanh", scores), b.const(s.attention_softcap, np.float32))
        probs = g.from_float32(b.op("Softmax", b.op("Add", scores, self.biases[s.window(i)]), axis=-1))
        context = b.op("MatMul", probs, b.op("Unsqueeze", present_v, b.i64(2)))  # [B, Hkv, G, S, D]
        context = b.op("Transpose", b.op("Reshape", context, b.i64(0, hq, -1, d)), perm=[0, 2, 1, 3])
        context = b.op("Reshape", context, b.i64(0, 0, hq * d))
        return g.linear(context, f"layers.{i}.attn.o_proj", n.o, i), present_k, present_v


class GroupQueryAttention:
    """ORT's com.microsoft.GroupQueryAttention: one node per layer takes the fused qkv projection
    (RoPE applied inside, from cos/sin caches), the past KV and the sequence lengths, and returns
    the attention output and the present KV.

    Sequence lengths are counted in positions of `attention_mask`, padding included:
    `total_sequence_length` = its width T and `seqlens_k` = T - 1 for every row, so causal order and
    sliding windows (`local_window_size`) run over the same positions as the mask, and padding
    (left, or anywhere) is masked by an additive `attention_bias` [batch, 1, seq, T] built once.
    Several new tokens on top of a past are taken for batch 1 only (runtime/session.py feeds a
    batch's continuation one position at a time).

    RoPE inside the node rotates by these mask positions, not by `position_ids`. A row with p
    padding positions in front is rotated by position + p everywhere, its queries and its keys,
    and attention scores depend only on the difference of the two, so logits are those of
    `position_ids` (the keys stored in the present KV differ from transformers' by that rotation).

    With a shared buffer (onnxruntime-genai's `past_present_share_buffer`, lowbit's BoundKVCache) the
    past is allocated at the maximum length and the node writes the new positions in place; without
    one (`DecoderSession.forward`) the present is the past plus the new positions, as with
    `StandardAttention`.
    """

    name = "gqa"
    shares_kv_buffer = True

    @staticmethod
    def unsupported(spec: DecoderSpec) -> str | None:
        if spec.head_dim % 16:
            return f"head_dim {spec.head_dim} is not a multiple of 16 (ORT's GroupQueryAttention requires it)"
        rope = spec.rope
        if rope is not None and rope.long_inv_freq is not None:
            return "longrope switches its frequency tables with the context length; GroupQueryAttention's are fixed"
        if rope is not None and rope.rotary_dim % 16:
            return f"rotary_dim {rope.rotary_dim} is not a multiple of 16 (GroupQueryAttention's rotary requires it)"
        return None

    def __init__(self, g: DecoderGraph, input_ids, attention_mask, position_ids):
        self.g = g
        b = g.b
        with b.scope("gqa_inputs"):
            batch = b.op("Shape", input_ids, start=0, end=1)  # [1]
            total = b.op("Gather", b.op("Shape", attention_mask), b.i64(1), axis=0)  # scalar
            self.total = b.op("Cast", total, to=ir.DataType.INT32)
            self.seqlens_k = b.op("Expand", b.op("Sub", self.total, b.const(1, np.int32)), batch)  # [B]: T - 1
            keep = b.op("Unsqueeze", b.op("Cast", attention_mask, to=ir.DataType.BOOL), b.i64(1, 2))  # [B, 1, 1, T]
            masked = b.op("Where", keep, g.scalar(0.0), g.scalar(np.finfo(g.dtype).min))
            rows = b.op("Concat", b.i64(1, 1), b.op("Shape", input_ids, start=1, end=2), b.i64(1), axis=0)
            self.bias = b.op("Expand", masked, rows)  # [B, 1, S, T]
        self.cos = self.sin = None
        if g.spec.rope is not None:
            self.cos, self.sin = (b.const(t, g.dtype) for t in rotary_caches(g.spec))

    def __call__(self, i, x, past_k, past_v):
        g, b, s, n = self.g, self.g.b, self.g.spec, self.g.names
        hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        qkv = g.linear(x, f"layers.{i}.attn.qkv_proj", n.qkv, i)
        query, key, value = qkv, None, None  # packed [B, S, (Hq + 2 Hkv) D]
        if s.qk_norm:  # RMSNorm per head, before RoPE
            query, key, value = b.ops("Split", qkv, b.i64(hq * d, hkv * d, hkv * d), axis=-1, num_outputs=3)
            query = self._head_norm(query, hq, f"layers.{i}.attn.q_norm", n.q_norm, i)
            key = self._head_norm(key, hkv, f"layers.{i}.attn.k_norm", n.k_norm, i)
        out, present_k, present_v = b.ops(
            "GroupQueryAttention", query, key, value, past_k, past_v, self.seqlens_k, self.total, self.cos, self.sin,
            None, self.bias,  # position_ids (unused: RoPE by mask position, see above), attention_bias
            domain="com.microsoft", num_outputs=3, num_heads=hq, kv_num_heads=hkv,
            scale=float(s.attention_scale if s.attention_scale is not None else d**-0.5),
            softcap=float(s.attention_softcap) if s.attention_softcap else None,
            local_window_size=s.window(i),  # the last `window` positions, this one included, as transformers
            do_rotary=1 if s.rope is not None else None,
        )
        return g.linear(out, f"layers.{i}.attn.o_proj", n.o, i), present_k, present_v

    def _head_norm(self, x, heads: int, name: str, prefix: str, layer: int):
        b, d = self.g.b, self.g.spec.head_dim
        normed = self.g.norm(b.op("Reshape", x, b.i64(0, 0, heads, d)), name, prefix, layer)
        return b.op("Reshape", normed, b.i64(0, 0, heads * d))


ATTENTION = {cls.name: cls for cls in (GroupQueryAttention, StandardAttention)}


def choose_attention(spec: DecoderSpec, preference: tuple[str, ...]):
    """The first builder in `preference` that supports `spec`."""
    for name in preference:
        if ATTENTION[name].unsupported(spec) is None:
            return ATTENTION[name]
    raise AssertionError(f"no attention builder in {preference} supports {spec.model_type}")
