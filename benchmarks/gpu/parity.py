"""The same inputs through a converted folder on two providers (default: cuda against cpu), one JSON line per folder.

    python benchmarks/gpu/parity.py FOLDER [FOLDER ...] [--provider cuda] [--reference cpu] [--jsonl FILE]

Per folder: the logits of a random prompt (batch 1, every position) and of `--steps` decode steps fed the
reference's greedy tokens (teacher forcing, so both sides see the same inputs however near the random model's
top logits are): the largest absolute difference, relative to the reference logits' largest magnitude, and the
argmax agreement over those positions; then free-running greedy generation of a left-padded batch of two prompts
through lowbit's generation loop, tokens compared row by row (informational: random weights make near ties).
`ok`: the requested provider ran the graph and the relative difference is within `tol` (2e-2 for float16 graphs,
1e-2 for float32; 1e-1 where the CPU side quantizes activations to int8, accuracy level 4, and CUDA does not).
`placement`: nodes per execution provider and op type, where this onnxruntime records it. Exit code 1 if a folder
is not ok.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from lowbit.runtime.generate import SamplingConfig, generate_ids
from lowbit.runtime.kv_cache import KVCache
from lowbit.runtime.session import PROVIDERS, create_session

RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"


def open_session(folder: Path, provider: str):
    """create_session, asking ORT to record where nodes run; CUDA libraries preloaded from pip's nvidia packages."""
    import onnxruntime as ort

    if provider != "cpu" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    try:
        return create_session(folder, provider, session_config={RECORD_PLACEMENT: "1"})
    except Exception:  # noqa: BLE001 - an onnxruntime without that config key
        return create_session(folder, provider)


def placement(session) -> dict | None:
    """{execution provider: {op type: nodes}}, or None where onnxruntime cannot tell."""
    try:
        subgraphs = session.session.get_provider_graph_assignment_info()
    except Exception:  # noqa: BLE001
        return None
    out: dict = {}
    for sub in subgraphs:
        ops = out.setdefault(sub.ep_name, {})
        for node in sub.get_nodes():
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return out or None


def kv_cache_kind(session) -> str:
    """The class of KV cache the runtime gives this session (BoundKVCache: buffers bound as past and present)."""
    return type(KVCache.empty(session, 1, 1)).__name__


def trace(session, ids: np.ndarray, steps: int, forced: np.ndarray | None = None):
    """Prefill logits [B, P, V] of `ids`, then `steps` decode steps through the generation cache feeding `forced`
    tokens [B, steps] (None: greedy): (prefill logits, step logits [B, steps, V], fed tokens [B, steps])."""
    batch, prompt = ids.shape
    cache = KVCache.empty(session, batch, prompt + steps)
    positions = np.tile(np.arange(prompt, dtype=np.int64), (batch, 1))
    prefill = cache.forward(ids, np.ones_like(ids), positions, logits_to_keep=0).astype(np.float32)
    last, fed, step_logits = prefill[:, -1], [], []
    for t in range(steps):
        token = last.argmax(-1) if forced is None else forced[:, t]
        fed.append(token)
        mask = np.ones((batch, prompt + t + 1), np.int64)
        logits = cache.forward(token[:, None].astype(np.int64), mask, np.full((batch, 1), prompt + t, np.int64),
                               logits_to_keep=1)
        last = logits[:, -1].astype(np.float32)
        step_logits.append(last)
    return prefill, np.stack(step_logits, 1), np.stack(fed, 1)


def tolerance(folder: Path) -> float:
    meta = json.loads((folder / "lowbit.json").read_text()) if (folder / "lowbit.json").is_file() else {}
    int8 = any(int(layer.get("accuracy_level", 0)) == 4 and layer.get("format") in ("matmulnbits", "blockwise")
               for layer in meta.get("quantization", {}).values())
    return 1e-1 if int8 else 2e-2 if meta.get("dtype") == "float16" else 1e-2


def compare(folder: Path, provider: str, reference: str, prompt_len: int, steps: int) -> dict:
    t0 = time.perf_counter()
    ref = open_session(folder, reference)
    test = open_session(folder, provider)
    used = list(test.session.get_providers())
    rng = np.random.default_rng(0)
    ids = rng.integers(3, ref.vocab_size, (1, prompt_len), dtype=np.int64)
    ref_prefill, ref_steps, tokens = trace(ref, ids, steps)
    test_prefill, test_steps, _ = trace(test, ids, steps, forced=tokens)
    ref_all = np.concatenate([ref_prefill, ref_steps], 1)
    test_all = np.concatenate([test_prefill, test_steps], 1)
    diff = np.abs(test_all - ref_all)
    scale = float(np.abs(ref_all).max())
    prompts = [list(map(int, rng.integers(3, ref.vocab_size, n))) for n in (prompt_len, max(1, prompt_len - 5))]
    config = SamplingConfig(max_new_tokens=steps)
    ref_rows, test_rows = generate_ids(ref, prompts, config), generate_ids(test, prompts, config)
    common = [next((i for i, (a, b) in enumerate(zip(r, t)) if a != b), min(len(r), len(t)))
              for r, t in zip(ref_rows, test_rows)]
    tol = tolerance(folder)
    result = {
        "folder": folder.name, "provider": provider, "reference": reference, "providers_used": used,
        "prompt_len": prompt_len, "steps": steps, "logits_scale": scale,
        "prefill_max_abs_diff": float(np.abs(test_prefill - ref_prefill).max()),
        "decode_max_abs_diff": float(np.abs(test_steps - ref_steps).max()),
        "max_abs_diff": float(diff.max()), "rel_diff": float(diff.max()) / max(scale, 1e-30),
        "rms_rel_diff": float(np.sqrt((diff ** 2).mean() / max((ref_all ** 2).mean(), 1e-30))),
        "top1_agreement": float((test_all.argmax(-1) == ref_all.argmax(-1)).mean()),
        "greedy_rows_equal": [r == t for r, t in zip(ref_rows, test_rows)], "greedy_common_prefix": common,
        "tol": tol, "kv_cache": kv_cache_kind(test), "placement": placement(test),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    result["ok"] = used[0] == PROVIDERS[provider] and result["rel_diff"] <= tol
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--provider", default="cuda", choices=list(PROVIDERS))
    ap.add_argument("--reference", default="cpu", choices=list(PROVIDERS))
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--jsonl", type=Path, default=None, help="also append the lines to this file")
    args = ap.parse_args(argv)
    failed = 0
    for folder in args.folders:
        try:
            result = compare(folder, args.provider, args.reference, args.prompt_len, args.steps)
        except Exception as e:  # noqa: BLE001 - one folder's failure is a result too; the others still run
            result = {"folder": folder.name, "provider": args.provider, "ok": False,
                      "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        failed += not result["ok"]
        line = json.dumps(result)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
