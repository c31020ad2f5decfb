"""The load-time fast path of `lowbit.MatMulBlockwise` (runtime/fast_paths.py): the repack is bit-exact against
the blockwise arrays, and sessions with the fast path give the function bodies' logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.affine import WeightQuant, dequantize, quantize
from lowbit.custom_ops import blockwise, blockwise_repack
from lowbit.custom_ops.bitpack import unpack_bytes
from tests.conftest import relative

K = 204  # a multiple of none of the groups: the last group is padded

REPACK_CASES = [
    (bits, group, rule)
    for bits in range(2, 9)
    for group in (16, 32, 40, 64, 128, None)
    for rule in ("symmetric", "asymmetric", "minmax_float_zp")
] + [(3, 24, "symmetric_full"), (5, 48, "asymmetric"), (3, 8, "symmetric"), (8, 200, "minmax_float_zp")]


def blockwise_weight(rng, bits, group, rule, dtype=np.float32, n=24, k=K):
    w = rng.standard_normal((n, k)).astype(np.float32)
    qw = quantize(w, WeightQuant(bits, group, rule), dtype)
    return qw, blockwise.pack(qw)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bits,group,rule", REPACK_CASES)
def test_repack_holds_the_same_codes_and_scales(bits, group, rule, dtype, rng):
    qw, arrays = blockwise_weight(rng, bits, group, rule, dtype)
    r = blockwise_repack.repack(arrays, rows_per_chunk=7)  # chunks of odd size: the chunking is exact too
    layout, weight = r.layout, r.weight
    assert weight.bits == (4 if bits <= 4 else 8) and weight.block_size in (16, 32, 64, 128)
    assert weight.k == layout.k_out and weight.b.shape == (qw.n, layout.blocks, weight.block_size * weight.bits // 8)
    positions = layout.positions()
    real = positions >= 0
    codes = unpack_bytes(weight.b, weight.bits, weight.block_size).reshape(qw.n, -1)
    assert np.array_equal(codes[:, real], qw.codes[:, positions[real]])  # the same integers
    groups = layout.block_groups()
    assert np.array_equal(weight.scales.reshape(qw.n, -1), qw.scales[:, groups])  # the same scales, bit for bit
    assert weight.scales.dtype == dtype
    # every block lies inside one group, and every real row sits in a block of its own group
    assert np.array_equal(groups[np.flatnonzero(real) // weight.block_size], positions[real] // qw.group_size)
    relaid = blockwise_repack.dequantize_relaid(r)
    assert not np.any(relaid[:, ~real[: layout.k_out]])  # padding rows are exactly 0
    original = dequantize(qw)
    if rule == "minmax_float_zp":
        assert r.correction is not None and r.correction.shape == (qw.groups, qw.n)
        # (q - c)s - (z - c)s against (q - z)s: a few roundings of values up to 2^nbits * s
        tol = 4 * np.finfo(dtype).eps * 2**weight.bits * qw.scales.astype(np.float32)
        tol = np.repeat(tol, qw.group_size, axis=1)[:, :K]
        assert np.all(np.abs(blockwise_repack.dequantize_original_order(r) - original) <= tol)
    else:
        assert r.correction is None
        assert np.array_equal(blockwise_repack.dequantize_original_order(r), original)  # bit-exact


@pytest.mark.parametrize("bits,group,rule", [(3, 40, "symmetric"), (8, None, "minmax_float_zp"), (3, 32, "symmetric"),
                                             (8, 40, "minmax_float_zp"), (6, 24, "asymmetric")])
def test_repacked_reference_matmul_equals_blockwise_reference(bits, group, rule, rng):
    _, arrays = blockwise_weight(rng, bits, group, rule)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    expected = blockwise.reference_matmul(x, arrays)
    actual = blockwise_repack.reference_matmul(x, blockwise_repack.repack(arrays))
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def test_mlc_group_40_layout():
    """MLC's q3f16_1 on K = 576: each group of 40 -> 64 rows, one block of 64 (40 bytes of 4-bit codes and block
    data in ORT's packed form, against 48 for three blocks of 16); the last group keeps its 16 rows (K' = 912)."""
    layout = blockwise_repack.Layout(3, 40, 15, 576)
    assert layout.relaid and (layout.padded_group, layout.block_size, layout.k_out, layout.chunk) == (64, 64, 912, 8)
    positions = layout.positions()
    assert list(positions[:64]) == list(range(40)) + [-1] * 24
    assert list(positions[896:912]) == list(range(560, 576)) and np.all(positions[912:] == -1)
    chunks = layout.chunk_index()  # chunks of 8 rows: a padding chunk repeats a real chunk of its own block
    assert list(chunks[:16]) == [0, 1, 2, 3, 4, 0, 0, 0, 5, 6, 7, 8, 9, 5, 5, 5]
    assert list(chunks[112:]) == [70, 71] and len(chunks) == 114
    assert np.array_equal(layout.gather_index()[:48], np.r_[np.arange(40), np.arange(8)])
    assert np.array_equal(layout.block_groups(), np.arange(15))
    assert blockwise_repack.padded_group_and_block(8, 40, 15, 576) == (48, 16)  # 8-bit: 72 bytes either way, fewer rows
    assert blockwise_repack.padded_group_and_block(3, 24, 24, 576) == (32, 32)
    assert blockwise_repack.padded_group_and_block(3, 100, 6, 576) == (128, 128)
    per_channel = blockwise_repack.Layout(8, 576, 1, 576)
    assert not per_channel.relaid and per_channel.block_size == 128 and per_channel.blocks == 5
    pow2 = blockwise_repack.Layout(3, 32, 18, 576)
    assert not pow2.relaid and pow2.block_size == 32 and pow2.k_out == 576


# ------------------------------------------------------------------------------ sessions: fast path vs function bodies


@pytest.fixture(autouse=True)
def ort_kernels_only(monkeypatch):
    """This file tests the rewrites into ONNX Runtime's own kernels, which run wherever lowbit's int8 CPU kernel is
    unavailable; tests/test_int4_int8_kernel.py tests that kernel's path. Float16 graphs stay float16 here
    (tests/test_float32_compute.py tests their float32 computation on the CPU)."""
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    monkeypatch.setenv("LOWBIT_CPU_FLOAT32", "0")


FAST_SCHEMES = ["q3f16_1", "w3a16", "a16w8-minmax", "a16w8-minmax-g40"]  # g40: float zero points and relaid groups
# |fast - function body| / max|function body| of the logits. Level 4 quantizes the activations to int8 per block
# (the function bodies compute in float); level 0 differs by summation order only (float16: its rounding too).
TOLERANCE = {(4, "float32"): 3e-2, (4, "float16"): 3e-2, (0, "float32"): 1e-5, (0, "float16"): 5e-3}


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    from tests.conftest import build_tiny_model

    root = tmp_path_factory.mktemp("fast_src")
    return {arch: (build_tiny_model(arch, root / arch), root / arch)[1] for arch in ("llama", "qwen2")}


def both_paths(folder, monkeypatch, step):
    """`step(session)` on a session with the fast path and on one running the function bodies."""
    from lowbit.runtime.session import create_session

    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("LOWBIT_FAST_PATH", flag)
        results.append(step(create_session(folder)))
    return results


def prefill_and_decode(session, rng):
    """Logits of a left-padded batch of 2 (prefill), then of one cached decode step (tests/conftest.py)."""
    from tests.conftest import prefill_and_decode as padded

    return padded(session)


def count_ops(path, op_type: str) -> int:
    import onnx

    return sum(n.op_type == op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("level", [4, 0])
@pytest.mark.parametrize("scheme", FAST_SCHEMES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_path_logits_equal_function_bodies(arch, scheme, level, tiny_sources, tmp_path, monkeypatch, capfd, rng):
    import lowbit

    out = tmp_path / "out"
    lowbit.convert(str(tiny_sources[arch]), out, scheme=scheme, accuracy_level=level)
    meta = json.loads((out / "lowbit.json").read_text())
    matmuls = count_ops(out / "model.onnx", "MatMulBlockwise")
    capfd.readouterr()
    fast, body = both_paths(out, monkeypatch, lambda s: prefill_and_decode(s, rng))
    err = capfd.readouterr().err
    assert err.splitlines() == [  # said once by each session
        f"lowbit: {matmuls} lowbit.MatMulBlockwise nodes run as MatMulNBits (repacked at load)",
        "lowbit: lowbit.MatMulBlockwise nodes run as their ONNX function bodies (LOWBIT_FAST_PATH=0)"]
    tol = TOLERANCE[(level, meta["dtype"])]
    for a, b in zip(fast, body):
        assert relative(a, b) <= tol


@pytest.fixture(scope="module")
def stories_q3(tmp_path_factory):
    import lowbit
    from tests.conftest import SAMPLE_MODEL

    out = tmp_path_factory.mktemp("fast_stories") / "q3f16_1"
    lowbit.convert(str(SAMPLE_MODEL), out, scheme="q3f16_1")
    return out


@pytest.mark.parametrize("scheme", ["q3f16_1", "w3a16", "a16w8-minmax"])
def test_stories260k_greedy_tokens_equal_at_float_compute(scheme, tmp_path, monkeypatch):
    """Accuracy level 0: the same greedy tokens as the function bodies. (At level 4 the int8 activations move the
    logits by about 1%, and this 260K-parameter model's greedy path follows near-ties: the logits are compared
    within TOLERANCE above and in test_rewritten_graph_runs below.)"""
    import lowbit
    from tests.conftest import SAMPLE_MODEL

    out = tmp_path / scheme
    lowbit.convert(str(SAMPLE_MODEL), out, scheme=scheme, accuracy_level=0)
    texts = []
    for flag in ("1", "0"):
        monkeypatch.setenv("LOWBIT_FAST_PATH", flag)
        texts.append(lowbit.load(out).generate(["Once upon a time", "The little dog"], max_new_tokens=40))
    assert texts[0] == texts[1]


def test_rewritten_graph(stories_q3, tmp_path):
    """Every MatMulBlockwise node becomes a MatMulNBits (4-bit, one block of 64 per group of 40) reading its input
    through one chunk Gather between Reshapes to constant shapes (every input's rank is known); the tied
    embedding keeps its GatherBlockwise on lm_head's words; the folder is not touched."""
    import onnx

    from lowbit.runtime import fast_paths

    before = {p.name: p.read_bytes() for p in stories_q3.iterdir()}
    model = onnx.load(str(stories_q3 / "model.onnx"), load_external_data=False)
    n = count_ops(stories_q3 / "model.onnx", "MatMulBlockwise")
    result = fast_paths.rewrite_blockwise(model, stories_q3, fast_paths.accuracy_levels(None), tmp_path)
    ops = [node.op_type for node in model.graph.node]
    assert len(result.fast) == n and not result.fallback and "MatMulBlockwise" not in ops
    nbits = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == n and ops.count("GatherBlockwise") == 1
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 64 and attrs["accuracy_level"] == 4
    # stories260K: hidden 64 (two groups of 40, the second holding 24 rows): K' = 64 + 24; MLP 172: 4 * 64 + 12
    assert {a.i for node in nbits for a in node.attribute if a.name == "K"} == {88, 268}
    relayouts = ops.count("Gather") - count_ops(stories_q3 / "model.onnx", "Gather")
    assert relayouts == len({node.input[0] for node in nbits})
    assert not any(node.op_type == "Shape" and node.name.startswith("lowbit_fast/") for node in model.graph.node)
    assert (tmp_path / fast_paths.DATA_FILE).is_file()
    assert {p.name: p.read_bytes() for p in stories_q3.iterdir()} == before


def test_unknown_ranks_and_copied_data(stories_q3, monkeypatch, rng):
    """Without known ranks the relayout takes its shapes from Shape(x); without hard links the folder's remaining
    external data is copied into the temporary data file. Same logits."""
    from lowbit.runtime import fast_paths

    reference = both_paths(stories_q3, monkeypatch, lambda s: prefill_and_decode(s, rng))[0]
    monkeypatch.setattr(fast_paths, "known_ranks", lambda graph: {})

    def no_link(*args):
        raise OSError("cross-device link")

    monkeypatch.setattr(fast_paths.os, "link", no_link)
    fast, body = both_paths(stories_q3, monkeypatch, lambda s: prefill_and_decode(s, rng))
    for a, b, c in zip(fast, body, reference):
        assert np.array_equal(a, c) and relative(a, b) <= 3e-2


def test_a_node_the_fast_path_cannot_take_keeps_its_function_body(stories_q3, tmp_path, monkeypatch, capfd, rng):
    import shutil

    import onnx

    folder = tmp_path / "edited"
    shutil.copytree(stories_q3, folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "MatMulBlockwise")
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [node.input[2]], ["scales_copy"]))
    node.input[2] = "scales_copy"  # scales computed in the graph: not an initializer
    onnx.save(model, str(folder / "model.onnx"))
    capfd.readouterr()
    fast, body = both_paths(folder, monkeypatch, lambda s: prefill_and_decode(s, rng))
    err = capfd.readouterr().err
    n = count_ops(folder / "model.onnx", "MatMulBlockwise")
    assert f"lowbit: {n - 1} lowbit.MatMulBlockwise nodes run as MatMulNBits" in err
    assert f"lowbit: {node.name} runs as its ONNX function body (its words, scales and zero points are not all " \
           "initializers)" in err
    for a, b in zip(fast, body):
        assert relative(a, b) <= 3e-2


def test_other_folders_do_not_import_onnx(tmp_path):
    import subprocess
    import sys

    import lowbit
    from tests.conftest import SAMPLE_MODEL

    out = tmp_path / "q4"
    lowbit.convert(str(SAMPLE_MODEL), out, scheme="q4f16_1")
    code = ("import sys; from lowbit.runtime.session import create_session; "
            f"create_session({str(out)!r}); print('onnx' in sys.modules, 'onnx_ir' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr
    assert "lowbit:" not in result.stderr


# ------------------------------------------------------------------ 2-bit MatMulNBits widened to 4-bit at load


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32, 128])
def test_widened_2bit_weights_dequantize_identically(symmetric, block, rng):
    from lowbit.affine import WeightQuant, dequantize, quantize
    from lowbit.custom_ops import matmul_nbits

    w = rng.standard_normal((24, 200)).astype(np.float32)
    qw = quantize(w, WeightQuant(2, block, "symmetric_full" if symmetric else "asymmetric"), np.float32)
    narrow = matmul_nbits.pack(qw, symmetric=symmetric)
    wide = matmul_nbits.widen(narrow)
    assert wide.bits == 4 and (wide.zero_points is None) == symmetric
    assert wide.b.shape == (24, narrow.b.shape[1], block // 2)
    assert np.array_equal(dequantize(matmul_nbits.unpack(wide)), dequantize(matmul_nbits.unpack(narrow)))
    a = rng.standard_normal((3, 200)).astype(np.float32)
    assert np.array_equal(matmul_nbits.reference(a, wide), matmul_nbits.reference(a, narrow))


@pytest.mark.parametrize("level", [4, 0])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_2bit_layers_run_as_4bit_with_the_same_logits(arch, symmetric, level, tiny_sources, tmp_path, monkeypatch,
                                                      capfd, rng):
    """Level 0: the same float weights, so equal to summation order. Level 4: ORT's 2-bit and 4-bit kernels both
    quantize activations to int8 per block but round differently (TOLERANCE)."""
    import lowbit

    out = tmp_path / "out"
    lowbit.convert(str(tiny_sources[arch]), out, scheme="w2a16", group_size=16, symmetric=symmetric,
                   accuracy_level=level)
    layers = count_ops(out / "model.onnx", "MatMulNBits")
    capfd.readouterr()
    fast, plain = both_paths(out, monkeypatch, lambda s: prefill_and_decode(s, rng))
    assert capfd.readouterr().err.splitlines() == [
        f"lowbit: {layers} 2-bit MatMulNBits nodes run as 4-bit (the same weights, widened at load: ORT's 4-bit "
        "kernel is the faster one)"]
    for a, b in zip(fast, plain):
        assert relative(a, b) <= TOLERANCE[(level, "float32")]


# ------------------------------------------------------------------ NVFP4 weights dequantized at load

NVFP4_RECIPE = "QuantizationModifier:\n  ignore: [lm_head]\n  scheme: NVFP4A16\n  targets: [Linear]\n"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_nvfp4_weights_dequantized_at_load_give_the_folded_graphs_logits(arch, tiny_sources, tmp_path, monkeypatch,
                                                                         capfd, rng):
    """An NVFP4A16 folder (ort: the unpack graph ORT folds at load): with the fast path every NVFP4 MatMul reads
    the float32 weight dequantized in numpy, the unpack nodes are gone, and prefill and cached decode give the
    logits of the folded graph bit for bit (the same weights into the same MatMul)."""
    import onnx

    import lowbit
    from lowbit.runtime import fast_paths

    recipe = tmp_path / "nvfp4.yaml"
    recipe.write_text(NVFP4_RECIPE)
    out = tmp_path / "out"
    lowbit.convert(str(tiny_sources[arch]), out, recipe=recipe)
    meta = json.loads((out / "lowbit.json").read_text())
    layers = fast_paths.nvfp4_layers(meta)
    assert len(layers) == len(meta["quantization"]) > 0
    capfd.readouterr()
    fast, folded = both_paths(out, monkeypatch, lambda s: prefill_and_decode(s, rng))
    assert capfd.readouterr().err.splitlines() == [
        f"lowbit: {len(layers)} NVFP4 weights dequantized to float32 at load, one layer at a time"]
    for a, b in zip(fast, folded):
        assert np.array_equal(a, b)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    result = fast_paths.rewrite_blockwise(model, out, fast_paths.accuracy_levels(meta), tmp_path, layers)
    assert sorted(result.dequantized) == sorted(layers)
    assert not [n for n in model.graph.node if n.op_type in ("BitwiseAnd", "BitShift", "Gather")
                and n.name.rsplit(".", 1)[0] in layers]
