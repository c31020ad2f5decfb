"""Perplexity of a converted folder (ONNX Runtime) next to transformers on the same windows.

    python benchmarks/ppl_vs_transformers.py samples/stories260K-hf ../shared/data/wikitext2_test.txt

Converts MODEL (q0f32) to a temporary folder, then scores the whole file with seq-len 512,
stride 512 both ways and prints both numbers.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lowbit.converter.export import convert
from lowbit.runtime.evaluate import perplexity, transformers_perplexity
from lowbit.runtime.session import create_session
from lowbit.runtime.tokenizer import load_tokenizer


def main(model_dir: str, data: str, seq_len: int = 512, stride: int = 512):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "onnx"
        convert(model_dir, out)
        ids = np.asarray(load_tokenizer(out).encode(Path(data).read_text()), np.int64)
        t0 = time.perf_counter()
        ours = perplexity(create_session(out), ids, seq_len, stride)
        t1 = time.perf_counter()
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        theirs, count = transformers_perplexity(reference, ids, seq_len, stride)
        t2 = time.perf_counter()
    print(f"tokens scored: lowbit {ours.tokens}, transformers {count}")
    print(f"lowbit (ONNX Runtime): {ours.perplexity:.6f} ({t1 - t0:.1f} s)")
    print(f"transformers (torch):  {theirs:.6f} ({t2 - t1:.1f} s)")
    print(f"equal to 4 significant digits: {f'{ours.perplexity:.4g}' == f'{theirs:.4g}'}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
