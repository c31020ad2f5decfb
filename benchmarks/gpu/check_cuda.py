"""What the GPU machine has, and whether ONNX Runtime's CUDA execution provider really runs there: a float16 MatMul
on [CUDAExecutionProvider, CPUExecutionProvider], which must stay on CUDA and match numpy (onnxruntime lists CUDA
among its available providers even where its libraries cannot load, and falls back to the CPU). Writes a JSON report.

    python3 benchmarks/gpu/check_cuda.py OUT.json [--dry-run [--cpu]]   # exit 3: CUDA is not usable (reason printed)

--dry-run (LOWBIT_GPU_DRY_RUN=1 in device_run.sh): imports only, no GPU needed; with --cpu (LOWBIT_GPU_PROVIDER=cpu)
a CPU build of onnxruntime will do.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CUDA = "CUDAExecutionProvider"


def loaded_cuda_libraries() -> list[str]:
    keys = ("cublas", "cudart", "cudnn", "curand", "cufft", "nvrtc", "onnxruntime_providers")
    try:
        paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if any(k in Path(p).name for k in keys))


def nvidia_smi() -> dict | str:
    query = "name,driver_version,memory.total,memory.used,compute_cap"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"no nvidia-smi: {e}"
    values = [v.strip() for v in out.stdout.splitlines()[0].split(",")] if out.stdout.strip() else []
    return dict(zip(query.split(","), values)) if values else out.stderr.strip()


def smoke(ort) -> dict:
    """A float16 MatMul [64, 256] x [256, 128] on CUDA: the providers the session got and the largest difference."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float16)
    x = rng.standard_normal((64, 256)).astype(np.float16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "smoke",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [64, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [64, 128])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA, "CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0].astype(np.float32)
    ref = x.astype(np.float32) @ w.astype(np.float32)
    return {"providers": session.get_providers(), "max_abs_diff": float(np.abs(y - ref).max()),
            "ok": session.get_providers()[0] == CUDA and bool(np.allclose(y, ref, atol=0.1, rtol=1e-2))}


def main(argv: list[str]) -> int:
    out_path = Path(argv[0])
    dry = "--dry-run" in argv
    report: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                    "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH",
                                                                                                      "")}
    problems = []
    try:
        import onnxruntime as ort

        report["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__,
                                 "package": getattr(ort, "package_name", None),
                                 "cuda_version": getattr(ort, "cuda_version", None),
                                 "build_info": ort.capi._pybind_state.get_build_info(),
                                 "available_providers": ort.get_available_providers()}
        if CUDA not in ort.get_available_providers() and "--cpu" not in argv:
            problems.append(f"{ort.__file__} is not a CUDA build (providers: {ort.get_available_providers()})")
    except Exception as e:  # noqa: BLE001 - the report says what failed
        problems.append(f"import onnxruntime: {type(e).__name__}: {e}")
        ort = None
    pack = Path(ort.__file__).parents[1] / "lowbit-gpu-pack.json" if ort else None
    report["pack"] = json.loads(pack.read_text()) if pack and pack.is_file() else None
    for module in ("numpy", "onnx", "onnx_ir", "transformers", "tokenizers", "lowbit", "lowbit.runtime.session",
                   "lowbit.converter.api", "lowbit.cli", *(() if dry else ("torch",))):
        try:
            mod = __import__(module, fromlist=["_"])
            report.setdefault("modules", {})[module] = f"{getattr(mod, '__version__', '')} {mod.__file__}".strip()
        except Exception as e:  # noqa: BLE001
            report.setdefault("modules", {})[module] = f"FAILED {type(e).__name__}: {e}"
            if module != "torch":
                problems.append(f"import {module}: {e}")
    if not dry and ort is not None:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            try:
                ort.preload_dlls()
                report["preload_dlls"] = "called"
            except Exception as e:  # noqa: BLE001
                report["preload_dlls"] = f"FAILED {type(e).__name__}: {e}"
        report["preload_dlls_printed"] = printed.getvalue().strip()
        report["nvidia_smi"] = gpu = nvidia_smi()
        sm = (report["pack"] or {}).get("sm")
        if sm and isinstance(gpu, dict) and gpu.get("compute_cap", "").replace(".", "") not in map(str, sm):
            problems.append(f"this pack keeps cubins for sm {sm} only, the GPU is compute capability "
                            f"{gpu.get('compute_cap')}: use the full pack (benchmarks/gpu/README.md)")
        try:
            report["smoke"] = smoke(ort)
            if not report["smoke"]["ok"]:
                problems.append(f"the CUDA MatMul smoke test failed: {report['smoke']}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"CUDA smoke test: {type(e).__name__}: {str(e)[:1000]}")
        report["loaded_libraries"] = loaded_cuda_libraries()
        try:
            import torch

            report["torch_cuda"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                                    "available": torch.cuda.is_available(),
                                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        except Exception as e:  # noqa: BLE001
            report["torch_cuda"] = f"FAILED {type(e).__name__}: {e}"
    report["problems"] = problems
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    if problems:
        print("CUDA check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 3
    print("CUDA check ok" + (" (dry run: imports only)" if dry else f": {report['smoke']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
