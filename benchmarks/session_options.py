"""ORT session options measured on one converted folder: prefill and decode of each variant, interleaved in one
process (each variant its own session and KV cache), so machine load moves them alike.

    python benchmarks/session_options.py FOLDER [--threads 2] [--rounds 5] [--prompt-len 128] [--new-tokens 64]

Variants: the session as lowbit opens it (ORT's defaults: spinning on, threads not pinned), intra-op spinning
off, the pool threads pinned one per logical processor (the calling thread left on the first), denormals flushed
to zero, and ORT's dynamic block base (how finely a parallel loop is cut); and, for reference, the runtime's path
before this benchmark existed (`DecoderSession.forward`: a growing past, all positions' logits, prompts on the
decode session). Prints medians over rounds of each variant's prefill and decode tok/s and the ratio to the
first variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PLAIN = "plain forward (growing past, all logits, no prompt session)"

VARIANTS = {
    "default": {},
    "no spinning": {"session.intra_op.allow_spinning": "0"},
    "pinned": {"session.intra_op_thread_affinities": None},  # pool thread i on logical processor i + 1 (main())
    "denormal as zero": {"session.set_denormal_as_zero": "1"},
    "dynamic block base 4": {"session.dynamic_block_base": "4"},
}


def run_plain(session, prompt_len: int, new_tokens: int, rng) -> tuple[float, float]:
    """The runtime's path before IO binding: `DecoderSession.forward` with a growing past and every position's
    logits, prompts on the decode session."""
    ids = rng.integers(0, session.vocab_size, (1, prompt_len))
    t0 = time.perf_counter()
    logits, past = session.forward(ids, np.ones_like(ids), np.arange(prompt_len)[None], session.empty_past(1))
    t1 = time.perf_counter()
    for step in range(new_tokens):
        token = logits[:, -1].argmax(-1)[:, None]
        mask = np.ones((1, prompt_len + step + 1), np.int64)
        logits, past = session.forward(token, mask, np.array([[prompt_len + step]]), past)
    t2 = time.perf_counter()
    return prompt_len / (t1 - t0), new_tokens / (t2 - t1)


def run_once(session, prompt_len: int, new_tokens: int, rng) -> tuple[float, float]:
    """The generation path (`lowbit bench`): the KV cache generation makes, last-position logits."""
    from lowbit.runtime.bench import generation_seconds

    prefill, decode = generation_seconds(session, rng.integers(0, session.vocab_size, (1, prompt_len)), new_tokens)
    return prompt_len / prefill, new_tokens / decode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from lowbit.runtime.session import create_session

    pinned = ";".join(str(i + 1) for i in range(1, args.threads))  # 1-based ids; the calling thread is the first
    variants = {name: {k: (pinned if v is None else v) for k, v in config.items()} for name, config in VARIANTS.items()
                if args.threads > 1 or name != "pinned"}
    sessions = {name: create_session(args.folder, threads=args.threads, session_config=config)
                for name, config in variants.items()}
    sessions[PLAIN] = create_session(args.folder, threads=args.threads, prompt_session=False)
    rng = np.random.default_rng(0)
    for session in sessions.values():
        run_once(session, args.prompt_len, 4, rng)  # warm-up
    samples = {name: [] for name in sessions}
    names = list(sessions)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            run = run_plain if name == PLAIN else run_once
            samples[name].append(run(sessions[name], args.prompt_len, args.new_tokens, rng))
    base = None
    print(f"{args.folder}, {args.threads} threads, medians of {args.rounds} interleaved rounds\n")
    print("| variant | prefill tok/s | × | decode tok/s | × |")
    print("|---|---|---|---|---|")
    for name, rows in samples.items():
        prefill, decode = (statistics.median(r[i] for r in rows) for i in (0, 1))
        base = base or (prefill, decode)
        print(f"| {name} | {prefill:.0f} | {prefill / base[0]:.3f} | {decode:.1f} | {decode / base[1]:.3f} |")


if __name__ == "__main__":
    main()
