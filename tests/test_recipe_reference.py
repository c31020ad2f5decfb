"""Every sample recipe (samples/recipes/, (a)-(e)) on tiny Llama and Qwen2 (GQA; tied and untied): the ONNX Runtime
logits equal a fake-quant reference of the same recipe, within float rounding.

The reference is the transformers model in float32 whose every quantized linear holds the weight the folder stores,
dequantized in numpy (`converter.emit.graph_weights.read_weight`, then `lowbit.affine.dequantize`: integer codes,
FP8 values, NVFP4 codes alike, whatever algorithm chose them), and whose inputs to the linears with quantized
activations go through the recipe's activation rounding in numpy: FP8 e4m3 with the folder's calibrated static
scale (ml_dtypes), or ONNX's DynamicQuantizeLinear (uint8, per tensor, per call). A value near a rounding boundary
(tests/conftest.py, near_rounding_boundary) may round either way after float32 sums in another order, so the
comparison stops at the first token of a row where some linear input lay there (causal attention carries it on),
as tests/test_fp8.py does. With one dynamic range per call, a token past that point may also move the call's range
when it lies near its min or max; then the whole call stops being compared
(`RecipeReference._mark_range_from_diverged_tokens`)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest
from lowbit.converter.api import convert
from lowbit.converter.emit.graph_weights import read_activation, read_weight

from lowbit import nvfp4
from lowbit.affine import dequantize
from tests.conftest import REPO, build_tiny_model, near_rounding_boundary
from tests.test_fp8 import (CALIBRATION_TEXT, float8_rounding, load_fused_weight, ml_dtypes_fp8, onnx_logits,
                            write_char_tokenizer)
from tests.test_w8a8 import dynamic_quantize_linear

torch = pytest.importorskip("torch")

SAMPLES = sorted((REPO / "samples" / "recipes").glob("*.yaml"))
SKIPPED_OPS = ("DequantizeLinear", "QuantizeLinear")  # the Q/DQ formats' other nodes carry the metadata too


def stored_weights(folder) -> dict[str, tuple[np.ndarray, dict, tuple | None]]:
    """{module: (W [N, K] float32 as the graph computes it, lowbit.json's layer entry, static activation (scale,
    zero point) or None)} for every quantized linear of the folder."""
    layers = json.loads((folder / "lowbit.json").read_text())["quantization"]
    model = ir.load(folder / "model.onnx")
    initializers = model.graph.initializers
    found = {}
    for node in model.graph:
        fmt = node.metadata_props.get("lowbit.format")
        if fmt is None or node.op_type in SKIPPED_OPS or node.name not in layers:
            continue

        def tensor(suffix, module=node.name):
            value = initializers.get(f"{module}.{suffix}")
            return None if value is None else value.const_value.numpy()

        entry = layers[node.name]
        group = re.search(r" g(\d+) ", entry["quant"])
        qw = read_weight(fmt, node, tensor, int(group.group(1)) if group else None)
        if isinstance(qw, nvfp4.NVFP4Weight):  # e2m1 codes, FP8 block scales, global scale; K padded to 16
            weight = nvfp4.dequantize(qw.codes, qw.scales, qw.global_scale)[:, : entry["shape"][1]]
        else:
            weight = dequantize(qw)
        found[node.name] = (weight.astype(np.float32), entry, read_activation(node.name, tensor))
    return found


class RecipeReference:
    """The tiny transformers model with the folder's weights and the recipe's activation rounding (module doc)."""

    def __init__(self, model, folder):
        self.model = model
        modules = dict(model.named_modules())
        with torch.no_grad():
            for module, (weight, entry, static) in stored_weights(folder).items():
                load_fused_weight(model, modules, module, weight, self._hook(entry["activation"], static))
            graph = ir.load(folder / "model.onnx").graph.initializers  # norms as the graph holds them (AWQ folds)
            for i in range(model.config.num_hidden_layers):
                for ours, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
                    norm = modules[f"model.layers.{i}.{theirs}"].weight
                    norm.copy_(torch.from_numpy(graph[f"layers.{i}.{ours}.weight"].const_value.numpy().copy()))

    def _hook(self, activation: dict | None, static):
        def hook(_linear, args):
            if activation is None:
                return None
            x = args[0].numpy()
            if activation.get("element") == "e4m3":  # static FP8, symmetric, per tensor
                scale = np.float32(static[0][0])
                self.near_tie |= near_rounding_boundary(x / scale, float8_rounding("e4m3"))
                return (torch.from_numpy(ml_dtypes_fp8(x / scale, "e4m3").astype(np.float32) * scale),)
            assert activation["dynamic"] and activation["type"] == "int", activation  # DynamicQuantizeMatMul
            fake = np.empty_like(x)
            for row in range(x.shape[0]):  # one range per call: per sequence of the batch (run one at a time)
                self._mark_range_from_diverged_tokens(row, x[row])
                codes, scale, zero = dynamic_quantize_linear(x[row])
                fake[row] = (codes.astype(np.float32) - np.float32(zero)) * scale
                self.near_tie[row] |= near_rounding_boundary(x[row] / scale, np.rint)
                # the zero point rint(-min / scale) near a tie may round the other way: every code of the call moves
                start = -np.minimum(x[row].min(), np.float32(0)) / scale
                if np.rint(start * np.float32(1 + 2e-6)) != np.rint(start * np.float32(1 - 2e-6)):
                    self.near_tie[row] = True
            return (torch.from_numpy(fake),)

        return hook

    def _mark_range_from_diverged_tokens(self, row: int, x: np.ndarray) -> None:
        """One activation range per call: a token past a near-tie may hold different values in ONNX Runtime, and if
        one of them comes near the call's min or max, the range, hence every code of the call, may differ: then no
        token of the call is exact from here on. Near means within 5% of the range of the exact tokens' extremes."""
        diverged = np.cumsum(self.near_tie[row]) > 0
        if not diverged.any() or diverged.all():
            return
        exact = x[~diverged]
        lo, hi = min(exact.min(), 0.0), max(exact.max(), 0.0)
        margin = 0.05 * (hi - lo)
        if x[diverged].max() >= hi - margin or x[diverged].min() <= lo + margin:
            self.near_tie[row] = True

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.near_tie = np.zeros(ids.shape, bool)
        with torch.no_grad():
            return self.model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem[0])
@pytest.mark.parametrize("arch_id", ["llama", "qwen2", "qwen2-untied"])
def test_sample_logits_equal_its_fake_quant_reference(arch_id, sample, rng, tmp_path):
    model = build_tiny_model(arch_id, tmp_path / "src")
    write_char_tokenizer(tmp_path / "src")
    (tmp_path / "calib.txt").write_text(CALIBRATION_TEXT)
    out = tmp_path / "out"
    convert(tmp_path / "src", out, recipe=sample, calib_data=tmp_path / "calib.txt", num_samples=4, seq_len=32,
            accuracy_level=0)  # float activations in weight-only layers: the recipe's numerics exactly
    reference = RecipeReference(build_tiny_model(arch_id, tmp_path / "ref-src"), out)
    errors, exact, float_errors = [], [], []
    for _ in range(12):  # one short sequence a call: dynamic activation ranges are per call
        ids = rng.integers(3, model.config.vocab_size, (1, 8))
        expected, got = reference.logits(ids), onnx_logits(out, ids)
        with torch.no_grad():
            float_logits = model(input_ids=torch.tensor(ids)).logits.numpy()
        scale = np.abs(expected).max()
        errors.append(np.abs(got - expected).max(axis=-1) / scale)
        exact.append(np.cumsum(reference.near_tie, axis=1) == 0)
        float_errors.append(np.abs(float_logits - expected).mean() / scale)
    errors, exact = np.concatenate(errors), np.concatenate(exact)
    assert exact.mean() >= 0.2, exact.mean()
    assert errors[exact].max() <= 1e-4, errors[exact].max()
    assert min(float_errors) > 1e-4  # the quantization is really there
