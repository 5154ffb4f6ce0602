"""A synthetic 1B-class Llama checkpoint (random bf16 weights) for scale runs: never committed.

    python tests/make_synthetic_llama.py artifacts/source/synthetic-llama-1b
    python tests/make_synthetic_llama.py DIR --hidden 2048 --layers 16 --intermediate 8192 \\
        --heads 32 --kv-heads 8 --vocab 128256

The defaults are Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads, 8 kv heads,
intermediate 8192, vocab 128256, tied embeddings): 1.24 B parameters, 2.47 GB in bf16.
Weights are drawn tensor by tensor (in row blocks) straight into bf16 and written shard by
shard with safetensors, so memory stays bounded by one shard (`--shard-mb`), never the model.
The tokenizer is the tests' offline byte-level BPE (`checkpoints.build_tokenizer`); the
model's vocab may be larger than it (ids it does not know decode to nothing). Same arguments
give the same files. Write it under artifacts/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from checkpoints import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, build_tokenizer

ROW_BLOCK_ELEMENTS = 16 * 1024 * 1024  # float32 scratch per draw: 64 MiB
INDEX_FILE = "model.safetensors.index.json"


def tensor_specs(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in file order (embeddings, layers, final norm, lm_head)."""
    head_dim = args.hidden // args.heads
    q, kv = args.heads * head_dim, args.kv_heads * head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (args.vocab, args.hidden))]
    for i in range(args.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (args.hidden,)),
            (p + "self_attn.q_proj.weight", (q, args.hidden)),
            (p + "self_attn.k_proj.weight", (kv, args.hidden)),
            (p + "self_attn.v_proj.weight", (kv, args.hidden)),
            (p + "self_attn.o_proj.weight", (args.hidden, q)),
            (p + "post_attention_layernorm.weight", (args.hidden,)),
            (p + "mlp.gate_proj.weight", (args.intermediate, args.hidden)),
            (p + "mlp.up_proj.weight", (args.intermediate, args.hidden)),
            (p + "mlp.down_proj.weight", (args.hidden, args.intermediate)),
        ]
    specs.append(("model.norm.weight", (args.hidden,)))
    if args.untied:
        specs.append(("lm_head.weight", (args.vocab, args.hidden)))
    return specs


def draw(shape: tuple[int, ...], std: float, norm: bool, generator: torch.Generator) -> torch.Tensor:
    """A bf16 tensor of N(0, std) (norm gains: 1 + N(0, 0.1)), drawn in row blocks of bounded size."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1) if len(shape) == 1 else out
    rows = shape[0]
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    block = max(1, ROW_BLOCK_ELEMENTS // per_row)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        values = torch.randn((stop - start, *shape[1:]), generator=generator, dtype=torch.float32)
        values = 1.0 + 0.1 * values if norm else values * std
        flat[start:stop] = values.to(torch.bfloat16)
    return out


def shards(specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most `shard_bytes` (a bigger tensor gets its own)."""
    out: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if out[-1] and size + nbytes > shard_bytes:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += nbytes
    return out


def write_config(path: Path, args: argparse.Namespace) -> None:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        initializer_range=args.std,
        tie_word_embeddings=not args.untied,
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    )
    config.dtype = "bfloat16"
    config.save_pretrained(path)


def make(args: argparse.Namespace) -> Path:
    path = Path(args.dir)
    if (path / "config.json").exists() and not args.force:
        print(f"{path}: already there (use --force to write it again)", file=sys.stderr)
        return path
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise SystemExit(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}, and that of --kv-heads")
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    started = time.perf_counter()
    specs = tensor_specs(args)
    groups = shards(specs, int(args.shard_mb * 1024 * 1024))
    generator = torch.Generator().manual_seed(args.seed)
    weight_map: dict[str, str] = {}
    total = 0
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {t: draw(shape, args.std, t.endswith("norm.weight"), generator) for t, shape in group}
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        for t, tensor in tensors.items():
            weight_map[t] = name
            total += tensor.numel() * tensor.element_size()
        del tensors
        print(f"  {name}: {len(group)} tensors ({time.perf_counter() - started:.1f}s)", file=sys.stderr)
    (path / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    write_config(path, args)
    build_tokenizer(args.tokenizer_vocab).save_pretrained(path)
    params = total // 2
    print(
        f"{path}: {params / 1e9:.3f} B parameters, {total / 1e9:.2f} GB bf16 in {len(groups)} shards "
        f"({time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
    )
    return path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="output directory (put it under artifacts/: it is never committed)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256, help="model vocab (>= the tokenizer's)")
    p.add_argument("--tokenizer-vocab", type=int, default=384, help="size of the trained BPE tokenizer")
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--untied", action="store_true", help="a separate lm_head (default: tied embeddings)")
    p.add_argument("--std", type=float, default=0.02, help="weight std (Llama's init: activations stay finite)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=float, default=512, help="shard size bound (memory bound of the writer)")
    p.add_argument("--force", action="store_true", help="write again over an existing checkpoint")
    args = p.parse_args(argv)
    if args.vocab < args.tokenizer_vocab:
        p.error(f"--vocab {args.vocab} must be >= --tokenizer-vocab {args.tokenizer_vocab}")
    return args


if __name__ == "__main__":
    print(make(parse()))
