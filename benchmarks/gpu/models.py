"""Random-weight checkpoints for the GPU run: benchmarks/random_model.py's configs plus a tiny one (tests, a quick
parity check with GroupQueryAttention: head size 32) and Llama-3.1-8B's shapes.

    python benchmarks/gpu/models.py tiny /tmp/tiny-random
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import random_model  # noqa: E402

EXTRA = {
    "tiny": dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu",
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, hidden_act="silu", head_dim=128,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}
CONFIGS = {**random_model.CONFIGS, **EXTRA}


def make(name: str, out: Path, dtype: str = "bfloat16") -> Path:
    random_model.CONFIGS.update(EXTRA)
    return random_model.make_random_model(name, Path(out), dtype)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in CONFIGS:
        sys.exit(f"usage: models.py {{{','.join(CONFIGS)}}} OUT")
    make(sys.argv[1], Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}")
