"""Phi-3: fused qkv_proj and gate_up_proj (gate first), optional longrope."""

from lowbit.converter.architectures.base import DecoderSpec, common_fields, llama_style_weights, register

WEIGHTS = llama_style_weights(
    qkv=("model.layers.{i}.self_attn.qkv_proj",),
    up=("model.layers.{i}.mlp.gate_up_proj",),
)


@register("phi3", WEIGHTS, genai_type="phi3")
def phi3(config) -> DecoderSpec:
    return DecoderSpec(**common_fields(config), norm="rms", norm_eps=config.rms_norm_eps, activation=config.hidden_act)
