"""Resolving a recipe against a model's weight modules: which config group of which modifier quantizes each module,
with which lowbit settings, and with which algorithm (docs/recipes.md).

A module is one weight node of lowbit's graph (`layers.0.attn.qkv_proj`) with the Hugging Face modules it computes
(`model.layers.0.self_attn.q_proj`, `...k_proj`, `...v_proj`) and their class name (`Linear`, `Embedding`).
Targets match the Hugging Face names as compressed-tensors matches them: `re:` + a regex matched from the start of
the name (`re.match`), otherwise the exact name or the class name; `ignore` wins. When several targets of one
modifier match a module, compressed-tensors takes the most specific kind (exact name, then regex, then class name);
two different config groups tied at that kind are an error, as is a module quantized by two modifiers, a target that
matches no module, and a fused module whose parts get different settings (unless the caller asks for those to be
listed instead, `split_fused`, and builds the graph with them unfused: converter/recipe_conversion.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowbit.affine import WeightQuant
from lowbit.converter.quant.plan import ActivationQuant, LayerQuant, QuantPlan, QuantRule
from lowbit.converter.recipes.load import (
    AWQOptions,
    GPTQOptions,
    Modifier,
    Recipe,
    SmoothQuantOptions,
    _check_format,
    format_path,
)
from lowbit.converter.recipes.schema import Group, RecipeError, Target
from lowbit.errors import LowbitError

CLASS_MRO = {"Linear": ("Linear", "Module"), "Embedding": ("Embedding", "Module")}


@dataclass(frozen=True)
class RecipeModule:
    """One weight node: lowbit's module name, the transformers modules it computes, their class, and (optional)
    the weight's input features K and output features N."""

    name: str
    hf_modules: tuple[str, ...]
    kind: str = "Linear"
    k: int | None = None
    n: int | None = None


def as_module(item) -> RecipeModule:
    """A RecipeModule from itself, a `WeightModule` (name, hf_modules) or a tuple (name, hf_modules[, kind[, k[,
    n]]]); the kind defaults to Embedding for embed_tokens, Linear otherwise."""
    if isinstance(item, RecipeModule):
        return item
    if isinstance(item, tuple):
        name, hf, *rest = item
    else:
        name, hf, rest = item.name, item.hf_modules, []
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    kind = rest[0] if rest else ("Embedding" if name.split(".")[-1] == "embed_tokens" else "Linear")
    return RecipeModule(name, hf or (name,), kind, *rest[1:3])


@dataclass(frozen=True)
class ResolvedModule:
    name: str
    hf_modules: tuple[str, ...]
    kind: str
    quant: LayerQuant | None  # None: float
    groups: tuple[str, ...] = ()  # config group(s) that produced it (several only when they agree, fused parts)
    modifiers: tuple[str, ...] = ()  # the modifiers' key paths in the recipe
    algorithm: str | None = None  # "rtn" | "gptq" | "awq" (None: float)
    gptq: GPTQOptions | None = None
    awq: AWQOptions | None = None
    smoothquant: SmoothQuantOptions | None = None

    @property
    def group(self) -> str | None:
        return "+".join(self.groups) or None

    @property
    def modifier(self) -> str | None:
        return "+".join(self.modifiers) or None

    def record(self) -> dict:
        """What lowbit.json / `lowbit inspect` can show for the node."""
        out = {"hf_modules": list(self.hf_modules), "group": self.group, "modifier": self.modifier,
               "algorithm": self.algorithm}
        if self.quant is not None:
            out["weights"] = self.quant.weight.describe()
            if self.quant.activation is not None:
                out["activations"] = self.quant.activation.describe()
        for key in ("gptq", "awq", "smoothquant"):
            if getattr(self, key) is not None:
                out[key] = asdict(getattr(self, key))
        return out


@dataclass(frozen=True)
class Resolution:
    recipe: Recipe
    modules: dict  # lowbit module name -> ResolvedModule, in model order
    plan: QuantPlan  # rules on the exact module names
    unused_ignores: tuple[str, ...] = ()  # ignore entries that matched nothing (allowed, as in llm-compressor)
    fused_conflicts: tuple[str, ...] = ()  # with split_fused: fused modules whose parts get different settings

    def group(self, module: str) -> Group | None:
        """The config group (validated, with its lowbit settings, targets and `format`) that quantizes `module`
        (the first, when fused parts name several that agree)."""
        resolved = self.modules[module]
        if not resolved.groups:
            return None
        for mod in self.recipe.modifiers:
            if mod.label == resolved.modifiers[0]:
                return next(g for g in mod.groups if g.name == resolved.groups[0])
        return None

    @property
    def algorithms(self) -> set[str]:
        return {m.algorithm for m in self.modules.values() if m.algorithm is not None}


@dataclass(frozen=True)
class _Setting:
    quant: LayerQuant | None
    algorithm: str | None
    gptq: GPTQOptions | None
    awq: AWQOptions | None
    smoothquant: SmoothQuantOptions | None

    def describe(self) -> str:
        if self.quant is None:
            return "float"
        text = self.quant.weight.describe()
        if self.quant.activation is not None:
            text += f", {self.quant.activation.describe()} activations"
        extra = [self.algorithm or ""] + (["smoothquant"] if self.smoothquant else [])
        return f"{text} ({' + '.join(e for e in extra if e)})"


def _tier(target: Target, name: str, kind: str) -> int | None:
    """0 exact name, 1 regex, 2 class name (compressed-tensors' order of precedence); None: no match."""
    if target.text.startswith("re:"):
        return 1 if target.regex.match(name) else None
    if target.text == name:
        return 0
    if target.text in CLASS_MRO.get(kind, (kind, "Module")):
        return 2
    return None


def _matches(target: Target, name: str, kind: str) -> bool:
    return _tier(target, name, kind) is not None


def storage_formats(weight: WeightQuant, activation: ActivationQuant | None, kind: str = "matmul", n: int = 256,
                    k: int = 256, module: str = "", target: str | None = None) -> tuple[list[str], list[str]]:
    """(names of the storage formats that hold `weight` with exactly `activation` on a site of `kind`, the reasons
    the others of that activation give)."""
    from lowbit.converter.quant.formats import FORMATS, Site

    names, reasons = [], []
    for fmt in FORMATS.values():
        if fmt.activation != activation or kind not in fmt.kinds or (target and target not in fmt.targets):
            continue
        why = fmt.unsupported(weight, Site(kind, module, None, None, None, n, k))
        if why is None:
            names.append(fmt.name)
        else:
            reasons.append(f"{fmt.name}: {why}")
    return names, reasons


def resolve_recipe(recipe: Recipe, modules, *, pad: bool | None = None, target: str | None = None,
                   accuracy_level: int = 0, split_fused: bool = False) -> Resolution:
    """Per-module settings for `recipe` on `modules` (RecipeModule, WeightModule or tuples, in model order).

    pad: None pads a K that the group size does not divide only where the modifier sets
    bypass_divisibility_checks (llm-compressor's rule; an error otherwise); True always pads; False never.
    target: "ort" / "tensorrt" to require a storage format for that target. accuracy_level: MatMulNBits'
    for weight-only layers (0 keeps activations float, as A16 means). split_fused: a fused module whose parts the
    recipe treats differently is listed in `Resolution.fused_conflicts` (and left out of the plan) instead of being
    an error, so that the caller can build the graph with it unfused and resolve again."""
    try:
        return _resolve(recipe, [as_module(m) for m in modules], pad, target, accuracy_level, split_fused)
    except RecipeError as e:
        raise recipe.error(e.path, e.message) from None


def _resolve(recipe: Recipe, modules: list[RecipeModule], pad, target, accuracy_level,
             split_fused: bool = False) -> Resolution:
    if not modules:
        raise LowbitError("the model has no weight modules to apply the recipe to")
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise LowbitError("module names repeat in the module list")
    parts = [(hf, m) for m in modules for hf in m.hf_modules]
    example = next((hf for hf, m in parts if "." in hf and m.kind == "Linear"), parts[0][0])
    claims: dict[str, tuple[int, Modifier, Group]] = {}
    unused_ignores = []
    for index, mod in enumerate(recipe.modifiers):
        if not mod.quantizes:
            continue
        used = set()
        ignore_used = set()
        for hf, m in parts:
            ignored = [t for t in mod.ignore if _matches(t, hf, m.kind)]
            hits = [(tier, g, t) for g in mod.groups for t in g.targets
                    if (tier := _tier(t, hf, m.kind)) is not None]
            used.update(t.path for _, _, t in hits)  # compressed-tensors counts a target as used before ignore
            if ignored:
                ignore_used.update(t.path for t in ignored)
                continue
            if not hits:
                continue
            best = min(tier for tier, _, _ in hits)
            top = {}
            for tier, g, t in hits:
                if tier == best:
                    top.setdefault(g.name, (g, t))
            if len(top) > 1:
                (g1, t1), (g2, t2) = list(top.values())[:2]
                raise RecipeError(t2.path, f"{hf} is claimed by two config groups of {mod.label}: {g1.name} "
                                           f"(target {t1.text!r}) and {g2.name} (target {t2.text!r})")
            group = next(iter(top.values()))[0]
            if hf in claims:
                _, other, og = claims[hf]
                raise RecipeError(next(iter(top.values()))[1].path,
                                  f"{hf} is quantized by two modifiers: {other.label} (group {og.name}) and "
                                  f"{mod.label} (group {group.name})")
            claims[hf] = (index, mod, group)
        for g in mod.groups:
            for t in g.targets:
                if t.path not in used:
                    raise RecipeError(t.path, f"target {t.text!r} matches no weight module of the model (names look "
                                              f"like {example}; classes {', '.join(sorted(CLASS_MRO))})")
        unused_ignores += [t.text for t in mod.ignore if t.path not in ignore_used]

    awq = _transforms(recipe, parts, claims, "AWQModifier")
    smooth = _transforms(recipe, parts, claims, "SmoothQuantModifier")

    resolved, rules, conflicts = {}, [], []
    for m in modules:
        settings, where = [], []
        for hf in m.hf_modules:
            settings.append(_part_setting(hf, claims, awq, smooth, accuracy_level, m))
            where.append(claims.get(hf))
        first = settings[0]
        if split_fused and any(s != first for s in settings):
            conflicts.append(m.name)
            continue
        for hf, s, w in zip(m.hf_modules, settings, where):
            if s != first:
                claim = w or where[0]
                path = claim[2].path if claim else recipe.modifiers[0].path
                detail = "; ".join(f"{h}: {x.describe()}" for h, x in zip(m.hf_modules, settings))
                raise RecipeError(path, f"{m.name} computes {', '.join(m.hf_modules)} in one node but the recipe "
                                        f"gives them different settings ({detail}); they can be unfused only "
                                        "where the checkpoint stores them apart: give them one setting")
        claimed = [w for w in where if w is not None]
        groups = tuple(dict.fromkeys(g.name for _, _, g in claimed))
        mods = tuple(dict.fromkeys(mod.label for _, mod, _ in claimed))
        if first.quant is not None:
            _check_module(m, claimed[0][1], claimed[0][2], first.quant, pad, target)
        resolved[m.name] = ResolvedModule(m.name, m.hf_modules, m.kind, first.quant, groups, mods, first.algorithm,
                                          first.gptq, first.awq, first.smoothquant)
        rules.append(QuantRule(m.name, first.quant))
    plan = QuantPlan(tuple(rules), pad is not False)
    # NVFP4 weights on tensorrt beside static activation scales: calibration runs their FLOAT4E2M1 bytes in ONNX
    # Runtime through standard ops (calibrate_folder._float4_weights_for_ort), so no restriction here
    return Resolution(recipe, resolved, plan, tuple(dict.fromkeys(unused_ignores)), tuple(conflicts))


def _transforms(recipe: Recipe, parts, claims, kind: str) -> dict:
    """hf name -> (options, modifier) for the AWQ / SmoothQuant mappings of `kind`."""
    out = {}
    for index, mod in enumerate(recipe.modifiers):
        if mod.kind != kind:
            continue
        for mapping in mod.mappings:
            for t in mapping.balance:
                hit = [hf for hf, m in parts if _matches(t, hf, m.kind)]
                if not hit and mapping.explicit:
                    raise RecipeError(t.path, f"balance layer {t.text!r} matches no weight module of the model")
                for hf in hit:
                    claim = claims.get(hf)
                    if claim is None:
                        continue  # stays float: scaling a float module changes nothing
                    q_index, qmod, _ = claim
                    own = q_index == index
                    if q_index < index:
                        raise RecipeError(mod.path, f"{mod.label} comes after {qmod.label}, which quantizes {hf}: "
                                                    f"put {kind} first")
                    if kind == "AWQModifier" and not own and qmod.kind == "AWQModifier":
                        raise RecipeError(mod.path, f"{hf} is AWQ-scaled by {mod.label} and again by {qmod.label}")
                    if hf in out and out[hf][1] is not mod:
                        raise RecipeError(mod.path, f"{hf} is smoothed by {out[hf][1].label} and again by "
                                                    f"{mod.label}")
                    base = mod.awq if kind == "AWQModifier" else mod.smoothquant
                    options = type(base)(**{**asdict(base), "smooth_layer": mapping.smooth_layer})
                    if hf in out and out[hf][0] != options:
                        raise RecipeError(mapping.path, f"{hf} is a balance layer of two mappings of {mod.label}")
                    out[hf] = (options, mod)
    return out


def _part_setting(hf: str, claims, awq, smooth, accuracy_level: int, m: RecipeModule) -> _Setting:
    claim = claims.get(hf)
    if claim is None:
        return _Setting(None, None, None, None, None)
    _, mod, group = claim
    quant = LayerQuant(group.weight, None, accuracy_level if group.activation is None else 0, group.activation)
    awq_options = awq[hf][0] if hf in awq else None
    if mod.kind == "AWQModifier":
        algorithm = "awq" if awq_options is not None else "rtn"
    else:
        algorithm = "awq" if awq_options is not None else mod.algorithm
    gptq = mod.gptq if mod.kind == "GPTQModifier" else None
    return _Setting(quant, algorithm, gptq, awq_options, smooth[hf][0] if hf in smooth else None)


def _check_module(m: RecipeModule, mod: Modifier, group: Group, quant: LayerQuant, pad, target):
    site_kind = "gather" if m.kind == "Embedding" else "matmul"
    if site_kind == "gather" and quant.activation is not None:
        raise RecipeError(group.path, f"{m.name} is an embedding: it has no input activations to quantize "
                                      f"(group {group.name} quantizes activations)")
    g = quant.weight.group_size
    k = m.k if m.k is not None else (2 * g if g else 256)
    n = m.n if m.n is not None else 256
    if g and m.k is not None and m.k % g:
        allowed = pad is True or (pad is None and mod.bypass_divisibility_checks)
        if not allowed:
            how = ("and padding is off (--no-pad)" if pad is False else
                   "and padding is off: set bypass_divisibility_checks: true on the modifier to zero-pad K (the "
                   "same values as compressed-tensors' shorter last group)")
            raise RecipeError(group.weights_path + (("group_size",) if group.preset is None else ()),
                              f"group size {g} does not divide K = {m.k} of {', '.join(m.hf_modules)} ({m.name}) "
                              f"{how}")
    _check_format(quant.weight, quant.activation, group.weights_path, site_kind, n, k, m.name, target)


__all__ = ["RecipeModule", "Resolution", "ResolvedModule", "as_module", "format_path", "resolve_recipe",
           "storage_formats"]
