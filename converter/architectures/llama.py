"""Llama (1, 2, 3 with rope scaling): RMSNorm, SiLU-gated MLP, RoPE, GQA."""

from lowbit.converter.architectures.base import DecoderSpec, common_fields, llama_style_weights, register


@register("llama", llama_style_weights())
def llama(config) -> DecoderSpec:
    return DecoderSpec(**common_fields(config), norm="rms", norm_eps=config.rms_norm_eps, activation=config.hidden_act)
