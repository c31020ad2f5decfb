"""Mistral: Llama layout with sliding-window attention."""

from lowbit.converter.architectures.base import DecoderSpec, common_fields, llama_style_weights, register


@register("mistral", llama_style_weights())
def mistral(config) -> DecoderSpec:
    return DecoderSpec(**common_fields(config), norm="rms", norm_eps=config.rms_norm_eps, activation=config.hidden_act)
