"""The sample recipes on stories260K: size, WikiText-2 perplexity, KL to the float model and top-1 agreement.

    python benchmarks/recipe_table.py --data ../shared/data/wikitext2_test.txt \
        --calib ../shared/data/alpaca_seed_tasks.jsonl [--model samples/stories260K-hf] [--work /tmp/lowbit-recipes]

Converts the model with q0f32 (the reference), with each sample recipe of samples/recipes/ that converts, and with
two uniform recipes written here beside sample (a): every linear at (a)'s int4 group and every linear at its int8
channel rule (same rules, same ignore list; K not a multiple of 32 zero-padded, as compressed-tensors' shorter last
group), so (a)'s mix can be placed between them. Each folder is evaluated
with `lowbit eval --seq-len 256 --reference Q0F32 --json` (WikiText-2 test in non-overlapping 256-token windows,
a fresh context each); recipes with static activation scales or calibrated algorithms (GPTQ, AWQ, SmoothQuant)
calibrate on --calib (never the evaluation text); sample (d) runs with each --pipeline.
Prints a Markdown table (docs/performance.md keeps the latest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "recipes"
RECIPES = ["a_int8_down_int4_rest.yaml", "b_nvfp4_fp8_down.yaml", "c_fp8_attn_channel_mlp_tensor.yaml",
           "d_awq_attn_gptq_mlp.yaml", "e_dashinfer_instant_quant.yaml"]
PIPELINES = {"d_awq_attn_gptq_mlp.yaml": ("sequential", "independent")}  # samples run with each --pipeline

UNIFORM = """QuantizationModifier:
  ignore: [lm_head]
  bypass_divisibility_checks: true
  config_groups:
    uniform:
      targets: [Linear]
      weights: {weights}
"""
UNIFORM_INT4 = "{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}"  # (a)'s int4_rest
UNIFORM_INT8 = "{num_bits: 8, type: int, symmetric: true, strategy: channel}"  # (a)'s int8_down_proj


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "samples" / "stories260K-hf"))
    parser.add_argument("--data", required=True, help="evaluation text (WikiText-2 test)")
    parser.add_argument("--calib", required=True, help="calibration text for static activation scales")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit-recipes"))
    args = parser.parse_args()
    args.data, args.calib = Path(args.data).resolve(), Path(args.calib).resolve()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import lowbit
    from lowbit.runtime.bench import model_bytes

    args.work.mkdir(parents=True, exist_ok=True)
    recipes = {"uniform int4 g32": (args.work / "uniform_int4.yaml", ()),
               "uniform int8 channel": (args.work / "uniform_int8.yaml", ())}
    recipes["uniform int4 g32"][0].write_text(UNIFORM.format(weights=UNIFORM_INT4))
    recipes["uniform int8 channel"][0].write_text(UNIFORM.format(weights=UNIFORM_INT8))
    for name in RECIPES:
        for pipeline in PIPELINES.get(name, (None,)):
            label = f"({name[0]}) {name[2:-5]}" + (f", --pipeline {pipeline}" if pipeline else "")
            recipes[label] = (SAMPLES / name, ("--pipeline", pipeline) if pipeline else ())

    reference = args.work / "q0f32"
    lowbit("convert", args.model, "-o", reference, "--scheme", "q0f32", "--overwrite")
    rows = [("q0f32", reference)]
    for label, (recipe, extra) in recipes.items():
        out = args.work / (recipe.stem + (f"-{extra[-1]}" if extra else ""))
        lowbit("convert", args.model, "-o", out, "--recipe", recipe, "--calib-data", args.calib, "--overwrite",
               *extra)
        rows.append((label, out))
    print("| model | weights MB | PPL | KL to q0f32 (nats/token) | KL p99 | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for label, out in rows:
        r = json.loads(lowbit("eval", out, "--data", args.data, "--seq-len", 256, "--reference", reference,
                              "--json").strip().splitlines()[-1])
        print(f"| {label} | {model_bytes(out) / 1e6:.3f} | {r['perplexity']:.2f} | {r['kl']:.5f} | "
              f"{r['kl_p99']:.4f} | {r['top1']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
