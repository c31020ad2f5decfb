"""lowbit.cpu.MatMulNarrowFloat (custom_ops/matmul_narrow_float.py, custom_ops/kernels/matmul_narrow_float.c) and
the load-time rewrite that uses it (runtime/narrow_float_weights.py): packing and widening against numpy, the
kernel bit for bit against its reference, and float16 / FP8 folders against ONNX Runtime's own float32 path."""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from lowbit.custom_ops import kernels
from lowbit.custom_ops import matmul_narrow_float as op
from tests.conftest import (SAMPLE_MODEL, assert_bound_decode_equals_forward, kernel_node_session,
                            prefill_and_decode, relative)

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason=f"no CPU kernel library: {kernels.unavailable()}")
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "e4m3fn": ml_dtypes.float8_e4m3fn,
          "e5m2": ml_dtypes.float8_e5m2}


def weights(rng, shape, dtype):
    return (rng.standard_normal(shape) * rng.choice([0.01, 0.3, 4.0])).astype(dtype)


@pytest.mark.parametrize("name", ["e4m3fn", "e5m2"])
def test_every_float8_code_widens_to_its_value(name):
    """All 256 codes (NaN excepted): the kernel's w[k, n] times its unit is the float8 value exactly, subnormals
    and signed zeros included."""
    codes = np.arange(256, dtype=np.uint8).view(DTYPES[name]).reshape(16, 16)
    packed = op.pack(codes)
    with np.errstate(invalid="ignore"):  # the NaN codes
        values = op.widened(packed)[:, :16] * np.float32(op.UNIT[packed.weight_type])
    expected = codes.astype(np.float32)
    finite = ~np.isnan(expected)
    assert np.array_equal(values[finite], expected[finite])
    assert np.array_equal(np.signbit(values[finite]), np.signbit(expected[finite]))


def exact_float32(x) -> np.float32:
    """The rational x rounded to float32, to nearest, ties to even."""
    near = np.float32(float(x))
    candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - x), int(np.array(v).view(np.uint32)) & 1))


def test_fma32_rounds_the_exact_sum_once(rng):
    """The reference's fused multiply-add equals the exact a * b + c rounded once to float32 (rational arithmetic):
    random values over many magnitudes, and a sum whose float64 rounding lands exactly halfway between two float32
    values (1 + 2^-23 plus just under half its ulp: one rounding gives 1 + 2^-23, rounding through float64 twice
    would give the even neighbour 1 + 2^-22)."""
    c = np.float32(1 + 2.0 ** -23)
    a, b = np.float32(2.0 ** -24 * (1 + 2.0 ** -23)), np.float32(1 - 2.0 ** -23)
    assert op.fma32(a, b, c) == c != np.float32(np.float64(a) * np.float64(b) + np.float64(c))
    a, b, c = (rng.standard_normal(3000) * 10.0 ** rng.integers(-8, 8, 3000)).astype(np.float32).reshape(3, 1000)
    got = op.fma32(a, b, c)
    expected = [exact_float32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))) for x, y, z in zip(a, b, c)]
    assert np.array_equal(got, np.array(expected, np.float32))


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("k,n", [(7, 3), (64, 16), (300, 50)])
def test_pack_holds_the_weights_in_tile_order(name, k, n, rng):
    w = weights(rng, (k, n), DTYPES[name])
    packed = op.pack(w)
    assert packed.b.shape == (-(-n // 16), k, op.ROW_BYTES[packed.weight_type])
    unit = np.float32(op.UNIT[packed.weight_type])
    assert np.array_equal(op.widened(packed)[:, :n] * unit, w.astype(np.float32))
    assert not op.widened(packed)[:, n:].any()
    assert np.array_equal(op.pack(np.ascontiguousarray(w.T), transposed=True).b, packed.b)


def test_exact_bfloat16_finds_float32_weights_that_are_bfloat16(rng):
    w = rng.standard_normal((64, 70)).astype(ml_dtypes.bfloat16)
    as_float32 = w.astype(np.float32)
    assert np.array_equal(op.exact_bfloat16(as_float32).astype(np.float32), as_float32)
    nudged = as_float32.copy()
    nudged.reshape(-1)[-1] = np.nextafter(nudged.reshape(-1)[-1], np.float32(9))  # one value past the prefix check
    assert op.exact_bfloat16(nudged) is None
    assert op.exact_bfloat16(rng.standard_normal((8, 8)).astype(np.float32)) is None


def test_pack_rejects_what_the_kernel_cannot_hold(rng):
    with pytest.raises(ValueError, match="only float16"):
        op.pack(rng.standard_normal((4, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="2-D"):
        op.pack(rng.standard_normal((2, 4, 4)).astype(np.float16))
    with pytest.raises(ValueError, match="one scale"):
        op.pack(rng.standard_normal((4, 5)).astype(np.float16), np.ones(4, np.float32))


def test_reference_is_the_matmul_of_the_dequantized_weight(rng):
    """Up to float32 summation rounding, the reference is A @ (w * scales) in float64."""
    for dtype in DTYPES.values():
        w = weights(rng, (96, 40), dtype)
        scales = rng.uniform(0.5, 2, 40).astype(np.float32)
        a = rng.standard_normal((3, 96)).astype(np.float32)
        expected = a.astype(np.float64) @ (w.astype(np.float64) * scales)
        got = op.reference_matmul(a, op.pack(w, scales))
        bound = 1e-5 * np.abs(a).sum(1).max() * np.abs(w.astype(np.float32) * scales).max()
        assert np.abs(got - expected).max() <= bound


def kernel_session(packed: op.NarrowFloatWeight, threads: int = 2):
    return kernel_node_session(op.OP_TYPE, {"B": packed.b, "S": packed.scales}, threads, K=packed.k, N=packed.n,
                               weight_type=packed.weight_type)


@needs_kernel
@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("k,n", [(5, 3), (64, 16), (300, 70), (3100, 33)])  # K > 1536: two chunks when M > 1
@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 7), (13,)])
@pytest.mark.parametrize("scaling", ["none", "one", "per_column"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("avx512", ["1", "0"])  # "1": 512-bit prompts where the CPU has AVX-512F
def test_kernel_equals_the_reference_bit_for_bit(name, k, n, lead, scaling, threads, avx512, rng, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNELS_AVX512", avx512)
    w = weights(rng, (k, n), DTYPES[name])
    scales = {"none": None, "one": np.float32(rng.uniform(0.1, 3)),
              "per_column": rng.uniform(0.1, 3, n).astype(np.float32)}[scaling]
    packed = op.pack(w, scales)
    a = rng.standard_normal((*lead, k)).astype(np.float32)
    y = kernel_session(packed, threads).run(None, {"A": a})[0]
    assert y.shape == (*lead, n)
    assert np.array_equal(y, op.reference_matmul(a, packed))


def onnx_runtime_fake_quant(x, scale, input_type):
    """ORT's QuantizeLinear -> DequantizeLinear to float8 (zero point 0, saturate), float32."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                               helper.make_tensor("z", input_type, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("input_type", [op.FLOAT8E4M3FN, op.FLOAT8E5M2])
def test_fake_quantize_is_onnx_runtimes_quantize_dequantize_pair(input_type, rng):
    """Random float32 bit patterns over 2^-31 .. 2^17 of both signs, every midpoint between two float8 values (the
    ties), and values past the largest (saturation), for three scales."""
    bits = rng.integers(0x30000000, 0x48000000, 200_000, dtype=np.uint32) | (
        rng.integers(0, 2, 200_000, dtype=np.uint32) << 31)
    dtype = DTYPES["e4m3fn" if input_type == op.FLOAT8E4M3FN else "e5m2"]
    codes = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    codes = np.sort(codes[np.isfinite(codes)])
    ties = ((codes[1:].astype(np.float64) + codes[:-1]) / 2).astype(np.float32)
    limit = op.FLOAT8_MAX[input_type]
    for scale in (1.0, float(rng.uniform(0.01, 0.1)), float(rng.uniform(1, 5))):
        x = np.concatenate([bits.view(np.float32), ties * np.float32(scale),
                            np.array([3e38, -3e38, 1.04 * limit, -1.1 * limit, 2 * limit], np.float32) * np.float32(
                                min(scale, 1.0))]).astype(np.float32)
        assert np.array_equal(op.fake_quantize(x, scale, input_type), onnx_runtime_fake_quant(x, scale, input_type))


@needs_kernel
@pytest.mark.parametrize("name", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_token_float8_route_equals_the_reference_and_knows_its_limits(name, threads, rng):
    """One token's float8 weights are widened straight to float32 bit patterns (the value times 2^-120 or 2^-112,
    subnormals as float32 subnormals) against the activation times 2^112: exact while every |A| < 2^16 and where
    the thread keeps subnormal inputs (no DAZ). Every code (subnormals included) against a token, a token with an
    activation of 2^16 and one of -3e4; and on one thread (the kernel then runs on the calling thread) with
    subnormal inputs treated as zero (torch.set_flush_denormal: DAZ and FTZ in MXCSR), where the scaled route would
    zero the subnormal weights: the kernel equals the reference bit for bit in all of them."""
    torch = pytest.importorskip("torch")
    codes = np.arange(256, dtype=np.uint8).view(DTYPES[name])
    with np.errstate(invalid="ignore"):
        finite = codes[np.isfinite(codes.astype(np.float32))]
    w = rng.permutation(np.tile(finite, 13))[: 64 * 48].reshape(64, 48)
    packed = op.pack(w, rng.uniform(0.5, 2, 48).astype(np.float32))
    tokens = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(3)]
    tokens[1][0, 7] = 2.0 ** 16  # the other route
    tokens[2][0, 9] = -3e4  # still scaled: 3e4 * 2^112 < 2^127
    expected = [op.reference_matmul(a, packed) for a in tokens]
    session = kernel_session(packed, threads)
    for a, y in zip(tokens, expected):
        assert np.array_equal(session.run(None, {"A": a})[0], y)
    if threads == 1 and torch.set_flush_denormal(True):
        try:
            got = session.run(None, {"A": tokens[0]})[0]
        finally:
            torch.set_flush_denormal(False)
        assert np.array_equal(got, expected[0])


@needs_kernel
@pytest.mark.parametrize("input_type", [op.FLOAT8E4M3FN, op.FLOAT8E5M2])
@pytest.mark.parametrize("lead", [(1,), (3, 5), (1, 11)])
def test_kernel_with_float8_inputs_equals_the_reference(input_type, lead, rng):
    """The fake quantization inside the kernel (AVX2) is the reference's, bit for bit, ties included."""
    k, n = 45, 40
    packed = op.pack(weights(rng, (k, n), DTYPES["e4m3fn"]), rng.uniform(0.5, 2, n).astype(np.float32))
    scale = np.float32(rng.uniform(0.01, 0.5))
    codes = np.arange(256, dtype=np.uint8).view(DTYPES["e4m3fn" if input_type == op.FLOAT8E4M3FN else "e5m2"])
    codes = np.sort(codes.astype(np.float32)[np.isfinite(codes.astype(np.float32))])
    ties = ((codes[1:].astype(np.float64) + codes[:-1]) / 2 * scale).astype(np.float32)
    a = (rng.standard_normal((*lead, k)) * rng.choice([0.01, 1, 100])).astype(np.float32)
    a.reshape(-1)[: min(a.size, ties.size)] = rng.choice(ties, min(a.size, ties.size))
    session = kernel_node_session(op.OP_TYPE, {"B": packed.b, "S": packed.scales, "T": scale.reshape(1)}, K=k, N=n,
                                  weight_type=packed.weight_type, input_type=input_type)
    y = session.run(None, {"A": a})[0]
    assert np.array_equal(y, op.reference_matmul(a, packed, (input_type, scale)))
    assert not np.array_equal(y, op.reference_matmul(a, packed))  # the quantization is there


@needs_kernel
def test_a_row_gives_the_same_result_alone_or_in_a_prompt(rng):
    """M == 1 and M > 1 take different loops; each output is the same sum in the same order."""
    packed = op.pack(weights(rng, (520, 45), np.float16))
    session = kernel_session(packed)
    a = rng.standard_normal((9, 520)).astype(np.float32)
    together = session.run(None, {"A": a})[0]
    for i in range(9):
        assert np.array_equal(session.run(None, {"A": a[i:i + 1]})[0], together[i:i + 1])


@needs_kernel
def test_kernel_rejects_inputs_of_the_wrong_shape(rng):
    packed = op.pack(weights(rng, (32, 16), np.float16))
    with pytest.raises(Exception, match="last dimension is not K"):
        kernel_session(packed).run(None, {"A": rng.standard_normal((1, 31)).astype(np.float32)})


# ------------------------------------------------------------------------------ folders


@pytest.fixture(scope="module")
def stories_narrow(tmp_path_factory):
    """stories260K as q0f16 and the FP8 codes; and, from a copy saved as bfloat16 (as most published checkpoints
    are), float32 folders: q0f32, a16w8 (DashInfer keeps lm_head float), w4a16 with a float lm_head."""
    import shutil

    from safetensors.numpy import load_file

    import lowbit

    root = tmp_path_factory.mktemp("narrow_float")
    for scheme in ("q0f16", "e4m3_e4m3_f16", "e5m2_e5m2_f16"):
        lowbit.convert(str(SAMPLE_MODEL), root / scheme, scheme=scheme)
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    rounded = root / "bfloat16-checkpoint"
    shutil.copytree(SAMPLE_MODEL, rounded)
    tensors = load_file(SAMPLE_MODEL / "model.safetensors")
    save_file({name: torch.from_numpy(t).to(torch.bfloat16) for name, t in tensors.items()},
              rounded / "model.safetensors")
    lowbit.convert(str(rounded), root / "q0f32-bfloat16", scheme="q0f32")
    lowbit.convert(str(rounded), root / "a16w8-bfloat16", scheme="a16w8")
    lowbit.convert(str(rounded), root / "w4a16-bfloat16", scheme="w4a16", ignore=["lm_head"])
    return root



@needs_kernel
@pytest.mark.parametrize("scheme", ["q0f16", "e4m3_e4m3_f16", "e5m2_e5m2_f16", "q0f32-bfloat16", "a16w8-bfloat16"])
def test_folders_on_the_kernel_give_onnx_runtimes_float32_logits(stories_narrow, scheme, monkeypatch, capfd):
    """The kernel sums the same float32 products in another order than ORT's MatMul over the folded float32
    weights: prefill and cached decode logits within 1e-5 of the largest logit (float32 rounding over K); the
    folder on disk is unchanged."""
    from lowbit.runtime.session import create_session

    folder = stories_narrow / scheme
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capfd.readouterr()
    session = create_session(folder)
    err = capfd.readouterr().err
    expected = {"q0f32-bfloat16": 21, "a16w8-bfloat16": 1}.get(scheme, 21)  # linears and lm_head; lm_head
    assert f"lowbit: {expected} MatMuls read float16/bfloat16/float8 weights at that width" in err
    assert ("with their inputs' float8 Q/DQ" in err) == scheme.startswith("e")
    on_kernel = prefill_and_decode(session)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    on_ort = prefill_and_decode(create_session(folder))
    assert "lowbit.cpu.MatMulNarrowFloat" not in capfd.readouterr().err
    monkeypatch.delenv(kernels.ENV_SWITCH)
    for a, b in zip(on_kernel, on_ort):
        assert relative(a, b) <= 1e-5
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@needs_kernel
def test_both_kernels_in_one_folder(stories_narrow, monkeypatch, capfd):
    """w4a16 with a float lm_head: the linears on the int8 kernel, the lm_head on this one, in one graph; the
    logits are those of the int8 kernel alone up to the lm_head's float32 summation order."""
    from lowbit.runtime import narrow_float_weights
    from lowbit.runtime.session import create_session

    capfd.readouterr()
    both = prefill_and_decode(create_session(stories_narrow / "w4a16-bfloat16"))
    err = capfd.readouterr().err
    assert "20 quantized MatMuls run on lowbit's int8 CPU kernel" in err
    assert "1 MatMuls read float16/bfloat16/float8 weights at that width" in err
    monkeypatch.setattr(narrow_float_weights, "kernel_applies", lambda metadata: False)
    int8_only = prefill_and_decode(create_session(stories_narrow / "w4a16-bfloat16"))
    for a, b in zip(both, int8_only):
        assert relative(a, b) <= 1e-5


@needs_kernel
def test_the_rewritten_graph(stories_narrow):
    """Every linear and the tied lm_head run on the kernel, the embedding Gather reads the float16 table: no
    weight matrix is left for ORT to fold into float32 (the kernel's tiles replace the others)."""
    import tempfile
    from pathlib import Path

    import onnx

    from lowbit.runtime import fast_paths, float32_compute, narrow_float_weights

    folder = stories_narrow / "q0f16"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    linears = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert float32_compute.to_float32(model)
    with tempfile.TemporaryDirectory() as tmp:
        result = fast_paths._rewrite_narrow_float(model, folder, Path(tmp))
    assert result.matmuls == linears and "lm_head" in linears and result.gathers == ["embed_tokens"]
    assert [n.op_type for n in model.graph.node].count(op.OP_TYPE) == len(linears)
    weights = {t.name for t in model.graph.initializer}
    assert not any(n.op_type in ("MatMul", "Gemm") and n.input[1] in weights for n in model.graph.node)
    folded = [t.name for t in model.graph.initializer if t.data_type == narrow_float_weights.FLOAT16
              and len(t.dims) == 2 and t.name.endswith(".weight" + float32_compute.SOURCE_SUFFIX)]
    assert folded == ["embed_tokens.weight" + float32_compute.SOURCE_SUFFIX]  # read by the Gather, as float16


@needs_kernel
def test_io_bound_decode_equals_plain_forward(stories_narrow):
    from lowbit.runtime.session import create_session

    assert_bound_decode_equals_forward(create_session(stories_narrow / "e4m3_e4m3_f16", prompt_session=False), 6, 8,
                                       12, seed=11)


def test_which_folders_the_rewrite_looks_at():
    """Without onnx: float16 folders, float32 ones from bfloat16 checkpoints, FP8 layers; not float32 checkpoints."""
    from lowbit.runtime.narrow_float_weights import kernel_applies

    assert kernel_applies({"dtype": "float16"})
    assert kernel_applies({"dtype": "float32", "source_float_dtypes": ["BF16"]})
    assert kernel_applies({"dtype": "float32", "source_float_dtypes": ["torch.bfloat16"]})
    assert not kernel_applies({"dtype": "float32", "source_float_dtypes": ["BF16", "F32"]})
    assert not kernel_applies({"dtype": "float32", "source_float_dtypes": ["F32"]})
    assert not kernel_applies({"dtype": "float32"}) and not kernel_applies(None)
    assert kernel_applies({"dtype": "float32", "quantization": {"x": {"format": "qdq_fp8_e4m3"}}})


# ------------------------------------------------------------------------------ NVFP4 (e2m1 codes, block steps)


def test_e2m1_pack_holds_the_dequantized_weight(rng):
    """e2m1(code) * (s / gs) per block: lowbit.nvfp4.dequantize's float32 weight, bit for bit (-0 as +0)."""
    from lowbit import nvfp4

    n, k = 37, 96
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scales = rng.uniform(0.02, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
    gs = np.float32(rng.uniform(10, 3000))
    steps = scales.astype(np.float32) / gs
    packed = op.pack_e2m1(codes, steps)
    assert packed.b.shape == (3, k, 8) and packed.scales.shape == (3, k // 16, 16)
    expected = nvfp4.dequantize(codes, scales, gs).T  # [K, N]
    got = op.widened(packed)[:, :n]
    assert np.array_equal(got, expected + 0.0)  # + 0.0: -0 -> +0
    with pytest.raises(ValueError, match="multiple of 16"):
        op.pack_e2m1(codes[:, :40], steps[:, :2])


@needs_kernel
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 9)])
@pytest.mark.parametrize("n,k", [(16, 16), (45, 96), (70, 320)])
@pytest.mark.parametrize("avx512", ["1", "0"])
def test_e2m1_kernel_equals_the_reference_bit_for_bit(lead, n, k, avx512, rng, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNELS_AVX512", avx512)
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    steps = (rng.uniform(0.02, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
             / np.float32(rng.uniform(10, 3000)))
    packed = op.pack_e2m1(codes, steps)
    a = rng.standard_normal((*lead, k)).astype(np.float32)
    y = kernel_session(packed).run(None, {"A": a})[0]
    assert np.array_equal(y, op.reference_matmul(a, packed))


@needs_kernel
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 9)])
@pytest.mark.parametrize("n,k", [(16, 16), (45, 96)])
def test_kernel_with_nvfp4_inputs_equals_the_reference(lead, n, k, rng):
    """input_type 23: the activations fake-quantized as lowbit.NVFP4ActivationQDQ computes them (blocks of 16, e4m3
    block scales, e2m1 values, ties to even, -0 where a negative value rounds to 0) inside the kernel, bit for bit:
    random rows at several magnitudes, exact ties of the e2m1 grid, an all-zero block and values far past 6 steps."""
    from lowbit import nvfp4

    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    steps = (rng.uniform(0.02, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
             / np.float32(rng.uniform(10, 3000)))
    packed = op.pack_e2m1(codes, steps)
    gs = np.float32(2.0 ** rng.integers(6, 12))  # a power of two: the tie block holds exact multiples of its step
    a = (rng.standard_normal((*lead, k)) * rng.choice([0.01, 1, 100], (*lead, 1))).astype(np.float32)
    rows = a.reshape(-1, k)
    if rows.size > 16:
        rows[0, :16] = 0.0  # amax 0: the 0.125 block scale
    if k >= 32:  # a block of exact ties: its max is 6 steps of an e4m3 scale s (step = s / gs), ties at half steps
        step = np.float32(rng.choice([0.5, 1.5, 3.0, 20.0, 208.0])) / gs
        rows[-1, 16:32] = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0, 3.0, -3.0, 6.0,
                                    -0.2, 1.0], np.float32) * step
    session = kernel_node_session(op.OP_TYPE, {"B": packed.b, "S": packed.scales, "T": gs.reshape(1)}, K=k, N=n,
                                  weight_type=packed.weight_type, input_type=op.FLOAT4E2M1)
    y = session.run(None, {"A": a})[0]
    quantized = nvfp4.fake_quantize_activations(a, gs)
    assert np.array_equal(y, op.reference_matmul(quantized, packed))
    assert np.array_equal(y, op.reference_matmul(a, packed, (op.FLOAT4E2M1, gs)))
    assert not np.array_equal(y, op.reference_matmul(a, packed))  # the quantization is there
    with pytest.raises(Exception, match="multiple of 16"):
        kernel_node_session(op.OP_TYPE, {"B": op.pack(weights(rng, (24, 16), DTYPES["e4m3fn"])).b,
                                         "S": np.ones(1, np.float32), "T": gs.reshape(1)}, K=24, N=16,
                            weight_type=op.FLOAT8E4M3FN, input_type=op.FLOAT4E2M1)


NVFP4_RECIPE = ("QuantizationModifier:\n  ignore: [lm_head]\n  scheme: NVFP4A16\n  targets: [Linear]\n"
                "  bypass_divisibility_checks: true\n")


@needs_kernel
def test_nvfp4_folder_on_the_kernel_gives_the_folded_weights_logits(tmp_path, monkeypatch, capfd):
    """stories260K NVFP4A16 at accuracy level 0: layers whose K is a multiple of 16 run on the kernel at 4 bits
    (the same float32 weights as the fold, summed in another order: within 1e-5 of the largest logit, prefill and
    cached decode), the others (down_proj, K = 172) keep the float32 weight dequantized at load."""
    import json

    import lowbit
    from lowbit.runtime import fast_paths
    from lowbit.runtime.session import create_session

    recipe = tmp_path / "nvfp4.yaml"
    recipe.write_text(NVFP4_RECIPE)
    out = tmp_path / "nvfp4a16"
    lowbit.convert(str(SAMPLE_MODEL), out, recipe=recipe, accuracy_level=0)
    layers = fast_paths.nvfp4_layers(json.loads((out / "lowbit.json").read_text()))
    on_kernel = [name for name, k in layers.items() if k % 16 == 0]
    assert 0 < len(on_kernel) < len(layers)
    capfd.readouterr()
    kernel_logits = prefill_and_decode(create_session(out))
    err = capfd.readouterr().err
    assert f"lowbit: {len(on_kernel)} NVFP4 weights run at 4 bits on lowbit.cpu.MatMulNarrowFloat" in err
    assert f"lowbit: {len(layers) - len(on_kernel)} NVFP4 weights dequantized to float32 at load" in err
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    folded = prefill_and_decode(create_session(out))
    for a, b in zip(kernel_logits, folded):
        assert relative(a, b) <= 1e-5
