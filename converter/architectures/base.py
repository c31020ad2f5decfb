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
    """Decorator for a `config -> DecoderSpec` function that registers an architecture. The registered
    `spec` checks the config first (`check_config`), so spec functions may trust the values they read."""

    def wrap(spec_fn):
        def checked_spec(config) -> DecoderSpec:
            check_config(config)
            return spec_fn(config)

        ARCHITECTURES[model_type] = Architecture(model_type, checked_spec, weights, genai_type or model_type)
        return spec_fn

    return wrap


def get_architecture(model_type: str) -> Architecture:
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise LowbitError(f"unsupported model_type '{model_type}' (supported: {known})")
    return arch


# ----------------------------------------------------------------------------------- config checks

# Sizes and positions: float32 holds every integer up to 2^24 exactly (rope angles are formed from float32
# positions), and no real model comes near it in any dimension.
MAX_SIZE = 1 << 24

REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
OPTIONAL_SIZES = ("intermediate_size", "n_inner", "num_key_value_heads", "head_dim", "sliding_window")
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "rope_theta", "partial_rotary_factor",
                    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
STRINGS = ("hidden_act", "hidden_activation", "activation_function")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _config_key(config, name: str) -> str:
    """The key config.json spells a standard name with (GPT-2: n_embd for hidden_size, ...)."""
    return getattr(config, "attribute_map", {}).get(name, name)


def _config_error(config, name: str, value, what: str) -> LowbitError:
    return LowbitError(f"config.json: {_config_key(config, name)} must be {what}, got {value!r}")


def check_config(config) -> None:
    """Types and ranges of the config values the decoder reads (by their standard transformers names), and
    the relations between them. Raises LowbitError naming the key."""

    def size(name, optional):
        value = getattr(config, name, None)
        if value is None and optional:
            return None
        if not (_is_int(value) and 1 <= value <= MAX_SIZE):
            raise _config_error(config, name, value, f"an integer within 1..{MAX_SIZE}")
        return value

    sizes = {name: size(name, optional=False) for name in REQUIRED_SIZES}
    sizes.update({name: size(name, optional=True) for name in OPTIONAL_SIZES})
    heads, kv_heads = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if kv_heads is not None and heads % kv_heads:
        raise LowbitError(f"config.json: num_attention_heads ({heads}) is not a multiple of "
                          f"num_key_value_heads ({kv_heads})")
    if sizes["head_dim"] is None and sizes["hidden_size"] % heads:
        hidden, heads_key = _config_key(config, "hidden_size"), _config_key(config, "num_attention_heads")
        raise LowbitError(f"config.json: {hidden} ({sizes['hidden_size']}) is not divisible by {heads_key} ({heads}) "
                          "and no head_dim is given")
    for name in POSITIVE_NUMBERS:
        value = getattr(config, name, None)
        if value is not None and not (_is_number(value) and value > 0):
            raise _config_error(config, name, value, "a positive finite number")
    factor = getattr(config, "partial_rotary_factor", None)
    if factor is not None and factor > 1:
        raise _config_error(config, "partial_rotary_factor", factor, "within (0, 1]")
    for name in STRINGS:
        value = getattr(config, name, None)
        if value is not None and not isinstance(value, str):
            raise _config_error(config, name, value, "a string")
    for name in TOKEN_IDS:
        value = getattr(config, name, None)
        ok = value is None or _is_int(value) or (
            name == "eos_token_id" and isinstance(value, list) and all(_is_int(v) for v in value)
        )
        if not ok:
            what = "an integer or a list of integers" if name == "eos_token_id" else "an integer"
            raise _config_error(config, name, value, what)
    tie = getattr(config, "tie_word_embeddings", None)
    if tie is not None and not isinstance(tie, bool):
        raise _config_error(config, "tie_word_embeddings", tie, "true or false")
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, name, None)
        if value is not None and not isinstance(value, dict):
            raise _config_error(config, name, value, "an object")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not (
        isinstance(layer_types, list) and len(layer_types) == sizes["num_hidden_layers"]
        and all(isinstance(t, str) for t in layer_types)
    ):
        raise _config_error(config, "layer_types", layer_types,
                            f"a list of {sizes['num_hidden_layers']} strings (one per layer)")


def _rope_value(p: dict, key: str, kind: str, integer: bool = False):
    """A required rope parameter: a positive finite number (integer if asked)."""
    value = p.get(key)
    if not (_is_int(value) if integer else _is_number(value)) or value <= 0:
        what = "a positive integer" if integer else "a positive finite number"
        raise LowbitError(f"config.json: rope '{kind}' needs {key} to be {what}, got {value!r}")
    return value


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
    kind = p["rope_type"]
    partial = p.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    if not (_is_number(partial) and 0 < partial <= 1):
        raise LowbitError(f"config.json: partial_rotary_factor must be within (0, 1], got {partial!r}")
    dim = int(head_dim * partial)
    if dim < 2 or dim % 2:
        raise LowbitError(f"config.json: the rotary dimension (head_dim {head_dim} x partial_rotary_factor {partial}) "
                          f"must be even and at least 2, got {dim}")
    base = float(_rope_value(p, "rope_theta", kind))
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim
    with np.errstate(over="ignore", divide="ignore"):
        inv_freq = 1.0 / (base**exponents)
    if not np.all(np.isfinite(inv_freq) & (inv_freq > 0)):
        raise LowbitError(f"config.json: rope_theta {base} gives non-finite rotary frequencies")
    if kind == "default":
        return RopeSpec(inv_freq, dim)
    if kind == "linear":
        return RopeSpec(inv_freq / _rope_value(p, "factor", kind), dim)
    if kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            _rope_value(p, key, kind)
        _rope_value(p, "original_max_position_embeddings", kind, integer=True)
        if p["high_freq_factor"] == p["low_freq_factor"]:
            raise LowbitError("config.json: rope 'llama3' needs high_freq_factor != low_freq_factor")
        return RopeSpec(_llama3_scaling(inv_freq, p), dim)
    if kind == "longrope":
        original = p.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        original = _rope_value({"original_max_position_embeddings": original}, "original_max_position_embeddings",
                               kind, integer=True)
        factor = _rope_value(p, "factor", kind) if p.get("factor") else config.max_position_embeddings / original
        scaling = _rope_value(p, "attention_factor", kind) if p.get("attention_factor") else (
            1.0 if factor <= 1.0 or original == 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
        tables = []
        for key in ("short_factor", "long_factor"):
            values = p.get(key)
            ok = isinstance(values, list) and len(values) == dim // 2 and all(_is_number(v) and v > 0 for v in values)
            if not ok:
                raise LowbitError(f"config.json: rope 'longrope' needs {key} to be a list of {dim // 2} positive "
                                  f"numbers, got {values!r}")
            tables.append(1.0 / (np.asarray(values, np.float64) * base**exponents))
        return RopeSpec(tables[0], dim, scaling, tables[1], original)
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
