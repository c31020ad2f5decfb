"""lowbit's CPU kernels alone, one node at a time, on SmolLM2-135M's shapes (random weights).

    python benchmarks/kernel_speed.py [--reps 300] [--library PATH]

- One token (M = 1, one thread, K = 576, N = 3072) on `lowbit.cpu.MatMulNarrowFloat` for every weight type it
  reads (bfloat16, float16, e4m3, e5m2, e2m1): Gweights/s, best of --reps calls.
- A decoder layer's four prompt linears (M = 128: qkv 576 x 960, o 576 x 576, gate/up 576 x 3072, down
  1536 x 576) on `MatMulNarrowFloat` with bfloat16 weights against ONNX Runtime's float32 MatMul on the same
  values, one and two threads.
- Prompt calls (M = 128) on `lowbit.cpu.MatMulInt4Int8` (4-bit codes, zero points, one group over K and groups of
  32), K = 576 and 1536, N = 576, two threads.
- NVFP4 as integers (`MatMulInt4Int8` with e2m1 codes, int8 activations): one token on one thread (Gweights/s), and
  a decoder layer's four prompt linears (M = 128, two threads) against ONNX Runtime's float32 MatMul on the
  weights they stand for.
- A decode step's linears: 30 layers' four one-token calls chained in one graph, every weight its own (so they
  stream from memory as in a model), two threads, 4-bit codes (`MatMulInt4Int8`) and 8-bit codes
  (`MatMulInt8Int8`), both with zero points per column; and an `lm_head` (576 x 49152) one token on two
  threads in bfloat16, float16 and e4m3 (`MatMulNarrowFloat`): ms and GB/s of weights read.
- Attention: 30 GroupQueryAttention nodes (SmolLM2-135M's 9 query and 3 KV heads of 64, RoPE inside, an attention
  bias, past and present bound to one buffer per node as generation binds them), two threads, ONNX Runtime's
  `com.microsoft` node against `lowbit.cpu.GroupQueryAttention`: one token on a past of 159 and of 1000, and a
  128-token prompt; microseconds a node.

Each number is the best of --reps runs of one ORT session (--reps / 5 for the decode step); the kernel library is
the one the runtime builds (custom_ops/kernels/), or --library, a compiled copy to compare with (an A/B of two
builds). docs/performance.md and docs/targets.md quote its output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.conftest import graph_session, kernel_node_session  # noqa: E402

from lowbit.custom_ops import kernels  # noqa: E402
from lowbit.custom_ops import matmul_int4_int8 as int4  # noqa: E402
from lowbit.custom_ops import matmul_int8_int8 as int8  # noqa: E402
from lowbit.custom_ops import matmul_narrow_float as narrow  # noqa: E402

LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (K, N) of a decoder layer's linears


def best_seconds(session, a: np.ndarray, reps: int) -> float:
    session.run(None, {"A": a})
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, {"A": a})
        best = min(best, time.perf_counter() - start)
    return best


def narrow_weight(rng, k: int, n: int, kind: str):
    if kind == "e2m1":
        steps = rng.uniform(0.02, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) / 100
        return narrow.pack_e2m1(rng.integers(0, 16, (n, k)).astype(np.uint8), steps.astype(np.float32))
    dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "e4m3": ml_dtypes.float8_e4m3fn,
             "e5m2": ml_dtypes.float8_e5m2}[kind]
    scales = rng.uniform(0.5, 1.5, n).astype(np.float32) if kind.startswith("e") else None
    return narrow.pack(rng.standard_normal((k, n)).astype(dtype), scales)


def narrow_session(weight, threads: int):
    return kernel_node_session(narrow.OP_TYPE, {"B": weight.b, "S": weight.scales}, threads, K=weight.k, N=weight.n,
                               weight_type=weight.weight_type)


def float32_session(w: np.ndarray, threads: int):
    from onnx import helper

    return graph_session([helper.make_node("MatMul", ["A", "W"], ["Y"])], {"W": w}, threads)


def nvfp4_session(rng, k: int, n: int, threads: int):
    """`MatMulInt4Int8` over random NVFP4 weights (e2m1 codes, e4m3 block scales over a global scale), int8
    activations (an NVFP4A16 layer at accuracy level 4), and the float32 weight [K, N] they stand for."""
    from lowbit import nvfp4

    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    steps = rng.uniform(0.02, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) / np.float32(100)
    weight = int4.from_nvfp4(codes, steps)
    session = kernel_node_session(int4.OP_TYPE, {"B": weight.b, "S": weight.scales, "Z": weight.zero_points},
                                  threads, K=k, N=n, group_size=16, layout=weight.layout, e2m1=1)
    return session, np.ascontiguousarray((nvfp4.E2M1[codes] * np.repeat(steps, 16, axis=1)).T.astype(np.float32))


def decode_linears_session(rng, bits: int, layers: int = 30):
    """A decode step's linears: per layer qkv -> o -> gate/up -> down, the outputs sliced to the next call's K."""
    from onnx import helper

    nodes, weights = [], {"start": np.array([0], np.int64), "axis": np.array([-1], np.int64)}
    module = int4 if bits == 4 else int8
    x = "A"
    for layer in range(layers):
        for name, (k, n) in zip(("qkv", "o", "gate_up", "down"), LAYER):
            if x != "A" and name in ("o", "down"):  # the attention output / SwiGLU product is K wide
                weights.setdefault(f"end{k}", np.array([k], np.int64))
                nodes.append(helper.make_node("Slice", [x, "start", f"end{k}", "axis"], [f"{x}_k"]))
                x = f"{x}_k"
            prefix = f"l{layer}_{name}"
            codes = rng.integers(0, 2**bits, (n, k))
            scales = (rng.random((1, n)) + 0.5).astype(np.float32)
            layout = {"layout": int4.VNNI} if bits == 4 else {}
            weight = module.pack(codes, scales, rng.integers(0, 2**bits, (1, n)), k, **layout)
            weights.update({f"{prefix}_b": weight.b, f"{prefix}_s": weight.scales, f"{prefix}_z": weight.zero_points})
            nodes.append(helper.make_node(f"MatMulInt{bits}Int8", [x, f"{prefix}_b", f"{prefix}_s", f"{prefix}_z"],
                                          [prefix], domain="lowbit.cpu", K=k, N=n, group_size=k, **layout))
            x = prefix
    nodes.append(helper.make_node("Identity", [x], ["Y"]))
    return graph_session(nodes, weights, 2, domains={"lowbit.cpu": 1}, kernels=True)


def attention_seconds(rng, domain: str, seq: int, past: int, capacity: int, reps: int, layers: int = 30) -> float:
    """Best seconds of `layers` GroupQueryAttention nodes of `domain` in one graph (each its own KV buffer, bound as
    past and present), SmolLM2-135M's heads, `seq` new tokens on `past` cached ones, two threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    hq, hkv, d = 9, 3, 64
    angles = rng.random((capacity, d // 2)) * 6
    initializers = [helper.make_tensor(name, TensorProto.FLOAT, list(values.shape), values.ravel())
                    for name, values in (("cos", np.cos(angles).astype(np.float32)),
                                         ("sin", np.sin(angles).astype(np.float32)))]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, seq, (hq + 2 * hkv) * d]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, seq, past + seq])]
    nodes, outputs = [], []
    for i in range(layers):
        for kv in "kv":
            inputs.append(helper.make_tensor_value_info(f"past_{kv}{i}", TensorProto.FLOAT, [1, hkv, capacity, d]))
            outputs.append(helper.make_tensor_value_info(f"present_{kv}{i}", TensorProto.FLOAT, [1, hkv, capacity, d]))
        nodes.append(helper.make_node("GroupQueryAttention", ["qkv", "", "", f"past_k{i}", f"past_v{i}", "seqlens_k",
                                                              "total", "cos", "sin", "", "bias"],
                                      [f"out{i}", f"present_k{i}", f"present_v{i}"], domain=domain, num_heads=hq,
                                      kv_num_heads=hkv, do_rotary=1))
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if domain == "lowbit.cpu":
        options.register_custom_ops_library(str(kernels.library()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    arrays = {"qkv": rng.standard_normal((1, seq, (hq + 2 * hkv) * d)).astype(np.float32),
              "seqlens_k": np.array([past + seq - 1], np.int32), "total": np.array(past + seq, np.int32),
              "bias": np.zeros((1, 1, seq, past + seq), np.float32)}
    for i in range(layers):
        for kv in "kv":
            arrays[f"past_{kv}{i}"] = rng.standard_normal((1, hkv, capacity, d)).astype(np.float32)
            binding.bind_output(f"present_{kv}{i}", "cpu", 0, np.float32, [1, hkv, capacity, d],
                                arrays[f"past_{kv}{i}"].ctypes.data)
        binding.bind_output(f"out{i}")
    for name, values in arrays.items():
        binding.bind_cpu_input(name, values)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--library", type=Path, help="a compiled kernel library to measure instead of the runtime's")
    args = parser.parse_args()
    if args.library is not None:
        if not args.library.is_file():
            parser.error(f"--library {args.library}: no such file")
        kernels.library = lambda: args.library.resolve()
    rng = np.random.default_rng(0)

    print("One token, one thread, K = 576, N = 3072 (MatMulNarrowFloat):")
    a = rng.standard_normal((1, 576)).astype(np.float32)
    for kind in ("bfloat16", "float16", "e4m3", "e5m2", "e2m1"):
        seconds = best_seconds(narrow_session(narrow_weight(rng, 576, 3072, kind), 1), a, args.reps * 5)
        print(f"  {kind:8s} {seconds * 1e6:7.1f} us  {576 * 3072 / seconds / 1e9:5.2f} Gweights/s")

    print("A layer's four prompt linears, M = 128 (MatMulNarrowFloat bfloat16 vs ORT float32 MatMul):")
    for threads in (1, 2):
        ours = theirs = 0.0
        for k, n in LAYER:
            values = rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16)
            a = rng.standard_normal((128, k)).astype(np.float32)
            ours += best_seconds(narrow_session(narrow.pack(values), threads), a, args.reps)
            theirs += best_seconds(float32_session(values.astype(np.float32), threads), a, args.reps)
        print(f"  {threads} thread(s): kernel {ours * 1e3:.3f} ms, float32 MatMul {theirs * 1e3:.3f} ms, "
              f"ratio {theirs / ours:.2f}")

    print("Prompt calls, M = 128, N = 576, two threads (MatMulInt4Int8, 4-bit codes with zero points):")
    for group in (0, 32):
        for k in (576, 1536):
            g = group or k
            groups = -(-k // g)
            weight = int4.pack(rng.integers(0, 16, (576, k)), (rng.random((groups, 576)) + 0.5).astype(np.float32),
                               rng.integers(0, 16, (groups, 576)), g, layout=int4.VNNI)
            session = kernel_node_session("MatMulInt4Int8", {"B": weight.b, "scales": weight.scales,
                                                             "zero_points": weight.zero_points}, 2, K=k, N=576,
                                          group_size=g, layout=int4.VNNI)
            seconds = best_seconds(session, rng.standard_normal((128, k)).astype(np.float32), args.reps)
            print(f"  K = {k:4d}, {'one group' if not group else f'groups of {group}':10s} {seconds * 1e6:7.1f} us")

    print("NVFP4 as integers (MatMulInt4Int8, e2m1 codes, groups of 16, int8 activations):")
    seconds = best_seconds(nvfp4_session(rng, 576, 3072, 1)[0], rng.standard_normal((1, 576)).astype(np.float32),
                           args.reps * 5)
    print(f"  one token, one thread, K = 576, N = 3072  {seconds * 1e6:7.1f} us  "
          f"{576 * 3072 / seconds / 1e9:5.2f} Gweights/s")
    ours = theirs = 0.0
    for k, n in LAYER:
        session, weight = nvfp4_session(rng, k, n, 2)
        a = rng.standard_normal((128, k)).astype(np.float32)
        ours += best_seconds(session, a, args.reps)
        theirs += best_seconds(float32_session(weight, 2), a, args.reps)
    print(f"  a layer's four prompt linears, M = 128, two threads: kernel {ours * 1e3:.3f} ms, float32 MatMul "
          f"{theirs * 1e3:.3f} ms, ratio {theirs / ours:.2f}")

    print("A decode step's linears, 30 layers of one-token calls, two threads (weights streamed from memory):")
    weights = 30 * sum(k * n for k, n in LAYER)
    a = rng.standard_normal((1, 576)).astype(np.float32)
    for bits in (4, 8):
        seconds = best_seconds(decode_linears_session(rng, bits), a, max(args.reps // 5, 1))
        print(f"  {bits}-bit codes  {seconds * 1e3:6.3f} ms  {weights * bits / 8 / seconds / 1e9:5.1f} GB/s")
    print("An lm_head, 576 x 49152, one token, two threads (MatMulNarrowFloat):")
    for kind in ("bfloat16", "float16", "e4m3"):
        weight = narrow_weight(rng, 576, 49152, kind)
        seconds = best_seconds(narrow_session(weight, 2), a, max(args.reps // 5, 1))
        print(f"  {kind:8s} {seconds * 1e3:6.3f} ms  {weight.b.nbytes / seconds / 1e9:5.1f} GB/s")
    print("Attention, 30 GroupQueryAttention nodes (9/3 heads of 64), two threads: us a node, ORT's node -> lowbit's:")
    for label, seq, past, capacity, reps in (("one token, past 159", 1, 159, 256, args.reps),
                                             ("one token, past 1000", 1, 1000, 1024, args.reps),
                                             ("prompt of 128", 128, 0, 256, max(args.reps // 10, 1))):
        theirs, ours = (attention_seconds(rng, domain, seq, past, capacity, reps) / 30 * 1e6
                        for domain in ("com.microsoft", "lowbit.cpu"))
        print(f"  {label:20s} {theirs:7.1f} -> {ours:7.1f} us  ({theirs / ours:.2f}x)")


if __name__ == "__main__":
    main()
