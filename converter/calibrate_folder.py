"""Static activation scales: calibration of a converted folder's Q/DQ activations (FP8 and INT8 schemes).

A static activation site is a MatMul/Gemm whose first input is DequantizeLinear(QuantizeLinear(x, s, z), s, z)
with s an initializer (`{module}.input_scale`) and z a float8, int8 or uint8 zero point. Calibration observes x with
every such activation Q/DQ bypassed (x fed straight into the MatMul; the weights stay quantized, as MLC's calibration
runs the model with quantized weights), so the result never depends on the scales the folder holds now: a folder
with placeholder scales and one already calibrated give the same scales, and calibrating twice changes nothing.
Each site's parameters come from its element type's rule (`ACTIVATION_RULES`): float8 and int8 are symmetric,
s = max|x| / element max (`absmax` observer, zero point 0); uint8 takes the min/max range widened to include 0,
s = (max − min) / 255 and z = round(−min / s) (`minmax` observer), as ONNX Runtime's static quantizer does.

NVFP4 input activations (W4A4, the `NVFP4` preset) are static sites too: a MatMul/Gemm fed by
`lowbit.NVFP4ActivationQDQ(x, {module}.input_global_scale)` (ort) or by DequantizeLinear(TRT_FP4DynamicQuantize(x,
{module}.input_global_scale_inverse)...) (tensorrt). Their block scales are computed at run time; calibration
measures max |x| (`absmax`) and writes the global scale gs = 448 · 6 / max |x| (llm-compressor's static_minmax
observer and generate_gparam: lowbit.nvfp4.global_scale_from_absmax), or 1 / gs for the TensorRT form. The bypass
removes these subgraphs as it removes Q/DQ pairs, and runs NVFP4 weights of the TensorRT form (FLOAT4E2M1
DequantizeLinear, which ORT's CPU provider lacks) as the same bytes read as uint8 and unpacked by standard ops
(`_float4_weights_for_ort`): e2m1 · (s · (1 / gs)), the values that form computes.

`lowbit convert --scheme e4m3_e4m3_f16` (or `w8a8-static`) runs this on its staging folder before moving it into
place; `lowbit calibrate OUT` runs it on a `*_max_calibrate` folder and rewrites it in place: the new model.onnx
(the scales are small tensors stored inside it; model.onnx.data is not touched) and lowbit.json are written
to temporary files in the folder and moved over the old ones with os.replace, model.onnx first. An error
before or between the two moves puts the old model.onnx back, so the folder is then as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from lowbit.converter.calibration import CalibrationSettings, calibrate_layerwise
from lowbit.converter.quant.formats import ACTIVATION_SCALE_PLACEHOLDER
from lowbit.custom_ops import nvfp4 as nvfp4_ops
from lowbit.errors import LowbitError
from lowbit.fp8 import scale_for
from lowbit.nvfp4 import global_scale_from_absmax, inverse_global_scale

WEIGHTED_OPS = ("MatMul", "Gemm")
QUANTIZED_WEIGHTS_FLOAT_COMPUTE = {"session.disable_quant_qdq": "1"}


@dataclass(frozen=True)
class ActivationRule:
    """How one activation element type's static parameters come from calibration statistics."""

    observer: str  # the observer (converter/calibration/observers.py) whose result `params` takes
    params: Callable[[object, np.dtype], tuple[np.ndarray, np.ndarray | None]]  # (scale, zero point or None: keep)


def _fp8_params(flavour: str):
    return lambda absmax, scale_dtype: (scale_for(absmax, flavour, scale_dtype), None)


def _int8_params(absmax: float, scale_dtype) -> tuple[np.ndarray, None]:
    """Symmetric int8: s = max|x| / 127 (at least the dtype's smallest normal), zero point 0."""
    scale = np.asarray(np.float32(absmax) / np.float32(127), np.float32)
    return np.maximum(scale, np.float32(np.finfo(scale_dtype).tiny)).astype(scale_dtype), None


def _uint8_params(value_range, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric uint8 over [min(lo, 0), max(hi, 0)]: s = (hi − lo) / 255 (rounded to the stored dtype first),
    z = clip(round(−lo / s), 0, 255) with round half to even, as QuantizeLinear rounds."""
    lo, hi = min(float(value_range.min), 0.0), max(float(value_range.max), 0.0)
    scale = np.asarray((np.float32(hi) - np.float32(lo)) / np.float32(255), np.float32)
    scale = np.maximum(scale, np.float32(np.finfo(scale_dtype).tiny)).astype(scale_dtype)
    zero = np.clip(np.rint(-np.float32(lo) / np.float32(scale)), 0, 255).astype(np.uint8)
    return scale, zero


# zero point's ONNX element type -> (name, rule)
ACTIVATION_RULES = {
    onnx.TensorProto.FLOAT8E4M3FN: ("e4m3", ActivationRule("absmax", _fp8_params("e4m3"))),
    onnx.TensorProto.FLOAT8E5M2: ("e5m2", ActivationRule("absmax", _fp8_params("e5m2"))),
    onnx.TensorProto.INT8: ("int8", ActivationRule("absmax", _int8_params)),
    onnx.TensorProto.UINT8: ("uint8", ActivationRule("minmax", _uint8_params)),
}
# NVFP4 activations (no zero point): element name -> rule; the global scale gs or its inverse (TensorRT form)
NVFP4_RULES = {
    "nvfp4": ActivationRule("absmax", lambda absmax, _: (np.asarray(global_scale_from_absmax(absmax), np.float32),
                                                         None)),
    "nvfp4_inverse": ActivationRule("absmax", lambda absmax, _: (
        np.asarray(inverse_global_scale(global_scale_from_absmax(absmax)), np.float32), None)),
}
METADATA_KEY = "activation_calibration"  # lowbit.json: {"status": "placeholder" | "calibrated", ...}


def _nvfp4_activation(node, producer: Callable):
    """(the activation input x, the global scale's input name, element name, the nodes between x and the MatMul)
    of an NVFP4 activation subgraph feeding a MatMul/Gemm's first input, or None."""
    if node.op_type not in WEIGHTED_OPS:
        return None
    first = producer(node, 0)
    if first is None:
        return None
    if (first.domain, first.op_type) == (nvfp4_ops.DOMAIN, nvfp4_ops.ACTIVATION_OP):
        return first.inputs[0] if hasattr(first, "inputs") else first.input[0], 1, "nvfp4", [first]
    if first.op_type != "DequantizeLinear":
        return None
    quantize = producer(first, 0)
    scales = producer(first, 1)
    if quantize is None or (quantize.domain, quantize.op_type) != (nvfp4_ops.TRT_DOMAIN,
                                                                   nvfp4_ops.TRT_DYNAMIC_QUANTIZE):
        return None
    x = quantize.inputs[0] if hasattr(quantize, "inputs") else quantize.input[0]
    return x, 1, "nvfp4_inverse", [first, *([scales] if scales is not None else []), quantize]


def _activation_qdq(node, producer: Callable):
    """(QuantizeLinear, DequantizeLinear) feeding a MatMul/Gemm's first input, or None."""
    if node.op_type not in WEIGHTED_OPS:
        return None
    dq = producer(node, 0)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producer(dq, 0)
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q, dq


def static_sites(model: onnx.ModelProto) -> dict[str, tuple[str, str, str]]:
    """{node name: (activation scale initializer, zero point initializer, element name)} of the static
    activation sites."""
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    sites = {}
    for node in model.graph.node:
        producer = (lambda n, i: producers.get(n.input[i]) if len(n.input) > i else None)
        fp4 = _nvfp4_activation(node, producer)
        if fp4 is not None:
            scale = fp4[3][-1].input[fp4[1]]
            if scale in initializers:
                sites[node.name] = (scale, "", fp4[2])
            continue
        qdq = _activation_qdq(node, producer)
        if qdq is None:
            continue
        q, dq = qdq
        zero = initializers.get(q.input[2]) if len(q.input) > 2 else None
        if q.input[1] not in initializers or dq.input[1] != q.input[1] or zero is None:
            continue
        if zero.data_type in ACTIVATION_RULES and dq.input[2:3] == q.input[2:3]:
            sites[node.name] = (q.input[1], q.input[2], ACTIVATION_RULES[zero.data_type][0])
    return sites


def bypass_activation_qdq(model) -> None:
    """onnx_ir edit: every MatMul/Gemm reads x instead of DequantizeLinear(QuantizeLinear(x)) or x's NVFP4
    activation subgraph; those nodes go. NVFP4 weights of the TensorRT form become ORT-runnable
    (`_float4_weights_for_ort`)."""
    def producer(node, index):
        return node.inputs[index].producer() if len(node.inputs) > index and node.inputs[index] is not None else None

    for node in list(model.graph):
        fp4 = _nvfp4_activation(node, producer)
        if fp4 is not None:
            node.replace_input_with(0, fp4[0])
            for dead in fp4[3]:
                if not any(output.uses() for output in dead.outputs):
                    model.graph.remove(dead, safe=True)
            continue
        qdq = _activation_qdq(node, producer)
        if qdq is None:
            continue
        q, dq = qdq
        node.replace_input_with(0, q.inputs[0])
        for dead in (dq, q):
            if not any(output.uses() for output in dead.outputs):
                model.graph.remove(dead, safe=True)
    _float4_weights_for_ort(model)


def _float4_weights_for_ort(model) -> None:
    """onnx_ir edit: each DequantizeLinear of a FLOAT4E2M1 initializer [N, K] (blocks of 16 along K) becomes standard
    ops over the same bytes read as uint8 [N, K / 2] (an external tensor at the same offset, nothing copied):
    nibbles → Gather from the e2m1 values → times the block scales the node had → [N, K]."""
    import onnx_ir as ir

    for node in list(model.graph):
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
            continue
        data = node.inputs[0]
        tensor = data.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT4E2M1 or len(tensor.shape) != 2:
            continue
        n, k = (int(d) for d in tensor.shape)
        name = f"{data.name}.as_uint8"
        if isinstance(tensor, ir.ExternalTensor):
            packed = ir.ExternalTensor(tensor.location, tensor.offset, tensor.length, ir.DataType.UINT8,
                                       shape=ir.Shape([n, k // 2]), name=name, base_dir=tensor.base_dir)
        else:
            packed = ir.tensor(np.frombuffer(tensor.tobytes(), np.uint8).reshape(n, k // 2), name=name)
        value = ir.Value(name=name, shape=ir.Shape([n, k // 2]), type=ir.TensorType(ir.DataType.UINT8),
                         const_value=packed)
        model.graph.register_initializer(value)
        tape = ir.tape.Tape()

        def const(v):
            return tape.op("Constant", [], {"value": ir.tensor(np.asarray(v, np.int64))})

        values = tape.op("CastLike", [nvfp4_ops.e2m1_blocks(tape, value, n), node.inputs[1]])
        weight = tape.op("Reshape", [tape.op("Mul", [values, tape.op("Unsqueeze", [node.inputs[1], const([-1])])]),
                                     const([n, k])])
        model.graph.insert_before(node, tape.nodes)
        ir.convenience.replace_all_uses_with(node.outputs[0], weight)
        model.graph.remove(node, safe=True)
    if any(n.op_type == "BitShift" for n in model.graph):
        model.opset_imports[""] = max(model.opset_imports.get("", 0), 21)


def measure_scales(model_onnx: Path, settings: CalibrationSettings, tokenizer_folder: Path, context_length: int,
                   progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """({scale or zero-point initializer name: new value}, the calibration record for lowbit.json) for a saved
    model."""
    model = _load(model_onnx)
    sites = static_sites(model)
    if not sites:
        raise LowbitError(f"{model_onnx}: no static activation scales to calibrate")
    rules = {**{name: rule for name, rule in ACTIVATION_RULES.values()}, **NVFP4_RULES}
    observers = sorted({rules[element].observer for _, _, element in sites.values()})
    samples, seq_len = settings.samples(tokenizer_folder, context_length)
    # with the activation Q/DQ bypassed, ORT would fuse DequantizeLinear(weight) + MatMul into MatMulNBits (int8
    # activations at its accuracy level 4: 1e-3 off, measured); QDQ handling off, it folds the weights to float
    statistics = calibrate_layerwise(model_onnx, list(sites), observers, samples, progress,
                                     edit=bypass_activation_qdq, session_config=QUANTIZED_WEIGHTS_FLOAT_COMPUTE)
    dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer}
    values, absmax, ranges, zero_points = {}, {}, {}, {}
    for node, (scale_name, zero_name, element) in sites.items():
        rule = rules[element]
        measured = statistics[node][rule.observer]
        if rule.observer == "absmax":
            absmax[node] = float(measured)
        else:
            ranges[node] = [float(measured.min), float(measured.max)]
        values[scale_name], zero = rule.params(measured, dtypes[scale_name])
        if zero is not None:
            values[zero_name] = zero
            zero_points[node] = int(zero)
    record = {
        "status": "calibrated", "observer": observers[0] if len(observers) == 1 else observers,
        **settings.record(samples, seq_len),
        "absmax": absmax, "scales": {node: float(values[name]) for node, (name, _, _) in sites.items()},
    }
    if ranges:
        record["ranges"], record["zero_points"] = ranges, zero_points
    fp4 = {node: float(global_scale_from_absmax(absmax[node])) for node, (_, _, e) in sites.items()
           if e in NVFP4_RULES}
    if fp4:  # NVFP4 activations: "scales" holds what the graph stores (gs, or 1 / gs for TensorRT), this gs
        record["input_global_scales"] = fp4
    return values, record


def _load(model_onnx: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(model_onnx), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises protobuf's and its own exception types
        raise LowbitError(f"{model_onnx}: cannot read it as ONNX ({str(e).splitlines()[0] if str(e) else e})") from None


def with_scales(model_onnx: Path, scales: dict[str, np.ndarray]) -> bytes:
    """The model file's bytes with the named (inline) scale initializers replaced."""
    model = _load(model_onnx)
    for tensor in model.graph.initializer:
        if tensor.name in scales:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                raise LowbitError(f"{model_onnx}: activation scale {tensor.name} is stored outside model.onnx")
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(scales[tensor.name]), tensor.name))
    return model.SerializeToString()


def replace_files(folder: Path, contents: dict[str, bytes]) -> None:
    """Write each file to a temporary one in `folder`, then move them over the old ones in order; on an error
    the files already moved get their old contents back (kept as hard links until the end), temporaries go."""
    temporaries, backups, done = {}, {}, []
    try:
        for name, data in contents.items():
            handle, path = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            temporaries[name] = Path(path)
            with os.fdopen(handle, "wb") as f:
                f.write(data)
            shutil.copymode(folder / name, temporaries[name])  # mkstemp's files are private (0600)
            backups[name] = temporaries[name].with_name(temporaries[name].name + ".old")  # unique: beside mkstemp's
            os.link(folder / name, backups[name])
        for name in contents:
            os.replace(temporaries[name], folder / name)
            del temporaries[name]
            done.append(name)
    except BaseException as e:
        for name in reversed(done):
            os.replace(backups.pop(name), folder / name)
        if isinstance(e, OSError):
            raise LowbitError(f"{folder}: cannot write the calibrated files ({e.strerror or e.__class__.__name__}); "
                              "the folder is unchanged") from None
        raise
    finally:
        for path in [*temporaries.values(), *backups.values()]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def context_length_of(folder: Path) -> int:
    try:
        return int(json.loads((folder / "genai_config.json").read_text())["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LowbitError(f"{folder}: no context length in genai_config.json (is this a lowbit folder?)") from None


def calibrate_folder(folder: str | Path, settings: CalibrationSettings = CalibrationSettings(),
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """`lowbit calibrate`: measure the activation scales of a `*_max_calibrate` folder (or recalibrate a folder
    with static activation scales) and rewrite them in place; the folder becomes the scheme it was made for.
    Returns lowbit.json's new calibration record. Raises LowbitError, the folder unchanged."""
    folder = Path(folder)
    meta_path = folder / "lowbit.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise LowbitError(f"{folder}: no readable lowbit.json (is this a `lowbit convert` output folder?)") from None
    record = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    if not isinstance(record, dict):
        raise LowbitError(f"{folder}: scheme {meta.get('scheme', '?') if isinstance(meta, dict) else '?'} has no "
                          "static activation scales; calibrate takes a *_max_calibrate output (e.g. "
                          "--scheme e4m3_e4m3_f16_max_calibrate)")
    model_onnx = folder / "model.onnx"
    scales, new_record = measure_scales(model_onnx, settings, folder, context_length_of(folder), progress)
    model_bytes = with_scales(model_onnx, scales)
    final = record.get("calibrated_scheme", meta["scheme"])
    meta[METADATA_KEY] = {**new_record, "calibrated_scheme": final,
                          "converted_as": record.get("converted_as", meta["scheme"]), "by": "lowbit calibrate"}
    meta["scheme"] = final
    replace_files(folder, {"model.onnx": model_bytes, "lowbit.json": json.dumps(meta, indent=2).encode()})
    return meta[METADATA_KEY]


def calibrate_staging(staging: Path, scheme, settings: CalibrationSettings, tokenizer_folder: Path,
                      context_length: int, progress: Callable[[str], object] | None = None) -> dict | None:
    """`lowbit convert`'s part: the record for lowbit.json of a static-activation scheme (scales measured and
    written into the staging folder's model.onnx for a one-shot scheme; placeholders kept for `*_max_calibrate`),
    None for other schemes."""
    if scheme.plan is None or not scheme.plan.static_activations():
        return None
    if not scheme.calibrates_at_conversion:
        return {"status": "placeholder", "placeholder_scale": ACTIVATION_SCALE_PLACEHOLDER,
                "calibrated_scheme": scheme.calibrated_name, "converted_as": scheme.name}
    model_onnx = staging / "model.onnx"
    scales, record = measure_scales(model_onnx, settings, tokenizer_folder, context_length,
                                    progress("activation scales") if progress else None)
    model_onnx.write_bytes(with_scales(model_onnx, scales))
    return {**record, "calibrated_scheme": scheme.name, "converted_as": scheme.name, "by": "lowbit convert"}


def imported_scales(staging: Path, scales: dict[str, float], scheme_name: str) -> dict:
    """`lowbit convert`'s part for a checkpoint that brings its own static activation scales (compressed-tensors
    `input_scale`): written into the staging folder's model.onnx as they are; the record for lowbit.json."""
    model_onnx = staging / "model.onnx"
    model = _load(model_onnx)
    sites = static_sites(model)
    missing = sorted(set(scales) - set(sites))
    if missing:
        raise LowbitError(f"no activation Q/DQ for the imported input scales of {', '.join(missing)}")
    dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer}
    values = {sites[module][0]: np.asarray(scale, dtypes[sites[module][0]]) for module, scale in scales.items()}
    model_onnx.write_bytes(with_scales(model_onnx, values))
    return {"status": "imported", "scales": {module: float(values[sites[module][0]]) for module in scales},
            "calibrated_scheme": scheme_name, "converted_as": scheme_name, "by": "the checkpoint's input_scale"}
