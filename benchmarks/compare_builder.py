"""lowbit vs the onnxruntime-genai model builder on a random-weight model with a real shape.

    python benchmarks/compare_builder.py --model smollm2-135m --work /tmp/lowbit-bench

Measures, each in a fresh subprocess: conversion wall time and peak RSS (lowbit `convert` and
`python -m onnxruntime_genai.models.builder`), then prefill/decode tokens per second of each
output (lowbit's runtime for lowbit folders, onnxruntime-genai for builder folders, and
onnxruntime-genai on the lowbit folder too, so the runtimes can be told apart). Prints a
markdown table; `--json FILE` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (kind, lowbit scheme / builder precision, extra builder options)
JOBS = {
    "lowbit q0f32": ("lowbit", "q0f32", []),
    "builder fp32": ("builder", "fp32", []),
    "lowbit w4a16": ("lowbit", "w4a16", ["--group-size", "32", "--accuracy-level", "4"]),
    "builder int4": ("builder", "int4", []),
}


def run_child(cmd):
    """Like `measured`, but the peak RSS is that one child's (wait4), not the max over all children."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, out


def convert_cmd(kind, scheme, extra, source, out):
    if kind == "lowbit":
        return [sys.executable, "-m", "lowbit", "convert", str(source), "-o", str(out), "--scheme", scheme,
                "--overwrite", *extra]
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out), "-p",
            scheme, "-e", "cpu", "-c", str(out) + ".cache", *extra]


GENAI_BENCH = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
folder, prompt_len, new_tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = og.Model(folder)
rng = np.random.default_rng(0)
best_prefill = best_decode = float("inf")
for _ in range(repeats + 1):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    ids = rng.integers(3, 1000, prompt_len).astype(np.int32)
    t0 = time.perf_counter(); gen.append_tokens(ids); t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        gen.generate_next_token()
    t2 = time.perf_counter()
    best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, (t2 - t1) / (new_tokens - 1))
print(json.dumps({"prefill_tokens_per_s": prompt_len / best_prefill, "decode_tokens_per_s": 1 / best_decode}))
"""


def bench(runtime: str, folder: Path, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    if runtime == "lowbit":
        cmd = [sys.executable, "-m", "lowbit", "bench", str(folder), "--prompt-len", str(prompt_len),
               "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--json"]
    else:
        cmd = [sys.executable, "-c", GENAI_BENCH, str(folder), str(prompt_len), str(new_tokens), str(repeats)]
    _, rss, out = run_child(cmd)
    result = json.loads(out.strip().splitlines()[-1])
    result["run_peak_rss_mb"] = rss
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit-bench"))
    parser.add_argument("--jobs", nargs="*", default=list(JOBS))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.chdir(HERE.parent)
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.random_model import make_random_model
    from lowbit.runtime.bench import model_bytes

    source = args.work / f"{args.model}-random"
    if not (source / "config.json").is_file():
        make_random_model(args.model, source)
    rows = []
    for name in args.jobs:
        kind, scheme, extra = JOBS[name]
        out = args.work / f"{args.model}-{name.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, _ = run_child(convert_cmd(kind, scheme, extra, source, out))
        row = {"job": name, "convert_s": wall, "convert_peak_rss_mb": rss, "model_bytes": model_bytes(out)}
        if kind == "lowbit":
            row["lowbit_runtime"] = bench("lowbit", out, args.prompt_len, args.new_tokens, args.repeats)
        row["genai_runtime"] = bench("genai", out, args.prompt_len, args.new_tokens, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.model} (random weights), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{os.cpu_count()} cores\n")
    print("| job | convert s | convert peak RSS MB | model MB | runtime | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for runtime in ("lowbit_runtime", "genai_runtime"):
            if runtime in row:
                r = row[runtime]
                print(f"| {row['job']} | {row['convert_s']:.1f} | {row['convert_peak_rss_mb']:.0f} | "
                      f"{row['model_bytes'] / 1e6:.0f} | {runtime.split('_')[0]} | "
                      f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
