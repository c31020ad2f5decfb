"""GPT-2: learned positions, LayerNorm with bias, tanh-GELU plain MLP, Conv1D ([in, out]) weights."""

from lowbit.converter.architectures.base import DecoderSpec, WeightMap, register
from lowbit.errors import LowbitError

WEIGHTS = WeightMap(
    embed="transformer.wte",
    position_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    attn_norm="transformer.h.{i}.ln_1",
    qkv=("transformer.h.{i}.attn.c_attn",),
    o="transformer.h.{i}.attn.c_proj",
    mlp_norm="transformer.h.{i}.ln_2",
    up=("transformer.h.{i}.mlp.c_fc",),
    down="transformer.h.{i}.mlp.c_proj",
    conv1d=True,
)


@register("gpt2", WEIGHTS, genai_type="llama")  # genai's own "gpt2" type expects other inputs
def gpt2(config) -> DecoderSpec:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise LowbitError("gpt2: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    head_dim = config.n_embd // config.n_head
    return DecoderSpec(
        model_type="gpt2",
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.n_inner or 4 * config.n_embd,
        num_layers=config.n_layer,
        num_heads=config.n_head,
        num_kv_heads=config.n_head,
        head_dim=head_dim,
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        activation=config.activation_function,
        max_position_embeddings=config.n_positions,
        gated_mlp=False,
        attention_scale=head_dim**-0.5 if config.scale_attn_weights else 1.0,
        tie_word_embeddings=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    )
