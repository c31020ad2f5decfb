"""Load-time fast paths: lowbit's own nodes rewritten into ONNX Runtime kernels when the runtime opens a folder.

`lowbit.MatMulBlockwise` (MLC's 3-bit groups of 40, any bits 2..8, float zero points) is an ONNX function of
standard ops, so ORT either unpacks the words on every call or constant-folds them into a float weight. Here,
before the session is created, each such node becomes `com.microsoft.MatMulNBits` over the same integer codes
and scales (custom_ops/blockwise_repack.py), plus, where groups are padded (40 -> 64 rows), a Gather of row
chunks that lays the activations out in the padded order, and, for float zero points, a small correction
`groupsum(x) @ ((z - c) * s)` subtracted from the product. The folder on disk is not changed; other runtimes
still run the function bodies.

NVFP4 weights on the ort target (converter format `nvfp4_unpack`: packed FP4 codes, FP8 block scales and a global
scale unpacked by standard ops) have no ORT kernel; ORT folds the unpack graph into the float weight at load, and
its folding holds several full-size intermediates at once (int64 indices among them: 3 GB peak for a 540 MB float
model). Here each such MatMul instead runs, where the kernel library exists and K is a multiple of 16, on
`lowbit.cpu.MatMulInt4Int8` over the e2m1 codes as integers (W4A4, whose NVFP4 activations make each block's
product an exact integer dot; weight-only layers at accuracy level 4, with int8 activations) or on
`lowbit.cpu.MatMulNarrowFloat` over the codes and the blocks' float32 steps (weight-only at level 0: float32
compute), else reads its float32 weight, dequantized in numpy one layer at a time (`lowbit.nvfp4.dequantize`, bit
for bit what the folding computes); the unpack nodes go either way.

How: the graph is read without its weights (`onnx.load(..., load_external_data=False)`); the packed tensors are
read one layer at a time through memory maps of the folder's external data, repacked, and written to a data
file in a temporary folder, which also holds (hard-linked, or copied when linking fails) the folder's other
external data. ORT loads the edited graph from bytes with `session.model_external_initializers_file_folder_path`
set to that folder, so it loads, prepacks and releases the new weights exactly as it does a folder's own
(peak memory: ORT's packed weights plus about one layer). The temporary folder is removed once the session
exists.

On CPUs with AVX2 and a C compiler, MatMuls at int8 compute (2/4/8-bit MatMulNBits at accuracy level 4;
MatMulBlockwise of 2-4 or 8 bits, MLC's groups of 40 included, unpadded, float zero points too) run instead on
lowbit's own kernels, `lowbit.cpu.MatMulInt4Int8` (codes of 4 bits or fewer, custom_ops/matmul_int4_int8.py) and
`lowbit.cpu.MatMulInt8Int8` (8-bit codes, custom_ops/matmul_int8_int8.py), compiled on first use (custom_ops/kernels/)
and registered with the session; their weights are the same codes, scales and zero points in the kernel's tile
order, written here like the others. `LOWBIT_KERNELS=0` keeps ONNX Runtime's kernels (the rewrites above).
A prompt session (`accuracy_level`) does not use it.

Float32 `com.microsoft.GroupQueryAttention` nodes run, where the kernel library exists, on
`lowbit.cpu.GroupQueryAttention` (runtime/attention_kernel.py): the same node in lowbit's domain.

Each node's accuracy level is the one `lowbit.json` records for its layer (`--accuracy-level` at conversion:
4 = int8 activations, also when lowbit.json says nothing; 0 keeps float compute). `LOWBIT_FAST_PATH=0` turns
the rewrite off (the function bodies run, as in any ONNX Runtime); it applies to the CPU provider only. A node
the rewrite cannot take keeps its function body, and the runtime says so on stderr, as it says once how many
nodes took the fast path.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lowbit.runtime import attention_kernel, float32_compute, narrow_float_weights

ENV_SWITCH = "LOWBIT_FAST_PATH"
DEFAULT_ACCURACY_LEVEL = 4  # what the converter records by default (int8 activations)
PROMPT_ACCURACY_LEVEL = 1  # a prompt session's MatMulNBits: float32 compute (runtime/session.py, PROMPT_MIN_TOKENS)
MATMUL_OP = ("lowbit", "MatMulBlockwise")  # schema in custom_ops/blockwise.py (not imported here: it needs onnx_ir)
FLOAT_TYPES = {1: np.float32, 10: np.float16}  # TensorProto FLOAT, FLOAT16: what MatMulNBits' CPU kernel takes
DATA_FILE = "fast_path.data"
NARROW_DATA_FILE = "narrow_float.data"  # the weights of lowbit.cpu.MatMulNarrowFloat (runtime/narrow_float_weights.py)
ALIGN = 4096  # offsets in the data file: page-aligned, so ORT can map each tensor


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def has_blockwise_matmul(model_dir: Path, metadata: dict | None) -> bool:
    """Cheap check before importing onnx: lowbit.json says whether any layer is blockwise; if one is (or there is
    no lowbit.json), the graph file (weights are external) names the op when a MatMul uses it."""
    if metadata is not None and "quantization" in metadata:
        if not any(layer.get("format") == "blockwise" for layer in metadata["quantization"].values()):
            return False
    return MATMUL_OP[1].encode() in (model_dir / "model.onnx").read_bytes()


NVFP4_FORMATS = ("nvfp4_unpack", "nvfp4_a4_unpack")  # converter formats whose MatMul weight is an unpack graph


def nvfp4_layers(metadata: dict | None) -> dict[str, int]:
    """{module: K} of the folder's NVFP4 layers that the load-time dequantization takes (float32 models)."""
    if (metadata or {}).get("dtype") != "float32":
        return {}
    return {name: int(layer["shape"][1]) for name, layer in metadata.get("quantization", {}).items()
            if layer.get("format") in NVFP4_FORMATS and len(layer.get("shape") or ()) == 2}


KERNEL_QUANT = re.compile(r"^[2348]-bit ")  # lowbit.json "quant" of the layers lowbit's int8 kernels can run
UINT8_ACTIVATION_FORMATS = ("dynamic_quantize_matmul", "qdq_uint8")  # w8a8's and w8a8-static's layers


def has_int8_kernel_matmuls(metadata: dict | None) -> bool:
    """lowbit.json lists a MatMulNBits or blockwise layer of 2, 3, 4 or 8 bits at int8 compute (accuracy level 4),
    or a w8a8 / w8a8-static one (uint8 activations), which lowbit's int8 CPU kernels run; True without lowbit.json
    (the rewrite looks at the graph itself)."""
    if metadata is None or "quantization" not in metadata:
        return True
    return any(layer.get("format") in UINT8_ACTIVATION_FORMATS
               or (layer.get("format") in ("matmulnbits", "blockwise")
                   and KERNEL_QUANT.match(str(layer.get("quant", "")))
                   and int(layer.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)) == 4)
               for layer in metadata["quantization"].values())


def int8_kernel_library(report: bool) -> Path | None:
    """The compiled library of lowbit.cpu.MatMulInt4Int8 and MatMulInt8Int8 (custom_ops/kernels), or None;
    `report`: say on stderr why not, unless it was switched off."""
    from lowbit.custom_ops import kernels

    library = kernels.library()
    if library is None and report and kernels.enabled():
        print(f"lowbit: the int8 CPU kernel is not available ({kernels.unavailable()}): ONNX Runtime's MatMulNBits "
              "run instead", file=sys.stderr)
    return library


VNNI_SWITCH = "LOWBIT_KERNELS_VNNI"


def vnni_layout() -> bool:
    """Whether the int8 kernel's weights take the VNNI layout (fours of rows a 32-bit lane), where the group size
    allows it: unless `LOWBIT_KERNELS_VNNI` is 0. On AVX512-VNNI CPUs the kernel runs it on `vpdpbusd`, on others
    on `vpmaddubsw` with 32-bit activation broadcasts, faster there than the AVX2 layout too (docs/targets.md). The
    results are the same either way."""
    return os.environ.get(VNNI_SWITCH, "1") != "0"


def has_2bit_matmul_nbits(metadata: dict | None) -> bool:
    """lowbit.json lists a 2-bit MatMulNBits layer (folders without lowbit.json are left as they are)."""
    layers = (metadata or {}).get("quantization", {}).values()
    return any(layer.get("format") == "matmulnbits" and str(layer.get("quant", "")).startswith("2-bit")
               for layer in layers)


def accuracy_levels(metadata: dict | None) -> dict[str, int]:
    layers = (metadata or {}).get("quantization", {})
    return {name: int(layer.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)) for name, layer in layers.items()}


PROMPT_SESSION_QUANT = re.compile(r"^4-bit g\d+ symmetric")  # lowbit.json "quant" of the layers it pays for


def prompt_accuracy_level(metadata: dict | None, vnni: bool | None = None,
                          int8_kernel: bool | None = None) -> int | None:
    """The accuracy level a prompt session should give the folder's MatMulNBits nodes: float32 compute
    (PROMPT_ACCURACY_LEVEL) where some symmetric 4-bit grouped MatMulNBits layer computes with int8 activations
    (level 4) on ONNX Runtime's kernel (`int8_kernel`: lowbit's int8 kernel runs them instead; default: whether it
    can here) on a CPU without VNNI (`vnni`; default: what this CPU has), where ORT's int8 kernels are the slower
    ones from about 32 rows on (docs/targets.md#prompts-float32-matmulnbits); None otherwise. Only there does ORT
    pack the float32 kernel's weights at about their 4-bit size (SmolLM2-135M w4a16: peak RSS +67 to +112 MB);
    with zero points, 8 bits, per-channel scales or repacked 2/3-bit layers it took +100 to +307 MB for 13-18%
    faster prompts, so those folders keep one session. With VNNI, or with lowbit's int8 kernel, the int8 path
    prefills faster than any prompt session measured, so there is none."""
    from lowbit.custom_ops import kernels

    if vnni is None:
        vnni = kernels.cpu_has_vnni()
    if int8_kernel is None:  # as inference_session decides: the fast paths on and the kernel library built
        int8_kernel = enabled() and kernels.library() is not None
    if vnni or int8_kernel:
        return None
    for layer in (metadata or {}).get("quantization", {}).values():
        if layer.get("format") == "matmulnbits" and PROMPT_SESSION_QUANT.match(str(layer.get("quant", ""))) \
                and int(layer.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)) == 4:
            return PROMPT_ACCURACY_LEVEL
    return None


def set_accuracy_level(graph, level: int) -> int:
    """Every com.microsoft.MatMulNBits node of `graph` at `level`; returns how many there are."""
    from onnx import helper

    count = 0
    for node in graph.node:
        if (node.domain, node.op_type) == ("com.microsoft", "MatMulNBits"):
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
            count += 1
    return count


def inference_session(model_dir: Path, options, providers: list[str], metadata: dict | None,
                      accuracy_level: int | None = None, shares_kv_buffer: bool = False):
    """`onnxruntime.InferenceSession` over the folder, with the fast paths applied where they can be;
    `metadata`: the folder's lowbit.json (None without one). `accuracy_level`: every MatMulNBits node (the
    folder's own and those the fast paths make) at that level instead (a prompt session); `shares_kv_buffer`:
    genai_config.json's `past_present_share_buffer` (the graph's attention is GroupQueryAttention); the folder's
    files are not changed. Only the session without `accuracy_level` reports on stderr."""
    import onnxruntime as ort

    from lowbit.custom_ops import kernels

    model_path = model_dir / "model.onnx"
    blockwise = has_blockwise_matmul(model_dir, metadata)
    nvfp4 = nvfp4_layers(metadata)
    rewrite = blockwise or has_2bit_matmul_nbits(metadata) or bool(nvfp4)
    off = None if enabled() else f"{ENV_SWITCH}=0"
    if providers[0] != "CPUExecutionProvider":
        off = "the fast path is for the CPU provider"
    report = accuracy_level is None
    if blockwise and off is not None and report:
        print(f"lowbit: lowbit.MatMulBlockwise nodes run as their ONNX function bodies ({off})", file=sys.stderr)
    # a prompt session (accuracy_level) keeps ORT's float compute
    kernel = int8_kernel_library(report) \
        if off is None and accuracy_level is None and has_int8_kernel_matmuls(metadata) else None
    rewrite = rewrite or kernel is not None
    widen = float32_compute.applies(metadata, providers[0])  # a float16 graph computed in float32
    narrow = off is None and narrow_float_weights.kernel_applies(metadata) and kernels.library() is not None
    attend = off is None and attention_kernel.kernel_applies(shares_kv_buffer, metadata) \
        and kernels.library() is not None
    if (not rewrite or off is not None) and accuracy_level is None and not widen and not narrow and not attend:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    session, widened, narrowed, attention = None, False, narrow_float_weights.NarrowFloatResult(), []
    try:
        with tempfile.TemporaryDirectory(prefix="lowbit-fast-path-", ignore_cleanup_errors=True) as folder:
            result = RewriteResult()
            if rewrite and off is None:
                result = rewrite_blockwise(model, model_dir, accuracy_levels(metadata), Path(folder), nvfp4,
                                           int8_kernel=kernel is not None,
                                           fp4_kernel=accuracy_level is None and kernels.library() is not None)
            if accuracy_level is not None:
                set_accuracy_level(model.graph, accuracy_level)
            widened = widen and float32_compute.to_float32(model)
            if narrow:
                narrowed = _rewrite_narrow_float(model, Path(folder) if result.changed else model_dir, Path(folder))
            if attend:
                attention = attention_kernel.rewrite(model.graph)
                if attention:
                    _import_domain(model, "lowbit.cpu")
            if result.kernel or result.fp4_kernel or result.fp4_integer or narrowed.changed or attention:
                options.register_custom_ops_library(str(kernels.library()))
            if result.changed or accuracy_level is not None or widened or narrowed.changed or attention:
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 folder if result.changed or narrowed.changed else str(model_dir))
                session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except OSError as e:  # no temporary space: every node keeps its function body
        widened, narrowed, attention = False, narrow_float_weights.NarrowFloatResult(), []
        result = RewriteResult(fallback=[("all lowbit.MatMulBlockwise nodes", f"no temporary folder: {e}")])
    if session is None:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    for line in result.messages() + [narrowed.message()] if report else []:
        if line:
            print(f"lowbit: {line}", file=sys.stderr)
    if widened and report:
        print(f"lowbit: the float16 graph computes in float32 on the CPU ({float32_compute.ENV_SWITCH}=0 keeps "
              "float16)", file=sys.stderr)
    return session


def _rewrite_narrow_float(model, data_dir: Path, folder: Path) -> narrow_float_weights.NarrowFloatResult:
    """runtime/narrow_float_weights.py on `model`, reading its external data from `data_dir` (the folder, or the
    temporary `folder` where rewrite_blockwise moved it) and writing the kernel's weights into `folder`."""
    graph = model.graph
    reader = _TensorReader(data_dir, graph)
    data = _DataFile(folder, NARROW_DATA_FILE)
    writer = _GraphWriter(data, {}, prefix="lowbit_narrow")
    try:
        result = narrow_float_weights.rewrite(model, reader, writer)
        if not result.changed:
            return result
        _replace_nodes(graph, writer)
        if data_dir != folder:
            data.take_over(graph, reader)
        _import_domain(model, "lowbit.cpu")
        return result
    finally:
        data.close()


def _import_domain(model, domain: str) -> None:
    """Version 1 of `domain` among the model's opset imports, where the rewrite put its first node of it."""
    from onnx import helper

    if not any(op.domain == domain for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))


@dataclass
class RewriteResult:
    fast: list[str] = field(default_factory=list)  # nodes now running as MatMulNBits
    fallback: list[tuple[str, str]] = field(default_factory=list)  # (node, why it kept its function body)
    widened: list[str] = field(default_factory=list)  # 2-bit MatMulNBits nodes now running as 4-bit
    dequantized: list[str] = field(default_factory=list)  # NVFP4 MatMuls now reading a float weight
    fp4_kernel: list[str] = field(default_factory=list)  # NVFP4 MatMuls now on lowbit.cpu.MatMulNarrowFloat
    fp4_integer: list[str] = field(default_factory=list)  # NVFP4 MatMuls now on lowbit.cpu.MatMulInt4Int8
    kernel: list[str] = field(default_factory=list)  # nodes now running on lowbit's int8 kernels
    kernel_ops: set[str] = field(default_factory=set)  # which: lowbit.cpu.MatMulInt4Int8, MatMulInt8Int8

    @property
    def changed(self) -> bool:
        return bool(self.fast or self.widened or self.dequantized or self.kernel or self.fp4_kernel or self.fp4_integer)

    def messages(self) -> list[str]:
        lines = []
        if self.kernel:
            ops = " and ".join(f"lowbit.cpu.{op}" for op in sorted(self.kernel_ops))
            lines.append(f"{len(self.kernel)} quantized MatMuls run on lowbit's int8 CPU kernel ({ops})")
        if self.fast:
            lines.append(f"{len(self.fast)} lowbit.MatMulBlockwise nodes run as MatMulNBits (repacked at load)")
        if self.widened:
            lines.append(f"{len(self.widened)} 2-bit MatMulNBits nodes run as 4-bit (the same weights, widened at "
                         "load: ORT's 4-bit kernel is the faster one)")
        if self.dequantized:
            lines.append(f"{len(self.dequantized)} NVFP4 weights dequantized to float32 at load, one layer at a time")
        if self.fp4_kernel:
            lines.append(f"{len(self.fp4_kernel)} NVFP4 weights run at 4 bits on lowbit.cpu.MatMulNarrowFloat")
        if self.fp4_integer:
            lines.append(f"{len(self.fp4_integer)} NVFP4 MatMuls run as integer block products on "
                         "lowbit.cpu.MatMulInt4Int8 (e2m1 codes at 4 bits)")
        lines += [f"{name} runs as its ONNX function body ({why})" for name, why in self.fallback]
        return lines


# ------------------------------------------------------------------------------ tensors in and out


class _TensorReader:
    """Initializers of a graph loaded without external data, read through memory maps of the external files
    (one per tensor, released with the array: only the layer being repacked is mapped)."""

    def __init__(self, model_dir: Path, graph):
        self.model_dir = model_dir
        self.protos = {t.name: t for t in graph.initializer}

    def has(self, name: str) -> bool:
        return name in self.protos

    def read(self, name: str) -> np.ndarray:
        from onnx import TensorProto, helper, numpy_helper

        proto = self.protos[name]
        if proto.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(proto)
        info = {entry.key: entry.value for entry in proto.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(proto.data_type))
        shape = tuple(proto.dims)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if int(info.get("length", size)) != size:
            raise ValueError(f"{name}: external data length {info['length']} is not {size} bytes ({shape} {dtype})")
        path = (self.model_dir / info["location"]).resolve()
        if not path.is_relative_to(self.model_dir.resolve()):  # as ORT: external data lives inside the folder
            raise ValueError(f"{name}: external data {info['location']!r} lies outside {self.model_dir}")
        if size == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape)


class _DataFile:
    """External data written to the temporary folder: new arrays, and the folder's own data ORT still needs."""

    def __init__(self, folder: Path, name: str = DATA_FILE):
        self.folder = folder
        self.name = name
        self.file = open(folder / name, "wb")

    def close(self) -> None:
        self.file.close()

    def write(self, array: np.ndarray) -> tuple[int, int]:
        """Appends the array's bytes at the next aligned offset: (offset, length)."""
        offset = -(-self.file.tell() // ALIGN) * ALIGN
        self.file.seek(offset)
        data = np.ascontiguousarray(array)
        self.file.write(memoryview(data.reshape(-1).view(np.uint8)) if data.size else b"")  # any dtype, bfloat16 too
        return offset, data.nbytes

    def tensor(self, name: str, array: np.ndarray):
        from onnx import TensorProto, helper

        offset, length = self.write(array)
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                            data_location=TensorProto.EXTERNAL)
        _set_location(proto, self.name, offset, length)
        return proto

    def take_over(self, graph, reader: _TensorReader) -> None:
        """Makes the graph's remaining external tensors readable from the temporary folder: their files hard-linked
        into it, or, across file systems, their bytes copied into the data file."""
        from onnx import TensorProto

        linked: dict[str, bool] = {}
        for proto in graph.initializer:
            if proto.data_location != TensorProto.EXTERNAL or proto.name not in reader.protos:
                continue
            location = {entry.key: entry.value for entry in proto.external_data}["location"]
            if location not in linked:
                target = self.folder / location
                try:
                    if location in (DATA_FILE, NARROW_DATA_FILE) or Path(location).name != location:
                        raise OSError("not a plain file name")
                    os.link(reader.model_dir / location, target)
                    linked[location] = True
                except OSError:
                    linked[location] = False
            if not linked[location]:
                offset, length = self.write(reader.read(proto.name))
                _set_location(proto, self.name, offset, length)


def _set_location(proto, location: str, offset: int, length: int) -> None:
    del proto.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _why_not(node, reader: _TensorReader) -> str | None:
    """Why a MatMulBlockwise node cannot run as MatMulNBits (None: it can)."""
    attrs = _attributes(node)
    if len(node.input) != 4 or not all(reader.has(name) for name in node.input[1:]):
        return "its words, scales and zero points are not all initializers"
    bits, group, k = attrs.get("bits"), attrs.get("group_size"), attrs.get("K")
    if not (isinstance(bits, int) and 2 <= bits <= 8 and isinstance(group, int) and group >= 1 and isinstance(k, int)):
        return f"attributes bits={bits} group_size={group} K={k} are out of range"
    words, scales, zeros = (reader.protos[name] for name in node.input[1:])
    if scales.data_type not in FLOAT_TYPES or zeros.data_type != scales.data_type:
        return "MatMulNBits takes float32 or float16 scales and activations"
    if len(words.dims) != 2 or len(scales.dims) != 2 or list(zeros.dims) not in (list(scales.dims), [1, 1]):
        return "unexpected tensor shapes"
    n, groups = scales.dims
    if words.dims[0] != n or not (groups - 1) * group < k <= groups * group \
            or words.dims[1] * (32 // bits) < groups * group:
        return "tensor shapes disagree with the attributes"
    return None


NVFP4_INTEGER_SWITCH = "LOWBIT_NVFP4_INTEGER"  # "0": NVFP4 on MatMulNarrowFloat, float32 compute (not MatMulInt4Int8)


def _dequantize_nvfp4(node, reader: _TensorReader, writer, layers: dict[str, int], fp4_kernel: bool = False,
                      producers: dict | None = None, levels: dict[str, int] | None = None) -> str:
    """A MatMul of an NVFP4 layer (`layers`: module -> K) reading the unpack graph's weight becomes, with
    `fp4_kernel` and K a multiple of 16, `lowbit.cpu.MatMulNarrowFloat` over the e2m1 codes and the blocks' float32
    steps s / gs (the same float32 weight, 4.5 bits a weight in memory; returns "kernel"), else the MatMul over that
    weight, float32 [K, N], dequantized here (`lowbit.nvfp4`; returns "float32"), appended to `writer`; "" leaves
    the node to the caller. The unpack nodes are left without a reader (`_prune` removes them). Where a
    `lowbit.NVFP4ActivationQDQ` produces the MatMul's input (`producers`: value -> node; W4A4), the pair becomes
    `lowbit.cpu.MatMulInt4Int8` with NVFP4 activations instead (custom_ops/matmul_int4_int8.py, `from_nvfp4`: each
    block's exact integer product, the e2m1 codes kept at 4 bits; returns "integer"); a weight-only layer at
    accuracy level 4 (`levels`: module -> level) runs there too, with int8 activations per block of 16 (int8
    compute, as MatMulNBits' level 4). `LOWBIT_NVFP4_INTEGER=0` keeps both on MatMulNarrowFloat: W4A4 with the
    activations' fake quantization inside it (input_type 23, its global scale as input_scale: the function body's
    bits), weight-only layers in float32."""
    from onnx import TensorProto, helper

    from lowbit import nvfp4

    if node.op_type != "MatMul" or node.domain or node.name not in layers:
        return ""
    packed, scales, gs = (f"{node.name}.{part}" for part in ("qweight", "scales", "global_scale"))
    if not all(reader.has(name) for name in (packed, scales, gs)) \
            or reader.protos[scales].data_type != TensorProto.FLOAT8E4M3FN:
        return ""
    k = layers[node.name]
    if fp4_kernel and k % nvfp4.GROUP == 0:
        from lowbit.custom_ops import matmul_narrow_float as op
        from lowbit.custom_ops import nvfp4 as nvfp4_op

        codes = nvfp4.unpack(reader.read(packed))[:, :k]
        steps = (np.asarray(reader.read(scales)).astype(np.float32) / np.float32(reader.read(gs)))[:, :k // nvfp4.GROUP]
        qdq = (producers or {}).get(node.input[0])
        fused = qdq is not None and (qdq.domain, qdq.op_type) == (nvfp4_op.DOMAIN, nvfp4_op.ACTIVATION_OP) \
            and reader.has(qdq.input[1])
        gs_in = np.asarray(reader.read(qdq.input[1]), np.float32).reshape(1) if fused else None
        int8_compute = not fused and (levels or {}).get(node.name) == 4
        if (fused or int8_compute) and os.environ.get(NVFP4_INTEGER_SWITCH, "1") != "0":
            from lowbit.custom_ops import matmul_int4_int8

            # W4A4: both operands are e2m1 values times a step per block of 16, so each block's product is an
            # integer dot (twice the values, -12..12) times the two half steps, on the int8 kernel; weight-only at
            # level 4: the same weights times int8 activations per block
            weight = matmul_int4_int8.from_nvfp4(codes, steps)
            del codes
            inputs = [qdq.input[0] if fused else node.input[0], writer.array("B", weight.b),
                      writer.array("scales", weight.scales), writer.array("zero_points", weight.zero_points)]
            writer.node(matmul_int4_int8.OP_TYPE, inputs + ([writer.array("input_scale", gs_in)] if fused else []),
                        "nvfp4_w4a4" if fused else "nvfp4_int8", domain=matmul_int4_int8.DOMAIN,
                        output=node.output[0], K=k, N=weight.n, group_size=nvfp4.GROUP, layout=weight.layout,
                        e2m1=1, activation=int(fused))
            return "integer"
        weight = op.pack_e2m1(codes, steps)
        inputs = [node.input[0], writer.array("B", weight.b), writer.array("steps", weight.scales)]
        attrs = {}
        if fused:
            inputs = [qdq.input[0], *inputs[1:], writer.array("input_scale", gs_in)]
            attrs["input_type"] = op.FLOAT4E2M1
        writer.node(op.OP_TYPE, inputs, "nvfp4", domain=op.DOMAIN, output=node.output[0], K=k, N=weight.n,
                    weight_type=op.FLOAT4E2M1, **attrs)
        return "kernel"
    weight = nvfp4.dequantize(nvfp4.unpack(reader.read(packed)), reader.read(scales), np.float32(reader.read(gs)))
    inputs = [node.input[0], writer.array("weight", np.ascontiguousarray(weight[:, :k].T))]
    del weight
    writer.nodes.append(helper.make_node("MatMul", inputs, list(node.output), name=node.name))
    return "float32"


def _uint8_columns(b, scales, zero_points):
    """A uint8 weight B [K, N] with per-column (or one) scales and zero points, as `_to_int8_kernel` takes it for
    one group over K: (K, N, group, bits, scales [1, N], zero points [1, N], read_codes)."""
    k, n = b.shape

    def read_codes(start, stop):
        return np.asarray(b[:, start:stop]).T

    return (k, n, k, 8, np.broadcast_to(np.asarray(scales, np.float32).reshape(-1), (n,))[None],
            np.broadcast_to(np.asarray(zero_points, np.uint8).reshape(-1), (n,))[None], read_codes)


def _uint8_qdq_matmul(node, reader: _TensorReader, producers: dict):
    """MatMul(DequantizeLinear(QuantizeLinear(x, s, z), s, z), DequantizeLinear(B, S, Z, axis=1)) with s float and z
    uint8 one initializer value each, B uint8 [K, N], S float and Z uint8 [N] or one value, all initializers ->
    (x, s float32 [1], z, B, S, Z), else None."""
    from onnx import TensorProto

    if node.op_type != "MatMul" or node.domain:
        return None
    dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
    q_x = producers.get(dq_x.input[0]) if dq_x is not None and dq_x.op_type == "DequantizeLinear" else None
    plain = all(p is not None and not p.domain and len(p.input) == 3 and p.input[2]
                and not {a.name for a in p.attribute} - {"axis"} for p in (dq_x, dq_w, q_x))
    if not plain or q_x.op_type != "QuantizeLinear" or list(q_x.input[1:]) != list(dq_x.input[1:]) \
            or dq_w.op_type != "DequantizeLinear" \
            or not all(reader.has(name) for name in [*q_x.input[1:], *dq_w.input]):
        return None
    types = [reader.protos[name].data_type for name in (*q_x.input[1:], *dq_w.input)]
    if types != [TensorProto.FLOAT, TensorProto.UINT8, TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8]:
        return None
    a_scale, a_zero = (np.asarray(reader.read(name)) for name in q_x.input[1:])
    b, w_scales, w_zeros = (np.asarray(reader.read(name)) if i else reader.read(name)
                            for i, name in enumerate(dq_w.input))
    axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
    if a_scale.size != 1 or a_zero.size != 1 or b.ndim != 2 or w_scales.size != w_zeros.size \
            or (w_scales.size != 1 and (w_scales.shape != (b.shape[1],) or axis not in (1, -1))):
        return None
    return (q_x.input[0], a_scale.astype(np.float32).reshape(1), int(a_zero.reshape(-1)[0]), b,
            w_scales.astype(np.float32), w_zeros.astype(np.uint8))


def _replace_nodes(graph, writer) -> None:
    """The graph's nodes become the writer's, pruned; its initializers, those still read plus the writer's."""
    del graph.node[:]
    graph.node.extend(writer.nodes)
    _prune(graph)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + writer.initializers)


def _prune(graph) -> None:
    """Removes the nodes whose outputs nothing reads (the graph's outputs count as read), repeatedly."""
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        kept = [n for n in graph.node if any(out in used for out in n.output if out)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


def _widen_2bit(node, reader: _TensorReader, writer) -> bool:
    """A 2-bit com.microsoft.MatMulNBits node with initializer weights becomes the 4-bit node over the same weights
    (`matmul_nbits.widen`), appended to `writer`; False leaves the node to the caller."""
    from onnx import helper

    from lowbit.custom_ops import matmul_nbits

    if (node.domain, node.op_type) != (matmul_nbits.DOMAIN, "MatMulNBits"):
        return False
    attrs = _attributes(node)
    inputs = list(node.input)
    has_zp = len(inputs) > 3 and inputs[3] != ""
    if attrs.get("bits") != 2 or not all(reader.has(name) for name in inputs[1:3] + inputs[3:4] * has_zp):
        return False
    arrays = matmul_nbits.MatMulNBitsArrays(
        reader.read(inputs[1]), reader.read(inputs[2]), reader.read(inputs[3]) if has_zp else None,
        attrs["K"], attrs["N"], 2, attrs["block_size"])
    if arrays.b.ndim != 3 or arrays.b.shape[0] != arrays.n or arrays.b.shape[2] * 4 != arrays.block_size:
        return False
    wide = matmul_nbits.widen(arrays)
    inputs[1] = writer.array("B", wide.b)
    if has_zp:
        inputs[3] = writer.array("zero_points", wide.zero_points)
    attrs["bits"] = 4
    writer.nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name,
                                         domain=matmul_nbits.DOMAIN, **attrs))
    return True


def _to_int8_kernel(node, reader: _TensorReader, writer, levels: dict[str, int],
                    producers: dict | None = None) -> str:
    """A com.microsoft.MatMulNBits node of 2, 4 or 8 bits at accuracy level 4, or a lowbit.MatMulBlockwise node of
    2-4 or 8 bits, whose weights are initializers, becomes `lowbit.cpu.MatMulInt4Int8` (8 bits: `MatMulInt8Int8`)
    over the same codes, scales and zero points (custom_ops/matmul_int4_int8.py, matmul_int8_int8.py), appended to
    `writer` (float16 activations through Casts): returns the op type, or "" leaving the node to the caller. Float
    zero points z (`a16w8-minmax`) go to the kernel as they are (float_zero_points 1: each group's term
    (float(dot) - z * float(xsum)) * (s * sx), int8 compute of (q - z) * s).
    A com.microsoft.DynamicQuantizeMatMul (w8a8: uint8 weights [K, N], per-column or one scale and zero point, no
    bias; K even, as the kernel's groups) becomes `MatMulInt8Int8` with one group over K and activation 2 (uint8
    activations per tensor as DynamicQuantizeLinear makes them): ORT's own result bit for bit. So does a MatMul of
    QuantizeLinear -> DequantizeLinear activations (uint8, one initializer scale and zero point) and
    DequantizeLinear weights (uint8 initializers [K, N], per column or one; `producers`: value -> node),
    w8a8-static's form, with activation 3 (the same quantization as the Q node; ORT fuses the pattern into an
    integer MatMul with the same result)."""
    from onnx import TensorProto, helper

    from lowbit.custom_ops import blockwise_repack, matmul_int4_int8, matmul_int8_int8, matmul_nbits
    from lowbit.custom_ops.bitpack import unpack_bytes, unpack_words

    inputs = [name for name in node.input]
    attrs = _attributes(node)
    float_zero_points = None  # [groups, N] float32
    input_scale = None  # activation 3: input 4
    attributes = {}
    if (node.domain, node.op_type) == (matmul_nbits.DOMAIN, "DynamicQuantizeMatMul"):
        has_zp = len(inputs) > 3 and inputs[3] != ""
        if any(inputs[4:]) or not all(reader.has(name) for name in inputs[1:3] + inputs[3:4] * has_zp) \
                or reader.protos[inputs[1]].data_type != TensorProto.UINT8:
            return ""
        b, dtype = reader.read(inputs[1]), reader.protos[inputs[2]].data_type
        if b.ndim != 2:
            return ""
        weight_zeros = np.asarray(reader.read(inputs[3]), np.uint8) if has_zp else np.zeros(1, np.uint8)
        k, n, group, bits, scales, zero_points, read_codes = _uint8_columns(b, reader.read(inputs[2]), weight_zeros)
        attributes = {"activation": 2}
    elif (static := _uint8_qdq_matmul(node, reader, producers or {})) is not None:
        x_in, input_scale, a_zero, b, w_scales, w_zeros = static
        k, n, group, bits, scales, zero_points, read_codes = _uint8_columns(b, w_scales, w_zeros)
        inputs, dtype = [x_in, *inputs[1:]], TensorProto.FLOAT
        attributes = {"activation": 3, "input_zero_point": a_zero}
    elif (node.domain, node.op_type) == (matmul_nbits.DOMAIN, "MatMulNBits"):
        bits, k, n, group = attrs.get("bits"), attrs.get("K"), attrs.get("N"), attrs.get("block_size")
        has_zp = len(inputs) > 3 and inputs[3] != ""
        if bits not in (2, 4, 8) or attrs.get("accuracy_level", 0) != 4 or any(inputs[4:]) \
                or not all(reader.has(name) for name in inputs[1:3] + inputs[3:4] * has_zp):
            return ""
        b = reader.read(inputs[1])
        blocks = -(-k // group)
        if b.shape != (n, blocks, group * bits // 8):
            return ""
        dtype = reader.protos[inputs[2]].data_type
        scales = np.asarray(reader.read(inputs[2]), np.float32).reshape(n, blocks).T
        zero_points = 2 ** (bits - 1)
        if has_zp:
            zero_points = unpack_bytes(np.asarray(reader.read(inputs[3])).reshape(n, -1), bits, blocks).T

        def read_codes(start, stop):
            return unpack_bytes(np.asarray(b[start:stop]).reshape(stop - start, -1), bits, blocks * group)
    elif (node.domain, node.op_type) == MATMUL_OP and _why_not(node, reader) is None \
            and (attrs["bits"] <= 4 or attrs["bits"] == 8) and levels.get(node.name, DEFAULT_ACCURACY_LEVEL) == 4:
        bits, k, group = attrs["bits"], attrs["K"], attrs["group_size"]
        words = reader.read(inputs[1])
        dtype = reader.protos[inputs[2]].data_type
        scales = np.asarray(reader.read(inputs[2]), np.float32).T  # [groups, N]
        n, groups = scales.T.shape
        zeros = np.asarray(reader.read(inputs[3]))
        if blockwise_repack.has_integer_zero_points(zeros, bits):
            zero_points = np.broadcast_to(zeros.astype(np.float32).astype(np.uint8), (n, groups)).T
        else:
            zero_points, float_zero_points = 0, np.broadcast_to(zeros.astype(np.float32), (n, groups)).T

        def read_codes(start, stop):
            return unpack_words(np.asarray(words[start:stop]), bits, groups * group)
    else:
        return ""
    if dtype not in FLOAT_TYPES:
        return ""
    if bits == 8:
        if not matmul_int8_int8.supports(group):
            return ""
        op = matmul_int8_int8
        weight = matmul_int8_int8.pack_rows(read_codes, n, k, scales, zero_points, group)
    else:
        if not matmul_int4_int8.supports(group):
            return ""
        op = matmul_int4_int8
        layout = matmul_int4_int8.VNNI if vnni_layout() and matmul_int4_int8.supports(group, matmul_int4_int8.VNNI) \
            else matmul_int4_int8.AVX2
        weight = matmul_int4_int8.pack_rows(read_codes, n, k, scales, zero_points, group, layout=layout)
        attributes = {"layout": layout} if layout != matmul_int4_int8.AVX2 else {}
        if bits < 4:  # fewer int16 flushes (custom_ops/kernels/matmul_int4_int8.c, octets_per_flush)
            attributes["max_code"] = 2**bits - 1
    x, y = inputs[0], node.output[0]
    if dtype != TensorProto.FLOAT:
        x = writer.shared.get(("float32", x)) or writer.node("Cast", [x], "to_float32", to=TensorProto.FLOAT)
        writer.shared[("float32", inputs[0])] = x
    optional = [] if input_scale is None else [writer.array("input_scale", input_scale)]
    if float_zero_points is not None:
        weight = matmul_int4_int8.with_float_zero_points(weight, float_zero_points)
        optional = [optional[0] if optional else "", writer.array("float_zero_points", weight.float_zero_points)]
        attributes["float_zero_points"] = 1
    product = writer.node(
        op.OP_TYPE,
        [x, writer.array("B", weight.b), writer.array("scales", weight.scales),
         writer.array("zero_points", weight.zero_points), *optional],
        "int8_kernel", domain=op.DOMAIN, output=y if dtype == TensorProto.FLOAT else None, K=k, N=n,
        group_size=group, **attributes)
    if dtype != TensorProto.FLOAT:
        writer.nodes.append(helper.make_node("Cast", [product], [y], name=writer.name("to_input_type"), to=dtype))
    return op.OP_TYPE


# ------------------------------------------------------------------------------ ranks

# Ops whose output has the rank of the broadcast of their inputs (elementwise) or of their first input.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater", "And", "Or",
                "Sigmoid", "Tanh", "Relu", "Gelu", "FastGelu", "QuickGelu", "BiasGelu", "Erf", "Neg", "Abs", "Sqrt",
                "Reciprocal", "Exp", "Log", "Softplus", "Cast", "CastLike", "Identity", "Not", "Clip", "Softmax"}
_LIKE_FIRST = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
               "SkipLayerNormalization", "RMSNormalization", "Split", "Transpose", "RotaryEmbedding", "Slice",
               "Concat", "Pad", "MatMulNBits", "MatMulBlockwise", "GroupQueryAttention", "MultiHeadAttention",
               "Attention"}


def known_ranks(graph) -> dict[str, int]:
    """Ranks of the values a short rule table follows from the graph inputs (activations are [batch, seq, ...]);
    a value missing here gets its shapes from Shape() at run time instead."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.input if v.type.tensor_type.HasField("shape")}
    lengths = {}  # 1-D initializers (Reshape shapes, Unsqueeze axes): their lengths
    for t in graph.initializer:
        ranks[t.name] = len(t.dims)
        if len(t.dims) == 1:
            lengths[t.name] = t.dims[0]
    for node in graph.node:
        present = [ranks.get(name) for name in node.input if name]
        first = ranks.get(node.input[0]) if node.input else None
        out = None
        if node.op_type in _ELEMENTWISE and present and None not in present:
            out = max(present)
        elif node.op_type in _LIKE_FIRST:
            out = first
        elif node.op_type == "MatMul" and len(present) == 2 and None not in present and min(present) >= 2:
            out = max(present)
        elif node.op_type in ("Gather", "GatherBlockQuantized") and len(present) >= 2 and None not in present[:2]:
            out = present[0] + present[1] - 1
        elif node.op_type == "GatherBlockwise" and len(present) >= 2 and present[1] is not None:
            out = present[1] + 1
        elif node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in lengths:
            out = lengths[node.input[1]]
        elif node.op_type == "Unsqueeze" and first is not None and len(node.input) > 1 and node.input[1] in lengths:
            out = first + lengths[node.input[1]]
        elif node.op_type == "Shape":
            out = 1
        if out is None:
            continue
        ranks[node.output[0]] = out
        if node.op_type in ("Split", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"):
            for name in node.output[1:]:  # Split's parts; the skip-norms' residual sum (their last output)
                ranks[name] = out
    return ranks


# ------------------------------------------------------------------------------ the rewrite


class _GraphWriter:
    """Nodes and initializers of the rewritten graph; activation-side helpers are shared per input."""

    def __init__(self, data: _DataFile, ranks: dict[str, int], prefix: str = "lowbit_fast"):
        self.data = data
        self.prefix = prefix  # of every name it makes: one per rewrite, so two rewrites never collide
        self.ranks = ranks
        self.nodes: list = []
        self.initializers: list = []
        self.shared: dict[tuple, str] = {}
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{self.prefix}/{stem}_{self.count}"

    def node(self, op: str, inputs: list[str], stem: str, domain: str = "", output: str | None = None, **attrs) -> str:
        from onnx import helper

        name = self.name(stem)
        self.nodes.append(helper.make_node(op, inputs, [output or name], name=name, domain=domain, **attrs))
        return output or name

    def const(self, values) -> str:
        """A small int64 constant (shapes, indices), stored in the graph."""
        from onnx import numpy_helper

        values = np.asarray(values, np.int64)
        key = ("const", values.tobytes(), values.shape)
        if key not in self.shared:
            self.shared[key] = name = self.name("const")
            self.initializers.append(numpy_helper.from_array(values, name))
        return self.shared[key]

    def array(self, stem: str, value: np.ndarray) -> str:
        """A weight array, written to the data file now."""
        name = self.name(stem)
        self.initializers.append(self.data.tensor(name, value))
        return name

    def relaid(self, x: str, layout) -> str:
        """x [..., K] -> [..., k_out] in the padded order: a Gather of whole chunks of rows (MLC's 40 on K = 576:
        chunks of 8) between two Reshapes, with constant shapes when x's rank is known, else from Shape(x)."""
        key = ("relaid", x, layout.group_size, layout.groups, layout.k)
        if key in self.shared:
            return self.shared[key]
        c = layout.chunk
        rank = self.ranks.get(x)
        if rank:
            chunked_shape = self.const([0] * (rank - 1) + [layout.k // c, c])
            flat_shape = self.const([0] * (rank - 1) + [layout.k_out])
        else:
            lead = self.shared.get(("lead", x)) or self.node("Shape", [x], "lead", end=-1)
            self.shared[("lead", x)] = lead
            chunked_shape = self.node("Concat", [lead, self.const([layout.k // c, c])], "shape", axis=0)
            flat_shape = self.node("Concat", [lead, self.const([layout.k_out])], "shape", axis=0)
        chunks = self.node("Reshape", [x, chunked_shape], "chunks")
        gathered = self.node("Gather", [chunks, self.const(layout.chunk_index())], "relaid_chunks", axis=-2)
        self.shared[key] = out = self.node("Reshape", [gathered, flat_shape], "relaid")
        return out

    def group_sums(self, x: str, layout, dtype) -> str:
        """[..., G]: x summed over each group's K positions (ReduceSum [..., 1] for one group per row)."""
        key = ("sums", x, layout.group_size, layout.groups, layout.k)
        if key not in self.shared:
            if layout.groups == 1:
                out = self.node("ReduceSum", [x, self.const([-1])], "row_sum", keepdims=1)
            else:
                out = self.node("MatMul", [x, self.array("group_matrix", layout.group_matrix(dtype))], "group_sums")
            self.shared[key] = out
        return self.shared[key]


def rewrite_blockwise(model, model_dir: Path, levels: dict[str, int], folder: Path,
                      nvfp4: dict[str, int] | None = None, int8_kernel: bool = False,
                      fp4_kernel: bool = False) -> RewriteResult:
    """Rewrites every `lowbit.MatMulBlockwise` node of `model` (an onnx.ModelProto loaded without external data) in
    place, and every 2-bit MatMulNBits and NVFP4 MatMul (`nvfp4`: module -> K) it can, writing the new weights, and
    the external data the graph still reads, into `folder`."""
    from lowbit.custom_ops import blockwise_repack, matmul_nbits

    graph = model.graph
    reader = _TensorReader(model_dir, graph)
    result = RewriteResult()
    data = _DataFile(folder)
    writer = _GraphWriter(data, known_ranks(graph))
    producers = {name: node for node in graph.node for name in node.output}
    try:
        for node in graph.node:
            op = _to_int8_kernel(node, reader, writer, levels, producers) if int8_kernel else ""
            if op:
                result.kernel.append(node.name or node.output[0])
                result.kernel_ops.add(op)
                continue
            if _widen_2bit(node, reader, writer):
                result.widened.append(node.name or node.output[0])
                continue
            route = _dequantize_nvfp4(node, reader, writer, nvfp4, fp4_kernel, producers, levels) if nvfp4 else ""
            if route:
                {"kernel": result.fp4_kernel, "integer": result.fp4_integer}.get(route, result.dequantized).append(
                    node.name)
                continue
            if (node.domain, node.op_type) != MATMUL_OP:
                writer.nodes.append(node)
                continue
            label = node.name or node.output[0]
            why = _why_not(node, reader)
            if why is not None:
                result.fallback.append((label, why))
                writer.nodes.append(node)
                continue
            attrs = _attributes(node)
            x, words, scales, zeros = node.input
            dtype = FLOAT_TYPES[reader.protos[scales].data_type]
            arrays = SimpleNamespace(  # blockwise.BlockwiseArrays' fields, memory-mapped
                words=reader.read(words), scales=reader.read(scales), zero_points=reader.read(zeros),
                bits=attrs["bits"], group_size=attrs["group_size"], k=attrs["K"])
            repacked = blockwise_repack.repack(arrays)
            del arrays
            layout, weight = repacked.layout, repacked.weight
            inputs = [writer.relaid(x, layout) if layout.relaid else x,
                      writer.array("B", weight.b), writer.array("scales", weight.scales)]
            if weight.zero_points is not None:
                inputs.append(writer.array("zero_points", weight.zero_points))
            y = node.output[0]
            product = writer.node(
                "MatMulNBits", inputs, "matmul_nbits", domain=matmul_nbits.DOMAIN,
                output=None if repacked.correction is not None else y, K=weight.k, N=weight.n, bits=weight.bits,
                block_size=weight.block_size, accuracy_level=levels.get(node.name, DEFAULT_ACCURACY_LEVEL))
            if repacked.correction is not None:
                sums = writer.group_sums(x, layout, dtype)
                if layout.groups == 1:
                    fix = writer.node("Mul", [sums, writer.array("correction", repacked.correction[0])], "correction")
                else:
                    fix = writer.node("MatMul", [sums, writer.array("correction", repacked.correction)], "correction")
                writer.node("Sub", [product, fix], "corrected", output=y)
            result.fast.append(label)
        if not result.changed:
            return result
        _replace_nodes(graph, writer)
        data.take_over(graph, reader)
        _import_domain(model, matmul_nbits.DOMAIN)
        return result
    finally:
        data.close()
