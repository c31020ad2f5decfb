"""Weight-algorithm quality on stories260K: round to nearest, clip search, GPTQ (± act-order), AWQ, 4 and 3 bits.

    python benchmarks/gptq_quality.py --calib ../shared/data/alpaca_seed_tasks.jsonl \
        --data ../shared/data/wikitext2_test.txt [--max-tokens N]

The protocol of issue 8 / docs/algorithms.md: decoder linears only (`--ignore lm_head --ignore embed_tokens`),
groups of 32, calibration on the given file (all of its rows, at most 512 tokens each; never the evaluation
text), evaluation with `lowbit report` against the q0f32 folder: WikiText-2 test in non-overlapping 256-token
windows with a fresh context each, perplexity, mean KL to the float model and top-1 agreement. Prints a
Markdown table (docs/performance.md keeps it) with each conversion's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import lowbit  # noqa: E402
DECODER_ONLY = ["--ignore", "lm_head", "--ignore", "embed_tokens"]
VARIANTS = {  # label -> convert arguments after the model and -o
    "w4 g32 sym RTN": ["--scheme", "w4a16", *DECODER_ONLY],
    "w4 g32 sym RTN + clip search": ["--scheme", "w4a16", "--clip-search", *DECODER_ONLY],
    "w4 g32 sym GPTQ": ["--scheme", "w4a16", "--algo", "gptq", *DECODER_ONLY],
    "w4 g32 sym GPTQ act-order": ["--scheme", "w4a16", "--algo", "gptq", "--act-order", *DECODER_ONLY],
    "w4 g32 sym GPTQ independent": ["--scheme", "w4a16", "--algo", "gptq", "--independent", *DECODER_ONLY],
    "w4 g32 sym AWQ": ["--scheme", "w4a16", "--algo", "awq", *DECODER_ONLY],
    "w4 g32 asym RTN": ["--scheme", "w4a16", "--asymmetric", *DECODER_ONLY],
    "w4 g32 asym AWQ": ["--scheme", "w4a16", "--asymmetric", "--algo", "awq", *DECODER_ONLY],
    "w4 g32 asym GPTQ": ["--scheme", "w4a16", "--asymmetric", "--algo", "gptq", *DECODER_ONLY],
    "w3 g32 sym RTN": ["--scheme", "w3a16", *DECODER_ONLY],
    "w3 g32 sym GPTQ": ["--scheme", "w3a16", "--algo", "gptq", *DECODER_ONLY],
    "w3 g32 sym AWQ": ["--scheme", "w3a16", "--algo", "awq", *DECODER_ONLY],
    "q3f16_1 RTN": ["--scheme", "q3f16_1"],
    "q3f16_1 GPTQ": ["--scheme", "q3f16_1", "--algo", "gptq"],
}
CALIBRATED = "--algo"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "samples" / "stories260K-hf"))
    parser.add_argument("--calib", required=True, help="calibration file (JSONL/JSON/text)")
    parser.add_argument("--num-samples", type=int, default=175)
    parser.add_argument("--data", required=True, help="evaluation text")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference = work / "q0f32"
        lowbit("convert", args.model, "-o", reference)
        folders, seconds = [], {}
        for i, label in enumerate(args.variants):
            out = work / f"v{i}"
            extra = VARIANTS[label]
            if CALIBRATED in extra:
                extra = [*extra, "--calib-data", args.calib, "--num-samples", args.num_samples]
            start = time.perf_counter()
            lowbit("convert", args.model, "-o", out, *extra)
            seconds[out.name] = time.perf_counter() - start
            folders.append(out)
        numbers = work / "report.json"
        limit = ["--max-tokens", args.max_tokens] if args.max_tokens else []
        lowbit("report", reference, *folders, "--data", args.data, "--reference", reference, "--seq-len", 256,
               *limit, "--repeats", 1, "--new-tokens", 8, "-o", work / "report.html", "--json", numbers)
        rows = {Path(r["folder"]).name: r for r in json.loads(numbers.read_text())["results"]}
    base = rows["q0f32"]
    print(f"stories260K, WikiText-2 test ({base['tokens']} scored tokens, 256-token windows), calibration "
          f"{Path(args.calib).name} ({args.num_samples} samples at most); q0f32 PPL {base['perplexity']:.2f}\n")
    print("| variant | PPL | KL (nats/token) | KL p99 | top-1 agreement | convert s |")
    print("|---|---|---|---|---|---|")
    for i, label in enumerate(args.variants):
        r = rows[f"v{i}"]
        print(f"| {label} | {r['perplexity']:.2f} | {r['kl']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | "
              f"{seconds[f'v{i}']:.1f} |")


if __name__ == "__main__":
    main()
