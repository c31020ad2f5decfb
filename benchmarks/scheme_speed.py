"""Speed matrix: every scheme converted from the same model, benchmarked against q0f32 in one interleaved run.

    python benchmarks/scheme_speed.py [--model smollm2-135m] [--work /tmp/lowbit-speed] [--rounds 3]
        [--schemes q0f32 w4a16 ...] [--prompt-len 128] [--new-tokens 16] [--threads 2] [--json FILE]
        [--ort-kernels] [--float16-graphs]

Builds a random-weight checkpoint of a real config (benchmarks/random_model.py), converts it with
every scheme (and the formats only a recipe reaches, with benchmarks/recipes/: rows `*-recipe`), then runs
`lowbit bench` in a fresh process per scheme, all schemes once per round
(rotating the order), for `--rounds` rounds. A scheme's prefill/decode is its best round; peak RSS
is the bench process's own (wait4). Ratios are against q0f32 from the same run, so machine load
moves both sides alike. Prints a Markdown table (docs/performance.md keeps the latest). `--ort-kernels` adds,
for each scheme, q0f32 included, a row run with LOWBIT_KERNELS=0 (ONNX Runtime's kernels instead of lowbit's CPU
kernels) and ratios against `q0f32 ORT`, the float model on ONNX Runtime's own MatMul;
`--float16-graphs`, for each float16 scheme, a row run with LOWBIT_CPU_FLOAT32=0 (its float16 graph as written,
instead of computed in float32).

With `--ort-kernels` it then checks the speed targets (TARGETS: issue 13's acceptance) against `q0f32 ORT` and
prints each one met or the rows that miss it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (row label, scheme, extra convert options, weight bits for the decode target: None for float weights and for
# an opt-in route)
SCHEMES = [
    ("q0f32", "q0f32", [], None),
    ("q0f16", "q0f16", [], None),
    ("a16w8", "a16w8", [], 8),
    ("a16w8-g64", "a16w8-g64", [], 8),
    ("a16w8-minmax", "a16w8-minmax", [], 8),
    ("a16w4", "a16w4", [], 4),
    ("a16w4-g64", "a16w4-g64", [], 4),
    ("q4f32_1", "q4f32_1", [], 4),
    ("q4f16_1", "q4f16_1", [], 4),
    ("q3f16_1", "q3f16_1", [], 3),
    ("w8a16", "w8a16", [], 8),
    ("w4a16", "w4a16", [], 4),
    ("w3a16", "w3a16", [], 3),
    ("w2a16", "w2a16", [], 2),
    ("w8a8", "w8a8", [], 8),
    ("w8a8-static", "w8a8-static", ["--num-samples", "16"], 8),
    ("e4m3_e4m3_f16", "e4m3_e4m3_f16", ["--num-samples", "16"], 8),  # activation scales: lowbit's default set
    ("e5m2_e5m2_f16", "e5m2_e5m2_f16", ["--num-samples", "16"], 8),
    # formats only a recipe reaches (benchmarks/recipes/): scheme None
    # at the default accuracy level 4: lowbit.cpu.MatMulInt4Int8 over the e2m1 codes, int8 activations
    ("nvfp4a16-recipe", None, ["--recipe", str(HERE / "recipes" / "nvfp4a16.yaml")], 4),
    # the same weights at float compute (--accuracy-level 0: float32 on lowbit.cpu.MatMulNarrowFloat), opt-in
    ("nvfp4a16-float-recipe", None, ["--recipe", str(HERE / "recipes" / "nvfp4a16.yaml"), "--accuracy-level", "0"],
     None),
    ("nvfp4-recipe", None, ["--recipe", str(HERE / "recipes" / "nvfp4.yaml"), "--num-samples", "16"], 4),
]


@dataclass(frozen=True)
class Targets:
    """Speed targets of every scheme's default route against the float model on ONNX Runtime's MatMul."""

    decode: tuple = ((8, 2.0), (4, 2.8), (3, 2.5), (2, 3.0))  # (weight bits, at least this × decode)
    prefill: float = 0.9  # every row, at least this × prefill
    rss_over_folder_mb: float = 300  # peak RSS at most the folder's bytes plus this
    q3_at_least: tuple = (("prefill", 0.8), ("decode", 0.8))  # q3f16_1 / q4f16_1 of each, at least
    q3_at_most: tuple = (("folder", 0.85), ("peak RSS", 1.5))  # and at most


TARGETS = Targets()


def verdict(misses: list[str]) -> str:
    return "; ".join(misses) if misses else "met"


def target_report(results: dict, bits: dict, targets: Targets = TARGETS) -> list[str]:
    """One line per target: met, or the rows that miss it. `results`: interleaved_bench's rows with `q0f32 ORT`
    among them; `bits`: row label -> weight bits (None: no decode target), for lowbit's rows (not `... ORT`)."""
    ort = results["q0f32 ORT"]
    rows = [label for label in bits if label in results]
    lines = []
    decode = dict(targets.decode)
    misses = [f"{label} {results[label]['decode'] / ort['decode']:.2f} < {decode[bits[label]]}" for label in rows
              if bits[label] in decode and results[label]["decode"] / ort["decode"] < decode[bits[label]]]
    bars = ", ".join(f"{bar} ({b}-bit)" for b, bar in targets.decode)
    lines.append(f"decode at least {bars}: {verdict(misses)}")
    misses = [f"{label} {results[label]['prefill'] / ort['prefill']:.2f}" for label in rows
              if results[label]["prefill"] / ort["prefill"] < targets.prefill]
    lines.append(f"prefill at least {targets.prefill} for every row: {verdict(misses)}")
    over = {label: results[label]["rss_mb"] - results[label]["model_bytes"] / 1e6 for label in rows}
    misses = [f"{label} {mb:.0f} MB" for label, mb in over.items() if mb > targets.rss_over_folder_mb]
    lines.append(f"peak RSS at most the folder plus {targets.rss_over_folder_mb:.0f} MB: {verdict(misses)}")
    if "q3f16_1" in results and "q4f16_1" in results:
        q3, q4 = results["q3f16_1"], results["q4f16_1"]
        measured = {"prefill": q3["prefill"] / q4["prefill"], "decode": q3["decode"] / q4["decode"],
                    "folder": q3["model_bytes"] / q4["model_bytes"], "peak RSS": q3["rss_mb"] / q4["rss_mb"]}
        parts = [f"{name} {measured[name]:.2f} " + (f"(>= {bar})" if measured[name] >= bar else f"(MISSED: < {bar})")
                 for name, bar in targets.q3_at_least]
        parts += [f"{name} {measured[name]:.2f} " + (f"(<= {bar})" if measured[name] <= bar else f"(MISSED: > {bar})")
                  for name, bar in targets.q3_at_most]
        lines.append("q3f16_1 against q4f16_1: " + ", ".join(parts))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit-speed"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schemes", nargs="*", default=[label for label, _, _, _ in SCHEMES])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ort-kernels", action="store_true",
                        help="also run every scheme with LOWBIT_KERNELS=0 (rows '... ORT'): ONNX Runtime's kernels "
                             "where lowbit's CPU kernels would run; adds ratios against 'q0f32 ORT'")
    parser.add_argument("--float16-graphs", action="store_true",
                        help="also run every float16 scheme with LOWBIT_CPU_FLOAT32=0 (rows '... f16'): the float16 "
                             "graph as written")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.common import interleaved_bench
    from benchmarks.compare_builder import run_child
    from lowbit.runtime.bench import model_bytes

    jobs = {label: (scheme, extra) for label, scheme, extra, _ in SCHEMES}
    labels = ["q0f32"] + [s for s in args.schemes if s != "q0f32"]
    unknown = [s for s in labels if s not in jobs]
    if unknown:
        parser.error(f"unknown scheme rows {unknown} (known: {', '.join(jobs)})")
    source = args.work / f"{args.model}-random"
    if not (source / "config.json").is_file():  # in a child: a fork of a process holding torch would count its RSS
        run_child([sys.executable, str(HERE / "random_model.py"), args.model, str(source)])
    folders = {}
    for label in labels:
        scheme, extra = jobs[label]
        folders[label] = out = args.work / f"{args.model}-{label}"
        run_child([sys.executable, "-m", "lowbit", "convert", str(source), "-o", str(out), "--overwrite",
                   *(["--scheme", scheme] if scheme else []), *extra])
        print(f"converted {label}: {model_bytes(out) / 1e6:.1f} MB", flush=True)
    variants = {label: [] for label in labels}  # extra rows: (suffix, environment)
    for label in labels:
        if args.ort_kernels:  # q0f32 too: lowbit's kernel reads a bfloat16 checkpoint's float32 weights at half width
            variants[label].append((" ORT", {"LOWBIT_KERNELS": "0"}))
        dtype = json.loads((folders[label] / "lowbit.json").read_text()).get("dtype")
        if label != "q0f32" and args.float16_graphs and dtype == "float16":
            variants[label].append((" f16", {"LOWBIT_CPU_FLOAT32": "0"}))
    envs = {}
    for label, extra in variants.items():
        for suffix, env in extra:
            folders[label + suffix], envs[label + suffix] = folders[label], env
    labels = [row for label in labels for row in [label] + [label + suffix for suffix, _ in variants[label]]]
    results = interleaved_bench({label: folders[label] for label in labels}, args.rounds, args.prompt_len,
                                args.new_tokens, args.threads, envs)
    base, ort = results["q0f32"], results.get("q0f32 ORT")  # ort: the float model on ONNX Runtime's own MatMul
    print(f"\n{args.model} (random weights), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, best of {args.rounds} interleaved rounds\n")
    against_ort = " × q0f32 ORT (prefill, decode) |" if ort else ""
    print(f"| scheme | folder MB | prefill tok/s | × q0f32 | decode tok/s | × q0f32 |{against_ort} peak RSS MB | "
          "RSS − folder MB |")
    print("|---|---|---|---|---|---|" + ("---|" if ort else "") + "---|---|")
    for label in labels:
        r = results[label]
        ratios = f" {r['prefill'] / ort['prefill']:.2f}, {r['decode'] / ort['decode']:.2f} |" if ort else ""
        print(f"| {label} | {r['model_bytes'] / 1e6:.1f} | {r['prefill']:.0f} | {r['prefill'] / base['prefill']:.2f} | "
              f"{r['decode']:.1f} | {r['decode'] / base['decode']:.2f} |{ratios} {r['rss_mb']:.0f} | "
              f"{r['rss_mb'] - r['model_bytes'] / 1e6:.0f} |")
    if ort:
        print("\nTargets, against q0f32 ORT:")
        bits = {label: weight_bits for label, _, _, weight_bits in SCHEMES}
        for line in target_report(results, bits):
            print(f"- {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
