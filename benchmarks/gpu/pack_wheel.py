"""Pack onnxruntime-gpu for the GPU machine, which reaches no package index: the wheel's files, less what the CUDA
execution provider does not need, as one tar.xz cut into parts that each fit one device `run` call's carry.

    python benchmarks/gpu/pack_wheel.py              # .gpu/full/: every GPU architecture (4 parts of <= 56 MiB)
    python benchmarks/gpu/pack_wheel.py --sm 90      # .gpu/sm90/: only sm_90 (H100/H200) machine code (2 parts)

Dropped: libonnxruntime_providers_tensorrt.so (TensorRT EP) and libonnxruntime.so.1.31.0 (the C API library; the
Python extension and the CUDA EP do not link it). `--sm 90` also zeroes, in libonnxruntime_providers_cuda.so's
.nv_fatbin section, the payloads of the cubins (SASS) built for other architectures; their headers stay, so the
CUDA driver still sees every entry and picks the sm_90 one, as it would anyway on an sm_90 GPU (SASS runs only on
its own major architecture). The zeroed bytes compress to nothing: 185 MB of compressed CUDA EP becomes ~52 MB.
xz, not zstd: the two came out equal on this library (185.5 MB each, xz -9e and zstd -19 --long), and Python's
lzma unpacks xz on the GPU machine without any tool.

It prints the device `run` calls to make, in order (benchmarks/gpu/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parts  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VERSION = "1.31.0"
WHEEL = f"onnxruntime_gpu-{VERSION}-cp312-cp312-manylinux_2_28_x86_64.whl"
DOWNLOAD = ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", f"onnxruntime-gpu=={VERSION}"]
DROP = {"onnxruntime/capi/libonnxruntime_providers_tensorrt.so", f"onnxruntime/capi/libonnxruntime.so.{VERSION}"}
CUDA_EP = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
FATBIN_MAGIC = 0xBA55ED50
MiB = 1 << 20
CALL_LIMIT = 63 * MiB  # what one device call may carry is 64 MiB with the working tree: keep 1 MiB spare


def tree_bytes() -> int:
    """Bytes of the working tree a device call copies (tracked files and untracked ones git does not ignore)."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())


def wheel_path(cache: Path) -> Path:
    path = cache / WHEEL
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {WHEEL} into {cache}", flush=True)
        subprocess.run([sys.executable, *DOWNLOAD, "-d", str(cache)], check=True)
    return path


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian file's section `name`."""
    if data[:5] != b"\x7fELF\x02":
        raise ValueError("not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # sh_name, sh_offset, sh_size
        base = shoff + i * shentsize
        return struct.unpack_from("<I", data, base)[0], *struct.unpack_from("<QQ", data, base + 0x18)

    _, str_offset, _ = header(shstrndx)
    for i in range(shnum):
        name_at, offset, size = header(i)
        end = data.index(b"\0", str_offset + name_at)
        if data[str_offset + name_at:end].decode() == name:
            return offset, size
    raise ValueError(f"no {name} section")


def keep_cubins(data: bytearray, keep_sm: set[int]) -> dict:
    """Zero the payload of every cubin (fatbin entry kind 2) in .nv_fatbin whose sm is not in `keep_sm`; PTX
    entries (kind 1) stay. Returns counts. Entry layout: u16 kind, u16 version, u32 header size, u64 payload size,
    ..., u32 sm at byte 28 (the layout cuobjdump and the open fatbin readers use)."""
    start, size = elf_section(data, ".nv_fatbin")
    stats = {"fatbins": 0, "kept": 0, "zeroed": 0, "zeroed_bytes": 0, "fatbins_without_kept_cubin": 0}
    i, end_section = start, start + size
    while i + 16 <= end_section:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, i)
        if magic != FATBIN_MAGIC:  # fatbins are 8-byte aligned, padding between them
            i += 8
            continue
        stats["fatbins"] += 1
        j, end, kept = i + header_size, i + header_size + fat_size, 0
        while j < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, j)
            sm, = struct.unpack_from("<I", data, j + 28)
            if kind == 2 and sm not in keep_sm:
                data[j + entry_header:j + entry_header + payload] = bytes(payload)
                stats["zeroed"] += 1
                stats["zeroed_bytes"] += payload
            else:
                kept += 1
                stats["kept"] += 1
            j += entry_header + payload
        stats["fatbins_without_kept_cubin"] += kept == 0
        i = end
    if not stats["kept"]:
        raise ValueError(f"no cubin for sm {sorted(keep_sm)} in {CUDA_EP}")
    return stats


def stage(wheel: Path, folder: Path, keep_sm: set[int] | None) -> dict:
    """The wheel's files less DROP under `folder`, the CUDA EP's foreign cubins zeroed with `keep_sm`."""
    info: dict = {"dropped": sorted(DROP)}
    with zipfile.ZipFile(wheel) as z:
        for member in z.infolist():
            if member.filename in DROP or member.is_dir():
                continue
            target = folder / member.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            data = z.read(member)
            if member.filename == CUDA_EP and keep_sm:
                data = bytearray(data)
                info["fatbin"] = keep_cubins(data, keep_sm)
            target.write_bytes(data)
    info["unpacked_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return info


def make_archive(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name)


def device_calls(pack: Path, manifest: dict) -> list[dict]:
    """The `run` calls, in order: one per part; the last also runs device_run.sh."""
    rel = pack.resolve().relative_to(REPO)
    calls = []
    for n, p in enumerate(manifest["parts"]):
        command = f"bash benchmarks/gpu/receive_part.sh {rel}/{p['file']}"
        if n == len(manifest["parts"]) - 1:
            command += " && bash benchmarks/gpu/device_run.sh"
        calls.append({"command": command, "carry": [f"{rel}/{p['file']}", f"{rel}/{parts.MANIFEST}"]})
    return calls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lowbit-gpu", help="where the wheel is kept")
    ap.add_argument("--sm", type=int, nargs="*", default=None, help="keep only these GPU architectures' cubins (90)")
    ap.add_argument("--out", type=Path, default=None, help="pack folder [.gpu/full, or .gpu/sm90 with --sm 90]")
    ap.add_argument("--part-mib", type=float, default=56.0, help="largest part, MiB")
    ap.add_argument("--wheel", type=Path, default=None, help="use this wheel file instead of the cache")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the archive kept in the cache folder")
    args = ap.parse_args(argv)
    keep_sm = set(args.sm or ())
    name = "sm" + "-".join(map(str, sorted(keep_sm))) if keep_sm else "full"
    out = args.out or REPO / ".gpu" / name
    wheel = args.wheel or wheel_path(args.cache)
    t0 = time.perf_counter()
    archive = args.cache / f"onnxruntime-gpu-{VERSION}-{name}.tar.xz"  # kept: a new --part-mib only re-splits
    info_path = archive.with_suffix(".json")
    if args.rebuild or not archive.is_file() or not info_path.is_file():
        with tempfile.TemporaryDirectory(prefix="lowbit-pack-") as tmp:
            info = stage(wheel, Path(tmp) / "site", keep_sm)
            info["wheel"], info["wheel_sha256"] = wheel.name, hashlib.sha256(wheel.read_bytes()).hexdigest()
            args.cache.mkdir(parents=True, exist_ok=True)
            make_archive(Path(tmp) / "site", archive.with_suffix(".tmp"))
            archive.with_suffix(".tmp").rename(archive)
            info_path.write_text(json.dumps(info, indent=1) + "\n")
    info = json.loads(info_path.read_text())
    manifest = parts.split(archive, out, int(args.part_mib * MiB), sm=sorted(keep_sm) or None, **info)
    sizes = ", ".join(f"{p['bytes'] / MiB:.1f}" for p in manifest["parts"])
    print(f"{wheel.name} ({wheel.stat().st_size / MiB:.1f} MiB) -> {out}: {manifest['bytes'] / MiB:.1f} MiB xz in "
          f"{len(manifest['parts'])} parts ({sizes} MiB), "
          f"{info['unpacked_bytes'] / MiB:.0f} MiB unpacked, {time.perf_counter() - t0:.0f} s")
    tree = tree_bytes()
    largest = max(p["bytes"] for p in manifest["parts"]) + tree + (out / parts.MANIFEST).stat().st_size
    print(f"the largest call carries {largest / MiB:.1f} MiB (working tree {tree / MiB:.1f} MiB + part + manifest)"
          + ("" if largest <= CALL_LIMIT else f": OVER {CALL_LIMIT / MiB:.0f} MiB, use a smaller --part-mib"))
    if "fatbin" in info:
        print(f"cubins kept for sm {sorted(keep_sm)}: {info['fatbin']}")
    print("device run calls, back to back (benchmarks/gpu/README.md):")
    for n, call in enumerate(device_calls(out, manifest), 1):
        print(f"  {n}. command: {call['command']}\n     carry: {call['carry']}")


if __name__ == "__main__":
    main()
