"""Imported GPTQ checkpoints decode at the speed of lowbit's own w4a16 of the same shape (the same kernel).

    python benchmarks/import_speed.py [--model smollm2-135m] [--work /tmp/lowbit-import] [--rounds 3]
        [--prompt-len 128] [--new-tokens 16] [--threads 2]

Builds a random-weight checkpoint of a real config (benchmarks/random_model.py) and, from it, GPTQ 4-bit group-128
checkpoints of the same shape (random codes, float16 scales; AutoGPTQ's layout, docs/importers.md): symmetric,
asymmetric (zero points) and asymmetric with act-order (a permuted g_idx). Converts each (`lowbit convert`: the
scheme is implied) and the float checkpoint with `--scheme w4a16 --group-size 128` keeping the embedding and lm_head
float as GPTQ does, then runs `lowbit bench` on every folder in interleaved rounds (best round each). Prints a
Markdown table (docs/performance.md, "Imported checkpoints").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GROUP = 128


def make_gptq(source: Path, out: Path, symmetric: bool, act_order: bool, seed: int = 0) -> Path:
    """A GPTQ v1 4-bit g128 checkpoint with `source`'s shape and float tensors (embedding, norms)."""
    import ml_dtypes  # noqa: F401 - bfloat16 tensors of the source

    from lowbit.converter.checkpoint import Checkpoint
    from lowbit.converter.importers.bitstream import pack_dense
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    checkpoint = Checkpoint(source)
    tensors, perms = {}, {}
    for name in checkpoint.names():
        if not name.endswith("_proj.weight"):
            tensors[name] = checkpoint.read_float32(name).astype(np.float16)
            continue
        prefix = name[: -len(".weight")]
        n, k = checkpoint.shape(name)
        groups = -(-k // GROUP)  # the last group is short where K is not a multiple of 128 (576 = 4.5 x 128)
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        zeros = np.full((groups, n), 8) if symmetric else rng.integers(1, 16, (groups, n))
        # |w| ~ 0.02 like the float model: scale * (code - zero) with codes spread over 16 levels
        scales = rng.uniform(0.002, 0.004, (groups, n)).astype(np.float16)
        g_idx = np.arange(k) // GROUP
        if act_order:  # one permutation per input (q/k/v share theirs, gate/up theirs)
            key = prefix.rsplit(".", 1)[0] + ("" if prefix.endswith(("o_proj", "down_proj")) else "/in")
            perm = perms.setdefault((key, k), rng.permutation(k))
            g_idx = np.empty(k, np.int64)
            g_idx[perm] = np.arange(k) // GROUP
        tensors[f"{prefix}.qweight"] = pack_dense(codes, 4, axis=0)
        tensors[f"{prefix}.qzeros"] = pack_dense((zeros - 1).astype(np.uint8), 4, axis=1)
        tensors[f"{prefix}.scales"] = scales
        tensors[f"{prefix}.g_idx"] = g_idx.astype(np.int32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order,
                                     "sym": symmetric, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def kernels(folder: Path) -> str:
    """The weight nodes of a folder: op, bits, block size, accuracy level, inputs (4: with zero points)."""
    import collections

    import onnx

    nodes = onnx.load(folder / "model.onnx", load_external_data=False).graph.node
    counts = collections.Counter(
        (n.op_type, *(a.i for a in n.attribute if a.name in ("bits", "block_size", "accuracy_level")), len(n.input))
        for n in nodes if n.op_type == "MatMulNBits")
    gathers = sum(n.name.endswith(".act_order") for n in nodes)
    return ", ".join(f"{c} x {key}" for key, c in sorted(counts.items())) + (f", {gathers} act-order Gathers"
                                                                             if gathers else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit-import"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.common import interleaved_bench
    from benchmarks.compare_builder import run_child
    from lowbit.runtime.bench import model_bytes

    source = args.work / f"{args.model}-random"
    if not (source / "config.json").is_file():
        run_child([sys.executable, str(HERE / "random_model.py"), args.model, str(source)])
    convert = [sys.executable, "-m", "lowbit", "convert"]
    rows = {  # label -> (checkpoint, extra convert options)
        "w4a16 g128 (lowbit RTN)": (source, ["--scheme", "w4a16", "--group-size", "128", "--ignore", "embed_tokens",
                                             "--ignore", "lm_head"]),
        "GPTQ v1 sym g128": (make_gptq(source, args.work / "gptq-sym", True, False), []),
        "GPTQ v1 asym g128": (make_gptq(source, args.work / "gptq-asym", False, False), []),
        "GPTQ v1 asym g128 act-order": (make_gptq(source, args.work / "gptq-act", False, True), []),
    }
    folders, seconds = {}, {}
    for i, (label, (checkpoint, extra)) in enumerate(rows.items()):
        folders[label] = out = args.work / f"onnx-{i}"
        seconds[label], _, _ = run_child([*convert, str(checkpoint), "-o", str(out), "--overwrite", *extra])
        print(f"converted {label}: {model_bytes(out) / 1e6:.1f} MB in {seconds[label]:.1f} s", flush=True)
    labels = list(rows)
    for label in labels[1:]:  # same kernel: the MatMulNBits nodes of each folder against lowbit's own w4a16
        print(f"{label}: {kernels(folders[label])} (w4a16: {kernels(folders[labels[0]])})", flush=True)
    results = interleaved_bench({label: folders[label] for label in labels}, args.rounds, args.prompt_len,
                                args.new_tokens, args.threads)
    base = results[labels[0]]
    print(f"\n{args.model} shape (random weights), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, best of {args.rounds} interleaved rounds\n")
    print("| folder | convert s | folder MB | prefill tok/s | × w4a16 | decode tok/s | × w4a16 | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for label in labels:
        r = results[label]
        print(f"| {label} | {seconds[label]:.1f} | {r['model_bytes'] / 1e6:.1f} | {r['prefill']:.0f} | "
              f"{r['prefill'] / base['prefill']:.2f} | {r['decode']:.1f} | {r['decode'] / base['decode']:.2f} | "
              f"{r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
