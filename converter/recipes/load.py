"""Reading a recipe file (YAML or JSON) in any of llm-compressor's layouts, strictly (docs/recipes.md).

Layouts, told apart by the top-level keys:
- staged (llm-compressor's own, and what it saves as recipe.yaml): `NAME_stage:` -> `GROUP_modifiers:` ->
  `ModifierName: {args}`; several stages run in file order;
- modifiers: a list of one-key mappings `- ModifierName: {args}`, a mapping `ModifierName: {args}`, either under
  a top-level `modifiers:` key or bare, or a bare `GROUP_modifiers:` mapping;
- plain: the arguments of one QuantizationModifier at the top level (`config_groups`, `scheme`, `ignore`, ...).

Every error is a `LowbitError` of one line: `FILE:LINE: key.path: what` (the line of the key, from YAML's node
marks; JSON is read by the YAML composer for the lines too).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path as FilePath

import yaml
from pydantic import ValidationError

from lowbit.converter.recipes.schema import (
    ALGORITHMS,
    KNOWN_KEYS,
    MODIFIERS,
    UNSUPPORTED_MODIFIERS,
    AWQModifier,
    GPTQModifier,
    Group,
    Path,
    QuantArgs,
    RecipeError,
    SmoothQuantModifier,
    Target,
    _QuantizationMixin,
    activation_quant,
    check_format,
    check_pattern,
    preset,
    weight_quant,
)
from lowbit.errors import LowbitError

TOP_LEVEL_EXTRAS = {"version", "args", "metadata"}  # llm-compressor / sparseml recipe headers


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


# ------------------------------------------------------------------------------ normalised recipe


@dataclass(frozen=True)
class GPTQOptions:
    """lowbit's GPTQ settings (lowbit.converter.algorithms.pipeline.GPTQSettings field names)."""

    damp: float = 0.01  # dampening_frac: a fraction of the Hessian's mean diagonal, as in llm-compressor
    block_size: int = 128
    act_order: bool = True  # actorder static / weight (llm-compressor's default): static groups


@dataclass(frozen=True)
class AWQOptions:
    """lowbit's AWQ settings (pipeline.AWQSettings field names) and the mapping that scales the module."""

    grid: int = 20  # n_grid
    duo_scaling: bool = True
    clip: bool = False  # llm-compressor's AWQ has no weight-clip search (AutoAWQ's has)
    smooth_layer: str | None = None  # the mapping's smooth_layer pattern (None: lowbit's default mappings)


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = 0.5  # smoothing_strength
    smooth_layer: str | None = None  # the mapping's smooth_layers pattern
    num_calibration_steps: int | None = None


@dataclass(frozen=True)
class Mapping:
    smooth_layer: str
    balance: tuple[Target, ...]
    path: Path
    explicit: bool  # written in the recipe (a pattern that matches nothing is then an error)


# llm-compressor's default mappings (transform/awq/mappings.py default_mappings,
# transform/smoothquant/utils.py DEFAULT_SMOOTHQUANT_MAPPINGS)
AWQ_DEFAULT_MAPPINGS = (
    ("re:.*input_layernorm$", ("re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$")),
    ("re:.*v_proj$", ("re:.*o_proj$",)),
    ("re:.*post_attention_layernorm$", ("re:.*gate_proj$", "re:.*up_proj$")),
    ("re:.*up_proj$", ("re:.*down_proj$",)),
)
SMOOTHQUANT_DEFAULT_MAPPINGS = (
    ("re:.*input_layernorm", ("re:.*q_proj", "re:.*k_proj", "re:.*v_proj")),
    ("re:.*post_attention_layernorm", ("re:.*gate_proj", "re:.*up_proj")),
)


@dataclass(frozen=True)
class Modifier:
    """One modifier of the recipe, validated and translated."""

    kind: str  # "QuantizationModifier" | "GPTQModifier" | "AWQModifier" | "SmoothQuantModifier"
    path: Path  # its key path in the document
    groups: tuple[Group, ...] = ()  # what it quantizes (empty: a transform only)
    ignore: tuple[Target, ...] = ()
    bypass_divisibility_checks: bool = False
    gptq: GPTQOptions | None = None
    awq: AWQOptions | None = None
    smoothquant: SmoothQuantOptions | None = None
    mappings: tuple[Mapping, ...] = ()  # AWQ / SmoothQuant

    @property
    def label(self) -> str:
        return format_path(self.path)

    @property
    def quantizes(self) -> bool:
        return bool(self.groups)

    @property
    def algorithm(self) -> str | None:
        return ALGORITHMS.get(self.kind) if self.groups else None


@dataclass(frozen=True)
class Recipe:
    modifiers: tuple[Modifier, ...]
    source: str = "<recipe>"
    layout: str = "plain"  # "staged" | "modifiers" | "plain"
    lines: dict = field(default_factory=dict, compare=False, repr=False)  # key path -> 1-based line

    def where(self, path: Path) -> str:
        path = tuple(path)
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source

    def error(self, path: Path, message: str) -> LowbitError:
        message = " ".join(str(message).split())
        return LowbitError(f"{self.where(path)}: {format_path(path)}: {message}")


# ------------------------------------------------------------------------------ reading


def load_recipe(source: str | FilePath) -> Recipe:
    """Read and validate a recipe file (.yaml/.yml/.json; other names: JSON, else YAML)."""
    path = FilePath(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LowbitError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"recipe {path}: cannot read it ({type(e).__name__}: {e})".replace("\n", " ")) from None
    return parse_recipe(text, str(path), json_first=path.suffix.lower() not in (".yaml", ".yml"))


def parse_recipe(text: str, source: str = "<recipe>", json_first: bool = False) -> Recipe:
    """Validate recipe text (YAML, or JSON, which is read as YAML too for line numbers)."""
    doc, lines = _read(text, source, json_first)
    try:
        layout, entries = _entries(doc)
        modifiers = tuple(_modifier(name, args, mpath) for name, args, mpath in entries)
        _check_order(modifiers)
    except RecipeError as e:
        raise Recipe((), source, lines=lines).error(e.path, e.message) from None
    return Recipe(modifiers, source, layout, lines)


class _Loader(yaml.SafeLoader):
    pass


def _no_duplicates(loader, node):
    seen = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r} (first on line {seen[key_node.value] + 1})",
                    key_node.start_mark)
            seen[key_node.value] = key_node.start_mark.line
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
# YAML 1.2 floats without a dot (`dampening_frac: 1e-2`), which PyYAML's YAML 1.1 reads as strings and
# llm-compressor's lax pydantic turns into numbers
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _read(text: str, source: str, json_first: bool):
    doc, json_error = None, None
    if json_first:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            json_error = e
        except RecursionError:
            raise LowbitError(f"{source}: nested too deeply") from None
    if doc is None:
        try:
            doc = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"{source}:{mark.line + 1}" if mark is not None else source
            problem = getattr(e, "problem", None) or str(e)
            if json_error is not None and text.lstrip().startswith(("{", "[")):
                where, problem = f"{source}:{json_error.lineno}", f"not JSON ({json_error.msg})"
            raise LowbitError(f"{where}: {' '.join(str(problem).split())}") from None
        except RecursionError:
            raise LowbitError(f"{source}: nested too deeply") from None
    lines = {}
    try:
        _lines(yaml.compose(text, Loader=yaml.SafeLoader), (), lines)
    except (yaml.YAMLError, RecursionError):
        pass  # JSON that YAML does not read: no line numbers
    return doc, lines


def _lines(node, path: Path, out: dict):
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
                out.setdefault(path + (key,), key_node.start_mark.line + 1)
                _lines(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(path + (i,), item.start_mark.line + 1)
            _lines(item, path + (i,), out)


# ------------------------------------------------------------------------------ layouts


def _is_modifier_key(key) -> bool:
    return isinstance(key, str) and (key.endswith("Modifier") or key in MODIFIERS or key in UNSUPPORTED_MODIFIERS)


def _entries(doc) -> tuple[str, list[tuple[str, object, Path]]]:
    """(layout, [(modifier name, args, key path)]) in recipe order."""
    if doc is None or doc == {} or doc == []:
        raise RecipeError((), "empty recipe")
    if isinstance(doc, list):
        return "modifiers", _modifier_list(doc, ())
    if not isinstance(doc, dict):
        raise RecipeError((), f"a recipe is a mapping or a list of modifiers, not {type(doc).__name__}")
    for key in doc:
        if not isinstance(key, str):
            raise RecipeError((key,), f"keys are strings, got {key!r}")
    if any(k.endswith("_stage") for k in doc):
        entries = []
        for key, value in doc.items():
            if key in TOP_LEVEL_EXTRAS:
                _extra(key, value, (key,))
            elif not key.endswith("_stage"):
                raise RecipeError((key,), f"unknown key {key!r} beside the stages (a staged recipe holds NAME_stage "
                                          "keys)")
            else:
                entries += _stage(value, (key,))
        return "staged", entries
    if any(_is_modifier_key(k) or k.endswith("_modifiers") or k == "modifiers" for k in doc):
        entries = []
        for key, value in doc.items():
            if key in TOP_LEVEL_EXTRAS:
                _extra(key, value, (key,))
            elif key == "modifiers" and isinstance(value, list):
                entries += _modifier_list(value, (key,))
            elif key == "modifiers" or key.endswith("_modifiers"):
                entries += _modifier_map(value, (key,))
            elif _is_modifier_key(key):
                entries.append((key, value, (key,)))
            else:
                raise RecipeError((key,), f"unknown key {key!r} beside modifiers{_hint(key)}")
        return "modifiers", entries
    return "plain", [("QuantizationModifier", doc, ())]


def _extra(key: str, value, path: Path):
    if key == "version":
        return  # a recipe format version string: nothing to honour
    if value not in (None, {}, []):
        raise RecipeError(path, f"recipe {key} (variables, metadata) are not supported")


def _stage(value, path: Path) -> list:
    if not isinstance(value, dict):
        raise RecipeError(path, f"a stage is a mapping of NAME_modifiers groups, not {type(value).__name__}")
    entries = []
    for key, group in value.items():
        if key == "run_type" and group == "oneshot":
            continue  # older recipes: lowbit is one-shot anyway
        if not isinstance(key, str) or not key.endswith("_modifiers"):
            raise RecipeError(path + (key,), f"unknown key {key!r} in a stage (a stage holds NAME_modifiers "
                                             "groups)")
        entries += _modifier_map(group, path + (key,))
    return entries


def _modifier_map(value, path: Path) -> list:
    if isinstance(value, list):
        return _modifier_list(value, path)
    if not isinstance(value, dict) or not value:
        raise RecipeError(path, "a modifier group is a mapping of ModifierName: {arguments}")
    return [(name, args, path + (name,)) for name, args in value.items()]


def _modifier_list(items: list, path: Path) -> list:
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(path + (i,), "each list entry is one ModifierName: {arguments}")
        ((name, args),) = item.items()
        entries.append((name, args, path + (i, name)))
    return entries


def _hint(key: str) -> str:
    close = difflib.get_close_matches(key, [*KNOWN_KEYS, *MODIFIERS], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------ one modifier


def _validate(model, args, path: Path):
    try:
        return model.model_validate(args)
    except ValidationError as e:
        err = e.errors()[0]
        loc, cur, where = err["loc"], args, []
        for part in loc:
            if isinstance(cur, dict) and part in cur:
                where.append(part)
                cur = cur[part]
            elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
                where.append(part)
                cur = cur[part]
        kind, last = err["type"], loc[-1] if loc else None
        if kind == "extra_forbidden":
            message = f"unknown key {last!r}{_hint(str(last))}"
        elif kind == "missing":
            message = f"missing key {last!r}"
        else:
            got = repr(err.get("input"))
            message = f"{err['msg']} (got {got[:60]}{'...' if len(got) > 60 else ''})"
        raise RecipeError(path + tuple(where), message) from None


def _modifier(name, args, path: Path) -> Modifier:
    if name not in MODIFIERS:
        if name in UNSUPPORTED_MODIFIERS:
            raise RecipeError(path, f"{name} ({UNSUPPORTED_MODIFIERS[name]}) is not supported by lowbit (it runs "
                                    f"{', '.join(MODIFIERS)})")
        raise RecipeError(path, f"unknown modifier {name!r}{_hint(str(name))} (lowbit runs {', '.join(MODIFIERS)})")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RecipeError(path, f"{name}'s arguments are a mapping, not {type(args).__name__}")
    mod = _validate(MODIFIERS[name], args, path)
    for key, allowed in (("start", (None, -1, 0)), ("end", (None, -1)), ("update", (None,))):
        value = getattr(mod, key)
        if value not in allowed:
            raise RecipeError(path + (key,), f"{key}: {value} is a training schedule; lowbit is one-shot (leave it "
                                             "out)")
    if isinstance(mod, SmoothQuantModifier):
        return _smoothquant(mod, path)
    groups = _groups(mod, path)
    ignore = tuple(check_pattern(t, path + ("ignore", i)) for i, t in enumerate(mod.ignore))
    gptq = awq = None
    if isinstance(mod, GPTQModifier):
        gptq = _gptq(mod, groups, path)
    mappings = ()
    if isinstance(mod, AWQModifier):
        awq, mappings = _awq(mod, path)
    elif not groups:
        raise RecipeError(path, f"{name} quantizes nothing: give it a scheme or config_groups")
    return Modifier(name, path, tuple(groups), ignore, mod.bypass_divisibility_checks, gptq, awq, None, mappings)


def _observer_overrides(mod: _QuantizationMixin, path: Path) -> tuple[str | None, str | None]:
    if mod.output_observer is not None:
        raise RecipeError(path + ("output_observer",), "output activation quantization is not supported")
    weight, inputs = mod.weight_observer, mod.input_observer
    if mod.observer is not None:
        if weight is not None or inputs is not None:
            raise RecipeError(path + ("observer",), "give either observer or weight_observer / input_observer")
        for key in mod.observer:
            if key not in ("weights", "input", "output"):
                raise RecipeError(path + ("observer", key), f"unknown observer key {key!r} (weights, input, output)")
            if key == "output":
                raise RecipeError(path + ("observer", key), "output activation quantization is not supported")
        weight, inputs = mod.observer.get("weights"), mod.observer.get("input")
    return weight, inputs


def _groups(mod: _QuantizationMixin, path: Path) -> list[Group]:
    """llm-compressor's resolve_quantization_config: a preset scheme (string, or {PRESET: targets}) or
    config_groups."""
    if mod.kv_cache_scheme is not None:
        raise RecipeError(path + ("kv_cache_scheme",), "KV-cache quantization is not supported")
    if mod.scheme is not None and mod.config_groups is not None:
        raise RecipeError(path + ("scheme",), "give either scheme or config_groups, not both")
    weight_observer, input_observer = _observer_overrides(mod, path)
    targets = [mod.targets] if isinstance(mod.targets, str) else mod.targets
    target_paths = [path + ("targets",)] if isinstance(mod.targets, str) else \
        [path + ("targets", i) for i in range(len(targets))]
    formats = {}
    raw = []  # (group name, targets, target paths, {weights, input_activations}, group path, preset)
    if isinstance(mod.scheme, str):
        raw.append(("group_0", targets, target_paths, preset(mod.scheme, path + ("scheme",)), path + ("scheme",),
                    mod.scheme.upper()))
    elif isinstance(mod.scheme, dict):
        for i, (name, tgts) in enumerate(mod.scheme.items()):
            gpath = path + ("scheme", name)
            tlist = [tgts] if isinstance(tgts, str) else tgts
            tpaths = [gpath] if isinstance(tgts, str) else [gpath + (j,) for j in range(len(tlist))]
            raw.append((f"group_{i}", tlist, tpaths, preset(name, gpath), gpath, name.upper()))
    elif mod.config_groups:
        for name, scheme in mod.config_groups.items():
            gpath = path + ("config_groups", name)
            if scheme.output_activations is not None:
                raise RecipeError(gpath + ("output_activations",), "output activation quantization is not "
                                                                   "supported")
            args = {k: v for k, v in (("weights", scheme.weights), ("input_activations", scheme.input_activations))
                    if v is not None}
            raw.append((name, scheme.targets, [gpath + ("targets", j) for j in range(len(scheme.targets))], args,
                        gpath, None))
            formats[name] = check_format(scheme.format, gpath + ("format",))
    groups = []
    for name, tgts, tpaths, args, gpath, preset_name in raw:
        wpath = gpath if preset_name else gpath + ("weights",)
        apath = gpath if preset_name else gpath + ("input_activations",)
        if not tgts:
            raise RecipeError(tpaths[0] if tpaths else gpath, "no targets")
        targets_ = tuple(check_pattern(t, p) for t, p in zip(tgts, tpaths))
        w = args.get("weights")
        a = args.get("input_activations")
        if w is None:
            if a is not None:
                raise RecipeError(apath, "activation quantization without weight quantization is not supported")
            if preset_name == "UNQUANTIZED":
                continue
            raise RecipeError(gpath, "the group quantizes nothing (no weights)")
        if weight_observer is not None:
            w = w.model_copy(update={"observer": weight_observer})
        if a is not None and input_observer is not None:
            a = a.model_copy(update={"observer": input_observer})
        weight, act_order = _preset_checked(weight_quant, w, wpath, preset_name, "weights")
        activation = _preset_checked(activation_quant, a, apath, preset_name, "input_activations") \
            if a is not None else None
        _check_format(weight, activation, wpath if activation is None else apath)
        groups.append(Group(name, targets_, weight, activation, act_order, w.actorder is not None, w.observer,
                            a.observer if a is not None else None, gpath, wpath, preset_name,
                            None if preset_name else formats.get(name)))
    return groups


def _preset_checked(check, args: QuantArgs, path: Path, preset_name: str | None, role: str):
    """check(args, path); a preset's errors name the preset's key (its arguments are not in the file)."""
    try:
        return check(args, path)
    except RecipeError as e:
        if preset_name is None:
            raise
        key = ".".join(map(str, (role, *e.path[len(path):])))
        raise RecipeError(path, f"preset {preset_name} ({key}): {e.message}") from None


def _check_format(weight, activation, path: Path, kind: str = "matmul", n: int = 256, k: int = 256,
                  module: str = "", target: str | None = None):
    """RecipeError unless some storage format holds `weight` with `activation` for a site of `kind`."""
    from lowbit.converter.recipes.resolve import storage_formats  # (formats registry, imported late)

    names, reasons = storage_formats(weight, activation, kind, n, k, module, target)
    if not names:
        what = f"{weight.describe()} weights" + (f" with {activation.describe()} activations" if activation else "")
        raise RecipeError(path, f"no lowbit format computes {what}{' for ' + module if module else ''}: "
                                f"{'; '.join(reasons) or 'none registered'}")


def _gptq(mod: GPTQModifier, groups: list[Group], path: Path) -> GPTQOptions:
    if mod.block_size < 1:
        raise RecipeError(path + ("block_size",), f"block_size must be positive, got {mod.block_size}")
    damp = 0.0 if mod.dampening_frac is None else mod.dampening_frac
    if not 0 <= damp < 1:
        raise RecipeError(path + ("dampening_frac",), f"dampening_frac must be within [0, 1), got {damp}")
    actorder, given = mod.actorder, "actorder" in mod.model_fields_set
    if actorder in (True, "group", "dynamic"):
        raise RecipeError(path + ("actorder",), f"actorder {actorder!r} (group order with g_idx) is not supported; "
                                                "use weight / static or null")
    act_order = actorder in ("static", "weight")
    for g in groups:  # llm-compressor's resolve_actorder: a group's own actorder vs the modifier's
        if g.actorder_given and given and g.act_order != act_order:
            raise RecipeError(path + ("actorder",), f"actorder {actorder!r} differs from config group "
                                                    f"{g.name}'s weights.actorder")
    own = {g.act_order for g in groups if g.actorder_given}
    if not given and len(own) == 1:
        act_order = own.pop()
    elif not given and len(own) > 1:
        raise RecipeError(path, "config groups with different weights.actorder in one GPTQModifier are not "
                                "supported")
    return GPTQOptions(float(damp), mod.block_size, act_order)


def _awq(mod: AWQModifier, path: Path) -> tuple[AWQOptions, tuple[Mapping, ...]]:
    if mod.duo_scaling == "both":
        raise RecipeError(path + ("duo_scaling",), "duo_scaling: both is not supported (true or false)")
    if mod.n_grid < 1:
        raise RecipeError(path + ("n_grid",), f"n_grid must be positive, got {mod.n_grid}")
    for i, m in enumerate(mod.mappings or ()):
        if m.activation_hook_target is not None:
            raise RecipeError(path + ("mappings", i, "activation_hook_target"), "activation_hook_target is not "
                                                                                "supported")
    if mod.mappings is None:
        mappings = tuple(Mapping(s, tuple(Target(b, path) for b in bal), path, False)
                         for s, bal in AWQ_DEFAULT_MAPPINGS)
    else:
        mappings = tuple(Mapping(m.smooth_layer, tuple(check_pattern(b, path + ("mappings", i, "balance_layers", j))
                                                       for j, b in enumerate(m.balance_layers)),
                                 path + ("mappings", i), True)
                         for i, m in enumerate(mod.mappings))
    return AWQOptions(mod.n_grid, bool(mod.duo_scaling), False), mappings


def _smoothquant(mod: SmoothQuantModifier, path: Path) -> Modifier:
    if mod.algorithm != "smoothquant":
        raise RecipeError(path + ("algorithm",), f"algorithm {mod.algorithm} is not supported (smoothquant)")
    if not 0 <= mod.smoothing_strength <= 1:
        raise RecipeError(path + ("smoothing_strength",), f"smoothing_strength must be within [0, 1], got "
                                                          f"{mod.smoothing_strength}")
    if mod.ignore:
        raise RecipeError(path + ("ignore",), "SmoothQuantModifier ignore is not supported yet (it names smooth "
                                              "layers, which lowbit's module list does not hold); write mappings")
    if mod.num_calibration_steps is not None and mod.num_calibration_steps < 1:
        raise RecipeError(path + ("num_calibration_steps",), "num_calibration_steps must be positive")
    if mod.mappings is None:
        mappings = tuple(Mapping(s, tuple(Target(b, path) for b in bal), path, False)
                         for s, bal in SMOOTHQUANT_DEFAULT_MAPPINGS)
    else:
        mappings = tuple(Mapping(m.smooth_layers, tuple(check_pattern(b, path + ("mappings", i))
                                                        for j, b in enumerate(m.balance_layers)),
                                 path + ("mappings", i), True)
                         for i, m in enumerate(mod.mappings))
    options = SmoothQuantOptions(float(mod.smoothing_strength), None, mod.num_calibration_steps)
    return Modifier("SmoothQuantModifier", path, smoothquant=options, mappings=mappings)


def _check_order(modifiers: tuple[Modifier, ...]):
    for i, m in enumerate(modifiers):
        if m.kind == "AWQModifier" and not m.quantizes and not any(n.quantizes for n in modifiers[i + 1:]):
            raise RecipeError(m.path, "AWQModifier without a scheme needs a quantizing modifier after it "
                                      "(as llm-compressor requires)")
    if not any(m.quantizes for m in modifiers):
        raise RecipeError(modifiers[0].path if modifiers else (), "the recipe quantizes nothing")


__all__ = ["AWQOptions", "GPTQOptions", "Mapping", "Modifier", "QuantArgs", "Recipe", "SmoothQuantOptions",
           "format_path", "load_recipe", "parse_recipe"]
