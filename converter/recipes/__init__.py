"""Quantization recipes: llm-compressor / compressed-tensors recipes (config groups, presets, modifiers) read
strictly and resolved into lowbit's per-module settings (docs/recipes.md).

    recipe = load_recipe("samples/recipes/a_int8_down_int4_rest.yaml")
    resolution = resolve_recipe(recipe, modules)  # modules: (name, hf_modules[, kind[, k[, n]]]) per weight node
    resolution.plan  # a QuantPlan with one rule per module name
    resolution.modules["layers.0.mlp.down_proj"].group  # which config group, modifier, algorithm produced it
"""

from lowbit.converter.recipes.load import (
    AWQOptions,
    GPTQOptions,
    Modifier,
    Recipe,
    SmoothQuantOptions,
    format_path,
    load_recipe,
    parse_recipe,
)
from lowbit.converter.recipes.resolve import (
    RecipeModule,
    Resolution,
    ResolvedModule,
    as_module,
    resolve_recipe,
    storage_formats,
)
from lowbit.converter.recipes.schema import PRESETS, RecipeError

__all__ = [
    "AWQOptions",
    "GPTQOptions",
    "Modifier",
    "PRESETS",
    "Recipe",
    "RecipeError",
    "RecipeModule",
    "Resolution",
    "ResolvedModule",
    "SmoothQuantOptions",
    "as_module",
    "format_path",
    "load_recipe",
    "parse_recipe",
    "resolve_recipe",
    "storage_formats",
]
