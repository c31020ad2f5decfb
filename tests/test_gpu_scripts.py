"""benchmarks/gpu/ on the CPU: the onnxruntime-gpu pack (stage, cubin stripping, split, receive, unpack),
device_run.sh's dry run, and parity.py / gpu_bench.py with provider cpu on a tiny random model (the code paths the
GPU run takes)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
GPU = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))

import gpu_bench  # noqa: E402
import pack_wheel  # noqa: E402
import parity  # noqa: E402
import parts  # noqa: E402


def cubin(kind: int, sm: int, payload: bytes) -> bytes:
    """A fatbin entry: u16 kind, u16 version, u32 header size (64), u64 payload size, ..., u32 sm at byte 28."""
    return struct.pack("<HHIQ", kind, 1, 64, len(payload)) + bytes(12) + struct.pack("<I", sm) + bytes(32) + payload


def fatbin(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", pack_wheel.FATBIN_MAGIC, 1, 16, len(body)) + body


def fake_elf(section: bytes) -> bytes:
    """An ELF64 file with a .nv_fatbin section holding `section` (and .shstrtab): what elf_section reads."""
    names = b"\0.nv_fatbin\0.shstrtab\0"
    strtab_at = 64 + len(section)
    shoff = -(-(strtab_at + len(names)) // 8) * 8
    head = bytearray(64)
    head[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", head, 0x28, shoff)
    struct.pack_into("<HHH", head, 0x3A, 64, 3, 2)

    def shdr(name_at, offset, size):
        h = bytearray(64)
        struct.pack_into("<I", h, 0, name_at)
        struct.pack_into("<QQ", h, 0x18, offset, size)
        return bytes(h)

    body = bytes(head) + section + names
    body += bytes(shoff - len(body))
    return body + shdr(0, 0, 0) + shdr(1, 64, len(section)) + shdr(12, strtab_at, len(names))


SM80, SM90, PTX = b"\x80" * 40, b"\x90" * 48, b"ptx" * 8
FATBINS = fatbin(cubin(2, 80, SM80), cubin(2, 90, SM90), cubin(1, 80, PTX)) + bytes(8) + fatbin(cubin(2, 75, SM80))


def test_keep_cubins_zeroes_only_other_architectures_cubins():
    data = bytearray(fake_elf(FATBINS))
    assert pack_wheel.elf_section(data, ".nv_fatbin") == (64, len(FATBINS))
    stats = pack_wheel.keep_cubins(data, {90})
    assert stats == {"fatbins": 2, "kept": 2, "zeroed": 2, "zeroed_bytes": 80, "fatbins_without_kept_cubin": 1}
    section = bytes(data[64:64 + len(FATBINS)])
    assert section.count(SM90) == 1 and section.count(PTX) == 1 and SM80[:8] not in section
    assert len(data) == len(fake_elf(FATBINS))  # same layout, only payload bytes changed
    with pytest.raises(ValueError, match="no cubin"):
        pack_wheel.keep_cubins(bytearray(fake_elf(fatbin(cubin(2, 80, SM80)))), {90})


@pytest.fixture
def fake_pack(tmp_path):
    """A fake onnxruntime-gpu wheel packed as the real one is (sm90, parts of 3000 bytes): (pack folder, staged
    files {relative path: bytes}, the wheel's member names)."""
    rng = np.random.default_rng(1)
    members = {
        "onnxruntime/__init__.py": b'__version__ = "0-stub"\npackage_name = "onnxruntime-gpu"\ncuda_version = "13.0"\n'
                                   b"from onnxruntime.capi import _pybind_state as _state\n"
                                   b"def get_available_providers():\n"
                                   b'    return ["CUDAExecutionProvider", "CPUExecutionProvider"]\n',
        "onnxruntime/capi/__init__.py": b"",
        "onnxruntime/capi/_pybind_state.py": b'def get_build_info():\n    return "stub"\n',
        pack_wheel.CUDA_EP: fake_elf(FATBINS),
        "onnxruntime/capi/onnxruntime_pybind11_state.so": rng.bytes(9000),  # incompressible: several parts
        "onnxruntime/capi/libonnxruntime_providers_tensorrt.so": b"dropped",
        f"onnxruntime/capi/libonnxruntime.so.{pack_wheel.VERSION}": b"dropped",
        "onnxruntime_gpu-1.31.0.dist-info/METADATA": b"Name: onnxruntime-gpu\n",
    }
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    staged = tmp_path / "staged"
    info = pack_wheel.stage(wheel, staged, {90})
    assert info["fatbin"]["zeroed"] == 2 and sorted(info["dropped"]) == sorted(pack_wheel.DROP)
    archive = tmp_path / "ort.tar.xz"
    pack_wheel.make_archive(staged, archive)
    manifest = parts.split(archive, tmp_path / "sm90", 3000, sm=[90], **info)
    files = {str(f.relative_to(staged)): f.read_bytes() for f in staged.rglob("*") if f.is_file()}
    return tmp_path / "sm90", files, manifest


def test_pack_split_receive_unpack_round_trip(fake_pack, tmp_path, capsys):
    pack, files, manifest = fake_pack
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= 3000 for p in manifest["parts"])
    joined = b"".join((pack / p["file"]).read_bytes() for p in manifest["parts"])
    assert hashlib.sha256(joined).hexdigest() == manifest["sha256"] == parts.sha256_file(pack.parent / "ort.tar.xz")
    assert set(files) == {n for n in files if "tensorrt" not in n and not n.endswith(pack_wheel.VERSION)}
    work = tmp_path / "work"
    for n, p in enumerate(manifest["parts"]):
        state = parts.receive(pack / p["file"], work)
        assert len(state["have"]) == n + 1
    assert "complete" in capsys.readouterr().out
    site = tmp_path / "site"
    got = parts.unpack(parts.complete_pack(work), site)
    assert got["sha256"] == manifest["sha256"]
    for name, data in files.items():
        assert (site / name).read_bytes() == data, name
    assert json.loads((site / parts.INSTALLED).read_text())["sm"] == [90]
    cuda_ep = (site / pack_wheel.CUDA_EP).read_bytes()
    assert SM90 in cuda_ep and SM80[:8] not in cuda_ep
    # the fallback: a second pack received later (the full one) is the one installed
    full = tmp_path / "full"
    full.mkdir()
    for p in manifest["parts"]:
        (full / p["file"]).write_bytes((pack / p["file"]).read_bytes())
    (full / parts.MANIFEST).write_text(json.dumps({**manifest, "name": "full"}))
    for p in manifest["parts"]:
        parts.receive(full / p["file"], work)
    assert parts.complete_pack(work) == work / "packs" / "full"
    # a damaged part is refused on receipt and at install
    bad = tmp_path / "bad" / "sm90"
    bad.mkdir(parents=True)
    (bad / parts.MANIFEST).write_bytes((pack / parts.MANIFEST).read_bytes())
    (bad / "part-00").write_bytes(b"x" + (pack / "part-00").read_bytes()[1:])
    with pytest.raises(ValueError, match="sha256"):
        parts.receive(bad / "part-00", tmp_path / "work2")
    (work / "packs" / "sm90" / "part-01").write_bytes(b"y" * manifest["parts"][1]["bytes"])
    with pytest.raises(ValueError, match="part-01: sha256"):
        parts.unpack(work / "packs" / "sm90", tmp_path / "site2")


def test_device_run_dry_run_installs_and_imports(fake_pack, tmp_path):
    """receive_part.sh for every part, then device_run.sh with LOWBIT_GPU_DRY_RUN=1: the pack installed into the
    work folder's site, lowbit imported from the symlinked package (not the checkout), env.json and the log in OUT."""
    pack, _, manifest = fake_pack
    nvidia = tmp_path / "pip" / "nvidia"  # pip's CUDA packages, as a namespace package
    for lib in ("cu13/lib", "cudnn/lib"):
        (nvidia / lib).mkdir(parents=True)
    env = {**os.environ, "LOWBIT_GPU_WORK": str(tmp_path / "work"), "LOWBIT_GPU_PYTHON": sys.executable,
           "OUT": str(tmp_path / "out"), "LOWBIT_GPU_DRY_RUN": "1", "PYTHONPATH": str(nvidia.parent)}
    for p in manifest["parts"]:
        subprocess.run(["bash", str(GPU / "receive_part.sh"), str(pack / p["file"])], env=env, check=True,
                       capture_output=True)
    run = subprocess.run(["bash", str(GPU / "device_run.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    report = json.loads((tmp_path / "out" / "env.json").read_text())
    assert report["problems"] == [] and report["onnxruntime"]["version"] == "0-stub"
    assert report["pack"]["sha256"] == manifest["sha256"]
    assert report["modules"]["lowbit.runtime.session"].startswith(str(tmp_path / "work" / "pkg" / "lowbit"))
    assert (tmp_path / "work" / "site" / "nvidia").resolve() == nvidia.resolve()  # where preload_dlls() looks
    assert report["LD_LIBRARY_PATH"].startswith(f"{nvidia.resolve()}/cu13/lib:{nvidia.resolve()}/cudnn/lib")
    assert "CUDA check ok (dry run" in (tmp_path / "out" / "log.txt").read_text()
    phases = (tmp_path / "out" / "phases.txt").read_text().split()
    assert phases[:2] == ["install", "0"] and phases[3:5] == ["check", "0"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import lowbit
    from benchmarks.random_model import make_random_model

    root = tmp_path_factory.mktemp("gpu-tiny")
    hf = make_random_model("tiny", root / "hf")
    for scheme in ("q0f16", "w4a16"):
        lowbit.convert(str(hf), str(root / scheme), scheme=scheme, overwrite=True)
    lowbit.convert(str(hf), str(root / "q0f16-trt"), scheme="q0f16", target="tensorrt", overwrite=True)
    return root


def test_parity_cpu_against_cpu_is_exact(tiny_folders, tmp_path, capsys):
    out = tmp_path / "parity.jsonl"
    folders = [str(tiny_folders / s) for s in ("q0f16", "w4a16")]
    assert parity.main([*folders, "--provider", "cpu", "--steps", "6", "--prompt-len", "9", "--jsonl", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["folder"] for r in lines] == ["q0f16", "w4a16"] and [r["tol"] for r in lines] == [2e-2, 1e-1]
    for r in lines:
        assert r["ok"] and r["providers_used"] == ["CPUExecutionProvider"]
        assert r["max_abs_diff"] == 0.0 and r["top1_agreement"] == 1.0 and r["logits_scale"] > 0.1
        assert r["greedy_rows_equal"] == [True, True] and r["greedy_common_prefix"] == [6, 6]
        assert r["placement"] is None or "CPUExecutionProvider" in r["placement"]
        assert r["kv_cache"] == "BoundKVCache"  # GroupQueryAttention graphs share the past and present buffers
    assert capsys.readouterr().out.count("\n") == 2


def test_parity_trace_is_the_generation_loop(tiny_folders):
    """trace's greedy tokens are those of lowbit's generation loop, and forcing them reproduces the same logits."""
    from lowbit.runtime.generate import SamplingConfig, generate_ids

    session = parity.open_session(tiny_folders / "q0f16", "cpu")
    ids = np.random.default_rng(3).integers(3, session.vocab_size, (1, 7), dtype=np.int64)
    prefill, steps, tokens = parity.trace(session, ids, 5)
    assert prefill.shape == (1, 7, session.vocab_size) and steps.shape == (1, 5, session.vocab_size)
    assert tokens[0].tolist() == generate_ids(session, [ids[0].tolist()], SamplingConfig(max_new_tokens=5))[0]
    _, forced_steps, _ = parity.trace(session, ids, 5, forced=tokens)
    np.testing.assert_array_equal(forced_steps, steps)


def test_gpu_bench_cpu_end_to_end(tiny_folders, tmp_path):
    """The lowbit side through a child process as on the GPU; the torch anchor's child body in this process (torch is
    imported here already: a second child would take seconds)."""
    out, md = tmp_path / "bench.jsonl", tmp_path / "bench.md"
    args = [str(tiny_folders / "w4a16"), "--provider", "cpu", "--batches", "1", "3", "--prompt-len", "8",
            "--new-tokens", "4", "--repeats", "1", "--jsonl", str(out), "--markdown", str(md)]
    assert gpu_bench.main(args) == 0
    lowbit_result = json.loads(out.read_text())
    assert lowbit_result["providers_used"] == ["CPUExecutionProvider"] and lowbit_result["gpu_peak_mb"] is None
    assert lowbit_result["kv_cache"] == "BoundKVCache"
    assert lowbit_result["model_bytes"] == sum(f.stat().st_size for f in (tiny_folders / "w4a16").glob("model.onnx*"))
    assert md.read_text().count("| w4a16 |") == 2
    namespace = gpu_bench.argparse.Namespace(provider="cpu", batches=[1, 3], prompt_len=8, new_tokens=4, repeats=1)
    torch_result = gpu_bench.child_torch(tiny_folders / "hf", "bfloat16", namespace)
    assert torch_result["device"] == "cpu" and "bfloat16 (hf)" in torch_result["rows"][0]["label"]
    for result in (lowbit_result, torch_result):
        assert [r["batch"] for r in result["rows"]] == [1, 3]
        for row in result["rows"]:
            assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
            assert row["decode_ms_per_step"] * row["decode_tok_s"] == pytest.approx(1e3 * row["batch"])
    table = gpu_bench.markdown([lowbit_result, torch_result, {"error": "boom\nCUDA failure", "child": ["x"]}],
                               namespace)
    assert table.count("bfloat16 (hf)") == 2 and "| x | – | error: CUDA failure |" in table


@pytest.mark.parametrize("folder", ["q0f16", "q0f16-trt"])  # bound cache + GroupQueryAttention, growing + standard
def test_gpu_bench_batched_loop_feeds_what_generation_feeds(tiny_folders, folder, monkeypatch):
    """lowbit_seconds at batch 3 makes the same cache calls (ids, mask, positions, logits_to_keep) as greedy
    generation of the three prompts."""
    from lowbit.runtime import kv_cache
    from lowbit.runtime.generate import SamplingConfig, generate_ids

    session = parity.open_session(tiny_folders / folder, "cpu")
    ids = np.random.default_rng(4).integers(3, session.vocab_size, (3, 6), dtype=np.int64)
    calls = []
    forward = kv_cache.KVCache.forward

    def spy(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        calls.append((input_ids.copy(), attention_mask.copy(), np.array(position_ids), logits_to_keep))
        return forward(self, input_ids, attention_mask, position_ids, logits_to_keep)

    monkeypatch.setattr(kv_cache.KVCache, "forward", spy)
    prefill_s, decode_s = gpu_bench.lowbit_seconds(session, ids, 4)
    bench_calls, calls[:] = list(calls), []
    generate_ids(session, ids.tolist(), SamplingConfig(max_new_tokens=5))
    assert prefill_s > 0 and decode_s > 0 and len(bench_calls) == len(calls) == 5
    for got, expected in zip(bench_calls, calls):
        for a, b in zip(got[:3], expected[:3]):
            np.testing.assert_array_equal(a, b)
        assert got[3] == expected[3] == 1


def test_gpu_memory_sampler_reads_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 1234\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpu_bench.GpuMemory.read() == 1234.0
    with gpu_bench.GpuMemory(interval=0.01) as memory:
        pass
    assert memory.baseline == memory.peak == 1234.0 and memory.used_mb == 0.0
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert gpu_bench.GpuMemory.read() is None
