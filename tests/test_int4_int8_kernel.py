"""lowbit.cpu.MatMulInt4Int8, the compiled int8 CPU kernel (custom_ops/kernels): its packing, its numpy reference
against the arithmetic it stands for, the kernel through ONNX Runtime against the reference bit for bit, and the
runtime's rewrite of 2/3/4-bit MatMulNBits and MatMulBlockwise nodes onto it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.custom_ops import kernels
from lowbit.custom_ops import matmul_int4_int8 as op
from tests.conftest import assert_bound_decode_equals_forward, kernel_node_session, prefill_and_decode, relative

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason=f"no int8 CPU kernel: {kernels.unavailable()}")


def random_weight(rng, n, k, group, per_column_zero_points=True, bits=4):
    groups = -(-k // group)
    codes = rng.integers(0, 2**bits, (n, k))
    scales = (rng.random((groups, n)) + 0.5).astype(np.float32)
    zero_points = rng.integers(0, 2**bits, (groups, n)) if per_column_zero_points else 2 ** (bits - 1)
    return codes, scales, zero_points


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (50, 100, 16), (33, 576, 40), (7, 10, 4), (40, 200, 128)])
@pytest.mark.parametrize("per_column", [True, False])
def test_pack_holds_the_codes_scales_and_zero_points(n, k, group, per_column, rng):
    codes, scales, zero_points = random_weight(rng, n, k, group, per_column)
    w = op.pack(codes, scales, zero_points, group)
    groups, n_pad = -(-k // group), -(-n // 16) * 16
    assert w.b.shape == (n_pad // 16, groups, group // 4, 32) and w.b.dtype == np.uint8
    assert np.array_equal(op.unpack_codes(w), codes)
    assert np.array_equal(op.per_group(w.scales)[:, :n], scales) and not op.per_group(w.scales)[:, n:].any()
    if per_column:
        assert np.array_equal(op.per_group(w.zero_points)[:, :n], zero_points)
    else:
        assert w.zero_points.shape == (1,) and w.zero_points[0] == zero_points
    # byte 2c + h of quad j of group g of tile t: rows 4j + h (low nibble) and 4j + 2 + h (high nibble) of column c
    t, g, j, c, h = 0, groups - 1, 0, min(n, 16) - 1, 1
    row = g * group + 4 * j + h
    if row + 2 < k:
        assert w.b[t, g, j, 2 * c + h] == codes[c, row] | (codes[c, row + 2] << 4)
    chunked = op.pack_rows(lambda a, b: codes[a:b], n, k, scales, zero_points, group, rows_per_chunk=16)
    assert all(np.array_equal(x, y) for x, y in zip((w.b, w.scales, w.zero_points),
                                                    (chunked.b, chunked.scales, chunked.zero_points)))


@pytest.mark.parametrize("group", [8, 40, 64])
def test_both_layouts_hold_the_same_codes(group, rng):
    codes, scales, zero_points = random_weight(rng, 37, 3 * group - 8, group)
    avx2, vnni = (op.pack(codes, scales, zero_points, group, layout) for layout in (op.AVX2, op.VNNI))
    assert np.array_equal(op.unpack_codes(vnni), codes) and np.array_equal(op.unpack_codes(avx2), codes)
    assert vnni.b.shape == avx2.b.shape and not np.array_equal(vnni.b, avx2.b)
    # VNNI: byte 4c + r of octet j holds rows 8j + r (low nibble) and 8j + 4 + r (high) of column c
    octet = vnni.b[0, 0, :2].reshape(-1)
    assert octet[4 * 3 + 1] == codes[3, 1] | (codes[3, 5] << 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        op.pack(codes[:, :36], scales, zero_points, 12, op.VNNI)


def test_pack_rejects_what_the_kernel_cannot_hold(rng):
    codes, scales, zero_points = random_weight(rng, 16, 64, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        op.pack(codes, scales[:, :], zero_points, 30)
    with pytest.raises(ValueError, match="0..15"):
        op.pack(codes + 16, scales, zero_points, 32)
    with pytest.raises(ValueError, match="scales"):
        op.pack(codes, scales[:1], zero_points, 32)


@pytest.mark.parametrize("group", [16, 40, 128])
def test_reference_is_int8_activations_times_the_dequantized_weight(group, rng):
    """Y = sum over groups of (xq sx) . ((q - z) s): the reference's integer dot and float terms are that product."""
    n, k = 24, 300
    codes, scales, zero_points = random_weight(rng, n, k, group)
    w = op.pack(codes, scales, zero_points, group)
    a = rng.standard_normal((5, k)).astype(np.float32)
    xq, sx, _ = op.quantize_activations(a, group)
    assert np.abs(xq).max() == 127 and np.all(np.abs(xq).max(axis=-1) == 127)  # every group's maximum maps to 127
    x = (xq * sx[..., None].astype(np.float64)).reshape(5, -1)[:, :k]
    dequantized = (codes - np.repeat(zero_points, group, axis=0)[:k].T) * np.repeat(scales, group, axis=0)[:k].T
    expected = x @ dequantized.astype(np.float64).T
    actual = op.reference_matmul(a, w)
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
    float_product = a.astype(np.float64) @ dequantized.T  # int8 activations: within about 1% of the float product
    assert np.abs(actual - float_product).max() <= 2e-2 * np.abs(float_product).max()


def kernel_session(w: op.Int4Int8Weight, threads: int = 2, max_code: int = 15):
    extra = {**({"layout": w.layout} if w.layout else {}), **({"max_code": max_code} if max_code != 15 else {})}
    return kernel_node_session(op.OP_TYPE, {"B": w.b, "S": w.scales, "Z": w.zero_points}, threads, K=w.k, N=w.n,
                               group_size=w.group_size, **extra)


KERNEL_CASES = [  # (n, k, group, lead dims of A, per-column zero points, bits)
    (64, 128, 32, (1,), False, 4), (960, 576, 32, (1,), False, 4), (48, 576, 40, (3,), False, 3),
    (50, 100, 16, (2, 5), True, 4), (17, 70, 64, (9,), True, 4), (576, 1536, 128, (1, 1), True, 4),
    (33, 204, 40, (4,), True, 2), (16, 8, 4, (6,), True, 4), (3000, 64, 32, (1,), False, 4),
    (24, 100, 16, (300,), True, 4),  # more than 16384 activations: prepared in parallel tasks of rows
]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k,group,lead,per_column,bits", KERNEL_CASES)
@pytest.mark.parametrize("layout,avx512", [(op.AVX2, "1"), (op.VNNI, "1"), (op.VNNI, "0")])
def test_kernel_equals_the_reference_bit_for_bit(n, k, group, lead, per_column, bits, threads, layout, avx512, rng,
                                                 monkeypatch):
    """Both layouts; the VNNI layout on vpdpbusd where the CPU has AVX512-VNNI, and on vpmaddubsw (AVX2) with
    LOWBIT_KERNELS_AVX512=0 or without it."""
    if not op.supports(group, layout):
        pytest.skip("the VNNI layout needs groups of a multiple of 8 rows")
    monkeypatch.setenv("LOWBIT_KERNELS_AVX512", avx512)
    codes, scales, zero_points = random_weight(rng, n, k, group, per_column, bits)
    w = op.pack(codes, scales, zero_points, group, layout)
    session = kernel_session(w, threads, 2**bits - 1)  # 2- and 3-bit: max_code 3 or 7, as the runtime sets it
    for _ in range(2):  # fresh activations each call
        a = (rng.standard_normal((*lead, k)) * rng.choice([0.01, 1.0, 300.0])).astype(np.float32)
        (y,) = session.run(None, {"A": a})
        assert y.shape == (*lead, n) and y.dtype == np.float32
        assert np.array_equal(y, op.reference_matmul(a, w))


@needs_kernel
@pytest.mark.parametrize("bits,group", [(3, 72), (3, 80), (2, 168), (2, 176), (4, 32), (4, 40)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int16_sums_at_their_bound(bits, group, sign, monkeypatch):
    """Every code at its largest and every activation at +-127: the int16 sums of the VNNI layout without VNNI
    reach their bound (max_code 7: 9 octets a flush, groups of 72 rows at it and 80 past it; max_code 3: 21 octets,
    168 and 176 rows; 4-bit: 4 octets) and the result is still the reference's bit for bit."""
    monkeypatch.setenv("LOWBIT_KERNELS_AVX512", "0")
    n, k = 32, 2 * group
    codes = np.full((n, k), 2**bits - 1)
    w = op.pack(codes, np.full((2, n), 0.5, np.float32), 0, group, op.VNNI)
    a = np.full((3, k), sign, np.float32)
    (y,) = kernel_session(w, 2, 2**bits - 1).run(None, {"A": a})
    assert np.array_equal(y, op.reference_matmul(a, w))
    assert np.array_equal(y, np.full_like(y, sign * (2**bits - 1) * k * 0.5))


@needs_kernel
def test_a_group_of_zero_activations(rng):
    codes, scales, zero_points = random_weight(rng, 32, 96, 32)
    w = op.pack(codes, scales, zero_points, 32)
    a = rng.standard_normal((2, 96)).astype(np.float32)
    a[0, 32:64] = 0.0  # amax 0: that group's activations and term are 0
    (y,) = kernel_session(w).run(None, {"A": a})
    assert np.array_equal(y, op.reference_matmul(a, w)) and np.isfinite(y).all()


@needs_kernel
def test_kernel_rejects_inputs_of_the_wrong_shape(rng):
    codes, scales, zero_points = random_weight(rng, 32, 64, 32)
    session = kernel_session(op.pack(codes, scales, zero_points, 32))
    with pytest.raises(Exception, match="last dimension is not K"):
        session.run(None, {"A": rng.standard_normal((1, 63)).astype(np.float32)})


# ------------------------------------------------------------------ NVFP4 as integers (e2m1 1)

def random_nvfp4(rng, n, k):
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    steps = (rng.random((n, k // 16)) + 0.25).astype(np.float32) * np.float32(0.01)
    return codes, steps


def nvfp4_session(w, threads=1, gs=None):
    inputs = {"B": w.b, "S": w.scales, "Z": w.zero_points}
    if gs is not None:
        inputs["gs"] = np.array([gs], np.float32)
    return kernel_node_session(op.OP_TYPE, inputs, threads, K=w.k, N=w.n, group_size=16, layout=w.layout, e2m1=1,
                               activation=int(gs is not None))


def test_e2m1_bytes_are_twice_the_values_plus_12():
    from lowbit import nvfp4

    assert op.E2M1_BYTES.dtype == np.uint8 and op.E2M1_BYTES.max() == 24 and op.E2M1_BYTES[8] == 12  # -0 is 12
    assert np.array_equal(op.E2M1_BYTES.astype(np.float32), 2 * nvfp4.E2M1 + 12)


def test_nvfp4_reference_is_the_exact_product_of_the_fake_quantized_operands(rng):
    """W4A4 as integers: NVFP4 weights (from_nvfp4) times NVFP4 activations (activation 1) equals the float64 product
    of lowbit.nvfp4's fake-quantized activations and dequantized weights within float32 rounding."""
    from lowbit import nvfp4

    n, k, gs = 40, 96, np.float32(37.0)
    codes, steps = random_nvfp4(rng, n, k)
    w = op.from_nvfp4(codes, steps)
    assert (w.group_size, w.layout, w.e2m1) == (16, op.VNNI, True)
    assert w.zero_points.shape == (1,) and w.zero_points[0] == 12 and np.array_equal(op.unpack_codes(w), codes)
    a = (rng.standard_normal((5, k)) * 3).astype(np.float32)
    x = nvfp4.fake_quantize_activations(a, gs).astype(np.float64)
    weight = nvfp4.E2M1[codes].astype(np.float64) * np.repeat(steps, 16, axis=1)
    expected = x @ weight.T
    actual = op.reference_matmul(a, w, nvfp4_global_scale=gs)
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
    # the integers times half their step are the exact e2m1 value times the step, of which the fake-quantized
    # activation is the float32 rounding (e * step can take 26 bits: the integer route keeps them)
    xq, sx, _ = op.nvfp4_activations(a, gs)
    exact = xq.astype(np.float64) * sx[..., None].astype(np.float64)
    assert np.array_equal(exact.reshape(5, k).astype(np.float32), nvfp4.fake_quantize_activations(a, gs))


def test_nvfp4_weights_with_int8_activations_are_int8_compute(rng):
    """Activation 0 (weight-only NVFP4 at accuracy level 4): the exact NVFP4 weight times int8 activations per block
    of 16, within int8 rounding of the float product."""
    from lowbit import nvfp4

    n, k = 48, 128
    codes, steps = random_nvfp4(rng, n, k)
    a = rng.standard_normal((3, k)).astype(np.float32)
    weight = nvfp4.E2M1[codes].astype(np.float64) * np.repeat(steps, 16, axis=1)
    xq, sx, _ = op.quantize_activations(a, 16)
    expected = (xq * sx[..., None]).reshape(3, k).astype(np.float64) @ weight.T
    actual = op.reference_matmul(a, op.from_nvfp4(codes, steps))
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
    assert relative(actual, a.astype(np.float64) @ weight.T) < 2e-2


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k,lead", [(64, 128, (1,)), (960, 576, (1,)), (50, 96, (2, 5)), (33, 1536, (7,)),
                                      (40, 64, (51,)), (20, 96, (2, 200))])  # prompts: blocks of 16 rows, a tail
@pytest.mark.parametrize("activations", ["nvfp4", "int8"])
@pytest.mark.parametrize("avx512", ["1", "0"])
def test_nvfp4_kernel_equals_the_reference_bit_for_bit(n, k, lead, threads, activations, avx512, rng, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNELS_AVX512", avx512)
    gs = np.float32(rng.choice([1.0, 37.0, 2688.0])) if activations == "nvfp4" else None
    codes, steps = random_nvfp4(rng, n, k)
    w = op.from_nvfp4(codes, steps)
    session = nvfp4_session(w, threads, gs)
    for call in range(3):  # random rows; a zero block; values on the e2m1 grid of their block (ties included)
        a = (rng.standard_normal((*lead, k)) * rng.choice([0.01, 1.0, 300.0])).astype(np.float32)
        if call == 1:
            a.reshape(-1, k)[0, :16] = 0.0
        if call == 2:
            a = (rng.integers(-24, 25, a.shape) * np.float32(0.25)).astype(np.float32)
        (y,) = session.run(None, {"A": a})
        assert y.shape == (*lead, n) and np.isfinite(y).all()
        assert np.array_equal(y, op.reference_matmul(a, w, nvfp4_global_scale=gs))


@needs_kernel
def test_e2m1_and_nvfp4_activations_need_their_layout_and_groups(rng):
    codes, steps = random_nvfp4(rng, 16, 64)
    w = op.from_nvfp4(codes, steps)
    inputs = {"B": w.b, "S": w.scales, "Z": w.zero_points}
    with pytest.raises(Exception, match="activation must be 0"):
        kernel_node_session(op.OP_TYPE, inputs, K=64, N=16, group_size=16, layout=1, e2m1=1, activation=2)
    with pytest.raises(Exception, match="e2m1 must be 0 or 1"):  # int16 sums hold 2 octets of codes up to 24
        kernel_node_session(op.OP_TYPE, {**inputs, "B": op.from_nvfp4(*random_nvfp4(rng, 16, 64)).b.reshape(
            1, 2, 8, 32)}, K=64, N=16, group_size=32, layout=1, e2m1=1)
    with pytest.raises(Exception, match="e2m1 must be 0 or 1"):
        kernel_node_session(op.OP_TYPE, inputs, K=64, N=16, group_size=16, layout=0, e2m1=1)
    session = kernel_node_session(op.OP_TYPE, {**inputs, "gs": np.array([1.0, 2.0], np.float32)}, K=64, N=16,
                                  group_size=16, layout=1, e2m1=1, activation=1)
    with pytest.raises(Exception, match="input_scale is not one value"):
        session.run(None, {"A": rng.standard_normal((1, 64)).astype(np.float32)})


# ------------------------------------------------------------------ the runtime's rewrite onto the kernel

KERNEL_SCHEMES = ["w4a16", "q4f16_1", "q3f16_1", "w3a16", "a16w4", "w2a16", "q4f32_1"]
TOLERANCE = 3e-2  # |kernel - float compute| / max|float compute|: int8 activations per group (accuracy level 4)


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    from tests.conftest import build_tiny_model

    root = tmp_path_factory.mktemp("kernel_src")
    return {arch: (build_tiny_model(arch, root / arch), root / arch)[1] for arch in ("llama", "qwen2")}


def kernel_layers(folder) -> int:
    """MatMulNBits (2/4 bits, level 4) and MatMulBlockwise (<= 4 bits) nodes of a folder."""
    import onnx

    count = 0
    for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        count += (node.op_type == "MatMulNBits" and attrs["bits"] in (2, 4) and attrs["accuracy_level"] == 4) \
            or (node.op_type == "MatMulBlockwise" and attrs["bits"] <= 4)
    return count



@needs_kernel
@pytest.mark.parametrize("scheme", KERNEL_SCHEMES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_schemes_run_on_the_kernel_within_int8_tolerance(arch, scheme, tiny_sources, tmp_path, monkeypatch, capfd):
    """Every 2/3/4-bit MatMul of the folder runs on the kernel (said once on stderr), prefill and cached decode
    within TOLERANCE of float compute (the same folder converted at accuracy level 0, which keeps ORT's kernels)."""
    import lowbit
    from lowbit.runtime.session import create_session

    out, exact = tmp_path / "int8", tmp_path / "float"
    lowbit.convert(str(tiny_sources[arch]), out, scheme=scheme)
    lowbit.convert(str(tiny_sources[arch]), exact, scheme=scheme, accuracy_level=0)
    capfd.readouterr()
    kernel = prefill_and_decode(create_session(out))
    lines = capfd.readouterr().err.splitlines()
    assert lines[0] == f"lowbit: {kernel_layers(out)} quantized MatMuls run on lowbit's int8 CPU kernel " \
                       "(lowbit.cpu.MatMulInt4Int8)"
    assert len(lines) == 1 or "GatherBlockwise" not in lines[1]
    reference = prefill_and_decode(create_session(exact))
    assert "int8 CPU kernel" not in capfd.readouterr().err  # level 0: float compute stays with ORT
    for a, b in zip(kernel, reference):
        assert relative(a, b) <= TOLERANCE
    monkeypatch.setenv("LOWBIT_KERNELS", "0")  # ORT's own int8 compute: as close to float compute
    for a, b in zip(prefill_and_decode(create_session(out)), reference):
        assert relative(a, b) <= TOLERANCE


@pytest.fixture(scope="module")
def stories_q4f16(tmp_path_factory):
    import lowbit
    from tests.conftest import SAMPLE_MODEL

    out = tmp_path_factory.mktemp("kernel_stories") / "q4f16_1"
    lowbit.convert(str(SAMPLE_MODEL), out, scheme="q4f16_1")
    return out


@needs_kernel
def test_rewritten_graph(stories_q4f16, tmp_path):
    """float16 activations reach the kernel through one Cast per input and leave through a Cast back; the tied
    embedding's GatherBlockQuantized keeps reading lm_head's MatMulNBits tensors; the folder is not touched."""
    import onnx

    from lowbit.runtime import fast_paths

    before = {p.name: p.read_bytes() for p in stories_q4f16.iterdir()}
    model = onnx.load(str(stories_q4f16 / "model.onnx"), load_external_data=False)
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name == "lm_head")
    assert any(node.op_type == "GatherBlockQuantized" for node in model.graph.node)  # reads head's tensors
    n = kernel_layers(stories_q4f16)
    result = fast_paths.rewrite_blockwise(model, stories_q4f16, {}, tmp_path, int8_kernel=True)
    nodes = list(model.graph.node)
    kernel = [node for node in nodes if node.op_type == op.OP_TYPE]
    assert len(result.kernel) == n == len(kernel) and not any(node.op_type == "MatMulNBits" for node in nodes)
    assert all(node.domain == op.DOMAIN for node in kernel)
    producers = {out: node for node in nodes for out in node.output}
    assert all(producers[node.input[0]].op_type == "Cast" for node in kernel)
    casts_in = {node.input[0] for node in kernel}
    assert len(casts_in) == len({producers[name].input[0] for name in casts_in})  # one Cast per input
    assert sum(node.op_type == "Cast" and node.input[0] in {k.output[0] for k in kernel} for node in nodes) == n
    names = {t.name for t in model.graph.initializer}
    assert all(name in names for name in head.input[1:3])  # kept for the embedding's Gather
    assert {p.name: p.read_bytes() for p in stories_q4f16.iterdir()} == before


@needs_kernel
def test_io_bound_decode_equals_plain_forward(stories_q4f16):
    """The kernel under the preallocated, IO-bound KV cache generation uses: the logits of session.forward bit for
    bit, 12 steps."""
    from lowbit.runtime.session import create_session

    assert_bound_decode_equals_forward(create_session(stories_q4f16, prompt_session=False), 6, 8, 12, seed=3)


def test_without_the_kernel_the_folder_runs_on_onnx_runtime(stories_q4f16, monkeypatch, capfd):
    """No C compiler: one line says so, and the session is the one LOWBIT_KERNELS=0 gives, logits bit for bit."""
    from lowbit.runtime.session import create_session

    widened = "lowbit: the float16 graph computes in float32 on the CPU (LOWBIT_CPU_FLOAT32=0 keeps float16)"
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    capfd.readouterr()
    missing = prefill_and_decode(create_session(stories_q4f16))
    if kernels.cpu_has_avx2():
        assert capfd.readouterr().err.splitlines() == [
            "lowbit: the int8 CPU kernel is not available (no C compiler (cc, gcc or clang; or $CC)): ONNX Runtime's "
            "MatMulNBits run instead", widened]
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    off = prefill_and_decode(create_session(stories_q4f16))
    assert capfd.readouterr().err.splitlines() == [widened]
    for a, b in zip(missing, off):
        assert np.array_equal(a, b)


def test_a_failed_build_is_a_reason_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(kernels, "cpu_has_avx2", lambda: True)
    assert kernels.library() is None
    assert kernels.unavailable().startswith("the C compiler failed")
    assert list(tmp_path.iterdir()) == []


@needs_kernel
def test_the_build_is_cached_under_a_hash_of_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    first = kernels.library()
    assert first.parent == tmp_path and first.name.startswith(kernels.LIBRARY_STEM + "-")
    assert kernels.library() == first and [p.name for p in tmp_path.iterdir()] == [first.name]


def test_the_compiler_reads_the_texts_the_name_hashes(tmp_path, monkeypatch):
    """The build compiles copies of the texts it hashed, not the package's files read a second time (an edit between
    the two reads would build one text under the other's name); the copies are gone afterwards."""
    import subprocess
    from pathlib import Path

    here = Path(kernels.__file__).parent
    seen = {}

    def fake_compiler(args, **_):
        out = Path(args[args.index("-o") + 1])
        for name in kernels.SOURCES:
            path = next(Path(a) for a in args if a.endswith("/" + name))
            seen[name] = (path.parent, path.read_bytes(), (path.parent / kernels.HEADERS[0]).read_bytes())
        out.write_bytes(b"library")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "fake-cc")
    monkeypatch.setattr(kernels, "cpu_has_avx2", lambda: True)
    monkeypatch.setattr(kernels.subprocess, "run", fake_compiler)
    built = kernels.library()
    assert built is not None and built.read_bytes() == b"library"
    assert set(seen) == set(kernels.SOURCES)
    for name, (folder, text, header) in seen.items():
        assert folder != here and text == (here / name).read_bytes()
        assert header == (here / kernels.HEADERS[0]).read_bytes()
        assert not folder.exists()
    assert [p.name for p in tmp_path.iterdir()] == [built.name]


def test_folders_without_such_layers_do_not_import_onnx(tmp_path):
    import subprocess
    import sys

    import lowbit
    from tests.conftest import SAMPLE_MODEL

    out = tmp_path / "w8"
    lowbit.convert(str(SAMPLE_MODEL), out, scheme="w8a16", accuracy_level=0)  # float compute: ORT's kernel
    layers = json.loads((out / "lowbit.json").read_text())["quantization"].values()
    assert all(layer["accuracy_level"] == 0 for layer in layers if layer.get("format") == "matmulnbits")
    code = ("import sys; from lowbit.runtime.session import create_session; "
            f"create_session({str(out)!r}); print('onnx' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False"], result.stderr
    assert "lowbit:" not in result.stderr


@needs_kernel
def test_nvfp4a16_at_accuracy_level_4_runs_on_the_kernel(tmp_path, monkeypatch, capfd):
    """stories260K NVFP4A16 converted at the recipe default, accuracy level 4: its layers whose K is a multiple
    of 16 run on MatMulInt4Int8 over the e2m1 codes with int8 activations per block of 16 (int8 compute), within
    the int8 tolerance of the same folder in float32 compute (LOWBIT_NVFP4_INTEGER=0, MatMulNarrowFloat), prefill
    and cached decode; at --accuracy-level 0 the float route is taken without the switch."""
    import lowbit
    from lowbit.runtime import fast_paths
    from lowbit.runtime.session import create_session
    from tests.conftest import SAMPLE_MODEL
    from tests.test_narrow_float_kernel import NVFP4_RECIPE

    recipe = tmp_path / "nvfp4a16.yaml"
    recipe.write_text(NVFP4_RECIPE)
    out = tmp_path / "level4"
    lowbit.convert(str(SAMPLE_MODEL), out, recipe=recipe)
    layers = fast_paths.nvfp4_layers(json.loads((out / "lowbit.json").read_text()))
    on_kernel = [name for name, k in layers.items() if k % 16 == 0]
    assert 0 < len(on_kernel) < len(layers)
    capfd.readouterr()
    integer = prefill_and_decode(create_session(out))
    assert f"lowbit: {len(on_kernel)} NVFP4 MatMuls run as integer block products on lowbit.cpu.MatMulInt4Int8" \
        in capfd.readouterr().err
    monkeypatch.setenv(fast_paths.NVFP4_INTEGER_SWITCH, "0")
    floats = prefill_and_decode(create_session(out))
    assert f"lowbit: {len(on_kernel)} NVFP4 weights run at 4 bits on lowbit.cpu.MatMulNarrowFloat" \
        in capfd.readouterr().err
    for a, b in zip(integer, floats):
        assert 0 < relative(a, b) <= TOLERANCE  # int8 activations: not the float result, within its tolerance
    monkeypatch.delenv(fast_paths.NVFP4_INTEGER_SWITCH)
    lowbit.convert(str(SAMPLE_MODEL), tmp_path / "level0", recipe=recipe, accuracy_level=0)
    prefill_and_decode(create_session(tmp_path / "level0"))
    assert "NarrowFloat" in capfd.readouterr().err
