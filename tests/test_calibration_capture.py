"""Activation capture through ONNX Runtime against transformers' own inputs of the same layers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.converter.calibration import ActivationCapture, calibrate_statistics, make_observer, observe
from lowbit.converter.calibration.fake_quant import squared_error
from lowbit.converter.calibration.observers import parse_observers
from lowbit.converter.export import convert
from lowbit.errors import LowbitError
from tests.conftest import SAMPLE_MODEL, build_tiny_model

torch = pytest.importorskip("torch")

EXACT_OBSERVERS = ["minmax", "absmax", "absmax_per_channel", "hessian"]
ALL_OBSERVERS = [*EXACT_OBSERVERS, "percentile", "mse"]


def hf_modules(model, layer: int) -> dict[str, object]:
    """Our site name -> the transformers module whose input is the same activation."""
    block = model.model.layers[layer]
    return {f"layers.{layer}.attn.qkv_proj": block.self_attn.q_proj, f"layers.{layer}.mlp.gate_up_proj":
            block.mlp.gate_proj, f"layers.{layer}.mlp.down_proj": block.mlp.down_proj,
            f"layers.{layer}.attn.o_proj": block.self_attn.o_proj, "lm_head": model.lm_head}


def hf_inputs(model, modules: dict, samples) -> dict[str, list[np.ndarray]]:
    """Per site, each sample's input rows of its module, recorded by forward pre-hooks."""
    rows = {site: [] for site in modules}
    hooks = [module.register_forward_pre_hook(
        lambda _m, args, site=site: rows[site].append(args[0].reshape(-1, args[0].shape[-1]).numpy().copy()))
        for site, module in modules.items()]
    try:
        with torch.no_grad():
            for sample in samples:
                model(input_ids=torch.tensor(sample[None, :]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def random_samples(rng, vocab, count, lengths=(5, 40)):
    return [rng.integers(3, vocab, int(rng.integers(*lengths)), dtype=np.int64) for _ in range(count)]


def check_against_reference(results, reference_rows, atol):
    for site, per_sample in reference_rows.items():
        reference = {name: make_observer(name) for name in ALL_OBSERVERS}
        for rows in per_sample:
            for observer in reference.values():
                observer.update(rows)
        got = results[site]
        assert got["minmax"].min == pytest.approx(reference["minmax"].result().min, abs=atol)
        assert got["minmax"].max == pytest.approx(reference["minmax"].result().max, abs=atol)
        assert got["absmax"] == pytest.approx(reference["absmax"].result(), abs=atol)
        np.testing.assert_allclose(got["absmax_per_channel"], reference["absmax_per_channel"].result(), atol=atol)
        np.testing.assert_allclose(got["hessian"], reference["hessian"].result(), rtol=1e-4, atol=atol)
        width = reference["percentile"].histogram.width
        assert got["percentile"] == pytest.approx(reference["percentile"].result(), abs=width + atol)
        # the clip is an argmin over a grid on a flat error curve, so float noise may pick a neighbouring ratio:
        # the captured choice must be as good as the reference choice on the reference histogram
        mse = reference["mse"]
        centers, counts = mse.histogram.centers(), mse.histogram.counts
        assert squared_error(centers, counts, got["mse"], mse.element) == pytest.approx(
            squared_error(centers, counts, mse.result(), mse.element), rel=1e-3)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    source = tmp_path_factory.mktemp("llama")
    model = build_tiny_model("llama", source)
    out = tmp_path_factory.mktemp("llama-onnx")
    convert(str(source), out, scheme="q0f32", overwrite=True)
    return model, out


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    import transformers

    out = tmp_path_factory.mktemp("stories-onnx")
    convert(str(SAMPLE_MODEL), out, scheme="q0f32", overwrite=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(SAMPLE_MODEL, attn_implementation="eager").eval()
    return model.float(), out


def test_tiny_llama_rows_and_statistics_match_transformers(tiny_llama, rng):
    model, folder = tiny_llama
    modules = {**hf_modules(model, 0), **hf_modules(model, 1)}
    samples = random_samples(rng, model.config.vocab_size, 4)
    reference = hf_inputs(model, modules, samples)
    capture = ActivationCapture(folder / "model.onnx", list(modules))
    for i, sample in enumerate(samples):
        rows = capture.run(sample)
        for site in modules:
            assert rows[site].dtype == np.float32 and rows[site].shape == reference[site][i].shape
            np.testing.assert_allclose(rows[site], reference[site][i], rtol=1e-5, atol=1e-5)
    files_before = sorted(p.name for p in folder.iterdir())
    calls = []
    results = calibrate_statistics(folder / "model.onnx", list(modules), ALL_OBSERVERS, samples,
                                   progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i + 1, len(samples)) for i in range(len(samples))]
    assert sorted(p.name for p in folder.iterdir()) == files_before  # nothing written next to the model
    check_against_reference(results, reference, atol=1e-5)


def test_stories_tied_lm_head_matches_transformers(stories, rng):
    model, folder = stories
    sites = ["layers.0.attn.qkv_proj", "layers.4.mlp.down_proj", "lm_head"]  # lm_head: a Gemm on the embedding
    modules = {site: module for site, module in {**hf_modules(model, 0), **hf_modules(model, 4)}.items()
               if site in sites}
    samples = random_samples(rng, model.config.vocab_size, 3, lengths=(20, 60))
    results = calibrate_statistics(folder / "model.onnx", sites, ALL_OBSERVERS, samples)
    assert list(results) == sites and all(list(r) == ALL_OBSERVERS for r in results.values())
    check_against_reference(results, hf_inputs(model, modules, samples), atol=1e-4)


def test_observer_memory_does_not_grow_with_samples(stories, rng):
    model, folder = stories
    capture = ActivationCapture(folder / "model.onnx", ["layers.1.attn.qkv_proj", "lm_head"])
    specs = parse_observers(ALL_OBSERVERS)

    def held_bytes(observers):
        total = 0
        for by_name in observers.values():
            for observer in by_name.values():
                for value in vars(observer).values():
                    arrays = [value] if isinstance(value, np.ndarray) else [getattr(value, "counts", None)]
                    total += sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))
        return total

    few = observe(capture, specs, random_samples(rng, model.config.vocab_size, 2))
    many = observe(capture, specs, random_samples(rng, model.config.vocab_size, 20, lengths=(30, 120)))
    assert held_bytes(few) == held_bytes(many) > 64 * 64 * 8


def shared_input_model(folder, rng):
    """input_ids -> Gather -> x; MatMul q(x), MatMul k(x), Gemm head(reshape(x)); weights in external data."""
    tensor = lambda name, shape: ir.Value(name=name, const_value=ir.tensor(  # noqa: E731
        rng.standard_normal(shape).astype(np.float32), name=name))
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "s"]))
    table, wq, wk, wh = tensor("table", (50, 8)), tensor("wq", (8, 6)), tensor("wk", (8, 4)), tensor("wh", (5, 8))
    gather = ir.node("Gather", [table, ids], name="embed")
    flat = ir.node("Reshape", [gather.outputs[0], ir.Value(name="shape", const_value=ir.tensor(np.array([-1, 8])))],
                   name="flat")
    q = ir.node("MatMul", [gather.outputs[0], wq], name="q")
    k = ir.node("MatMul", [gather.outputs[0], wk], name="k")
    head = ir.node("Gemm", [flat.outputs[0], wh], attributes={"transB": 1}, name="head")
    graph = ir.Graph([ids], [q.outputs[0], k.outputs[0], head.outputs[0]], nodes=[gather, flat, q, k, head],
                     initializers=[table, wq, wk, wh, flat.inputs[1]], opset_imports={"": 21})
    path = folder / "model.onnx"
    ir.save(ir.Model(graph, ir_version=10), path, external_data="model.onnx.data", size_threshold_bytes=64)
    return path, table.const_value.numpy()


def test_sites_sharing_an_input_share_one_output(tmp_path, rng):
    path, table = shared_input_model(tmp_path, rng)
    assert (tmp_path / "model.onnx.data").stat().st_size >= table.nbytes
    capture = ActivationCapture(path, ["q", "k", "head"])
    assert len(capture.output_names) == 2  # x (for q and k) and the Reshape of x (for head)
    sample = rng.integers(0, 50, 7)
    rows = capture.run(sample)
    np.testing.assert_array_equal(rows["q"], table[sample])
    assert rows["k"] is rows["q"]
    np.testing.assert_array_equal(rows["head"], table[sample])


def test_bad_sites(stories, tmp_path):
    _, folder = stories
    model = folder / "model.onnx"
    with pytest.raises(LowbitError, match="no node named 'layers.9.mlp.down_proj'"):
        ActivationCapture(model, ["layers.9.mlp.down_proj"])
    with pytest.raises(LowbitError, match="node 'embed_tokens' is a Gather, not one of"):
        ActivationCapture(model, ["embed_tokens"])
    with pytest.raises(LowbitError, match="at least one site"):
        ActivationCapture(model, [])
    with pytest.raises(LowbitError, match="sites listed twice: lm_head"):
        ActivationCapture(model, ["lm_head", "lm_head"])
    with pytest.raises(LowbitError, match="no such ONNX model"):
        ActivationCapture(tmp_path / "model.onnx", ["lm_head"])
    with pytest.raises(LowbitError, match="no calibration samples"):
        calibrate_statistics(model, ["lm_head"], ["absmax"], [])
    with pytest.raises(LowbitError, match="non-empty 1-D array of token ids"):
        calibrate_statistics(model, ["lm_head"], ["absmax"], [np.zeros((2, 3), np.int64)])
