"""Compiled CPU kernels, built on first use with the machine's C compiler and cached.

`library()` returns the shared library ONNX Runtime loads (`SessionOptions.register_custom_ops_library`) to run
`lowbit.cpu.*` nodes, or None with the reason in `unavailable()`: no x86-64 CPU with AVX2, no C compiler, a failed
build, or `LOWBIT_KERNELS=0`. Nothing needs the library: the runtime then keeps ONNX Runtime's own nodes.

The build is `cc -O3 -mavx2 -mf16c -mfma -shared` of the sources beside this file, into `$LOWBIT_CACHE_DIR` (default
`$XDG_CACHE_HOME/lowbit` or `~/.cache/lowbit`) under a name that hashes the sources, the compiler and the flags,
written to a temporary name and renamed, so concurrent processes never load a partial file. The compiler reads
copies of the texts that were hashed, so a library's name always matches its code.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

ENV_SWITCH = "LOWBIT_KERNELS"
SOURCES = ("register.c", "matmul_int4_int8.c", "matmul_narrow_float.c", "group_query_attention.c")
HEADERS = ("ort_api.h", "simd.h")
FLAGS = ("-O3", "-mavx2", "-mf16c", "-mfma", "-ffp-contract=off", "-fPIC", "-shared", "-fvisibility=hidden")
LIBRARY_STEM = "lowbit_cpu_kernels"


def cache_dir() -> Path:
    if os.environ.get("LOWBIT_CACHE_DIR"):
        return Path(os.environ["LOWBIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowbit"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> Path | None:
    """The compiled library, or None (see `unavailable`)."""
    path, _ = _build()
    return path


def unavailable() -> str | None:
    """Why `library()` is None; None when it is not."""
    return _build()[1]


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty off x86-64 Linux)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has_avx2() -> bool:
    """AVX2, F16C and FMA (every AVX2 CPU has all three)."""
    return {"avx2", "f16c", "fma"} <= cpu_flags()


def cpu_has_avx512_vnni() -> bool:
    """AVX512-VNNI with 256-bit forms (AVX512VL), which the int8 kernel's VNNI layout needs."""
    return {"avx512_vnni", "avx512vl"} <= cpu_flags()


def cpu_has_vnni() -> bool:
    """int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI), which ONNX Runtime's int8 kernels use."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@lru_cache(maxsize=None)
def _cached_build(cc: str, folder: str) -> tuple[Path | None, str | None]:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    try:
        texts = [(here / name).read_bytes() for name in SOURCES + HEADERS]
    except OSError as e:
        return None, f"the kernel sources are missing ({e})"
    for part in [cc, *FLAGS, *texts]:
        digest.update(part if isinstance(part, bytes) else part.encode())
    target = Path(folder) / f"{LIBRARY_STEM}-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target, None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{LIBRARY_STEM}-", suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        return None, f"no cache folder for the compiled kernels ({e})"
    try:
        # the compiler reads the very texts the name hashes (copies), not the files again: a source edited between
        # the two reads would otherwise be built under the other text's name
        with tempfile.TemporaryDirectory(prefix=f".{LIBRARY_STEM}-src-", dir=target.parent) as copies:
            for name, text in zip(SOURCES + HEADERS, texts):
                Path(copies, name).write_bytes(text)
            run = subprocess.run([cc, *FLAGS, "-o", partial, *(str(Path(copies, name)) for name in SOURCES), "-lm"],
                                 capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            first = next((line for line in run.stderr.splitlines() if "error" in line), run.stderr.strip()[:200])
            return None, f"the C compiler failed ({first})"
        os.replace(partial, target)
        return target, None
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C compiler failed ({e})"
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _build() -> tuple[Path | None, str | None]:
    if not enabled():
        return None, f"{ENV_SWITCH}=0"
    if not cpu_has_avx2():
        return None, "the CPU has no AVX2"
    cc = compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang; or $CC)"
    return _cached_build(cc, str(cache_dir()))
