"""What the seed documents (../shared/seeds/) claim, in one place: ablate compares against
seed 001, the report draws seeds 000, 003 and 004 beside what a run measured."""

from __future__ import annotations

from typing import Any

# Seed 000: the experiment fragsim implements (SmolLM2-135M base, 4 fragments 0-7, 8-15,
# 16-22, 23-29, prompt "The capital of France is", 24 greedy tokens, their machine).
SEED_000: dict[str, Any] = {
    "seed": "000_d45a36e8ebf4e3a9",
    "title": "Contiguous Layer-Range Fragmentation and Reassembly in SmolLM2-135M",
    "model": "SmolLM2-135M (base)",
    "ranges": ["0-7", "8-15", "16-22", "23-29"],
    "baseline_s": 3.23,
    "checkpoints": [
        {"layers": 8, "label": "repetition loop", "seconds": 0.87, "text": ", and and, and, and, and, …"},
        {"layers": 16, "label": "whitespace collapse", "seconds": 1.59, "text": "[whitespace only]"},
        {"layers": 23, "label": "repetition loop", "seconds": 1.26, "text": "."},
        {"layers": 30, "label": "coherent", "seconds": 1.46, "text": "the capital of the country."},
    ],
}

# Seed 001: single-layer ablation of SmolLM2-135M (30 layers).
SEED_001: dict[str, Any] = {
    "seed": "001_473de6a743a50867",
    "title": "Anatomical Heterogeneity in Transformer Language Models",
    "author": "Wietrzykowski, Tomasz",
    "url": "https://arxiv.org/abs/2603.19348",
    "model": "SmolLM2-135M, 30 layers",
}
SEED_001_LAYERS = 30  # its claims are about layer indices of this depth
CRITICAL_CORE = (8, 9, 10, 11)
PAPER_MAX_CHANGE_PCT = 63_419.0
PAPER_ANTI_LAYERS = (14, 17)
# "~+63,419 %": the paper's evaluation text is not ours, so a perplexity ratio within this
# factor of the paper's (either way) counts as the same magnitude.
MAGNITUDE_FACTOR = 2.0

# Seed 003: residual-stream std per hidden state of SmolLM2-360M-Instruct (32 layers) on the
# probe "47 + 86"; index 0 is the embeddings, i the output of layer i-1. Its ranges ("Layer
# 4-12: ~327") are expanded to one value per layer.
SEED_003: dict[str, Any] = {
    "seed": "003_789b278e56ef5648",
    "model": "SmolLM2-360M-Instruct, 32 layers",
    "std": [0.105, 2.55, 3.70, 3.67, 327.0] + [327.0] * 9 + [337.0] * 14 + [310.0] * 4 + [1.34],
}

# Seed 004: the SmolLM2-135M parameter census.
SEED_004: dict[str, Any] = {
    "seed": "004_5871c3def5c8fec3",
    "embeddings": 28_311_552,
    "attention_per_block": 884_736,
    "mlp_per_block": 2_654_208,
    "norms_per_block": 1_152,
    "per_block": 3_540_096,
    "blocks": 30,
    "blocks_total": 106_202_880,
    "final_norm": 576,
    "lm_head": 0,  # tied with the embeddings
    "total": 134_515_008,
}
