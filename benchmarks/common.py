"""Helpers the benchmark scripts share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def lowbit(*args) -> str:
    """`python -m lowbit ARGS` in a child process; its stdout, or RuntimeError with its stderr."""
    result = subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return result.stdout


def interleaved_bench(folders: dict[str, Path], rounds: int, prompt_len: int, new_tokens: int,
                      threads: int, envs: dict[str, dict[str, str]] | None = None) -> dict[str, dict]:
    """`lowbit bench` of every folder once per round in a fresh process (the order rotated each round); per label
    the best prefill and decode tok/s, the largest peak RSS (MB) and the folder's model bytes. `envs`: environment
    variables for some labels' processes."""
    from benchmarks.compare_builder import run_child

    labels = list(folders)
    results: dict[str, dict] = {}
    for round_ in range(rounds):
        for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
            cmd = [sys.executable, "-m", "lowbit", "bench", str(folders[label]), "--prompt-len", str(prompt_len),
                   "--new-tokens", str(new_tokens), "--repeats", "2", "--threads", str(threads), "--json"]
            _, rss, out = run_child(cmd, (envs or {}).get(label))
            r = json.loads(out.strip().splitlines()[-1])
            best = results.setdefault(label, {"prefill": 0.0, "decode": 0.0, "rss_mb": 0.0,
                                              "model_bytes": r["model_bytes"]})
            best["prefill"] = max(best["prefill"], r["prefill_tokens_per_s"])
            best["decode"] = max(best["decode"], r["decode_tokens_per_s"])
            best["rss_mb"] = max(best["rss_mb"], rss)
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    return results
