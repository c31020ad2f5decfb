"""lowbit against llama.cpp on the CPU, the same checkpoint, interleaved in one run (not part of CI).

    python benchmarks/compare_llamacpp.py [--model smollm2-135m] [--work /tmp/lowbit-llamacpp]
        [--llamacpp DIR] [--threads 2] [--rounds 3] [--prompt-len 128] [--new-tokens 64] [--repeats 3]
        [--json FILE]

llama.cpp comes from ../shared/anchors/build_llamacpp.sh (run here unless --llamacpp names the folder it
printed): llama-bench, llama-quantize and a venv with its convert_hf_to_gguf.py. The random-weight checkpoint
of a real config (benchmarks/random_model.py) is converted by both tools from the same HF folder: F32 GGUF and
`llama-quantize ... Q4_0` against `lowbit convert --scheme q0f32` and `--scheme w4a16 --group-size 32` (4-bit
blocks of 32 with one scale each, as Q4_0; llama-quantize keeps its default mix: a tied output/embedding
matrix becomes Q6_K, lowbit's stays 4-bit g32).

Each round runs, pair by pair, `lowbit bench` (prefill of --prompt-len random tokens with last-position logits,
then --new-tokens decode steps) and `llama-bench -p P -n N -d 0,P` (pp at depth 0; tg at depth 0 and at depth P,
the latter being what follows our prefill), each in a fresh process. The table gives medians over rounds.
llama.cpp's OpenMP threads spin: keep the CPUs otherwise idle, or its figures fall by orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE.parent.parent / "shared" / "anchors" / "build_llamacpp.sh"
SAMPLE_TOKENIZER = HERE.parent / "samples" / "stories260K-hf" / "tokenizer.model"

# (our label, lowbit convert options, llama.cpp label, GGUF type)
PAIRS = [
    ("w4a16", ["--scheme", "w4a16", "--group-size", "32"], "Q4_0", "Q4_0"),
    ("q0f32", ["--scheme", "q0f32"], "F32", None),
]


def run(cmd: list, env: dict | None = None) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"error: {' '.join(map(str, cmd))} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def llamacpp_folder(given: Path | None) -> Path:
    if given is not None:
        return given
    if not BUILD_SCRIPT.is_file():
        sys.exit(f"error: no --llamacpp folder and no {BUILD_SCRIPT} to build one")
    return Path(run(["bash", BUILD_SCRIPT]).strip().splitlines()[-1])


def gguf_source(work: Path, source: Path) -> Path:
    """The checkpoint as llama.cpp's converter takes it. The random model's placeholder BPE tokenizer is not one
    it recognises, so its folder gets the weights (linked) and the SentencePiece model of samples/stories260K-hf
    instead, padded by the converter to the config's vocabulary; speed does not depend on the tokens."""
    folder = work / "hf-gguf"
    folder.mkdir(exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if not (folder / name).exists():
            (folder / name).symlink_to(source / name)
    if not (folder / "tokenizer.model").exists():
        shutil.copyfile(SAMPLE_TOKENIZER, folder / "tokenizer.model")
    return folder


def gguf_files(work: Path, source: Path, llama: Path) -> dict[str, Path]:
    """F32 from llama.cpp's converter, then each quantized type with llama-quantize."""
    files = {"F32": work / "model-F32.gguf"}
    if not files["F32"].is_file():
        run([llama / "venv" / "bin" / "python", llama / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py",
             gguf_source(work, source), "--outtype", "f32", "--outfile", files["F32"]])
    for _, _, label, gguf_type in PAIRS:
        if gguf_type:
            files[label] = work / f"model-{label}.gguf"
            if not files[label].is_file():
                run([llama / "build" / "bin" / "llama-quantize", files["F32"], files[label], gguf_type],
                    env={**os.environ, "LD_LIBRARY_PATH": str(llama / "build" / "bin")})
    return files


def llama_bench(llama: Path, gguf: Path, prompt_len: int, new_tokens: int, threads: int,
                repeats: int) -> dict[str, float]:
    out = run([llama / "build" / "bin" / "llama-bench", "-m", gguf, "-p", prompt_len, "-n", new_tokens,
               "-d", f"0,{prompt_len}", "-t", threads, "-r", repeats, "-o", "json"],
              env={**os.environ, "LD_LIBRARY_PATH": str(llama / "build" / "bin")})
    rows = json.loads(out)
    pick = {(r["n_prompt"], r["n_gen"], r["n_depth"]): r["avg_ts"] for r in rows}
    return {"prefill": pick[(prompt_len, 0, 0)], "decode": pick[(0, new_tokens, prompt_len)],
            "decode_empty": pick[(0, new_tokens, 0)]}


def lowbit_bench(folder: Path, prompt_len: int, new_tokens: int, threads: int, repeats: int) -> dict[str, float]:
    out = run([sys.executable, "-m", "lowbit", "bench", folder, "--prompt-len", prompt_len, "--new-tokens",
               new_tokens, "--repeats", repeats, "--threads", threads, "--json"])
    r = json.loads(out.strip().splitlines()[-1])
    return {"prefill": r["prefill_tokens_per_s"], "decode": r["decode_tokens_per_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit-llamacpp"))
    parser.add_argument("--llamacpp", type=Path, help="the folder build_llamacpp.sh printed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="per round: lowbit bench --repeats (best of) and llama-bench -r (mean of)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    llama = llamacpp_folder(args.llamacpp)
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    source = work / "hf"
    if not (source / "config.json").is_file():
        run([sys.executable, HERE / "random_model.py", args.model, source])
    ggufs = gguf_files(work, source, llama)
    ours = {}
    for label, options, _, _ in PAIRS:
        ours[label] = work / f"lowbit-{label}"
        if not (ours[label] / "model.onnx").is_file():
            run([sys.executable, "-m", "lowbit", "convert", source, "-o", ours[label], *options])

    samples: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for label, _, llama_label, _ in PAIRS:
            samples.setdefault(label, []).append(lowbit_bench(ours[label], args.prompt_len, args.new_tokens,
                                                              args.threads, args.repeats))
            samples.setdefault(llama_label, []).append(llama_bench(llama, ggufs[llama_label], args.prompt_len,
                                                                   args.new_tokens, args.threads, args.repeats))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1]['prefill']:.0f}/{v[-1]['decode']:.1f}" for k, v in samples.items()), flush=True)
    median = {k: {m: statistics.median(s[m] for s in v) for m in v[0]} for k, v in samples.items()}

    print(f"\n{args.model} (random weights), {args.threads} threads, medians of {args.rounds} interleaved rounds; "
          f"prefill {args.prompt_len} tokens, decode {args.new_tokens} tokens after them (tok/s)\n")
    print("| ours / llama.cpp | lowbit prefill | llama.cpp prefill | × | lowbit decode | llama.cpp decode | × | "
          "llama.cpp decode, empty context | × |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, _, llama_label, _ in PAIRS:
        a, b = median[label], median[llama_label]
        print(f"| {label} / {llama_label} | {a['prefill']:.0f} | {b['prefill']:.0f} | "
              f"{a['prefill'] / b['prefill']:.2f} | {a['decode']:.1f} | {b['decode']:.1f} | {a['decode'] / b['decode']:.2f} | "
              f"{b['decode_empty']:.1f} | {a['decode'] / b['decode_empty']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "median": median}, indent=2))


if __name__ == "__main__":
    main()
