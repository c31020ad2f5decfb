"""Float16 graphs computed in float32 on the CPU (runtime/float32_compute.py): the graph rewrite against numpy,
and the runtime's sessions over float16 folders."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.runtime import float32_compute
from tests.conftest import SAMPLE_MODEL, assert_bound_decode_equals_forward, prefill_and_decode, relative

FLOAT, FLOAT16 = 1, 10


def float16_graph(rng):
    """y = Cast(MatMul(x, W) * c + ConstantOfShape(0.5), float16) + Cast(n, float16), float16 everywhere: W an
    initializer, c a Constant node, n an int64 input."""
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((8, 4)).astype(np.float16)
    c = np.array(rng.random() + 0.5, np.float16)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c)),
        helper.make_node("Mul", ["xw", "c"], ["scaled"]),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([4], np.int64))),
        helper.make_node("ConstantOfShape", ["shape"], ["half"],
                         value=numpy_helper.from_array(np.array([0.5], np.float16))),
        helper.make_node("Add", ["scaled", "half"], ["sum"]),
        helper.make_node("Cast", ["sum"], ["same"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["n"], ["n16"], to=TensorProto.FLOAT16),
        helper.make_node("Add", ["same", "n16"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])],
        [numpy_helper.from_array(w, "W")],
        value_info=[helper.make_tensor_value_info("xw", TensorProto.FLOAT16, [2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, w, c


def run(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_the_rewritten_graph_computes_in_float32(rng):
    import onnx

    model, w, c = float16_graph(rng)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    n = rng.integers(-3, 4, (2, 4))
    assert float32_compute.to_float32(model)
    onnx.checker.check_model(model, full_check=True)
    y = run(model, {"x": x, "n": n})
    assert y.dtype == np.float32
    expected = (x.astype(np.float64) @ w.astype(np.float64)) * float(c) + 0.5 + n
    assert np.abs(y - expected).max() <= 1e-6 * np.abs(expected).max()
    # the float16 tensor stays as it was in the file, read through one Cast
    (source,) = [t for t in model.graph.initializer]
    assert source.name == "W" + float32_compute.SOURCE_SUFFIX and source.data_type == FLOAT16
    cast = model.graph.node[0]
    assert (cast.op_type, list(cast.input), list(cast.output)) == ("Cast", [source.name], ["W"])
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    assert FLOAT16 not in {v.type.tensor_type.elem_type for v in values}
    assert not any(a.i == FLOAT16 or a.t.data_type == FLOAT16 for node in model.graph.node for a in node.attribute)


def test_the_float16_graph_rounds_where_the_rewrite_does_not(rng):
    """The same graph unrewritten computes in float16 steps: further from the float64 result than the rewrite."""
    model, w, c = float16_graph(rng)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    n = rng.integers(-3, 4, (2, 4))
    expected = (x.astype(np.float16).astype(np.float64) @ w.astype(np.float64)) * float(c) + 0.5 + n
    before = run(model, {"x": x.astype(np.float16), "n": n})
    assert before.dtype == np.float16
    float32_compute.to_float32(model)
    after = run(model, {"x": x.astype(np.float16).astype(np.float32), "n": n})
    assert np.abs(after - expected).max() < np.abs(before.astype(np.float64) - expected).max()


def test_graphs_it_does_not_change(rng):
    from onnx import TensorProto, helper

    model, _, _ = float16_graph(rng)
    float32_compute.to_float32(model)
    once = model.SerializeToString()
    assert not float32_compute.to_float32(model)  # a float32 graph: nothing to do
    assert model.SerializeToString() == once
    model, _, _ = float16_graph(rng)  # W also a graph input (a caller may feed float16 there): left alone
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT16, [8, 4]))
    before = model.SerializeToString()
    assert not float32_compute.to_float32(model)
    assert model.SerializeToString() == before


def test_applies_to_float16_folders_on_the_cpu(monkeypatch):
    assert float32_compute.applies({"dtype": "float16"}, "CPUExecutionProvider")
    assert not float32_compute.applies({"dtype": "float32"}, "CPUExecutionProvider")
    assert not float32_compute.applies(None, "CPUExecutionProvider")
    assert not float32_compute.applies({"dtype": "float16"}, "CUDAExecutionProvider")
    monkeypatch.setenv(float32_compute.ENV_SWITCH, "0")
    assert not float32_compute.applies({"dtype": "float16"}, "CPUExecutionProvider")


@pytest.fixture(scope="module")
def stories_folders(tmp_path_factory):
    import lowbit

    root = tmp_path_factory.mktemp("float32_compute")
    for scheme in ("q0f32", "q0f16"):
        lowbit.convert(str(SAMPLE_MODEL), root / scheme, scheme=scheme)
    lowbit.convert(str(SAMPLE_MODEL), root / "q4f16_1", scheme="q4f16_1", accuracy_level=0)  # float compute
    return root


def both_ways(folder, monkeypatch, capfd):
    """prefill_and_decode logits of the folder widened, then as its float16 graph (LOWBIT_CPU_FLOAT32=0)."""
    from lowbit.runtime.session import create_session

    capfd.readouterr()
    session = create_session(folder)
    assert capfd.readouterr().err.splitlines()[-1] == \
        "lowbit: the float16 graph computes in float32 on the CPU (LOWBIT_CPU_FLOAT32=0 keeps float16)"
    assert session.kv_dtype == np.float32 and session.logits_dtype == np.float32
    widened = prefill_and_decode(session)
    with monkeypatch.context() as patch:
        patch.setenv(float32_compute.ENV_SWITCH, "0")
        session = create_session(folder)
    assert "float32 on the CPU" not in capfd.readouterr().err
    assert session.kv_dtype == np.float16 and session.logits_dtype == np.float16
    return widened, prefill_and_decode(session)


def test_a_float16_folder_runs_closer_to_the_float32_model(stories_folders, monkeypatch, capfd):
    """q0f16 widened is nearer q0f32's logits than its float16 graph is, prefill and cached decode; the folder
    is unchanged."""
    from lowbit.runtime.session import create_session

    folder = stories_folders / "q0f16"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    reference = prefill_and_decode(create_session(stories_folders / "q0f32"))
    widened, float16 = both_ways(folder, monkeypatch, capfd)
    for a, b, ref in zip(widened, float16, reference):
        assert relative(a, ref) < relative(b, ref)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_quantized_float16_folders_differ_by_float16_rounding(stories_folders, monkeypatch, capfd):
    """q4f16_1 at float compute (accuracy level 0: ORT's MatMulNBits with float16, now float32, scales): widened
    and float16 logits within 5 float16 epsilons (9.8e-4) of each other."""
    widened, float16 = both_ways(stories_folders / "q4f16_1", monkeypatch, capfd)
    for a, b in zip(widened, float16):
        assert relative(a, b) <= 5e-3


def test_generation_on_a_widened_folder_equals_its_plain_forward(stories_folders):
    """Greedy tokens through the IO-bound cache (float32 buffers) are those of session.forward, step by step."""
    from lowbit.runtime.session import create_session

    assert_bound_decode_equals_forward(create_session(stories_folders / "q0f16", prompt_session=False), 5, 6, 10,
                                       seed=5)
