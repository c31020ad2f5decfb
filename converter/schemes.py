"""Schemes: named presets that expand to a compute dtype and a per-layer quantization plan.

Fixed names are registered in `SCHEMES`; families with a parameter in the name (`a16w4-g128`)
are matched by `SCHEME_PATTERNS`. Options from the command line (`SchemeOptions`) are
validated once here; the rest of the code only sees `Scheme` objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lowbit.errors import LowbitError
from lowbit.affine import WeightQuant
from lowbit.converter.quant.formats import STATIC_INT8_SYMMETRIC, STATIC_UINT8, static_fp8
from lowbit.converter.quant.plan import ActivationQuant, LayerQuant, QuantPlan, uniform_plan
from lowbit.fp8 import FLOAT8

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


@dataclass(frozen=True)
class SchemeOptions:
    """What the command line may change on top of a preset (None = the preset's value)."""

    group_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    dtype: str | None = None
    pad: bool = True
    clip_search: bool = False

    def __post_init__(self):
        if self.group_size is not None and not (_is_int(self.group_size) and self.group_size >= 1):
            raise LowbitError(f"--group-size must be a positive integer, got {self.group_size!r}")
        if self.accuracy_level is not None and not (_is_int(self.accuracy_level) and 0 <= self.accuracy_level <= 4):
            raise LowbitError(f"--accuracy-level must be 0..4, got {self.accuracy_level!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise LowbitError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Scheme:
    name: str
    dtype: np.dtype
    description: str
    plan: QuantPlan | None = None
    calibrated_name: str | None = None  # static activation scales left as placeholders: `lowbit calibrate` makes
    #                                     the folder this scheme (MLC's `*_max_calibrate` -> the final code)
    algorithm: str | None = None  # the weight algorithm the scheme is defined with (MLC's q4f16_awq: "awq")

    @property
    def calibrates_at_conversion(self) -> bool:
        """Static activation scales measured by `lowbit convert` itself (one-shot)."""
        return self.plan is not None and self.plan.static_activations() and self.calibrated_name is None


SCHEMES: dict[str, Callable[[SchemeOptions, str], Scheme]] = {}
SCHEME_PATTERNS: list[tuple[re.Pattern, Callable[[re.Match, SchemeOptions, str], Scheme]]] = []


def _dtype(options: SchemeOptions, default: str) -> np.dtype:
    return DTYPES[options.dtype or default]


# int8 activations (MatMulNBits accuracy_level 4) unless asked otherwise: on CPU it is several times faster than
# float compute and costs little quality (docs/schemes.md has the KL and PPL of both for every scheme);
# --accuracy-level 0 keeps MLC's / DashInfer's float numerics exactly.
DEFAULT_ACCURACY_LEVEL = 4


def accuracy_level(options: SchemeOptions) -> int:
    """The MatMulNBits accuracy level of weight-only layers: the option, else DEFAULT_ACCURACY_LEVEL."""
    return DEFAULT_ACCURACY_LEVEL if options.accuracy_level is None else options.accuracy_level


def _no_options(options: SchemeOptions, name: str, allowed=("dtype",)):
    given = [f for f in ("group_size", "symmetric", "accuracy_level", "dtype") if getattr(options, f) is not None]
    for field_name in given + (["clip_search"] if options.clip_search else []):
        if field_name not in allowed:
            raise LowbitError(f"scheme {name} fixes its own {field_name.replace('_', '-')}; drop that option")


# ------------------------------------------------------------------------------ MLC-LLM codes


def _mlc(name, bits, group, dtype, description, quantize=True):
    def make(options: SchemeOptions, target: str) -> Scheme:
        _no_options(options, name, allowed=("accuracy_level",) if quantize else ())
        plan = None
        if quantize:
            layer = LayerQuant(WeightQuant(bits, group, "symmetric"), accuracy_level=accuracy_level(options))
            # TensorRT has no quantized Gather: the embedding stays float there
            plan = uniform_plan(layer, embeddings=target != "tensorrt", lm_head=True, pad=options.pad)
        return Scheme(name, DTYPES[dtype], description, plan)

    SCHEMES[name] = make


_mlc("q0f32", 0, None, "float32", "no quantization, float32 weights and compute", quantize=False)
_mlc("q0f16", 0, None, "float16", "no quantization, float16 weights and compute", quantize=False)
_mlc("q4f16_1", 4, 32, "float16", "MLC 4-bit group 32, s = max|w|/7, embedding and lm_head too, float16")
_mlc("q4f32_1", 4, 32, "float32", "MLC 4-bit group 32, s = max|w|/7, embedding and lm_head too, float32")
_mlc("q3f16_1", 3, 40, "float16", "MLC 3-bit group 40, s = max|w|/3, embedding and lm_head too, float16")


def _mlc_awq(options: SchemeOptions, target: str) -> Scheme:
    """MLC's q4f16_awq: AWQ's int4 with zero points in groups of 128 on the decoder linears (MLC keeps the
    embedding and the final projection float), float16; lowbit runs AWQ itself (`--algo awq` is implied)."""
    _no_options(options, "q4f16_awq", allowed=("accuracy_level",))
    layer = LayerQuant(WeightQuant(4, 128, "asymmetric"), accuracy_level=accuracy_level(options))
    return Scheme("q4f16_awq", DTYPES["float16"], "MLC AWQ: 4-bit group 128 with zero points, decoder linears, "
                  "AWQ scales folded into the norms, float16",
                  uniform_plan(layer, embeddings=False, lm_head=False, pad=options.pad), algorithm="awq")


SCHEMES["q4f16_awq"] = _mlc_awq


# ------------------------------------------------------------------------------ DashInfer InstantQuant


def _dashinfer(match: re.Match, options: SchemeOptions, target: str) -> Scheme:
    bits = int(match["bits"])
    group = int(match["group"]) if match["group"] else options.group_size
    if group is not None and group < 1:
        raise LowbitError(f"scheme {match[0]}: the group size must be positive")
    minmax = bool(match["minmax"])
    if minmax and bits != 8:
        raise LowbitError("the DashInfer CPU min/max rule is 8-bit only (a16w8-minmax)")
    symmetric = options.symmetric or False
    rule = "minmax_float_zp" if minmax else ("symmetric" if symmetric else "asymmetric")
    layer = LayerQuant(WeightQuant(bits, group, rule, options.clip_search), accuracy_level=accuracy_level(options))
    granularity = f"group {group}" if group else "per-channel"
    return Scheme(match[0], _dtype(options, "float32"),
                  f"DashInfer InstantQuant {'int8' if bits == 8 else 'uint4'} weights, {granularity}, {rule}",
                  uniform_plan(layer, embeddings=False, lm_head=False, pad=options.pad))


SCHEME_PATTERNS.append((re.compile(r"a16w(?P<bits>[48])(?P<minmax>-minmax)?(?:-g(?P<group>\d+))?"), _dashinfer))


def dashinfer_scheme_name(config: dict) -> str:
    """The scheme a DashInfer quantization config dict names."""
    allowed = {"quant_method", "weight_format", "group_size", "compute_method"}
    unknown = set(config) - allowed
    if unknown:
        raise LowbitError(f"quant config: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    if config.get("quant_method") != "instant_quant":
        raise LowbitError(f"quant config: quant_method must be 'instant_quant', got {config.get('quant_method')!r}")
    if config.get("compute_method", "weight_only") != "weight_only":
        raise LowbitError("quant config: only compute_method 'weight_only' (A16) is supported")
    formats = {"int8": "a16w8", "uint4": "a16w4"}
    fmt = config.get("weight_format")
    if fmt not in formats:
        raise LowbitError(f"quant config: weight_format must be one of {sorted(formats)}, got {fmt!r}")
    group = config.get("group_size", -1)
    if not _is_int(group) or (group != -1 and group < 1):
        raise LowbitError(f"quant config: group_size must be -1 (per-channel) or a positive int, got {group!r}")
    return formats[fmt] + (f"-g{group}" if group != -1 else "")


def scheme_from_quant_config(path: Path) -> str:
    try:
        config = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LowbitError(f"{path}: cannot read quant config ({e.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise LowbitError(f"{path}: quant config must be a JSON object")
    return dashinfer_scheme_name(config)


# ------------------------------------------------------------------------------ A8W8: dynamic int8 activations


def _w8a8(name: str):
    def make(options: SchemeOptions, target: str) -> Scheme:
        _no_options(options, name, allowed=())
        activation = ActivationQuant(bits=8, type="int", dynamic=True, symmetric=False, strategy="tensor")
        layer = LayerQuant(WeightQuant(8, None, "symmetric"), activation=activation)
        # lm_head stays float (as DashInfer's A8W8 keeps it): int8 there costs quality, see docs/schemes.md
        return Scheme(name, DTYPES["float32"], "int8 per-channel symmetric weights (s = max|w|/127), activations "
                      "quantized to uint8 per tensor at run time, integer GEMM; lm_head and embedding float",
                      uniform_plan(layer, embeddings=False, lm_head=False, pad=options.pad))

    return make


for _name in ("w8a8", "a8w8"):  # a8w8: DashInfer's name for the same scheme
    SCHEMES[_name] = _w8a8(_name)


def _w8a8_static(options: SchemeOptions, target: str) -> Scheme:
    """int8 per-channel symmetric weights, activations with one static scale per tensor from calibration at
    conversion, as Q/DQ pairs: symmetric int8 for TensorRT, uint8 with a zero point for ORT (formats.py says why)."""
    _no_options(options, "w8a8-static", allowed=())
    activation = STATIC_INT8_SYMMETRIC if target == "tensorrt" else STATIC_UINT8
    layer = LayerQuant(WeightQuant(8, None, "symmetric"), activation=activation)
    form = ("int8 symmetric (s = absmax/127)" if target == "tensorrt"
            else "uint8 with a zero point (min/max range)")
    return Scheme("w8a8-static", DTYPES["float32"], "int8 per-channel symmetric weights (s = max|w|/127), "
                  f"activations per tensor with static scales from calibration at conversion, {form}, as "
                  "QuantizeLinear/DequantizeLinear pairs; lm_head and embedding float",
                  uniform_plan(layer, embeddings=False, lm_head=False, pad=options.pad))


SCHEMES["w8a8-static"] = _w8a8_static


# ------------------------------------------------------------------------------ FP8: MLC's e4m3_e4m3_f16, e5m2_e5m2_f16


def _fp8(flavour: str, max_calibrate: bool):
    name = f"{flavour}_{flavour}_f16"

    def make(options: SchemeOptions, target: str) -> Scheme:
        scheme_name = name + ("_max_calibrate" if max_calibrate else "")
        _no_options(options, scheme_name, allowed=())
        # MLC's PerTensorQuantize: one scale per weight tensor and per activation tensor, max calibration
        layer = LayerQuant(WeightQuant(8, None, f"fp8_{flavour}", per_tensor=True), activation=static_fp8(flavour))
        calibration = ("activation scales left at 1.0 until `lowbit calibrate`" if max_calibrate
                       else "activation scales from max calibration at conversion")
        return Scheme(scheme_name, DTYPES["float16"],
                      f"float8 {flavour} weights (per-tensor s = max|w|/{FLOAT8[flavour].max_value:g}) and activations "
                      f"(per-tensor static s = absmax/{FLOAT8[flavour].max_value:g}), float16 compute, {calibration}; "
                      "lm_head and embedding float",
                      uniform_plan(layer, embeddings=False, lm_head=False, pad=options.pad),
                      calibrated_name=name if max_calibrate else None)

    SCHEMES[name + ("_max_calibrate" if max_calibrate else "")] = make


for _flavour in FLOAT8:
    for _max_calibrate in (False, True):
        _fp8(_flavour, _max_calibrate)


# ------------------------------------------------------------------------------ generic weight-only


def _generic(match: re.Match, options: SchemeOptions, target: str) -> Scheme:
    bits = int(match["bits"])
    symmetric = True if options.symmetric is None else options.symmetric
    group = options.group_size or (128 if target == "tensorrt" else 32)
    if target == "tensorrt":
        if bits != 4 or not symmetric or group not in (64, 128):
            raise LowbitError("target tensorrt takes w4a16 symmetric with --group-size 64 or 128 "
                              "(the INT4 weight-only form TensorRT builds)")
    # symmetric: the full signed range (ORT's quantizer, llama.cpp's Q4_0); TensorRT takes positive scales only,
    # so there the extreme value maps to +/-(2^(b-1) - 1) (MLC's rule)
    rule = ("symmetric" if target == "tensorrt" else "symmetric_full") if symmetric else "asymmetric"
    layer = LayerQuant(WeightQuant(bits, group, rule, options.clip_search), accuracy_level=accuracy_level(options))
    return Scheme(match[0], _dtype(options, "float32"),
                  f"{bits}-bit weights, group {group}, {rule}" + (", clip search" if options.clip_search else ""),
                  uniform_plan(layer, embeddings=target != "tensorrt", lm_head=True, pad=options.pad))


SCHEME_PATTERNS.append((re.compile(r"w(?P<bits>[2348])a16"), _generic))


def scheme_names() -> list[str]:
    return sorted(SCHEMES) + ["a16w8", "a16w4", "a16w8-g128", "a16w4-g128", "a16w8-minmax", "w2a16", "w3a16",
                              "w4a16", "w8a16"]


def get_scheme(name: str, options: SchemeOptions | None = None, target: str = "ort") -> Scheme:
    options = options or SchemeOptions()
    if name in SCHEMES:
        scheme = SCHEMES[name](options, target)
    else:
        for pattern, factory in SCHEME_PATTERNS:
            match = pattern.fullmatch(name)
            if match:
                scheme = factory(match, options, target)
                break
        else:
            raise LowbitError(f"unknown scheme '{name}' (known: {', '.join(scheme_names())}; see docs/schemes.md)")
    return scheme
