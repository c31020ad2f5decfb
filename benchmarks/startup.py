"""Whole-process time of `lowbit run` (start, tokenizer, session, 60 tokens, exit) on stories260K.

    python benchmarks/startup.py [--model samples/stories260K-hf] [--runs 10]

Converts the model once into a temporary folder, then times `python -m lowbit run` as a fresh
process each time and reports the median and the spread, and which heavy modules the run imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import sys, runpy; sys.argv = ['lowbit', 'run', {folder!r}, '--prompt', 'Once upon a time', "
         "'--max-new-tokens', '60']\ntry:\n    runpy.run_module('lowbit', run_name='__main__')\nexcept SystemExit:\n"
         "    pass\nprint([m for m in ('torch', 'transformers', 'onnx', 'onnx_ir', 'lowbit.converter') "
         "if m in sys.modules], file=sys.stderr)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "samples" / "stories260K-hf"))
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "model")
        subprocess.run([sys.executable, "-m", "lowbit", "convert", args.model, "-o", folder], check=True,
                       capture_output=True)
        command = [sys.executable, "-m", "lowbit", "run", folder, "--prompt", "Once upon a time",
                   "--max-new-tokens", "60"]
        times = []
        for _ in range(args.runs + 1):  # the first run warms the file cache
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        heavy = subprocess.run([sys.executable, "-c", PROBE.format(folder=folder)], capture_output=True, text=True)
    times = times[1:]
    print(f"lowbit run, 60 tokens, whole process: median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s, max {max(times):.3f} s over {len(times)} runs")
    print(f"heavy modules imported: {heavy.stderr.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
