"""Gemma 2: (1 + w) RMSNorm, sqrt(hidden) embedding scale, sandwich norms, soft-capping,
alternating sliding-window layers, tanh-GELU gated MLP."""

from lowbit.converter.architectures.base import DecoderSpec, common_fields, llama_style_weights, register

WEIGHTS = llama_style_weights(
    mlp_norm="model.layers.{i}.pre_feedforward_layernorm",
    post_attn_norm="model.layers.{i}.post_attention_layernorm",
    post_mlp_norm="model.layers.{i}.post_feedforward_layernorm",
)


@register("gemma2", WEIGHTS)
def gemma2(config) -> DecoderSpec:
    return DecoderSpec(
        **common_fields(config),
        norm="rms",
        norm_eps=config.rms_norm_eps,
        activation=config.hidden_activation or config.hidden_act,
        norm_weight_offset=1.0,
        sandwich_norm=True,
        embedding_scale=config.hidden_size**0.5,
        attention_scale=config.query_pre_attn_scalar**-0.5,
        attention_softcap=config.attn_logit_softcapping,
        final_logit_softcap=config.final_logit_softcapping,
    )
