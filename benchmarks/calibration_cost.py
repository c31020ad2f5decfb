"""Wall time and peak memory of calibration through ONNX Runtime on a realistic shape.

    python benchmarks/calibration_cost.py --data FILE [--model smollm2-135m] [--work /tmp/lowbit-calib]
        [--num-samples 128] [--seq-len 512] [--threads 2] [--runs calibrate smoothquant gptq awq]

Builds a random-weight checkpoint of a real config (benchmarks/random_model.py) and converts it to q0f32 (for its
size). Then, each in a child process (peak RSS from wait4), with `--num-samples` × `--seq-len` tokens:
`calibrate`: `lowbit calibrate` of a `w8a8-static` folder (converted first with 2 samples); `smoothquant`: a
`--smoothquant-alpha 0.5` w8a8-static conversion (`--smoothquant` is the same); `gptq` / `awq`: a w4a16 conversion
with `--algo gptq` / `--algo awq`, sequential. Speed and memory do not depend on the weights or on what the text
says, so any long text file will do (weights are random; nothing is evaluated).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.random_model import make_random_model  # noqa: E402


def run_measured(args: list[str], threads: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of `python -m lowbit ARGS` in a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "lowbit", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"lowbit {' '.join(args)} failed: {process.stderr.read()}")
    return wall, usage.ru_maxrss / 1024


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", default="/tmp/lowbit-calib", type=Path)
    parser.add_argument("--num-samples", default=128, type=int)
    parser.add_argument("--seq-len", default=512, type=int)
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--smoothquant", action="store_true", help="also time a --smoothquant-alpha conversion")
    parser.add_argument("--runs", nargs="+", default=["calibrate"], choices=["calibrate", "smoothquant", "gptq", "awq"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / f"{args.model}-random"
    if not (source / "config.json").is_file():
        make_random_model(args.model, source)
    runs = list(dict.fromkeys(args.runs + (["smoothquant"] if args.smoothquant else [])))
    float_folder, static_folder = args.work / "q0f32", args.work / "w8a8-static"
    for folder, scheme, extra, needed in ((float_folder, "q0f32", [], True),
                                          (static_folder, "w8a8-static", ["--num-samples", "2"], "calibrate" in runs)):
        if needed and not (folder / "lowbit.json").is_file():
            subprocess.run([sys.executable, "-m", "lowbit", "convert", str(source), "-o", str(folder), "--scheme",
                            scheme, "--overwrite", *extra], check=True, stdout=subprocess.DEVNULL)
    samples = ["--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
    converts = {  # run -> (label, scheme and options)
        "smoothquant": ("lowbit convert --scheme w8a8-static --smoothquant-alpha 0.5 (two passes + writing)",
                        ["--scheme", "w8a8-static", "--smoothquant-alpha", "0.5"]),
        "gptq": ("lowbit convert --scheme w4a16 --algo gptq (sequential, writing included)",
                 ["--scheme", "w4a16", "--algo", "gptq"]),
        "awq": ("lowbit convert --scheme w4a16 --algo awq (sequential, writing included)",
                ["--scheme", "w4a16", "--algo", "awq"]),
    }
    rows = []
    for run in runs:
        if run == "calibrate":
            rows.append(("lowbit calibrate (w8a8-static)",
                         *run_measured(["calibrate", str(static_folder), "--dataset", str(args.data),
                                        "--num-calibration-samples", str(args.num_samples), "--seq-len",
                                        str(args.seq_len)], args.threads)))
            continue
        label, options = converts[run]
        out = args.work / f"{run}-out"
        rows.append((label, *run_measured(["convert", str(source), "-o", str(out), *options, "--overwrite",
                                           "--calib-data", str(args.data), *samples], args.threads)))
    size = folder_mb(float_folder)
    print(f"\n{args.model} (random weights), {args.num_samples} samples x {args.seq_len} tokens, "
          f"{args.threads} threads; fp32 folder {size:.1f} MB\n")
    print("| run | wall s | peak RSS MB | RSS / fp32 folder |")
    print("|---|---|---|---|")
    for label, wall, rss in rows:
        print(f"| {label} | {wall:.0f} | {rss:.0f} | {rss / size:.2f} |")


if __name__ == "__main__":
    main()
