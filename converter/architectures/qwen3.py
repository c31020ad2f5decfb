"""Qwen3: Llama layout with RMSNorm on each query and key head before RoPE."""

from lowbit.converter.architectures.base import DecoderSpec, common_fields, llama_style_weights, register

WEIGHTS = llama_style_weights(q_norm="model.layers.{i}.self_attn.q_norm", k_norm="model.layers.{i}.self_attn.k_norm")


@register("qwen3", WEIGHTS)
def qwen3(config) -> DecoderSpec:
    return DecoderSpec(
        **common_fields(config), norm="rms", norm_eps=config.rms_norm_eps, activation=config.hidden_act, qk_norm=True
    )
