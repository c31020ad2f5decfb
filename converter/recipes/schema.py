"""Recipe schema: llm-compressor's modifiers and compressed-tensors' quantization arguments as strict pydantic models,
the presets by name, and their translation into lowbit's `WeightQuant` / `ActivationQuant` (docs/recipes.md).

The pydantic models check structure only (keys, types; `extra="forbid"`); the meaning is checked afterwards by
`weight_quant` / `activation_quant` / `preset_groups`, which raise `RecipeError` naming the key path of the offending
value, so that the loader can add the file and line. Everything compressed-tensors accepts but lowbit cannot compute
is rejected by name here, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lowbit.affine import WeightQuant
from lowbit.converter.quant.formats import DYNAMIC_INT8, STATIC_INT8_SYMMETRIC, STATIC_UINT8, static_fp8
from lowbit.converter.quant.plan import NVFP4_ACTIVATIONS, ActivationQuant
from lowbit.errors import LowbitError

Path = tuple  # a key path into the recipe document: str keys and int list indices


class RecipeError(LowbitError):
    """A problem with one value of a recipe: `path` is its key path in the document (the loader adds file and
    line to the message)."""

    def __init__(self, path: Path, message: str):
        self.path = tuple(path)
        self.message = " ".join(str(message).split())  # one line
        super().__init__(self.message)


# ------------------------------------------------------------------------------ pydantic models (structure)


def _lower(value):
    return value.lower() if isinstance(value, str) else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QuantArgs(_Strict):
    """compressed-tensors' `QuantizationArgs`, field for field."""

    num_bits: int = 8
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    group_size: int | None = None
    strategy: Literal["tensor", "channel", "group", "block", "token", "tensor_group", "attn_head"] | None = None
    block_structure: list[int] | str | None = None
    dynamic: bool | Literal["local"] = False
    actorder: bool | Literal["weight", "static", "group", "dynamic"] | None = None
    scale_dtype: str | None = None
    zp_dtype: str | None = None
    observer: str | None = None
    observer_kwargs: dict[str, Any] = Field(default_factory=dict)

    lower_names = field_validator("type", "strategy", "dynamic", "actorder", mode="before")(_lower)


class Scheme(_Strict):
    """compressed-tensors' `QuantizationScheme` (one config group)."""

    targets: list[str]
    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    output_activations: QuantArgs | None = None
    format: str | None = None


class _Modifier(_Strict):
    """llm-compressor's `Modifier` base fields (a one-shot recipe leaves the schedule empty)."""

    index: int | None = None
    group: str | None = None
    start: float | None = None
    end: float | None = None
    update: float | None = None


class _QuantizationMixin(_Modifier):
    """llm-compressor's `QuantizationMixin` fields."""

    config_groups: dict[str, Scheme] | None = None
    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    scheme: str | dict[str, str | list[str]] | None = None
    kv_cache_scheme: QuantArgs | None = None
    weight_observer: str | None = None
    input_observer: str | None = None
    output_observer: str | None = None
    observer: dict[str, str] | None = None
    bypass_divisibility_checks: bool = False


class QuantizationModifier(_QuantizationMixin):
    """Round to nearest (lowbit `--algo rtn`)."""


class GPTQModifier(_QuantizationMixin):
    block_size: int = 128
    dampening_frac: float | None = 0.01
    actorder: bool | Literal["weight", "static", "group", "dynamic"] | None = "static"
    offload_hessians: bool = False

    lower_actorder = field_validator("actorder", mode="before")(_lower)


class AWQMapping(_Strict):
    smooth_layer: str
    balance_layers: list[str]
    activation_hook_target: str | None = None


class AWQModifier(_QuantizationMixin):
    """Current llm-compressor: a transform only (scales, then a later quantizing modifier quantizes); older
    releases: also a quantizing modifier with its own scheme / config_groups (both are accepted)."""

    mappings: list[AWQMapping] | None = None
    offload_device: str | None = None
    duo_scaling: bool | Literal["both"] = True
    n_grid: int = 20


class SmoothQuantMapping(_Strict):
    balance_layers: list[str]
    smooth_layers: str


class SmoothQuantModifier(_Modifier):
    smoothing_strength: float = 0.5
    mappings: list[SmoothQuantMapping] | None = None
    ignore: list[str] | None = None
    num_calibration_steps: int | None = None
    algorithm: Literal["smoothquant", "log_equalization"] = "smoothquant"

    @field_validator("mappings", mode="before")
    @classmethod
    def _pairs(cls, value):
        # llm-compressor writes each mapping as a pair [balance_layers, smooth_layer]
        if isinstance(value, list):
            return [{"balance_layers": m[0], "smooth_layers": m[1]} if isinstance(m, (list, tuple)) and len(m) == 2
                    else m for m in value]
        return value


MODIFIERS: dict[str, type[_Modifier]] = {
    "QuantizationModifier": QuantizationModifier,
    "GPTQModifier": GPTQModifier,
    "AWQModifier": AWQModifier,
    "SmoothQuantModifier": SmoothQuantModifier,
}
ALGORITHMS = {"QuantizationModifier": "rtn", "GPTQModifier": "gptq", "AWQModifier": "awq"}

# llm-compressor modifiers lowbit knows of but does not run
UNSUPPORTED_MODIFIERS = {
    "SparseGPTModifier": "pruning", "WandaPruningModifier": "pruning", "ConstantPruningModifier": "pruning",
    "MagnitudePruningModifier": "pruning", "REAPModifier": "expert pruning",
    "LogarithmicEqualizationModifier": "logarithmic equalization", "QuIPModifier": "QuIP rotations",
    "SpinQuantModifier": "SpinQuant rotations", "AutoRoundModifier": "AutoRound", "OutputDistillationModifier":
    "distillation",
}

KNOWN_KEYS = sorted({name for m in (*MODIFIERS.values(), QuantArgs, Scheme, AWQMapping) for name in m.model_fields})


# ------------------------------------------------------------------------------ presets (compressed-tensors)


def _args(**kw) -> dict:
    return kw


def _int_wnam(bits: int, act_bits: int = 16) -> dict:
    scheme = {"weights": _args(num_bits=bits, type="int", strategy="group", group_size=128, symmetric=True,
                               dynamic=False)}
    if act_bits < 16:
        scheme["input_activations"] = _args(num_bits=act_bits, type="int", strategy="token", symmetric=True,
                                            dynamic=True)
    return scheme


NVFP4_GROUP = 16
FLOAT8_E4M3_NAMES = ("float8_e4m3fn", "torch.float8_e4m3fn")  # compressed-tensors' NVFP4 scale / zero-point dtype
_NVFP4_WEIGHTS = _args(num_bits=4, type="float", strategy="tensor_group", symmetric=True, dynamic=False, group_size=16,
                       scale_dtype="float8_e4m3fn", zp_dtype="float8_e4m3fn")
_MX = {"scale_dtype": "uint8", "zp_dtype": "uint8"}


def _mx(bits: int, dynamic: bool = False) -> dict:
    """An OCP MX float format's arguments: groups of 32 sharing a uint8 (E8M0) scale."""
    return _args(num_bits=bits, type="float", strategy="group", symmetric=True, dynamic=dynamic, group_size=32,
                 **_MX)

# compressed_tensors.quantization.quant_scheme.PRESET_SCHEMES (0.20), as plain dicts; tests/test_recipes.py compares
# them with the installed library. Names are case-insensitive, as there.
PRESETS: dict[str, dict] = {
    "UNQUANTIZED": {},
    "W4A16_ASYM": {"weights": _args(num_bits=4, type="int", strategy="group", group_size=128, symmetric=False,
                                    dynamic=False)},
    "W8A8": {"weights": _args(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False),
             "input_activations": _args(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)},
    "W4AFP8": {"weights": _args(num_bits=4, type="int", strategy="group", group_size=128, symmetric=True,
                                dynamic=False),
               "input_activations": _args(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)},
    "FP8": {"weights": _args(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False),
            "input_activations": _args(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False,
                                       observer="static_minmax")},
    "FP8_DYNAMIC": {"weights": _args(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False),
                    "input_activations": _args(num_bits=8, type="float", strategy="token", symmetric=True,
                                               dynamic=True)},
    "FP8_BLOCK": {"weights": _args(num_bits=8, type="float", strategy="block", symmetric=True, dynamic=False,
                                   block_structure=[128, 128]),
                  "input_activations": _args(num_bits=8, type="float", strategy="group", symmetric=True, dynamic=True,
                                             group_size=128)},
    "NVFP4A16": {"weights": dict(_NVFP4_WEIGHTS)},
    "NVFP4": {"weights": dict(_NVFP4_WEIGHTS),
              "input_activations": dict(_NVFP4_WEIGHTS, dynamic="local", observer="static_minmax")},
    "MXFP4A16": {"weights": _mx(4)},
    "MXFP4": {"weights": _mx(4), "input_activations": _mx(4, dynamic=True)},
    "MXFP4XFP8": {"weights": _mx(4),
                  "input_activations": _args(num_bits=8, type="float", strategy="group", symmetric=True, dynamic=True,
                                             group_size=128)},
    "MXFP6A16": {"weights": _mx(6)},
    "MXFP6A8": {"weights": _mx(6), "input_activations": _mx(8, dynamic=True)},
    "MXFP8A16": {"weights": _mx(8)},
    "MXFP8": {"weights": _mx(8), "input_activations": _mx(8, dynamic=True)},
}
PRESETS["INT8"] = PRESETS["W8A8"]
for _w, _a in [(2, 4), (2, 8), (2, 16), (3, 4), (3, 8), (3, 16), (4, 4), (4, 8), (4, 16), (5, 8), (5, 16), (6, 8),
               (6, 16), (7, 8), (7, 16), (8, 16)]:
    PRESETS[f"W{_w}A{_a}"] = _int_wnam(_w, _a)


def preset(name: str, path: Path) -> dict:
    """A preset's {weights, input_activations} as QuantArgs (case-insensitive name)."""
    if not isinstance(name, str) or name.upper() not in PRESETS:
        raise RecipeError(path, f"unknown preset scheme {name!r} (compressed-tensors presets: "
                                f"{', '.join(sorted(PRESETS))})")
    return {k: QuantArgs.model_validate(v) for k, v in PRESETS[name.upper()].items()}


# ------------------------------------------------------------------------------ meaning: compressed-tensors -> lowbit

# llm-compressor's observers (llmcompressor.observers): for weights, every min/max observer sees the whole weight
# once, which is lowbit's rule; the MSE searches are a different grid from lowbit's --clip-search.
WEIGHT_MINMAX_OBSERVERS = {"minmax", "static_minmax", "memoryless_minmax", "memoryless"}
MSE_OBSERVERS = {"mse", "memoryless_mse", "static_mse", "imatrix_mse"}
# static activation ranges: lowbit's calibration takes the min / max over all calibration tokens = static_minmax;
# llm-compressor's `minmax` is a moving average (averaging constant 0.01) over batches, which lowbit does not do
ACTIVATION_STATIC_OBSERVERS = {"static_minmax"}
ACTIVATION_DYNAMIC_OBSERVERS = {"memoryless_minmax", "minmax", "static_minmax", "memoryless"}


def _strategy(args: QuantArgs, path: Path) -> str:
    """compressed-tensors' strategy inference and its checks of impossible combinations."""
    strategy, group = args.strategy, args.group_size
    if group is not None and group < -1:
        raise RecipeError(path + ("group_size",), f"invalid group_size {group} (positive for strategy group, "
                                                  "-1 for channel)")
    if strategy is None:
        if group is None:
            strategy = "tensor"
        elif group > 0:
            strategy = "group"
        elif group == -1:
            strategy = "channel"
        else:
            raise RecipeError(path + ("group_size",), f"invalid group_size {group}")
    if strategy in ("group", "tensor_group") and (group is None or group <= 0):
        raise RecipeError(path + ("group_size",), f"strategy {strategy} needs a positive group_size, "
                                                  f"got {group!r}")
    if group is not None and group > 0 and strategy not in ("group", "tensor_group"):
        raise RecipeError(path + ("group_size",), f"group_size {group} needs strategy group, not {strategy}")
    if strategy == "token" and not args.dynamic:
        raise RecipeError(path + ("strategy",), "static per-token quantization is impossible: token needs "
                                                "dynamic: true")
    if (strategy == "block") != (args.block_structure is not None):
        raise RecipeError(path + ("strategy",), "strategy block and block_structure go together")
    if args.dynamic and strategy not in ("token", "tensor", "tensor_group", "group"):
        raise RecipeError(path + ("dynamic",), f"dynamic quantization takes strategy token, tensor, group or "
                                               f"tensor_group, not {strategy}")
    if args.dynamic == "local" and strategy != "tensor_group":
        raise RecipeError(path + ("dynamic",), "dynamic: local is only for strategy tensor_group")
    return strategy


def _float_name(args: QuantArgs, strategy: str) -> str:
    if args.num_bits == 4 and strategy == "tensor_group":
        return "NVFP4 (FP4 e2m1 values, FP8 e4m3 scales per 16, a global scale)"
    if args.num_bits in (4, 6, 8) and strategy == "group" and args.scale_dtype == "uint8":
        return f"MXFP{args.num_bits} (OCP microscaling, E8M0 scales per {args.group_size})"
    return f"{args.num_bits}-bit float"


def weight_quant(args: QuantArgs, path: Path) -> tuple[WeightQuant, bool]:
    """(WeightQuant, act_order asked in the args) for `weights` at `path`; RecipeError for what lowbit cannot
    compute, named."""
    strategy = _strategy(args, path)
    if args.dynamic:
        raise RecipeError(path + ("dynamic",), "dynamic weight quantization is not a thing lowbit stores; "
                                               "weights are quantized once (dynamic: false)")
    nvfp4 = args.type == "float" and args.num_bits == 4 and strategy == "tensor_group"
    if nvfp4:
        if args.group_size != NVFP4_GROUP:
            raise RecipeError(path + ("group_size",), f"NVFP4 weights take group_size {NVFP4_GROUP} (FP8 scales per "
                                                      f"16 values), not {args.group_size}")
        if not args.symmetric:
            raise RecipeError(path + ("symmetric",), "asymmetric FP4 weights are not supported (symmetric: true)")
    elif args.type == "float":
        if args.num_bits != 8:
            raise RecipeError(path + ("num_bits",), f"{_float_name(args, strategy)} weights are not supported yet "
                                                    "(lowbit's float weights are FP8 e4m3, and NVFP4: 4 bits, "
                                                    "strategy tensor_group, group_size 16)")
        if strategy not in ("tensor", "channel"):
            raise RecipeError(path + ("strategy",), f"FP8 weights take strategy tensor or channel in lowbit, not "
                                                    f"{strategy} ({_float_name(args, strategy)})")
        if not args.symmetric:
            raise RecipeError(path + ("symmetric",), "asymmetric FP8 weights are not supported (symmetric: true)")
    else:
        if not 2 <= args.num_bits <= 8:
            raise RecipeError(path + ("num_bits",), f"{args.num_bits}-bit integer weights are not supported "
                                                    "(lowbit stores 2..8 bits)")
        if strategy not in ("channel", "group"):
            raise RecipeError(path + ("strategy",), f"integer weights with strategy {strategy} are not supported: "
                                                    "lowbit's integer weights have one scale per channel "
                                                    "(strategy channel) or per group (strategy group)")
    if args.scale_dtype is not None and not (nvfp4 and args.scale_dtype in FLOAT8_E4M3_NAMES):
        raise RecipeError(path + ("scale_dtype",), f"scale_dtype {args.scale_dtype} is not supported: lowbit "
                                                   "stores scales in the model dtype (--dtype), NVFP4's in "
                                                   "float8_e4m3fn")
    if args.zp_dtype is not None and not (args.type == "int" and args.zp_dtype in ("int8", "torch.int8")) \
            and not (nvfp4 and args.zp_dtype in FLOAT8_E4M3_NAMES):
        raise RecipeError(path + ("zp_dtype",), f"zp_dtype {args.zp_dtype} is not supported (int8 zero points; "
                                                "NVFP4: float8_e4m3fn)")
    if args.observer is not None and args.observer not in WEIGHT_MINMAX_OBSERVERS:
        why = ("llm-compressor's MSE range search is not lowbit's clip search (a different grid and norm)"
               if args.observer in MSE_OBSERVERS else "unknown observer")
        raise RecipeError(path + ("observer",), f"weight observer {args.observer!r} is not supported: {why}; "
                                                f"use one of {', '.join(sorted(WEIGHT_MINMAX_OBSERVERS))}")
    if args.observer_kwargs:
        raise RecipeError(path + ("observer_kwargs",), "observer_kwargs are not supported")
    if args.actorder in (True, "group", "dynamic"):
        raise RecipeError(path + ("actorder",), f"actorder {args.actorder!r} (group order with g_idx) was removed "
                                                "from compressed-tensors; use actorder: weight (static)")
    if nvfp4:
        return WeightQuant(4, NVFP4_GROUP, "nvfp4"), False
    if args.type == "float":
        return WeightQuant(8, None, "fp8_e4m3", per_tensor=strategy == "tensor"), False
    group = args.group_size if strategy == "group" else None
    return WeightQuant(args.num_bits, group, "symmetric" if args.symmetric else "asymmetric"), \
        args.actorder in ("weight", "static")


def activation_quant(args: QuantArgs, path: Path) -> ActivationQuant:
    """The ActivationQuant for `input_activations` at `path`; RecipeError naming what lowbit cannot run."""
    strategy = _strategy(args, path)
    if args.actorder not in (None, False):
        raise RecipeError(path + ("actorder",), "actorder applies to weights, not input activations")
    if strategy == "token":
        raise RecipeError(path + ("strategy",), "per-token dynamic activations (as the W8A8 and FP8_DYNAMIC presets "
                                                "ask) are not supported: lowbit's formats quantize "
                                                "activations per tensor (int8 dynamic asymmetric: "
                                                "DynamicQuantizeMatMul; int8 or FP8 static)")
    if args.type == "float" and args.num_bits == 4:
        return _nvfp4_activation(args, strategy, path)
    if strategy != "tensor":
        name = _float_name(args, strategy) if args.type == "float" else f"int{args.num_bits}"
        raise RecipeError(path + ("strategy",), f"{name} activations with strategy {strategy} are not supported "
                                                "(lowbit quantizes activations per tensor)")
    if args.num_bits != 8:
        raise RecipeError(path + ("num_bits",), f"{args.num_bits}-bit activations are not supported (8-bit only)")
    if args.scale_dtype is not None:
        raise RecipeError(path + ("scale_dtype",), f"scale_dtype {args.scale_dtype} is not supported")
    if args.zp_dtype is not None and not (args.type == "int" and args.zp_dtype in ("int8", "torch.int8")):
        raise RecipeError(path + ("zp_dtype",), f"zp_dtype {args.zp_dtype} is not supported")
    if args.observer_kwargs:
        raise RecipeError(path + ("observer_kwargs",), "observer_kwargs are not supported")
    observers = ACTIVATION_DYNAMIC_OBSERVERS if args.dynamic else ACTIVATION_STATIC_OBSERVERS
    if args.observer is not None and args.observer not in observers:
        why = ("a moving average of batch ranges, which lowbit's calibration does not compute"
               if args.observer == "minmax" else
               "llm-compressor's MSE search is not lowbit's" if args.observer in MSE_OBSERVERS else "unknown observer")
        raise RecipeError(path + ("observer",), f"{'dynamic' if args.dynamic else 'static'} activation observer "
                                                f"{args.observer!r} is not supported: {why}; use "
                                                f"{', '.join(sorted(observers))}")
    if args.type == "float":
        if args.dynamic:
            raise RecipeError(path + ("dynamic",), "dynamic FP8 activations are not supported: lowbit's FP8 "
                                                   "activations have a calibrated static per-tensor scale")
        if not args.symmetric:
            raise RecipeError(path + ("symmetric",), "asymmetric FP8 activations are not supported")
        return static_fp8("e4m3")
    if args.dynamic:
        if args.symmetric:
            raise RecipeError(path + ("symmetric",), "dynamic symmetric int8 activations are not supported: "
                                                     "ORT's DynamicQuantizeMatMul quantizes them asymmetrically "
                                                     "(uint8 with a zero point); write symmetric: false")
        return DYNAMIC_INT8
    return STATIC_INT8_SYMMETRIC if args.symmetric else STATIC_UINT8


def _nvfp4_activation(args: QuantArgs, strategy: str, path: Path) -> ActivationQuant:
    """The `NVFP4` preset's input activations (tensor_group, groups of 16, dynamic local: a calibrated static global
    scale, FP8 block scales computed at run time, symmetric), or a RecipeError naming what differs."""
    if strategy != "tensor_group":
        raise RecipeError(path + ("strategy",), f"{_float_name(args, strategy)} activations are not supported "
                                                "(FP4 activations are NVFP4: strategy tensor_group, group_size 16)")
    if args.group_size != NVFP4_GROUP:
        raise RecipeError(path + ("group_size",), f"NVFP4 activations take group_size {NVFP4_GROUP}, not "
                                                  f"{args.group_size}")
    if args.dynamic != "local":
        raise RecipeError(path + ("dynamic",), f"NVFP4 activations with dynamic: {args.dynamic} are not supported "
                                               "(dynamic: local: a calibrated global scale, block scales at run time)")
    if not args.symmetric:
        raise RecipeError(path + ("symmetric",), "asymmetric FP4 activations are not supported (symmetric: true)")
    for key in ("scale_dtype", "zp_dtype"):
        if getattr(args, key) is not None and getattr(args, key) not in FLOAT8_E4M3_NAMES:
            raise RecipeError(path + (key,), f"{key} {getattr(args, key)} is not supported for NVFP4 activations "
                                             "(float8_e4m3fn)")
    if args.observer_kwargs:
        raise RecipeError(path + ("observer_kwargs",), "observer_kwargs are not supported")
    if args.observer is not None and args.observer not in ACTIVATION_STATIC_OBSERVERS:
        raise RecipeError(path + ("observer",), f"NVFP4 activation observer {args.observer!r} is not supported: the "
                                                "global input scale is the calibration's max |x| (static_minmax)")
    return NVFP4_ACTIVATIONS


# ------------------------------------------------------------------------------ validated, normalised pieces


@dataclass(frozen=True)
class Target:
    text: str
    path: Path

    @property
    def regex(self) -> re.Pattern | None:
        return re.compile(self.text[3:]) if self.text.startswith("re:") else None


def check_pattern(text: str, path: Path) -> Target:
    if not text or not text.strip():
        raise RecipeError(path, "empty target")
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as e:
            raise RecipeError(path, f"{text!r} is not a regular expression ({e})") from None
    return Target(text, path)


@dataclass(frozen=True)
class Group:
    """One config group of one modifier, with lowbit's settings."""

    name: str
    targets: tuple[Target, ...]
    weight: WeightQuant | None
    activation: ActivationQuant | None
    act_order: bool  # weights.actorder asked (GPTQ only)
    actorder_given: bool
    weight_observer: str | None
    activation_observer: str | None
    path: Path  # the group's key path (config_groups.NAME, or scheme)
    weights_path: Path
    preset: str | None = None
    format: str | None = None  # the compressed-tensors compressor asked for (for --emit compressed-tensors)


# compressed_tensors.config.CompressionFormat values a quantized config group may name
COMPRESSION_FORMATS = ("dense", "int-quantized", "float-quantized", "naive-quantized", "pack-quantized",
                       "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized")
SPARSE_FORMATS = ("sparse-bitmask", "sparse-24-bitmask", "marlin-24")


def check_format(fmt: str | None, path: Path) -> str | None:
    if fmt is None or fmt in COMPRESSION_FORMATS:
        return fmt
    if fmt in SPARSE_FORMATS:
        raise RecipeError(path, f"format {fmt} (sparsity) is not supported")
    if fmt == "mixed-precision":
        raise RecipeError(path, "mixed-precision is the format of a whole config, not of one config group")
    raise RecipeError(path, f"unknown format {fmt!r} (compressed-tensors formats: {', '.join(COMPRESSION_FORMATS)})")
