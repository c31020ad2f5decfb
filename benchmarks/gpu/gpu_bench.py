"""Prefill and decode throughput on the GPU: lowbit folders on ONNX Runtime's CUDA provider at batch 1 and 8, and the
anchor, transformers + torch on the same random-weight checkpoint in float16 and bfloat16.

    python benchmarks/gpu/gpu_bench.py FOLDER ... [--anchor HF_FOLDER ...] [--provider cuda] [--batches 1 8]
        [--prompt-len 128] [--new-tokens 64] [--repeats 3] [--jsonl FILE] [--markdown FILE]

Both sides time the same loop: a prefill of `--prompt-len` random tokens per row (logits of the last position only),
then `--new-tokens` greedy decode steps each feeding one token per row on top of the cache, best of `--repeats`
after one warm-up; tok/s count every row (batch x tokens / seconds). lowbit's loop is runtime/bench.py's
generation_seconds for a batch of B (KVCache.forward, logits_to_keep=1); the anchor's is the model's forward with
past_key_values and logits_to_keep=1, torch.cuda.synchronize() around each timed part. Each folder and each anchor
dtype runs in a child process of its own while this one samples `nvidia-smi --query-gpu=memory.used`: the GPU
memory column is the peak over the child's life less the reading before it started (weights, cache, workspace and
allocator pools together). Without nvidia-smi (the CPU provider) it is empty.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------ children


def lowbit_seconds(session, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s) of `ids` [B, P] then `new_tokens` greedy steps through the generation cache, logits of
    the last position only: runtime/bench.py's generation_seconds, which `lowbit bench --batch` times."""
    from lowbit.runtime.bench import generation_seconds

    return generation_seconds(session, ids, new_tokens)


def torch_seconds(model, ids, new_tokens: int, sync) -> tuple[float, float]:
    """The same loop on a transformers model: forward with its cache (`past_key_values`, `cache` from
    transformers 5.2x on), last-position logits."""
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{key: out[key]})
    sync()
    t2 = time.perf_counter()
    held = out[key].get_seq_length()
    if held != ids.shape[1] + new_tokens:  # each step must have run on top of the cache, not from scratch
        raise RuntimeError(f"the cache holds {held} positions after the loop, not {ids.shape[1] + new_tokens}")
    return t1 - t0, t2 - t1


def best_rows(label: str, seconds, vocab: int, args) -> list[dict]:
    """Best of `repeats` (after a warm-up) of seconds(ids) per batch size, as table rows."""
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        best_prefill = best_decode = float("inf")
        for _ in range(args.repeats + 1):
            ids = rng.integers(3, vocab, (batch, args.prompt_len), dtype=np.int64)
            prefill, decode = seconds(ids)
            best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, decode)
        rows.append({"label": label, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "prefill_tok_s": batch * args.prompt_len / best_prefill,
                     "decode_tok_s": batch * args.new_tokens / best_decode,
                     "decode_ms_per_step": 1e3 * best_decode / args.new_tokens})
    return rows


def child_lowbit(folder: Path, args) -> dict:
    from parity import kv_cache_kind, open_session, placement

    from lowbit.runtime.bench import model_bytes, peak_rss_mb
    from lowbit.runtime.session import PROVIDERS

    session = open_session(folder, args.provider)
    used = list(session.session.get_providers())
    if used[0] != PROVIDERS[args.provider]:
        raise RuntimeError(f"{folder}: asked for {args.provider}, onnxruntime runs it on {used}")
    rows = best_rows(folder.name, lambda ids: lowbit_seconds(session, ids, args.new_tokens), session.vocab_size, args)
    return {"rows": rows, "providers_used": used, "model_bytes": model_bytes(folder), "peak_rss_mb": peak_rss_mb(),
            "kv_cache": kv_cache_kind(session), "placement": placement(session)}


def child_torch(hf: Path, dtype: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lowbit.runtime.bench import peak_rss_mb

    device = "cuda" if args.provider != "cpu" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=getattr(torch, dtype)).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def seconds(ids):
        with torch.inference_mode():
            return torch_seconds(model, torch.from_numpy(ids).to(device), args.new_tokens, sync)

    label = f"transformers {torch.__version__} {dtype} ({hf.name})"
    rows = best_rows(label, seconds, model.config.vocab_size, args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"rows": rows, "model_bytes": weights, "peak_rss_mb": peak_rss_mb(), "device": device}
    if device == "cuda":
        out["torch_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_name"] = torch.cuda.get_device_name()
    return out


# ------------------------------------------------------------------------------ parent


class GpuMemory:
    """Samples `nvidia-smi --query-gpu=memory.used` (MiB, first GPU) in a thread: baseline and peak."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, None, threading.Event()
        self.baseline = self.read()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10)
            return float(out.stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _run(self):
        while True:  # at least one reading, however short the child
            value = self.read()
            if value is not None:
                self.peak = value if self.peak is None else max(self.peak, value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def used_mb(self) -> float | None:
        return None if self.peak is None or self.baseline is None else self.peak - self.baseline


def run_child(child_args: list[str], args) -> dict:
    cmd = [sys.executable, str(HERE / "gpu_bench.py"), *child_args, "--provider", args.provider,
           "--batches", *map(str, args.batches), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    t0 = time.perf_counter()
    with GpuMemory() as memory:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.child_timeout} s", "child": child_args}
    if proc.returncode:
        return {"error": proc.stderr.strip()[-3000:], "child": child_args}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["gpu_peak_mb"] = memory.used_mb
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def markdown(results: list[dict], args) -> str:
    lines = [f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, provider {args.provider}, best of "
             f"{args.repeats}", "",
             "| what | batch | prefill tok/s | decode tok/s | decode ms/step | GPU memory MB | weights MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {' '.join(r['child'])} | – | error: {r['error'].splitlines()[-1][:200]} | | | | |")
            continue
        gpu = "–" if r.get("gpu_peak_mb") is None else f"{r['gpu_peak_mb']:.0f}"
        for row in r["rows"]:
            lines.append(f"| {row['label']} | {row['batch']} | {row['prefill_tok_s']:.0f} | "
                         f"{row['decode_tok_s']:.1f} | {row['decode_ms_per_step']:.2f} | {gpu} | "
                         f"{r['model_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path, help="lowbit convert output folders")
    ap.add_argument("--anchor", type=Path, action="append", default=[], help="HF folder for transformers + torch")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], help="the anchor's dtypes")
    ap.add_argument("--provider", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child-timeout", type=float, default=300.0, help="seconds for one folder or anchor dtype")
    ap.add_argument("--jsonl", type=Path, default=None, help="append each result to this file as it comes")
    ap.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)  # lowbit FOLDER | torch HF DTYPE
    args = ap.parse_args(argv)
    if args.child:
        kind, path, *rest = args.child
        result = child_lowbit(Path(path), args) if kind == "lowbit" else child_torch(Path(path), rest[0], args)
        print(json.dumps(result), flush=True)
        return 0
    results = []
    jobs = [["--child", "lowbit", str(f)] for f in args.folders]
    jobs += [["--child", "torch", str(hf), dtype] for hf in args.anchor for dtype in args.dtypes]
    for job in jobs:
        result = run_child(job, args)
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
    table = markdown(results, args)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(table + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
