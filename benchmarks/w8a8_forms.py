"""ONNX Runtime forms of a dynamic-int8 linear, timed on the 121 linears of SmolLM2-135M's shape.

    python benchmarks/w8a8_forms.py [--threads 1] [--rounds 8] [--forms fp32 dqmm dqmm_u8 ...]

One bare graph per form (each linear its own input, random weights); the forms take turns, the best
round counts. M = 128 (prefill) and M = 1 (decode). Forms: fp32 MatMul; DynamicQuantizeMatMul with int8
weights (dqmm) or uint8 weights + zero point 128 (dqmm_u8, what `w8a8` writes); DynamicQuantizeLinear +
MatMulInteger + Cast + Mul (mi, int8 weights); DynamicQuantizeLinear + MatMulIntegerToFloat (mitf_u8);
8-bit MatMulNBits at accuracy level 4 (nbits8). docs/performance.md ("A8W8") keeps the latest numbers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = [s for _ in range(LAYERS) for s in ((HIDDEN, HIDDEN + 2 * KV), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTERMEDIATE),
                                             (INTERMEDIATE, HIDDEN))] + [(HIDDEN, VOCAB)]
FORMS = ("fp32", "dqmm", "dqmm_u8", "mi", "mitf_u8", "nbits8")


def linear(form: str, i: int, w: np.ndarray):
    """(nodes, initializers) computing y{i} = x{i} @ w in `form`."""
    k, n = w.shape
    x, y = f"x{i}", f"y{i}"
    if form == "fp32":
        return [helper.make_node("MatMul", [x, f"w{i}"], [y])], [numpy_helper.from_array(w, f"w{i}")]
    s = (np.abs(w).max(0) / 127).astype(np.float32)
    q = np.clip(np.rint(w / s), -127, 127).astype(np.int8)
    u8 = (q.astype(np.int16) + 128).astype(np.uint8)
    if form == "nbits8":
        block = 128 if k % 128 == 0 else 64
        inits = [numpy_helper.from_array(np.ascontiguousarray(u8.T).reshape(n, k // block, block), f"q{i}"),
                 numpy_helper.from_array(np.repeat(s, k // block), f"s{i}")]
        return [helper.make_node("MatMulNBits", [x, f"q{i}", f"s{i}"], [y], domain="com.microsoft", K=k, N=n, bits=8,
                                 block_size=block, accuracy_level=4)], inits
    unsigned = form.endswith("_u8")
    inits = [numpy_helper.from_array(u8 if unsigned else q, f"q{i}"), numpy_helper.from_array(s, f"s{i}")]
    zero = []
    if unsigned:
        inits.append(numpy_helper.from_array(np.full(n, 128, np.uint8), f"z{i}"))
        zero = [f"z{i}"]
    if form.startswith("dqmm"):
        node = helper.make_node("DynamicQuantizeMatMul", [x, f"q{i}", f"s{i}", *zero], [y], domain="com.microsoft")
        return [node], inits
    dql = helper.make_node("DynamicQuantizeLinear", [x], [f"xq{i}", f"xs{i}", f"xz{i}"])
    if form == "mi":
        return [dql, helper.make_node("MatMulInteger", [f"xq{i}", f"q{i}", f"xz{i}"], [f"acc{i}"]),
                helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"xs{i}", f"s{i}"], [f"sc{i}"]),
                helper.make_node("Mul", [f"accf{i}", f"sc{i}"], [y])], inits
    return [dql, helper.make_node("MatMulIntegerToFloat", [f"xq{i}", f"q{i}", f"xs{i}", f"s{i}", f"xz{i}", *zero], [y],
                                  domain="com.microsoft")], inits


def session(form: str, threads: int, rng) -> ort.InferenceSession:
    nodes, inits, inputs, outputs = [], [], [], []
    for i, (k, n) in enumerate(SHAPES):
        more_nodes, more_inits = linear(form, i, (rng.standard_normal((k, n), dtype=np.float32) * 0.05))
        nodes += more_nodes
        inits += more_inits
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["M", k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", n]))
    model = helper.make_model(helper.make_graph(nodes, "linears", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--forms", nargs="*", default=list(FORMS), choices=FORMS)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    forms = ["fp32"] + [f for f in args.forms if f != "fp32"]
    sessions = {form: session(form, args.threads, rng) for form in forms}
    for m, rounds in ((128, args.rounds), (1, 4 * args.rounds)):
        feeds = {f"x{i}": rng.standard_normal((m, k), dtype=np.float32) for i, (k, _) in enumerate(SHAPES)}
        for sess in sessions.values():  # warm-up: the first run allocates
            sess.run(None, feeds)
        best = dict.fromkeys(forms, float("inf"))
        for _ in range(rounds):
            for form, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, feeds)
                best[form] = min(best[form], time.perf_counter() - start)
        print(f"M={m}, {args.threads} threads: " + ", ".join(
            f"{form} {t * 1e3:.1f} ms ({best['fp32'] / t:.2f}x)" for form, t in best.items()), flush=True)


if __name__ == "__main__":
    main()
