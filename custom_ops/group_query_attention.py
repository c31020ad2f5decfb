"""`lowbit.cpu.GroupQueryAttention`: the float32 attention of `com.microsoft.GroupQueryAttention` as lowbit's
converter emits it (converter/attention.py), run by a compiled kernel of our own (custom_ops/kernels/
group_query_attention.c) that ONNX Runtime loads as a custom op library.

ONNX Runtime's CPU GroupQueryAttention computes one token's attention in 20-35 us a layer on two threads (small
per-head GEMMs, 128-bit loops) and a 128-token prompt's in 0.66 ms a layer: about a tenth of a 4-bit model's
decode step and of its prompt. The node exists only in the graphs the runtime builds in memory
(runtime/attention_kernel.py); files on disk keep ORT's node, which is its fallback. Same inputs, attributes and
outputs as ORT's node, for the cases the rewrite hands it:

    inputs   query [B, S, Hq * D], or packed [B, S, (Hq + 2 Hkv) * D] with key and value absent; key, value
             [B, S, Hkv * D] (optional); past_key, past_value [B, Hkv, L, D]; seqlens_k int32 [B];
             total_sequence_length int32 (scalar or [1]); cos_cache, sin_cache [P, R / 2] (with do_rotary);
             position_ids (absent); attention_bias [B or 1, Hq or 1, S, T] (optional)
    outputs  output [B, S, Hq * D]; present_key, present_value [B, Hkv, max(L, T), D]
    attrs    num_heads Hq, kv_num_heads Hkv, scale (0: D ** -0.5), softcap (0: none), local_window_size (-1: none),
             do_rotary (rotary_interleaved 0)

The arithmetic (`reference`; the kernel agrees to float32 rounding: another summation order, an exp polynomial, and
for one new token the keys in chunks whose partial softmaxes are combined):

    row b's new tokens sit at positions p = seqlens_k[b] + 1 - S + s (s = 0 .. S-1); T = total_sequence_length
    rotary (do_rotary, R = 2 * cos_cache.shape[1]): x[:R/2], x[R/2:R] <- x1 * cos[p] - x2 * sin[p],
             x2 * cos[p] + x1 * sin[p], for each query and key head; the rest of x unchanged
    present  = past (positions < p of the first new token) with the new keys and values written at their positions
             (in place when ONNX Runtime binds present and past to one buffer)
    score[j] = scale * q . k[j]; softcap c: c * tanh(score / c); plus attention_bias[b, h, s, j]
    keys j: j <= p (causal), and j > p - local_window_size with a window; query head h reads kv head h // (Hq / Hkv)
    output   = sum_j softmax(score)[j] * v[j]. Where every score is the float32 minimum or below (each key masked by
             the bias, as a left-padded row's padding positions are in a prompt): zeros, and with a softcap the
             keys' plain mean, as ORT's node gives (outputs no generation reads)
"""

from __future__ import annotations

import numpy as np

DOMAIN = "lowbit.cpu"
OP_TYPE = "GroupQueryAttention"
INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
          "sin_cache", "position_ids", "attention_bias")
# ORT attributes the kernel reads; any other one set (rotary_interleaved, smooth_softmax, qk_output, ...) keeps
# ORT's node (runtime/attention_kernel.py)
ATTRIBUTES = ("num_heads", "kv_num_heads", "scale", "softcap", "local_window_size", "do_rotary")


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Non-interleaved rotary on x [..., D] with cos, sin [..., R / 2] (broadcast): the first R dims rotate."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], axis=-1)


def reference(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache=None,
              sin_cache=None, attention_bias=None, *, num_heads: int, kv_num_heads: int, scale: float = 0.0,
              softcap: float = 0.0, local_window_size: int = -1, do_rotary: int = 0):
    """(output, present_key, present_value) in numpy, float64 inside, float32 out."""
    query = np.asarray(query, np.float64)
    batch, seq = query.shape[:2]
    if key is None:  # packed query, key, value
        d = query.shape[2] // (num_heads + 2 * kv_num_heads)
        query, key, value = np.split(query, [num_heads * d, (num_heads + kv_num_heads) * d], axis=2)
    d = query.shape[2] // num_heads
    q = query.reshape(batch, seq, num_heads, d).transpose(0, 2, 1, 3)  # [B, Hq, S, D]
    k = np.asarray(key, np.float64).reshape(batch, seq, kv_num_heads, d).transpose(0, 2, 1, 3)
    v = np.asarray(value, np.float64).reshape(batch, seq, kv_num_heads, d).transpose(0, 2, 1, 3)
    total = int(np.asarray(total_sequence_length).reshape(-1)[0])
    capacity = past_key.shape[2]
    present_k = np.zeros((batch, kv_num_heads, max(capacity, total), d))
    present_v = np.zeros_like(present_k)
    output = np.zeros((batch, num_heads, seq, d))
    scale = scale or d**-0.5
    group = num_heads // kv_num_heads
    for b in range(batch):
        first = int(seqlens_k[b]) + 1 - seq  # position of the first new token
        positions = first + np.arange(seq)
        qb, kb = q[b], k[b]
        if do_rotary:
            cos, sin = (np.asarray(c, np.float64)[positions][None] for c in (cos_cache, sin_cache))  # [1, S, R/2]
            qb, kb = rotate(qb, cos, sin), rotate(kb, cos, sin)
        present_k[b, :, :first] = past_key[b, :, :first]
        present_v[b, :, :first] = past_value[b, :, :first]
        present_k[b, :, first:first + seq] = kb
        present_v[b, :, first:first + seq] = v[b]
        for h in range(num_heads):
            keys, values = present_k[b, h // group], present_v[b, h // group]
            for s, p in enumerate(positions):
                lo = max(0, p - local_window_size + 1) if local_window_size > 0 else 0
                scores = scale * (keys[lo:p + 1] @ qb[h, s])
                if softcap:
                    scores = softcap * np.tanh(scores / softcap)
                if attention_bias is not None:
                    bias = np.asarray(attention_bias, np.float64)
                    scores = scores + bias[b % bias.shape[0], h % bias.shape[1], s, lo:p + 1]
                if (scores.astype(np.float32) <= np.finfo(np.float32).min).all():  # every key masked by the bias
                    if not softcap:
                        continue  # zeros, as ORT's node gives
                    scores = np.zeros_like(scores)  # with a softcap ORT's node weighs them equally
                weights = np.exp(scores - scores.max())
                output[b, h, s] = (weights / weights.sum()) @ values[lo:p + 1]
    output = output.transpose(0, 2, 1, 3).reshape(batch, seq, num_heads * d)
    return output.astype(np.float32), present_k.astype(np.float32), present_v.astype(np.float32)
