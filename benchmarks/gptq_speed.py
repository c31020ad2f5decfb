"""GPTQ arithmetic alone: `gptq_quantize` on the SmolLM2-135M linear shapes, random weights and a random SPD Hessian.

    python benchmarks/gptq_speed.py [--repeat 3] [--rows 2048] [--bits 4] [--group 32] [--rule symmetric_full]
        [--act-order] [--clip-search] [--block-size 128] [--against REV]

Per shape (qkv 960x576, o_proj 576x576, gate_up 3072x576, down 576x1536) the best of `--repeat` calls in ms, as
wall-clock time and as the CPU time of the process (all its threads: on a shared machine, with
OPENBLAS_NUM_THREADS=1, the CPU time is close to what the call would take alone on one core), then one layer's sum
and the wall-clock sum times 30 layers (SmolLM2-135M). The Hessian is H = 2/n XᵀX of `--rows` correlated random
activations with a few outlier channels (n ≥ K: positive definite before dampening), built once per K, not timed.

`--against REV` also times converter/algorithms/gptq.py as of git revision REV (e.g. HEAD), its calls interleaved
with the working tree's so that other load on the machine hits both alike, and stops if the two give different
codes, scales or zero points.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

from lowbit.affine import WeightQuant
from lowbit.converter.algorithms import gptq_quantize

SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (N, K)
LAYERS = 30
ROOT = Path(__file__).resolve().parent.parent


def gptq_at(rev: str):
    """`gptq_quantize` from converter/algorithms/gptq.py as of git revision `rev`."""
    source = subprocess.run(["git", "show", f"{rev}:converter/algorithms/gptq.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = sys.modules[f"gptq_at_{rev}"] = types.ModuleType(f"gptq_at_{rev}")  # dataclasses look it up
    exec(compile(source, f"{rev}:converter/algorithms/gptq.py", "exec"), module.__dict__)
    return module.gptq_quantize


def hessian(rng: np.random.Generator, k: int, rows: int) -> np.ndarray:
    mixing = rng.standard_normal((k, k)) * (0.3 / np.sqrt(k)) + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mixing
    x[:, rng.choice(k, 4, replace=False)] *= 8.0  # a few outlier channels, as in real activations
    return 2.0 / rows * (x.T @ x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2048, help="calibration rows behind the random Hessian")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--rule", default="symmetric_full", help="w4a16: symmetric_full")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--clip-search", action="store_true")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--against", metavar="REV", help="also time gptq.py at this git revision (e.g. HEAD)")
    args = parser.parse_args()
    versions = {"now": gptq_quantize}
    if args.against:
        versions = {args.against: gptq_at(args.against), **versions}
    rng = np.random.default_rng(0)
    quant = WeightQuant(args.bits, args.group, args.rule, args.clip_search)
    hessians = {k: hessian(rng, k, args.rows) for k in sorted({k for _, k in SHAPES.values()})}
    print(f"gptq_quantize, {quant.describe()}, block {args.block_size}, act_order={args.act_order}, best of "
          f"{args.repeat}; ms per call, wall clock / CPU time of the process (all its threads)")
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    columns = [(version, clock) for version in versions for clock in clocks]
    print(f"{'shape':8s} {'N x K':>11s}" + "".join(f" {f'{v} {c}':>12s}" for v, c in columns)
          + ("  speedup wall / cpu" if len(versions) > 1 else ""))
    totals = dict.fromkeys(columns, 0.0)

    def row(label: str, shape: str, times: dict) -> str:
        line = f"{label:8s} {shape:>11s}" + "".join(f" {times[column] * 1e3:12.1f}" for column in columns)
        if len(versions) > 1:
            line += "  " + " / ".join(f"{times[args.against, c] / times['now', c]:.1f}x" for c in clocks)
        return line

    for name, (n, k) in SHAPES.items():
        w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        best, results = dict.fromkeys(columns, float("inf")), {}
        for _ in range(args.repeat):
            for version, function in versions.items():
                starts = {c: clock() for c, clock in clocks.items()}
                results[version] = function(w, hessians[k], quant, block_size=args.block_size,
                                            act_order=args.act_order)
                for c, clock in clocks.items():
                    best[version, c] = min(best[version, c], clock() - starts[c])
        for column in columns:
            totals[column] += best[column]
        first, last = results[next(iter(versions))].quantized, results["now"].quantized
        for field in ("codes", "scales", "zero_points"):
            if not np.array_equal(getattr(first, field), getattr(last, field)):
                raise SystemExit(f"{name}: {field} differ between {args.against} and the working tree")
        print(row(name, f"{n}x{k}", best), flush=True)
    print(row("layer", "", totals))
    print(f"{LAYERS} layers, wall: " + ", ".join(f"{v} {totals[v, 'wall'] * LAYERS:.1f} s" for v in versions))


if __name__ == "__main__":
    main()
