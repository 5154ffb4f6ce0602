"""Tiny random Llama checkpoints for fast tests.

A plain helper module (not a test file): fixtures import `make_tiny_llama` to get a
real Hugging Face checkpoint directory in well under a second, with no hub access.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
# Special tokens come first in the trained vocab, so their ids are fixed: 0, 1, 2.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Byte-level BPE needs the 256 byte alphabet plus the specials before any merge,
# so the model vocab must leave room for some merges on top of that.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 16

# Weights far larger than Llama's 0.02 init: with 0.02 a tiny random model's logits are
# nearly flat and greedy decoding tends to repeat one token, which hides bugs in
# tests that compare generated sequences.
INIT_STD = 0.2

_CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin.
The capital of Italy is Rome. The capital of Spain is Madrid.
Paris is a city in France. Berlin is a city in Germany.
The quick brown fox jumps over the lazy dog.
A model is split into fragments, and each fragment runs a range of layers.
The coordinator sends hidden states from one agent to the next.
Once upon a time there was a small language model that liked to count: one, two, three.
"""


def make_tiny_llama(
    path: Path,
    *,
    num_layers: int = 6,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 384,
    tied: bool = True,
    dtype: str = "float32",
    seed: int = 0,
    sharded: bool = False,
) -> Path:
    """Write a deterministic random Llama checkpoint plus tokenizer into `path`.

    Same arguments give the same weights and tokenizer. `sharded=True` saves at least
    two safetensors shards and `model.safetensors.index.json`. Returns `path`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; expected one of {sorted(DTYPES)}")
    if vocab < MIN_VOCAB:
        raise ValueError(f"vocab {vocab} too small for a byte-level BPE tokenizer; expected >= {MIN_VOCAB}")
    if heads % kv_heads != 0:
        raise ValueError(f"heads {heads} must be a multiple of kv_heads {kv_heads}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(vocab)
    config = _tiny_config(num_layers, hidden, heads, kv_heads, intermediate, vocab, tied, dtype)
    model = _random_model(config, seed).to(DTYPES[dtype])
    model.save_pretrained(path, max_shard_size=_shard_size(model) if sharded else "50GB")
    tokenizer.save_pretrained(path)
    return path


def build_tokenizer(vocab: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a built-in corpus: offline, deterministic, any text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )


def _tiny_config(
    num_layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int, tied: bool, dtype: str
) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        initializer_range=INIT_STD,
        tie_word_embeddings=tied,
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    )
    config.dtype = dtype
    return config


def _random_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _redraw_weights(model, seed)
    return model.eval()


def _redraw_weights(model: PreTrainedModel, seed: int) -> None:
    # Re-draw every weight ourselves: the library's init scheme (e.g. zeroed padding
    # rows, unit norms) may change between transformers versions; ours must not.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm gains near 1 keep activations in a sane range through the stack.
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(INIT_STD * torch.randn(param.shape, generator=generator))


def _shard_size(model: LlamaForCausalLM) -> int:
    # A third of the total guarantees >= 2 shards; never below the largest tensor,
    # which cannot be split across shards.
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return max(sum(sizes) // 3, max(sizes))


# Tiny configs of other Hugging Face architectures, in each config class's own argument names:
# the supported ones must run end to end, the others must be refused before anything starts.
_DECODER: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}
_TINY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_inner": 128, "n_positions": 512},
    "falcon": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 512},
    "mixtral": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {**_DECODER, "tie_word_embeddings": True},
    "mistral": dict(_DECODER),
    "qwen3": {**_DECODER, "head_dim": 16},
    "phi3": {**_DECODER, "original_max_position_embeddings": 512},
    "gemma2": {**_DECODER, "head_dim": 16, "sliding_window": 8},
    "gpt_neox": {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"},
}
TINY_ARCHITECTURES = tuple(_TINY_ARCHITECTURES)


def make_tiny_model(
    path: Path, model_type: str, *, vocab: int = 384, dtype: str = "float32", seed: int = 0, **overrides: Any
) -> Path:
    """Write a deterministic random checkpoint of another architecture (one of TINY_ARCHITECTURES,
    4 layers, hidden size 64) with transformers' own config and model classes, plus the tokenizer.

    `overrides` replace config arguments. Same arguments give the same files. Returns `path`.
    """
    if model_type not in _TINY_ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} not supported; expected one of {TINY_ARCHITECTURES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; expected one of {sorted(DTYPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab)
    config = AutoConfig.for_model(
        model_type,
        **_TINY_ARCHITECTURES[model_type],
        vocab_size=vocab,
        initializer_range=INIT_STD,
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        **overrides,
    )
    config.dtype = dtype
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _redraw_weights(model, seed)
    model.eval().to(DTYPES[dtype]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":  # `python tests/checkpoints.py DIR [LAYERS]`: a tiny model for soaks and demos
    import sys

    target = Path(sys.argv[1])
    if not (target / "config.json").exists():
        make_tiny_llama(target, num_layers=int(sys.argv[2]) if len(sys.argv) > 2 else 8)
    print(target)
