"""Float vs int8 compute (MatMulNBits accuracy_level 0 vs 4) for every scheme, on stories260K.

    python benchmarks/accuracy_levels.py --data ../shared/data/wikitext2_test.txt [--max-tokens 40960]

Converts samples/stories260K-hf with every weight-only scheme twice (`--accuracy-level 0` and the
default 4), and with the recipes that have weight-only layers (`--recipes`: benchmarks/recipes/nvfp4a16.yaml, whose
int8 compute is lowbit's MatMulInt4Int8 over the e2m1 codes, K not a multiple of 16 zero-padded; the sample recipes
(a) int4/int8, (b) NVFP4A16 + FP8, (d) AWQ int4 attention + GPTQ W8A8 MLP, (e) DashInfer int8 per channel, calibrated
on `--calib-data`, never the evaluation text), then measures each folder
with `lowbit report` against the q0f32 folder: WikiText-2 test in non-overlapping 256-token windows with a fresh
context each, perplexity, mean KL divergence to the float model's next-token distribution, and top-1 agreement.
Prints a Markdown table (docs/schemes.md keeps it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import lowbit  # noqa: E402
SAMPLES = ROOT / "samples" / "recipes"
# name: (recipe, text appended to it); stories260K's down_proj has K = 172: NVFP4 zero-pads it to groups of 16
RECIPES = {"nvfp4a16": (ROOT / "benchmarks" / "recipes" / "nvfp4a16.yaml", "  bypass_divisibility_checks: true\n"),
           "sample-a": (SAMPLES / "a_int8_down_int4_rest.yaml", ""),
           "sample-b": (SAMPLES / "b_nvfp4_fp8_down.yaml", ""),
           "sample-d": (SAMPLES / "d_awq_attn_gptq_mlp.yaml", ""),
           "sample-e": (SAMPLES / "e_dashinfer_instant_quant.yaml", "")}
SCHEMES = ["q4f32_1", "q4f16_1", "q3f16_1", "a16w8", "a16w8-g128", "a16w8-minmax", "a16w4", "a16w4-g32", "w8a16",
           "w4a16", "w3a16", "w2a16"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "samples" / "stories260K-hf"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-tokens", type=int, default=40960)
    parser.add_argument("--schemes", nargs="*", default=SCHEMES)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--calib-data", default=str(ROOT.parent / "shared" / "data" / "alpaca_seed_tasks.jsonl"),
                        help="calibration text of the recipes (default: ../shared's alpaca seed tasks)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference = work / "q0f32"
        lowbit("convert", args.model, "-o", reference)
        folders = []
        for scheme in args.schemes:
            for level in (0, 4):
                out = work / f"{scheme}-level{level}"
                lowbit("convert", args.model, "-o", out, "--scheme", scheme, "--accuracy-level", level)
                folders.append(out)
        for name in args.recipes:
            source, extra = RECIPES[name]
            recipe = work / f"{name}.yaml"
            recipe.write_text(source.read_text().rstrip("\n") + "\n" + extra)
            for level in (0, 4):
                out = work / f"{name}-level{level}"
                lowbit("convert", args.model, "-o", out, "--recipe", recipe, "--accuracy-level", level,
                       "--calib-data", args.calib_data)
                folders.append(out)
        numbers = work / "report.json"
        lowbit("report", reference, *folders, "--data", args.data, "--reference", reference, "--seq-len", 256,
               "--max-tokens", args.max_tokens, "--repeats", 1, "--new-tokens", 8, "-o", work / "report.html",
               "--json", numbers)
        rows = {Path(r["folder"]).name: r for r in json.loads(numbers.read_text())["results"]}
    base = rows["q0f32"]
    print(f"stories260K, WikiText-2 test, first {args.max_tokens} tokens in 256-token windows; "
          f"q0f32 PPL {base['perplexity']:.2f}\n")
    print("| scheme | PPL float compute | PPL int8 compute | KL float | KL int8 | top-1 float | top-1 int8 |")
    print("|---|---|---|---|---|---|---|")
    for scheme in args.schemes + args.recipes:
        f, q = rows[f"{scheme}-level0"], rows[f"{scheme}-level4"]
        print(f"| {scheme} | {f['perplexity']:.2f} | {q['perplexity']:.2f} | {f['kl']:.4f} | {q['kl']:.4f} | "
              f"{f['top1']:.3f} | {q['top1']:.3f} |")


if __name__ == "__main__":
    main()
