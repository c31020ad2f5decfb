"""Per-layer quantization plans: ordered (pattern -> LayerQuant) rules over module names.

Module names are those of the graph's weight-consuming nodes: `embed_tokens`,
`layers.{i}.attn.qkv_proj`, `layers.{i}.attn.o_proj`, `layers.{i}.mlp.gate_up_proj` (gated
MLPs) or `layers.{i}.mlp.fc_proj`, `layers.{i}.mlp.down_proj`, `lm_head`. Patterns are shell
globs (`layers.*.mlp.*`); the first matching rule wins; `None` keeps a module in float.
A scheme expands to a plan; a recipe file can later build one with different settings per
pattern. A layer's `activation` (None: float activations) asks for quantized activations; only
a storage format that computes with exactly that setting is chosen for it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from lowbit.affine import WeightQuant
from lowbit.fp8 import FLOAT8


@dataclass(frozen=True)
class ActivationQuant:
    """How a layer's input activations are quantized: `dynamic` = range measured at run time on every call
    (static: a scale calibrated beforehand); `strategy` "tensor" (one scale and zero point for the whole input) or
    "token" (one per row); `type` "int" or "float" (8-bit, `element` "e4m3" or "e5m2": lowbit.fp8). NVFP4
    activations (`NVFP4_ACTIVATIONS`: 4-bit float, `element` "e2m1", strategy "tensor_group", blocks of 16) have a
    static (calibrated) global scale and FP8 block scales computed on every call (compressed-tensors' dynamic
    local); `dynamic` False says that calibration measures the global scale."""

    bits: int = 8
    type: str = "int"
    dynamic: bool = True
    symmetric: bool = False
    strategy: str = "tensor"
    element: str | None = None  # float8 flavour of type "float"; None for "int"

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits must be within 2..8, got {self.bits}")
        if self.type not in ("int", "float"):
            raise ValueError(f"activation type must be 'int' or 'float', got {self.type!r}")
        if self.strategy not in ("tensor", "token", "tensor_group"):
            raise ValueError(f"activation strategy must be 'tensor', 'token' or 'tensor_group', got {self.strategy!r}")
        if (self.strategy == "tensor_group") != (self.element == FP4_ELEMENT):
            raise ValueError("tensor_group activations are NVFP4 (4-bit float, element 'e2m1'), and only they")
        if self.element == FP4_ELEMENT:
            if (self.bits, self.type, self.dynamic, self.symmetric) != (4, "float", False, True):
                raise ValueError("NVFP4 activations are 4-bit float, symmetric, with a static global scale")
        elif self.type == "float" and (self.bits != 8 or self.element not in FLOAT8):
            raise ValueError(f"float activations are 8-bit with element one of {', '.join(FLOAT8)}, got "
                             f"{self.bits}-bit {self.element!r}")
        if self.type == "int" and self.element is not None:
            raise ValueError(f"integer activations take no float8 element, got {self.element!r}")

    def as_dict(self) -> dict:
        """The fields as lowbit.json writes them (`element` only when set)."""
        return {k: v for k, v in asdict(self).items() if k != "element" or v is not None}

    def describe(self) -> str:
        if self.element == FP4_ELEMENT:
            return "nvfp4 e2m1 (dynamic fp8 scales per 16, static global scale)"
        kind = f"fp8 {self.element}" if self.type == "float" else f"{self.type}{self.bits}"
        return (f"{kind} {'dynamic' if self.dynamic else 'static'} "
                f"{'symmetric' if self.symmetric else 'asymmetric'} per-{self.strategy}")


FP4_ELEMENT = "e2m1"
NVFP4_ACTIVATIONS = ActivationQuant(bits=4, type="float", dynamic=False, symmetric=True, strategy="tensor_group",
                                    element=FP4_ELEMENT)


@dataclass(frozen=True)
class LayerQuant:
    weight: WeightQuant
    format: str | None = None  # storage format name (lowbit.converter.quant.formats); None = best for target
    accuracy_level: int = 0  # MatMulNBits accuracy_level (0 float compute, 4 int8 activations)
    activation: ActivationQuant | None = None  # None: float activations (weight-only)


@dataclass(frozen=True)
class QuantRule:
    pattern: str
    quant: LayerQuant | None


@dataclass(frozen=True)
class QuantPlan:
    rules: tuple[QuantRule, ...]
    pad: bool = True  # zero-pad K to a multiple of the group; False: such a layer is an error

    def static_activations(self) -> bool:
        """Some layer quantizes its activations with calibrated (static) scales."""
        return any(r.quant is not None and r.quant.activation is not None and not r.quant.activation.dynamic
                   for r in self.rules)

    def lookup(self, module: str) -> LayerQuant | None:
        for rule in self.rules:
            if fnmatch.fnmatchcase(module, rule.pattern):
                return rule.quant
        return None


def uniform_plan(quant: LayerQuant, embeddings: bool, lm_head: bool, pad: bool = True) -> QuantPlan:
    """Every decoder linear layer, optionally the embedding table and lm_head, with one setting."""
    return QuantPlan(
        (
            QuantRule("embed_tokens", quant if embeddings else None),
            QuantRule("lm_head", quant if lm_head else None),
            QuantRule("layers.*", quant),
        ),
        pad,
    )
