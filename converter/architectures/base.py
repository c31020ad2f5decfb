"""What the shared decoder template needs to know about one architecture.

An architecture module maps a transformers config onto a `DecoderSpec` (numbers and switches)
and names where each logical weight lives in the checkpoint (`WeightMap`). The graph builder
only ever sees these two objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: per-pair inverse frequencies, possibly switched by context length."""

    inv_freq: np.ndarray  # [rotary_dim // 2] float64
    rotary_dim: int
    attention_scaling: float = 1.0
    # longrope: a second frequency table used once max(position_ids) + 1 exceeds this length
    long_inv_freq: np.ndarray | None = None
    original_max_position: int | None = None


@dataclass(frozen=True)
class DecoderSpec:
    """Numbers and switches of a pre-norm decoder-only transformer."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str  # "rms" or "layer"
    norm_eps: float
    activation: str  # key of builder.ACTIVATIONS
    max_position_embeddings: int
    rope: RopeSpec | None = None  # None: learned absolute positions
    norm_weight_offset: float = 0.0  # Gemma stores w - 1
    gated_mlp: bool = True
    qk_norm: bool = False
    sandwich_norm: bool = False  # Gemma 2: extra norms after attention and MLP
    embedding_scale: float | None = None
    attention_scale: float | None = None  # default 1/sqrt(head_dim)
    attention_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


@dataclass(frozen=True)
class WeightMap:
    """Checkpoint names of each logical weight; `{i}` stands for the layer index.

    Linear layers and norms are given by module prefix: `.weight` and (if present) `.bias` are
    appended. A linear given as several prefixes is the row-wise concatenation of them (q, k, v
    into one fused projection). `conv1d` marks GPT-2's [in, out] weight layout.
    """

    embed: str
    final_norm: str
    lm_head: str | None
    attn_norm: str
    qkv: tuple[str, ...]
    o: str
    mlp_norm: str
    up: tuple[str, ...]  # gate then up for gated MLPs, fc for plain MLPs
    down: str
    position_embed: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    conv1d: bool = False
    strip_prefixes: tuple[str, ...] = ("model.", "transformer.")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    spec: Callable[[object], DecoderSpec]
    weights: WeightMap
    genai_type: str = field(default="llama")


ARCHITECTURES: dict[str, Architecture] = {}


def register(model_type: str, weights: WeightMap, genai_type: str | None = None):
    """Decorator for a `config -> DecoderSpec` function that registers an architecture."""

    def wrap(spec_fn):
        ARCHITECTURES[model_type] = Architecture(model_type, spec_fn, weights, genai_type or model_type)
        return spec_fn

    return wrap


def get_architecture(model_type: str) -> Architecture:
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise LowbitError(f"unsupported model_type '{model_type}' (supported: {known})")
    return arch


# ----------------------------------------------------------------------------------- helpers


def rope_parameters(config) -> dict:
    """Rope settings from a transformers 5 `rope_parameters` or a 4.x `rope_theta`/`rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    merged["rope_type"] = merged.get("rope_type") or merged.get("type") or "default"
    return merged


def _llama3_scaling(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    factor = p["factor"]
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def build_rope(config, head_dim: int) -> RopeSpec:
    p = rope_parameters(config)
    partial = p.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    dim = int(head_dim * partial)
    base = float(p["rope_theta"])
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim
    inv_freq = 1.0 / (base**exponents)
    kind = p["rope_type"]
    if kind == "default":
        return RopeSpec(inv_freq, dim)
    if kind == "linear":
        return RopeSpec(inv_freq / p["factor"], dim)
    if kind == "llama3":
        return RopeSpec(_llama3_scaling(inv_freq, p), dim)
    if kind == "longrope":
        original = p.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        factor = p.get("factor") or config.max_position_embeddings / original
        scaling = p.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
        short = 1.0 / (np.asarray(p["short_factor"], np.float64) * base**exponents)
        long = 1.0 / (np.asarray(p["long_factor"], np.float64) * base**exponents)
        return RopeSpec(short, dim, scaling, long, original)
    raise LowbitError(f"rope type '{kind}' is not supported (supported: default, linear, llama3, longrope)")


def sliding_windows(config, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer window from `layer_types` (transformers 5) or a model-wide `sliding_window`."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window and getattr(config, "use_sliding_window", True):
        return (window,) * num_layers
    return (None,) * num_layers


def common_fields(config) -> dict:
    """Fields that every HF decoder config spells the same way."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_layers = config.num_hidden_layers
    return dict(
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=num_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
        rope=build_rope(config, head_dim),
        sliding_windows=sliding_windows(config, num_layers),
    )


def llama_style_weights(**overrides) -> WeightMap:
    """Names used by Llama and most of its descendants (`model.layers.{i}.self_attn.q_proj`...)."""
    layer = "model.layers.{i}"
    names = dict(
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        attn_norm=f"{layer}.input_layernorm",
        qkv=(f"{layer}.self_attn.q_proj", f"{layer}.self_attn.k_proj", f"{layer}.self_attn.v_proj"),
        o=f"{layer}.self_attn.o_proj",
        mlp_norm=f"{layer}.post_attention_layernorm",
        up=(f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"),
        down=f"{layer}.mlp.down_proj",
    )
    names.update(overrides)
    return WeightMap(**names)
