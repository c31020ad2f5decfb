"""ORT's GroupQueryAttention on lowbit's own kernel, at load: `lowbit.cpu.GroupQueryAttention`.

ONNX Runtime's CPU GroupQueryAttention takes 25-45 us a layer for one token on two threads (about a tenth of a
4-bit model's decode step) and 0.45-0.65 ms a layer for a 128-token prompt. `rewrite(graph)` moves each float32
`com.microsoft.GroupQueryAttention` node whose attributes the kernel reads (custom_ops/group_query_attention.py:
rotary not interleaved, no position_ids input, no smooth softmax or head sink) to the `lowbit.cpu` domain: the
same inputs, attributes and outputs, computed by custom_ops/kernels/group_query_attention.c; the result is the
same attention to float32 rounding. The folder on disk keeps ORT's node. `LOWBIT_ATTENTION_KERNEL=0`,
`LOWBIT_KERNELS=0` (no kernel library) or `LOWBIT_FAST_PATH=0` keeps ORT's node, as does a float16 graph left in
float16 (`LOWBIT_CPU_FLOAT32=0`). The move is silent (the attention is the same; `lowbit run`'s stderr lines are
for what changes the arithmetic).
"""

from __future__ import annotations

import os

ENV_SWITCH = "LOWBIT_ATTENTION_KERNEL"  # "0": keep ORT's node (an A/B of the two, or a fallback)
ORT_DOMAIN = "com.microsoft"
FLOAT = 1  # onnx.TensorProto.FLOAT
POSITION_IDS = 9  # GroupQueryAttention's input index of position_ids


def kernel_applies(shares_kv_buffer: bool, metadata: dict | None) -> bool:
    """Cheap check before loading the graph (no onnx import otherwise): a lowbit folder (lowbit.json) whose
    attention is GroupQueryAttention, which genai_config.json says as `past_present_share_buffer` (the converter
    sets it for that builder only, converter/attention.py; runtime/session.py reads it). Each node is still checked
    itself."""
    return metadata is not None and shares_kv_buffer and os.environ.get(ENV_SWITCH, "1") != "0"


def _supported(node, float_values: set[str]) -> bool:
    from onnx import helper

    from lowbit.custom_ops import group_query_attention as op

    if node.op_type != op.OP_TYPE or node.domain != ORT_DOMAIN or len(node.input) > len(op.INPUTS):  # head_sink
        return False
    if len(node.input) > POSITION_IDS and node.input[POSITION_IDS]:
        return False
    if any(a.name not in op.ATTRIBUTES and helper.get_attribute_value(a) != 0 for a in node.attribute):
        return False  # rotary_interleaved, smooth_softmax, qk_output, ... set
    return len(node.input) > 3 and node.input[3] in float_values  # past_key: float32 (not a float16 graph)


def rewrite(graph) -> list[str]:
    """Moves the supported nodes of `graph` (an onnx.GraphProto, changed in place) to lowbit.cpu; their names."""
    from lowbit.custom_ops import group_query_attention as op

    float_values = {v.name for v in list(graph.input) + list(graph.value_info)
                    if v.type.tensor_type.elem_type == FLOAT}
    moved = []
    for node in graph.node:
        if _supported(node, float_values):
            node.domain = op.DOMAIN
            moved.append(node.name)
    return moved

