"""lowbit vs the onnxruntime-genai model builder on a random-weight model with a real shape.

    python benchmarks/compare_builder.py --model smollm2-135m --work /tmp/lowbit-bench

Measures, each in a fresh subprocess: conversion wall time and peak RSS (lowbit `convert` and
`python -m onnxruntime_genai.models.builder`), then prefill/decode tokens per second of each
output (lowbit's runtime for lowbit folders, onnxruntime-genai for builder folders, and
onnxruntime-genai on the lowbit folder too, so the runtimes can be told apart). Prints a
markdown table; `--json FILE` also writes the raw numbers.

`--rounds N` runs every speed measurement N times, the jobs interleaved round by round, and
keeps the best, so that load from other processes hits all jobs alike. `--paired N` also
measures onnxruntime-genai decode with all folders taking turns step by step in one process, N
rounds, once per rotation of the loading order, and prints medians: on a shared machine this
tells differences of a few percent apart, where separate runs vary by ±5-10%.
`--baseline-src DIR`
adds "baseline" jobs converted by another lowbit source tree (e.g. `git archive <commit>` of
an older graph), measured with the same runtimes:

    git archive HEAD~1 | (mkdir -p /tmp/lowbit-old && tar -x -C /tmp/lowbit-old)
    python benchmarks/compare_builder.py --baseline-src /tmp/lowbit-old --rounds 5 \
        --jobs "baseline q0f32" "lowbit q0f32" "builder fp32" "baseline w4a16" "lowbit w4a16" "builder int4"
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

import numpy as np

HERE = Path(__file__).resolve().parent

# name -> (kind, lowbit scheme / builder precision, extra builder options)
W4A16 = ["--group-size", "32", "--accuracy-level", "4"]
JOBS = {
    "lowbit q0f32": ("lowbit", "q0f32", []),
    "builder fp32": ("builder", "fp32", []),
    "lowbit w4a16": ("lowbit", "w4a16", W4A16),
    "builder int4": ("builder", "int4", []),
    "baseline q0f32": ("baseline", "q0f32", []),  # with --baseline-src
    "baseline w4a16": ("baseline", "w4a16", W4A16),
}
DEFAULT_JOBS = [name for name, (kind, _, _) in JOBS.items() if kind != "baseline"]


def run_child(cmd, env: dict[str, str] | None = None):
    """Like `measured`, but the peak RSS is that one child's (wait4), not the max over all children. `env`:
    variables set for the child on top of this process's."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env} if env else None)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, out


# `python -m lowbit` from the package folder given first, ahead of an editable install's import hook
BASELINE_LOWBIT = r"""
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path.insert(0, sys.argv.pop(1))
runpy.run_module("lowbit", run_name="__main__", alter_sys=True)
"""


def convert_cmd(kind, scheme, extra, source, out, baseline: Path | None = None):
    if kind == "lowbit":
        return [sys.executable, "-m", "lowbit", "convert", str(source), "-o", str(out), "--scheme", scheme,
                "--overwrite", *extra]
    if kind == "baseline":
        return [sys.executable, "-c", BASELINE_LOWBIT, str(baseline), "convert", str(source), "-o", str(out),
                "--scheme", scheme, "--overwrite", *extra]
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


# --paired: all folders in one onnxruntime-genai process, their generators taking turns step by step
# (random order each step), so that outside load hits them alike.
PAIRED_GENAI = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
prompt_len, new_tokens, rounds, folders = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
models = [og.Model(f) for f in folders]
rng = np.random.default_rng(0)
steps = [[] for _ in folders]
for r in range(rounds + 1):
    ids = rng.integers(3, 1000, prompt_len).astype(np.int32)
    gens = []
    for model in models:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_len + new_tokens, do_sample=False)
        gens.append(og.Generator(model, params))
        gens[-1].append_tokens(ids)
    for _ in range(new_tokens - 1):
        for k in rng.permutation(len(models)):
            t = time.perf_counter(); gens[k].generate_next_token(); t = time.perf_counter() - t
            if r:
                steps[k].append(t)
print(json.dumps([1 / float(np.median(x)) for x in steps]))
"""

def paired(folders: list[Path], prompt_len: int, new_tokens: int, rounds: int) -> list[float]:
    """onnxruntime-genai decode tokens per second of each folder, measured turn about in one process: the median over
    `rounds`, then the geometric mean over every rotation of the loading order (the model loaded last
    runs up to 10% faster on our 2-core VM, so each folder takes each place once)."""
    speeds = np.zeros((len(folders), len(folders)))
    for shift in range(len(folders)):
        order = folders[shift:] + folders[:shift]
        _, _, out = run_child([sys.executable, "-c", PAIRED_GENAI, str(prompt_len), str(new_tokens), str(rounds),
                               *map(str, order)])
        speeds[shift] = np.roll(json.loads(out.strip().splitlines()[-1]), shift)
    return np.exp(np.log(speeds).mean(axis=0)).tolist()


def baseline_package(src: Path, work: Path) -> Path:
    """A folder holding `lowbit` as source tree `src` installs it (lowbit/ with converter/, runtime/ and
    custom_ops/ inside), for BASELINE_LOWBIT."""
    shim = work / "baseline-package" / "lowbit"
    shutil.rmtree(shim.parent, ignore_errors=True)
    shim.mkdir(parents=True)
    for entry in (src / "lowbit").iterdir():
        (shim / entry.name).symlink_to(entry.resolve())
    for folder in ("converter", "runtime", "custom_ops"):
        (shim / folder).symlink_to((src / folder).resolve())
    return shim.parent


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
    parser.add_argument("--jobs", nargs="*", default=DEFAULT_JOBS, choices=list(JOBS))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="speed runs per job, interleaved; the best is kept")
    parser.add_argument("--baseline-src", type=Path, help="lowbit source tree that converts the baseline jobs")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="also measure genai decode with the folders taking turns in one process")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if any(JOBS[name][0] == "baseline" for name in args.jobs) and args.baseline_src is None:
        parser.error("baseline jobs need --baseline-src")
    os.chdir(HERE.parent)
    sys.path.insert(0, str(HERE.parent))
    from lowbit.runtime.bench import model_bytes

    source = args.work / f"{args.model}-random"
    if not (source / "config.json").is_file():  # in a child: a fork of a process holding torch would count its RSS
        run_child([sys.executable, str(HERE / "random_model.py"), args.model, str(source)])
    rows = []
    for name in args.jobs:
        kind, scheme, extra = JOBS[name]
        out = args.work / f"{args.model}-{name.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        baseline = baseline_package(args.baseline_src, args.work) if kind == "baseline" else None
        wall, rss, _ = run_child(convert_cmd(kind, scheme, extra, source, out, baseline))
        runtimes = ["genai"] if kind == "builder" else ["lowbit", "genai"]
        rows.append({"job": name, "folder": out, "convert_s": wall, "convert_peak_rss_mb": rss,
                     "model_bytes": model_bytes(out), "runtimes": runtimes})
    for _ in range(args.rounds):  # every job once per round, so that outside load hits all of them alike
        for row in rows:
            for runtime in row["runtimes"]:
                result = bench(runtime, row["folder"], args.prompt_len, args.new_tokens, args.repeats)
                row.setdefault(f"{runtime}_runs", []).append(result)
                print(json.dumps({"job": row["job"], "runtime": runtime, **result}), flush=True)
    for row in rows:
        for runtime in row["runtimes"]:
            runs = row[f"{runtime}_runs"]
            row[f"{runtime}_runtime"] = {key: max(r[key] for r in runs)
                                         for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    print(f"\n{args.model} (random weights), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{os.cpu_count()} cores, best of {args.rounds} round(s) x {args.repeats} repeats\n")
    print("| job | convert s | convert peak RSS MB | model MB | runtime | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for runtime in ("lowbit_runtime", "genai_runtime"):
            if runtime in row:
                r = row[runtime]
                print(f"| {row['job']} | {row['convert_s']:.1f} | {row['convert_peak_rss_mb']:.0f} | "
                      f"{row['model_bytes'] / 1e6:.0f} | {runtime.split('_')[0]} | "
                      f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} |")
    if args.paired:
        print(f"\nonnxruntime-genai decode, the folders taking turns in one process ({args.paired} rounds per "
              f"loading order)\n")
        print("| job | decode tok/s |")
        print("|---|---|")
        speeds = paired([row["folder"] for row in rows], args.prompt_len, args.new_tokens, args.paired)
        for row, speed in zip(rows, speeds):
            row["genai_paired_decode_tokens_per_s"] = speed
            print(f"| {row['job']} | {speed:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
