"""lowbit.cpu.MatMulInt8Int8, the 8-bit sibling of the int8 CPU kernel (custom_ops/matmul_int8_int8.py): its
packing, its numpy reference against the arithmetic it stands for, the kernel through ONNX Runtime against the
reference bit for bit, and the runtime's rewrite of 8-bit MatMulNBits (accuracy level 4) onto it."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.custom_ops import kernels
from lowbit.custom_ops import matmul_int8_int8 as op
from tests.conftest import graph_session, kernel_node_session, prefill_and_decode, relative

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason=f"no int8 CPU kernel: {kernels.unavailable()}")


def random_weight(rng, n, k, group, per_column_zero_points=True):
    groups = -(-k // group)
    codes = rng.integers(0, 256, (n, k))
    scales = (rng.random((groups, n)) + 0.5).astype(np.float32)
    zero_points = rng.integers(0, 256, (groups, n)) if per_column_zero_points else 128
    return codes, scales, zero_points


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (50, 100, 16), (33, 576, 40), (7, 10, 2), (40, 200, 128)])
@pytest.mark.parametrize("per_column", [True, False])
def test_pack_holds_the_codes_scales_and_zero_points(n, k, group, per_column, rng):
    codes, scales, zero_points = random_weight(rng, n, k, group, per_column)
    w = op.pack(codes, scales, zero_points, group)
    groups, n_pad = -(-k // group), -(-n // 16) * 16
    assert w.b.shape == (n_pad // 16, groups, group // 2, 32) and w.b.dtype == np.uint8
    assert np.array_equal(op.unpack_codes(w), codes)
    # pair p of group g of tile t, byte 8 * (0, 2, 1, 3)[c // 4] + 2 (c % 4) + h: row g * group + 2p + h of column
    # 16t + c (the quarters of 4 columns in the order the kernel's in-lane unpacks want)
    t, g, p, c, h = (n - 1) // 16, groups - 1, 0, (n - 1) % 16, 1
    assert w.b[t, g, p, 8 * (0, 2, 1, 3)[c // 4] + 2 * (c % 4) + h] == codes[16 * t + c, g * group + 2 * p + h]
    if group >= 4 and n > 5:
        assert w.b[0, 0, 1, 2 * 3] == codes[3, 2]  # pair 1, row 0 (h = 0) of column 3: row 2 of K
        assert w.b[0, 0, 1, 16 + 2 * 1] == codes[5, 2]  # column 5, in the third quarter
    per_group = w.scales.transpose(1, 0, 2).reshape(groups, n_pad)
    assert np.array_equal(per_group[:, :n], scales) and not per_group[:, n:].any()
    if per_column:
        assert np.array_equal(w.zero_points.transpose(1, 0, 2).reshape(groups, n_pad)[:, :n], zero_points)
    else:
        assert w.zero_points.shape == (1,) and w.zero_points[0] == zero_points
    chunked = op.pack_rows(lambda a, b: codes[a:b], n, k, scales, zero_points, group, rows_per_chunk=16)
    assert all(np.array_equal(x, y) for x, y in zip((w.b, w.scales, w.zero_points),
                                                    (chunked.b, chunked.scales, chunked.zero_points)))


def test_pack_rejects_what_the_kernel_cannot_hold(rng):
    codes, scales, zero_points = random_weight(rng, 16, 64, 32)
    with pytest.raises(ValueError, match="even"):
        op.pack(codes[:, :63], scales, zero_points, 21)
    with pytest.raises(ValueError, match="0..255"):
        op.pack(codes + 256, scales, zero_points, 32)
    with pytest.raises(ValueError, match="scales"):
        op.pack(codes, scales[:1], zero_points, 32)


@pytest.mark.parametrize("group", [16, 40, 128])
def test_reference_is_int8_activations_times_the_dequantized_weight(group, rng):
    """Y = sum over groups of (xq sx) . ((q - z) s), within float32 rounding, and within int8 activation error of
    the float product."""
    from lowbit.custom_ops.matmul_int4_int8 import quantize_activations

    n, k = 24, 300
    codes, scales, zero_points = random_weight(rng, n, k, group)
    w = op.pack(codes, scales, zero_points, group)
    a = rng.standard_normal((5, k)).astype(np.float32)
    xq, sx, _ = quantize_activations(a, group)
    x = (xq * sx[..., None].astype(np.float64)).reshape(5, -1)[:, :k]
    dequantized = (codes - np.repeat(zero_points, group, axis=0)[:k].T) * np.repeat(scales, group, axis=0)[:k].T
    expected = x @ dequantized.astype(np.float64).T
    actual = op.reference_matmul(a, w)
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
    float_product = a.astype(np.float64) @ dequantized.T
    assert np.abs(actual - float_product).max() <= 2e-2 * np.abs(float_product).max()


def kernel_session(w: op.Int8Int8Weight, threads: int = 2):
    return kernel_node_session(op.OP_TYPE, {"B": w.b, "S": w.scales, "Z": w.zero_points}, threads, K=w.k, N=w.n,
                               group_size=w.group_size)


KERNEL_CASES = [  # (n, k, group, lead dims of A, per-column zero points)
    (64, 128, 32, (1,), False), (960, 576, 32, (1,), False), (48, 576, 128, (3,), False),
    (50, 100, 16, (2, 5), True), (17, 70, 64, (9,), True), (576, 1536, 128, (1, 1), True),
    (33, 206, 2, (4,), True), (16, 8, 4, (6,), True), (3000, 64, 32, (1,), False), (40, 576, 256, (7,), True),
    (24, 100, 16, (300,), True),  # more than 16384 activations: prepared in parallel tasks of rows
]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k,group,lead,per_column", KERNEL_CASES)
def test_kernel_equals_the_reference_bit_for_bit(n, k, group, lead, per_column, threads, rng):
    codes, scales, zero_points = random_weight(rng, n, k, group, per_column)
    w = op.pack(codes, scales, zero_points, group)
    session = kernel_session(w, threads)
    for call in range(2):  # fresh activations each call; the second with a group of zeros (amax 0: its term is 0)
        a = (rng.standard_normal((*lead, k)) * rng.choice([0.01, 1.0, 300.0])).astype(np.float32)
        if call:
            a.reshape(-1, k)[0, :group] = 0.0
        (y,) = session.run(None, {"A": a})
        assert y.shape == (*lead, n) and y.dtype == np.float32 and np.isfinite(y).all()
        assert np.array_equal(y, op.reference_matmul(a, w))


@needs_kernel
def test_extreme_codes_and_activations_stay_exact(rng):
    """Codes 255 against activations of +-127 over a group of 256 rows: the largest sums the int32 lanes hold."""
    n, k, group = 32, 512, 256
    codes = np.full((n, k), 255)
    codes[::2] = rng.integers(0, 256, (n // 2, k))
    scales = (rng.random((2, n)) + 0.5).astype(np.float32)
    w = op.pack(codes, scales, rng.integers(0, 256, (2, n)), group)
    a = np.where(rng.random((3, k)) < 0.9, 1.0, -1.0).astype(np.float32) * np.float32(2.5)
    (y,) = kernel_session(w).run(None, {"A": a})
    assert np.array_equal(y, op.reference_matmul(a, w))


@needs_kernel
def test_kernel_rejects_inputs_of_the_wrong_shape(rng):
    codes, scales, zero_points = random_weight(rng, 32, 64, 32)
    w = op.pack(codes, scales, zero_points, 32)
    session = kernel_session(w)
    with pytest.raises(Exception, match="MatMulInt8Int8: A's last dimension is not K"):
        session.run(None, {"A": rng.standard_normal((1, 63)).astype(np.float32)})
    with pytest.raises(Exception, match="MatMulInt8Int8: B is not"):
        kernel_node_session(op.OP_TYPE, {"B": w.b[:, :, :8], "S": w.scales, "Z": w.zero_points}, K=64, N=32,
                            group_size=32).run(None, {"A": rng.standard_normal((1, 64)).astype(np.float32)})
    with pytest.raises(Exception, match="group_size must be a positive even number"):
        kernel_node_session(op.OP_TYPE, {"B": w.b, "S": w.scales, "Z": w.zero_points}, K=64, N=32, group_size=31)


# ------------------------------------------------------------------ NVFP4 activations (activation 1)

@needs_kernel
@pytest.mark.parametrize("n,k,lead", [(64, 128, (1,)), (50, 96, (2, 5))])
def test_nvfp4_activations_equal_the_reference_bit_for_bit(n, k, lead, rng):
    """Activation 1 on 8-bit codes (here NVFP4 weights as bytes, twice the e2m1 value plus 12): the node quantizes
    its input as NVFP4 (matmul_int4_int8.nvfp4_activations, the same C code as MatMulInt4Int8's) and multiplies the
    integers exactly."""
    from lowbit.custom_ops import matmul_int4_int8

    gs = np.float32(rng.choice([1.0, 37.0]))
    codes = rng.integers(0, 16, (n, k))
    halves = (rng.random((k // 16, n)) + 0.25).astype(np.float32) * np.float32(0.005)
    w = op.pack(matmul_int4_int8.E2M1_BYTES[codes], halves, matmul_int4_int8.NVFP4_ZERO_POINT, 16)
    session = kernel_node_session(op.OP_TYPE, {"B": w.b, "S": w.scales, "Z": w.zero_points,
                                               "gs": np.array([gs], np.float32)}, 2, K=k, N=n, group_size=16,
                                  activation=1)
    a = (rng.standard_normal((*lead, k)) * rng.choice([0.01, 300.0])).astype(np.float32)
    (y,) = session.run(None, {"A": a})
    assert y.shape == (*lead, n) and np.array_equal(y, op.reference_matmul(a, w, nvfp4_global_scale=gs))
    w4 = matmul_int4_int8.from_nvfp4(codes, (2 * halves).T)
    assert np.array_equal(y, matmul_int4_int8.reference_matmul(a, w4, nvfp4_global_scale=gs))


# ------------------------------------------------------------------ the runtime's rewrite onto the kernel

KERNEL_SCHEMES = ["w8a16", "a16w8", "a16w8-g64", "a16w8-minmax"]
TOLERANCE = 3e-2  # |kernel - float compute| / max|float compute|: int8 activations per group (accuracy level 4)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    from tests.conftest import build_tiny_model

    folder = tmp_path_factory.mktemp("int8_kernel_src") / "llama"
    build_tiny_model("llama", folder)
    return folder


def eight_bit_layers(folder) -> int:
    """8-bit MatMulNBits and MatMulBlockwise nodes (a16w8-minmax: float zero points)."""
    import onnx

    return sum(node.op_type in ("MatMulNBits", "MatMulBlockwise") and {a.name: a.i for a in node.attribute}["bits"] == 8
               for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


@needs_kernel
@pytest.mark.parametrize("scheme", KERNEL_SCHEMES)
def test_8bit_schemes_run_on_the_kernel_within_int8_tolerance(scheme, tiny_source, tmp_path, monkeypatch, capfd):
    """Every 8-bit MatMulNBits or MatMulBlockwise of the folder (accuracy level 4) runs on lowbit.cpu.MatMulInt8Int8
    (said once on stderr; float zero points as float_zero_points), prefill and cached decode within TOLERANCE of
    float compute (the folder converted at accuracy level 0), as ONNX Runtime's own int8 compute of the same folder
    is, and with integer zero points within 1e-5 of it."""
    import lowbit
    from lowbit.runtime.session import create_session

    out, exact = tmp_path / "int8", tmp_path / "float"
    lowbit.convert(str(tiny_source), out, scheme=scheme)
    lowbit.convert(str(tiny_source), exact, scheme=scheme, accuracy_level=0)
    capfd.readouterr()
    kernel = prefill_and_decode(create_session(out))
    lines = capfd.readouterr().err.splitlines()
    assert eight_bit_layers(out) > 0
    assert lines[0] == f"lowbit: {eight_bit_layers(out)} quantized MatMuls run on lowbit's int8 CPU kernel " \
                       "(lowbit.cpu.MatMulInt8Int8)"
    reference = prefill_and_decode(create_session(exact))
    assert "int8 CPU kernel" not in capfd.readouterr().err  # level 0: float compute stays with ORT
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    ort_int8 = prefill_and_decode(create_session(out))
    for a, b, c in zip(kernel, reference, ort_int8):
        assert relative(a, b) <= TOLERANCE and relative(c, b) <= TOLERANCE
        if scheme != "a16w8-minmax":  # float zero points: the kernel's int8 compute of (q - z) s, ORT's own route
            assert relative(a, c) <= 1e-5  # the same int8 arithmetic as ORT's level 4


# ------------------------------------------------------------------ uint8 activations per tensor (activation 2)

def dynamic_quantize_matmul_session(b, scales, zero_points):
    """ONNX Runtime's com.microsoft.DynamicQuantizeMatMul(A, B uint8 [K, N], scales [N], zero points [N])."""
    from onnx import helper

    node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft")
    return graph_session([node], {"B": b, "S": scales, "Z": zero_points}, domains={"com.microsoft": 1})


def test_uint8_activations_are_dynamic_quantize_linear(rng):
    from tests.test_w8a8 import dynamic_quantize_linear  # checked against ORT's DynamicQuantizeLinear bit for bit

    for shift in (0.0, 0.7, -0.9):
        a = (rng.standard_normal((5, 96)) + shift * 4).astype(np.float32)
        codes, scale, zero = dynamic_quantize_linear(a)
        xq, sx, xsum = op.uint8_activations(a, 32)
        assert np.array_equal(xq.reshape(5, 96), codes.astype(np.int32) - int(zero))
        assert np.all(sx == scale) and np.array_equal(xsum, xq.sum(axis=-1))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k,lead", [(64, 128, (1,)), (960, 576, (1,)), (50, 96, (2, 5)), (33, 1536, (7,)),
                                      (20, 10, (3,)), (20, 96, (400,))])
def test_uint8_activations_equal_the_reference_and_dynamic_quantize_matmul(n, k, lead, threads, rng):
    """Activation 2 with one group over K: ONNX Runtime's DynamicQuantizeMatMul (w8a8's node) bit for bit, and the
    numpy reference; activations all positive, all negative, all zero and mixed (the zero point at either end)."""
    codes = rng.integers(0, 256, (n, k)).astype(np.uint8)
    scales = (rng.random(n) * 0.01 + 0.001).astype(np.float32)
    zero_points = np.full(n, 128, np.uint8)
    w = op.pack(codes, scales[None], zero_points[None], k)
    session = kernel_node_session(op.OP_TYPE, {"B": w.b, "S": w.scales, "Z": w.zero_points}, threads, K=k, N=n,
                                  group_size=k, activation=2)
    ort_node = dynamic_quantize_matmul_session(np.ascontiguousarray(codes.T), scales, zero_points)
    for shift in (0.0, 3.0, -3.0, None):
        a = np.zeros((*lead, k), np.float32) if shift is None else \
            (rng.standard_normal((*lead, k)) + shift).astype(np.float32) * np.float32(rng.choice([0.01, 1.0, 300.0]))
        (y,) = session.run(None, {"A": a})
        assert y.shape == (*lead, n)
        assert np.array_equal(y, op.reference_matmul(a, w, activation=2))
        assert np.array_equal(y, ort_node.run(None, {"A": a})[0])


@needs_kernel
def test_uint8_activations_only_on_8bit_codes(rng):
    from lowbit.custom_ops import matmul_int4_int8

    w = matmul_int4_int8.pack(rng.integers(0, 16, (16, 64)), np.ones((1, 16), np.float32), 8, 64)
    with pytest.raises(Exception, match="MatMulInt4Int8: activation must be 0"):
        kernel_node_session(matmul_int4_int8.OP_TYPE, {"B": w.b, "S": w.scales, "Z": w.zero_points}, K=64, N=16,
                            group_size=64, activation=2)


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_w8a8_runs_on_the_kernel_with_onnx_runtimes_logits(arch, tmp_path, monkeypatch, capfd):
    """w8a8's DynamicQuantizeMatMul nodes run on MatMulInt8Int8 (activation 2; said on stderr) with the logits of ONNX
    Runtime's own kernel, prefill and cached decode, exactly (each node is ORT's arithmetic bit for bit)."""
    import lowbit
    from tests.conftest import build_tiny_model

    build_tiny_model(arch, tmp_path / "src")
    lowbit.convert(str(tmp_path / "src"), tmp_path / "w8a8", scheme="w8a8")
    assert_kernel_gives_onnx_runtimes_logits(tmp_path / "w8a8", 8, monkeypatch, capfd)


def assert_kernel_gives_onnx_runtimes_logits(folder, layers: int, monkeypatch, capfd) -> None:
    """`layers` MatMuls of the folder run on MatMulInt8Int8 (said on stderr), with the logits of the folder on ONNX
    Runtime's kernels (LOWBIT_KERNELS=0), prefill and cached decode, exactly."""
    from lowbit.runtime import attention_kernel
    from lowbit.runtime.session import create_session

    # the attention on ORT's node both ways: this compares the MatMuls (lowbit's attention kernel agrees to float32
    # rounding, tests/test_group_query_attention_kernel.py)
    monkeypatch.setattr(attention_kernel, "kernel_applies", lambda shares_kv_buffer, metadata: False)
    capfd.readouterr()
    kernel = prefill_and_decode(create_session(folder))
    assert f"{layers} quantized MatMuls run on lowbit's int8 CPU kernel (lowbit.cpu.MatMulInt8Int8)" \
        in capfd.readouterr().err
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    for a, b in zip(kernel, prefill_and_decode(create_session(folder))):
        assert np.array_equal(a, b)


@needs_kernel
@pytest.mark.parametrize("n,k,lead", [(64, 128, (1,)), (50, 96, (2, 5)), (33, 1536, (7,)), (20, 96, (400,))])
def test_static_uint8_activations_equal_the_reference_and_ort_qdq(n, k, lead, rng):
    """Activation 3 (w8a8-static: QuantizeLinear with a calibrated scale and zero point): the numpy reference bit for
    bit, and ONNX Runtime's Q/DQ -> MatMul with DQ weights (which it fuses into an integer MatMul) bit for bit;
    values past the scale's range saturate."""
    from onnx import helper

    codes = rng.integers(0, 256, (n, k)).astype(np.uint8)
    scales = (rng.random(n) * 0.01 + 0.001).astype(np.float32)
    zero_points = np.full(n, 128, np.uint8)
    a_scale, a_zero = np.float32(rng.random() * 0.02 + 0.005), int(rng.integers(90, 160))
    w = op.pack(codes, scales[None], zero_points[None], k)
    session = kernel_node_session(op.OP_TYPE, {"B": w.b, "S": w.scales, "Z": w.zero_points,
                                               "s": np.array([a_scale], np.float32)}, 2, K=k, N=n, group_size=k,
                                  activation=3, input_zero_point=a_zero)
    nodes = [helper.make_node("QuantizeLinear", ["A", "as", "az"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "as", "az"], ["ad"]),
             helper.make_node("DequantizeLinear", ["B", "S", "Z"], ["W"], axis=1),
             helper.make_node("MatMul", ["ad", "W"], ["Y"])]
    qdq = graph_session(nodes, {"B": np.ascontiguousarray(codes.T), "S": scales, "Z": zero_points,
                                "as": np.array(a_scale, np.float32), "az": np.array(a_zero, np.uint8)})
    for spread in (0.3, 1.0, 3.0):
        a = (rng.standard_normal((*lead, k)) * spread).astype(np.float32)
        (y,) = session.run(None, {"A": a})
        assert np.array_equal(y, op.reference_matmul(a, w, activation=3, input_scale=a_scale,
                                                      input_zero_point=a_zero))
        assert np.array_equal(y, qdq.run(None, {"A": a})[0])


@needs_kernel
def test_w8a8_static_runs_on_the_kernel_with_onnx_runtimes_logits(tmp_path, monkeypatch, capfd):
    """stories260K w8a8-static: every Q/DQ -> MatMul of uint8 activations runs on MatMulInt8Int8 (activation 3),
    with the logits of ONNX Runtime's fused integer MatMul, prefill and cached decode, exactly."""
    import lowbit
    from tests.conftest import SAMPLE_MODEL

    lowbit.convert(SAMPLE_MODEL, tmp_path / "static", scheme="w8a8-static", num_samples=2, seq_len=16)
    assert_kernel_gives_onnx_runtimes_logits(tmp_path / "static", 20, monkeypatch, capfd)


# ------------------------------------------------------------------ float zero points (float_zero_points 1)

@needs_kernel
@pytest.mark.parametrize("bits,n,k,group", [(8, 50, 96, 96), (8, 33, 576, 128), (4, 40, 200, 40), (3, 20, 64, 32)])
def test_float_zero_points_equal_the_reference_bit_for_bit(bits, n, k, group, rng):
    """Float zero points z (a16w8-minmax, blockwise asymmetric with float zero points): each group's term is
    (float(dot) - z * float(xsum)) * (s * sx); both ops, the numpy reference bit for bit, and within int8 rounding
    of the float product with the dequantized weight (q - z) * s."""
    from lowbit.custom_ops import matmul_int4_int8

    groups = -(-k // group)
    codes = rng.integers(0, 2**bits, (n, k))
    scales = (rng.random((groups, n)) + 0.5).astype(np.float32) * np.float32(0.01)
    z = (rng.random((groups, n)) * (2**bits - 1)).astype(np.float32)
    if bits == 8:
        w, op_type, attrs = op.pack(codes, scales, 0, group), op.OP_TYPE, {}
    else:
        layout = matmul_int4_int8.VNNI if matmul_int4_int8.supports(group, matmul_int4_int8.VNNI) \
            else matmul_int4_int8.AVX2
        w = matmul_int4_int8.pack(codes, scales, 0, group, layout)
        op_type, attrs = matmul_int4_int8.OP_TYPE, {"layout": layout}
    w = matmul_int4_int8.with_float_zero_points(w, z)
    session = kernel_node_session(op_type, {"B": w.b, "S": w.scales, "Z": w.zero_points, "": None,
                                            "F": w.float_zero_points}, 2, K=k, N=n, group_size=group,
                                  float_zero_points=1, **attrs)
    reference = op.reference_matmul if bits == 8 else matmul_int4_int8.reference_matmul
    a = rng.standard_normal((3, k)).astype(np.float32)
    (y,) = session.run(None, {"A": a})
    assert np.array_equal(y, reference(a, w))
    dequantized = (codes - np.repeat(z, group, axis=0)[:k].T) * np.repeat(scales, group, axis=0)[:k].T
    assert relative(y, a @ dequantized.T) < 2e-2
