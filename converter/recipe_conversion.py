"""`lowbit convert MODEL -o OUT --recipe FILE`: a recipe (converter/recipes) turned into the conversion's plan.

The recipe is read and validated before the checkpoint; once the float graph exists, its weight nodes (our module
names, the transformers modules each computes, their K and N) are resolved against it into one plan rule per
module, and the weight algorithm of the modifiers that need one (GPTQModifier, AWQModifier) runs on the modules
they target, with that modifier's settings, while the others are rounded to nearest; several calibrated modifiers
run in one model (`algorithms.pipeline.run_algorithms`: one sequential pass, or one pass each with
`--independent`). A SmoothQuantModifier smooths the modules its mappings name, each with its modifier's strength.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx_ir as ir

from lowbit.converter.algorithms.pipeline import AlgorithmSpec, AWQSettings, GPTQSettings
from lowbit.converter.graph import hf_modules
from lowbit.converter.quant.rewrite import weight_sites
from lowbit.converter.recipes import Recipe, RecipeModule, load_recipe, resolve_recipe
from lowbit.converter.schemes import DTYPES, Scheme, SchemeOptions, accuracy_level
from lowbit.errors import LowbitError

RECIPE_NODE_KEY = "lowbit.recipe"  # node metadata: "modifier / config group" that produced the node


def recipe_for_conversion(path: Path, scheme: str | None, ignore: tuple[str, ...], algorithm: AlgorithmSpec) -> Recipe:
    """The validated recipe, after checking that no option contradicts it."""
    if scheme is not None:
        raise LowbitError("give either --scheme or --recipe, not both (the recipe sets the quantization per module)")
    if ignore:
        raise LowbitError("--ignore does not combine with --recipe: list the modules under the recipe's `ignore`")
    if algorithm.name != "rtn" or algorithm.smoothquant_alpha is not None:
        raise LowbitError("--algo and --smoothquant-alpha do not combine with --recipe: the recipe's modifiers "
                          "(GPTQModifier, AWQModifier, SmoothQuantModifier) choose the algorithms")
    return load_recipe(path)


def recipe_placeholder(options: SchemeOptions) -> Scheme:
    """The scheme until the graph exists: the compute dtype (--dtype, default float32), no plan yet."""
    for name in ("group_size", "symmetric"):
        if getattr(options, name) is not None:
            raise LowbitError(f"--{name.replace('_', '-')} does not combine with --recipe: set it in the recipe")
    if options.clip_search:
        raise LowbitError("--clip-search does not combine with --recipe")
    return Scheme("recipe", DTYPES[options.dtype or "float32"], "recipe")


@dataclass
class RecipeRun:
    scheme: Scheme
    algorithms: dict[str, frozenset[str]]  # calibrated algorithm -> the modules it runs on, in modifier order
    settings: dict[str, GPTQSettings | AWQSettings]  # module -> its modifier's settings for that algorithm
    smoothquant: dict[str, float]  # module -> SmoothQuant strength, for the modules a SmoothQuantModifier maps
    labels: dict[str, str]  # module -> "modifier / group"
    record: dict = field(default_factory=dict)
    quantization_config: dict = field(default_factory=dict)  # compressed-tensors style, for config.json

    def tag(self, model: ir.Model) -> None:
        """Each quantized node names the modifier and config group that produced it (`lowbit inspect`)."""
        for node in model.graph:
            label = self.labels.get(node.name)
            if label and "lowbit.quant" in node.metadata_props:
                node.metadata_props[RECIPE_NODE_KEY] = label


def _modules(model: ir.Model) -> list[RecipeModule]:
    return [RecipeModule(s.module, hf_modules(s.node) or (s.module,), "Embedding" if s.kind == "gather" else
                         "Linear", s.k, s.n) for s in weight_sites(model)]


def modules_to_unfuse(recipe: Recipe, model: ir.Model, options: SchemeOptions, target: str) -> frozenset[str]:
    """The graph's fused modules (q/k/v, gate/up) whose parts the recipe treats differently: to be emitted as one
    node per part (SmoothQuant and AWQ then scale the parts that read one norm with one s). Not those whose parts
    are one tensor in the checkpoint (resolving reports the conflict, naming the module)."""
    resolution = resolve_recipe(recipe, _modules(model), pad=None if options.pad else False, target=target,
                                accuracy_level=accuracy_level(options), split_fused=True)
    return frozenset(resolution.fused_conflicts)


def apply_recipe(recipe: Recipe, path: Path, model: ir.Model, options: SchemeOptions, target: str) -> RecipeRun:
    resolution = resolve_recipe(recipe, _modules(model), pad=None if options.pad else False, target=target,
                                accuracy_level=accuracy_level(options))
    resolved = resolution.modules.values()
    order = {ALGORITHM_OF[mod.kind]: None for mod in recipe.modifiers if mod.kind in ALGORITHM_OF}
    algorithms = {name: frozenset(m.name for m in resolved if m.algorithm == name) for name in order}
    algorithms = {name: modules for name, modules in algorithms.items() if modules}
    settings = {m.name: _settings(m) for m in resolved if m.algorithm in algorithms}
    smoothquant = {m.name: m.smoothquant.alpha for m in resolved if m.smoothquant is not None and m.quant is not None}
    quantized = [m for m in resolved if m.quant is not None]
    if not quantized:
        raise LowbitError(f"recipe {path}: quantizes no module of this model")
    groups = sorted({m.group for m in quantized})
    scheme = Scheme("recipe", DTYPES[options.dtype or "float32"],
                    f"recipe {Path(path).name}: {len(quantized)} modules in config groups {', '.join(groups)}",
                    resolution.plan)
    record = {
        "file": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "modules": {m.name: m.record() for m in resolved if m.quant is not None},
        "float": [m.name for m in resolved if m.quant is None],
        "unused_ignores": list(resolution.unused_ignores),
    }
    labels = {m.name: f"{m.modifier} / {m.group}" for m in quantized}
    return RecipeRun(scheme, algorithms, settings, smoothquant, labels, record, quantization_config(resolution))


ALGORITHM_OF = {"GPTQModifier": "gptq", "AWQModifier": "awq"}  # modifiers that run a calibrated algorithm


def _settings(module) -> GPTQSettings | AWQSettings:
    """The pipeline's settings for a resolved module, from its modifier's options."""
    gptq = GPTQSettings(**asdict(module.gptq)) if module.gptq is not None else None
    if module.algorithm == "gptq":
        return gptq
    return AWQSettings(grid=module.awq.grid, duo_scaling=module.awq.duo_scaling, clip=module.awq.clip, gptq=gptq)


def _weight_args(q) -> dict:
    """compressed-tensors QuantizationArgs of a lowbit WeightQuant."""
    if q.rule == "nvfp4":  # compressed-tensors' NVFP4A16 weights (FP4 e2m1, FP8 e4m3 scales per 16, global scale)
        return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                "group_size": q.group_size, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    float8 = q.rule.startswith("fp8")
    strategy = "tensor" if q.per_tensor else "group" if q.group_size else "channel"
    args = {"num_bits": q.bits, "type": "float" if float8 else "int",
            "symmetric": float8 or q.rule != "asymmetric", "strategy": strategy, "dynamic": False}
    if q.group_size:
        args["group_size"] = q.group_size
    return args


def _activation_args(a) -> dict | None:
    if a is None:
        return None
    if a.strategy == "tensor_group":  # the NVFP4 preset's input activations (calibrated global scale, dynamic local)
        return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
                "dynamic": "local", "observer": "static_minmax", "scale_dtype": "torch.float8_e4m3fn"}
    return {"num_bits": a.bits, "type": a.type, "symmetric": a.symmetric, "strategy": a.strategy,
            "dynamic": a.dynamic}


def _compressor(weights: dict, activations: dict | None) -> str:
    """The compressed-tensors format llm-compressor would save such a group as."""
    if weights["type"] == "float":
        return "nvfp4-pack-quantized" if weights["num_bits"] == 4 else "float-quantized"
    return "int-quantized" if activations is not None else "pack-quantized"


def quantization_config(resolution) -> dict:
    """config.json's `quantization_config` in compressed-tensors' schema, for the recipe as resolved on this model:
    one config group per recipe group, its targets the exact transformers names of the modules it quantizes,
    `ignore` the linear modules left float, each group's compressor (`format`, `mixed-precision` where they
    differ). `quantization_status` "frozen": the settings are final, but the weights live in model.onnx, not in
    compressed safetensors."""
    groups: dict[str, dict] = {}
    ignore = []
    for m in resolution.modules.values():
        if m.quant is None:
            ignore += list(m.hf_modules) if m.kind == "Linear" else []  # compressed-tensors targets linears
            continue
        name = m.group.replace("+", "_")
        weights, activations = _weight_args(m.quant.weight), _activation_args(m.quant.activation)
        group = groups.setdefault(name, {"targets": [], "weights": weights, "input_activations": activations,
                                         "format": _compressor(weights, activations)})
        group["targets"] += list(m.hf_modules)
    formats = sorted({g["format"] for g in groups.values()})
    return {"quant_method": "compressed-tensors", "format": formats[0] if len(formats) == 1 else "mixed-precision",
            "quantization_status": "frozen", "config_groups": groups, "ignore": ignore}

