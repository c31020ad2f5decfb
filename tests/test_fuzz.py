"""Fuzz the command line with damaged configs, damaged checkpoints and random option values.

Every run must either succeed or fail the project's way: exit code 2 with exactly one `error:` line on
stderr, nothing on stdout, no traceback (the exception CliRunner saw is the SystemExit), and no output or
staging folder left beside the output. Cases are seeded (`SEED + case`) and a failure prints the seed, the
damage and the command, so `pytest tests/test_fuzz.py -k case17` replays one; to search further, run
`make_case` over other case numbers. A few cases run as real
subprocesses (`python -m lowbit ...`) to see the real stderr.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from lowbit.cli import main
from tests.conftest import SAMPLE_MODEL

SEED = 1390  # chosen so that the six tensor-damage cases are six different kinds
CASES = 42  # six of each of the seven families
# also run as `python -m lowbit`: a config, a header, Inf in a small (inline) and NaN in a large (threaded) tensor,
# and `run` past the context (nothing may be printed before the error)
SUBPROCESS_CASES = (0, 1, 2, 16, 27)

VALUES = [0, -1, 1, 2, 3, 7, 64, 513, 10**9, 2**63, -(2**31), 1.5, -0.0, float("nan"), float("inf"), "", "x", "64",
          [], [1, 2], {}, {"rope_type": "linear"}, {"rope_type": "llama3", "factor": 0}, True, False, None]
EXTRA_KEYS = ["head_dim", "rope_scaling", "rope_parameters", "sliding_window", "layer_types", "partial_rotary_factor",
              "num_key_value_heads", "pad_token_id"]
BAD_NUMBERS = ["0", "-1", "99999999999999999999", "-99999999999", "1.5", "x", "", "nan", "inf", "1e3", " 5"]
SCHEMES = ["q0f32", "q0f16", "q4f16_1", "q4f32_1", "q3f16_1", "a16w8", "a16w4", "a16w4-g128", "a16w8-minmax",
           "w2a16", "w3a16", "w4a16", "w8a16", "a16w4-g7"]
BAD_SCHEMES = ["a16w4-g0", "q9f99", "", "W4A16"]

# option -> (good values, bad values); a case draws a bad one a quarter of the time
CONVERT_OPTIONS = {
    "--group-size": (["1", "16", "32", "40", "64", "100", "128", "4096", "99999999999999999999"], BAD_NUMBERS),
    "--accuracy-level": (["0", "4"], ["5", "-1", "x"]),
    "--target": (["ort", "tensorrt"], ["x"]),
    "--dtype": (["float16", "float32"], ["int8"]),
}
EVAL_OPTIONS = {
    "--seq-len": (["2", "3", "16", "64", "512"], ["1", "513", *BAD_NUMBERS]),
    "--stride": (["1", "7", "16", "64"], BAD_NUMBERS),
    "--max-tokens": (["2", "3", "40", "99999999999999999999"], ["1", *BAD_NUMBERS]),
}
BENCH_OPTIONS = {  # small enough to stay fast: --repeats is never huge
    "--prompt-len": (["1", "7", "64", "500"], ["0", "-1", "600", "99999999999999999999", "x", "1.5"]),
    "--new-tokens": (["1", "8", "12"], ["0", "-1", "513", "x", "99999999999999999999"]),
    "--repeats": (["1", "2"], ["0", "-1", "x", "", "1.5"]),
    "--threads": (["1", "2"], ["0", "-1", "x", "2000", "99999999999999999999"]),
}
RUN_OPTIONS = {
    "--max-new-tokens": (["1", "5", "20"], ["0", "-1", "600", "99999999999999999999", "x"]),
    "--top-k": (["0", "3", "99999999999999999999"], ["-1", "x"]),
    "--temperature": (["0.5", "1", "1e308", "1e-30"], ["0", "-1", "nan", "inf", "x"]),
    "--top-p": (["0.5", "1", "1e-9"], ["0", "1.5", "nan", "-0.1"]),
    "--seed": (["0", "7", "99999999999999999999999"], ["-1", "x"]),
}


def draw_options(rng, options: dict, p: float = 0.5) -> list[str]:
    args = []
    for option, (good, bad) in options.items():
        if rng.random() < p:
            args += [option, rng.choice(bad if rng.random() < 0.25 else good)]
    return args


# ------------------------------------------------------------------------ damage


def damage_config(rng, folder):
    config = json.loads((folder / "config.json").read_text())
    notes = []
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(sorted(config) + EXTRA_KEYS)
        if rng.random() < 0.25:
            config.pop(key, None)
            notes.append(f"del {key}")
        else:
            config[key] = rng.choice(VALUES) if rng.random() < 0.7 else rng.randint(-5, 600)
            notes.append(f"{key}={config[key]!r}")
    (folder / "config.json").write_text(json.dumps(config))
    return notes


def _split(path):
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def damage_header(rng, folder):
    path = folder / "model.safetensors"
    header, body = _split(path)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    kind = rng.choice(["bytes", "dtype", "offsets", "shape", "length", "entry"])
    if kind == "bytes":  # random bytes inside the header JSON
        data = bytearray(path.read_bytes())
        length = struct.unpack("<Q", data[:8])[0]
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(8, 8 + length)] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == "dtype":
        header[name]["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "Q4", "", 5, None])
        _join(path, header, body)
    elif kind == "offsets":
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[end, begin], [begin, end + 4], [-4, end], [begin, 2**62],
                                                   [0, end - begin], [begin], "x", [begin + 0.5, end]])
        _join(path, header, body)
    elif kind == "shape":
        shape = header[name]["shape"]
        header[name]["shape"] = rng.choice([shape[::-1], shape + [1], [-s for s in shape], [], ["64"], [2**40],
                                            [s + 1 for s in shape]])
        _join(path, header, body)
    elif kind == "length":  # the 8-byte header length
        data = path.read_bytes()
        length = rng.choice([0, 1, 2**64 - 1, len(data), struct.unpack("<Q", data[:8])[0] - 3])
        path.write_bytes(struct.pack("<Q", length) + data[8:])
    else:
        header[name] = rng.choice([[1, 2], "x", None, {}, {"dtype": "F32"}])
        _join(path, header, body)
    return [f"header {kind} {name}"]


def damage_tensors(rng, folder):
    path = folder / "model.safetensors"
    kind = rng.choice(["truncate", "nan", "inf", "shape", "consolidated", "index", "data_bytes"])
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:rng.randrange(len(data))])
        return [kind]
    tensors = load_file(path)
    name = rng.choice(sorted(tensors))
    if kind in ("nan", "inf"):
        value = np.nan if kind == "nan" else -np.inf
        if rng.random() < 0.5:
            tensors[name][...] = value
        else:
            tensors[name].reshape(-1)[rng.randrange(tensors[name].size)] = value
        save_file(tensors, path)
    elif kind == "shape":
        t = tensors[name]
        tensors[name] = rng.choice([t.T.copy(), t[..., :-1].copy(), t.reshape(-1).copy(), np.concatenate([t, t])])
        save_file(tensors, path)
    elif kind == "consolidated":  # an undeclared copy with conflicting values: must be ignored
        save_file({k: np.full_like(v, np.nan) for k, v in tensors.items()}, folder / "consolidated.safetensors")
    elif kind == "index":
        weight_map = {k: "model.safetensors" for k in tensors}
        weight_map[name] = rng.choice(["model-00002-of-00002.safetensors", "../model.safetensors", "", 5])
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:  # random bytes in the tensor data
        data = bytearray(path.read_bytes())
        start = 8 + struct.unpack("<Q", data[:8])[0]
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(start, len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    return [f"{kind} {name}"]


def convert_options(rng):
    args = ["--scheme", rng.choice(BAD_SCHEMES if rng.random() < 0.1 else SCHEMES)] if rng.random() < 0.8 else []
    args += draw_options(rng, CONVERT_OPTIONS, p=0.3)
    for flag in ("--symmetric", "--asymmetric", "--no-pad", "--clip-search"):
        if rng.random() < 0.1:
            args.append(flag)
    return args


# ------------------------------------------------------------------------ cases


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "stories"
    result = CliRunner().invoke(main, ["convert", str(SAMPLE_MODEL), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def make_case(case: int, tmp_path, converted):
    """(description, argv, output folder or None) for one seeded case."""
    rng = random.Random(SEED + case)
    family = ["config", "header", "tensors", "convert", "eval", "bench", "run"][case % 7]
    if family in ("config", "header", "tensors", "convert"):
        model = tmp_path / "model"
        shutil.copytree(SAMPLE_MODEL, model)
        notes = {"config": damage_config, "header": damage_header, "tensors": damage_tensors}.get(
            family, lambda rng, folder: [])(rng, model)
        out = tmp_path / "out"
        options = convert_options(rng) if family == "convert" or rng.random() < 0.2 else []
        return f"{family} {notes}", ["convert", str(model), "-o", str(out), *options], out
    if family == "eval":
        data = tmp_path / "data.txt"
        content = rng.choice([b"Once upon a time there was a cat. " * 8] * 3 + [b"", b" \n", b"a", b"\xff\xfe\x00 text",
                              bytes(rng.randrange(256) for _ in range(64)), "Ünïcödé ✓ ".encode() * 5])
        data.write_bytes(content)
        path = rng.choice([data] * 6 + [tmp_path, tmp_path / "missing.txt"])
        args = ["eval", str(converted), "--data", str(path), *draw_options(rng, EVAL_OPTIONS)]
        return f"eval {content[:20]!r}", args, None
    if family == "bench":
        args = ["bench", str(converted), *draw_options(rng, BENCH_OPTIONS, p=1.0)]
        return "bench", args, None
    prompts = rng.sample(["Once upon a time", "", " ", "✓ ünï", "\x00", "a" * 700, "The cat"], rng.randint(1, 3))
    args = ["run", str(converted), *[a for p in prompts for a in ("--prompt", p)]]
    args += draw_options(rng, RUN_OPTIONS)
    if rng.random() < 0.5:
        args.append("--sample")
    if rng.random() < 0.1:  # the sample has no chat template: an error
        args += ["--chat"] + (["--system", "Be brief."] if rng.random() < 0.5 else [])
    return f"run {prompts!r}", args, None


def check_clean(code, stdout, stderr, out, what):
    if code == 0:
        if out is not None:
            assert (out / "model.onnx").is_file() and (out / "lowbit.json").is_file(), what
    else:
        assert code == 2, what
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), what
        assert stdout == "", what  # nothing partial on stdout
        if out is not None:
            assert not out.exists(), what
    assert "Traceback" not in stdout + stderr, what
    if out is not None:
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
        assert not leftovers, what


@pytest.mark.parametrize("case", [pytest.param(i, id=f"case{i}") for i in range(CASES)])
def test_fuzz(case, tmp_path, converted):
    description, args, out = make_case(case, tmp_path, converted)
    result = CliRunner().invoke(main, args)
    what = (f"seed {SEED} + case {case}: {description}\n  lowbit {' '.join(map(repr, args))}\n"
            f"  exit {result.exit_code}, exception {result.exception!r}\n  stdout {result.stdout[-500:]!r}\n"
            f"  stderr {result.stderr[-2000:]!r}")
    assert result.exception is None or isinstance(result.exception, SystemExit), what
    check_clean(result.exit_code, result.stdout, result.stderr, out, what)
    if case not in SUBPROCESS_CASES:
        return
    if out is not None and out.exists():
        shutil.rmtree(out)
    proc = subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, timeout=120)
    what = (f"seed {SEED} + case {case} (subprocess): {description}\n  python -m lowbit {' '.join(map(repr, args))}\n"
            f"  exit {proc.returncode}\n  stdout {proc.stdout[-500:]!r}\n  stderr {proc.stderr[-2000:]!r}")
    assert proc.returncode == result.exit_code, what
    check_clean(proc.returncode, proc.stdout, proc.stderr, out, what)
