"""Qwen2: Llama layout with biases on q/k/v (picked up from the checkpoint)."""

from lowbit.converter.architectures.base import DecoderSpec, common_fields, llama_style_weights, register


@register("qwen2", llama_style_weights())
def qwen2(config) -> DecoderSpec:
    return DecoderSpec(**common_fields(config), norm="rms", norm_eps=config.rms_norm_eps, activation=config.hidden_act)
