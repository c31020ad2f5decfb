"""Every scheme on the bundled stories260K: model bytes, WikiText-2 perplexity, decode tok/s.

    python benchmarks/scheme_table.py --data ../shared/data/wikitext2_test.txt [--max-tokens N]

Each scheme is converted with `lowbit convert`, evaluated with `lowbit eval --json`
(seq-len 512, stride 512) and benchmarked with `lowbit bench --json` (prompt 128, 64 new tokens).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = [
    ("q0f32", []), ("q0f16", []), ("q4f32_1", []), ("q4f16_1", []), ("q3f16_1", []),
    ("a16w8", []), ("a16w8-g128", []), ("a16w8-minmax", []), ("a16w4", []), ("a16w4-g32", []),
    ("w8a16", ["--accuracy-level", "0"]), ("w4a16", ["--accuracy-level", "0"]), ("w4a16", []),
    ("w4a16", ["--asymmetric"]), ("w2a16", ["--group-size", "16", "--asymmetric"]),
]


def lowbit(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return result.stdout


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "samples" / "stories260K-hf"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit-schemes"))
    args = parser.parse_args()
    print("| scheme | options | model bytes | WikiText-2 PPL | decode tok/s | prefill tok/s |")
    print("|---|---|---|---|---|---|")
    for scheme, options in SCHEMES:
        out = args.work / (scheme + "".join(options).replace("-", "_"))
        lowbit("convert", args.model, "-o", out, "--scheme", scheme, "--overwrite", *options)
        extra = ["--max-tokens", args.max_tokens] if args.max_tokens else []
        ppl = json.loads(lowbit("eval", out, "--data", args.data, "--seq-len", 512, "--json", *extra).splitlines()[-1])
        bench = json.loads(lowbit("bench", out, "--json").splitlines()[-1])
        print(f"| {scheme} | {' '.join(options)} | {bench['model_bytes']:,} | {ppl['perplexity']:.3f} | "
              f"{bench['decode_tokens_per_s']:.0f} | {bench['prefill_tokens_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
