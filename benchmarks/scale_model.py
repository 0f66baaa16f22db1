"""A Llama-3-8B-shaped checkpoint with random weights, written shard by shard, never whole in memory.

No model hub is needed: every tensor is drawn from its own seeded generator (so it is
the same whatever the shard layout), in row chunks, at Llama's init scale (normal,
std `initializer_range` = 0.02; norms at 1), and written as bfloat16 safetensors
shards of at most `SHARD_BYTES`, with `model.safetensors.index.json`, `config.json`
and an offline tokenizer (`tokenizer.json`: one word `t<id>` per id of the
vocabulary, so a text of words is exactly those ids). A process holding it only ever
has one shard's tensors in memory; `write_model` measures that and says so.

The checkpoint is cached (`$PEFTKIT_BENCH_CACHE`, else `~/.cache/peftkit-bench`) under
the shape's name, written atomically and reused while its recorded shape matches.

    python benchmarks/scale_model.py                 # the 8b shape (about 16 GB on disk)
    python benchmarks/scale_model.py --shape tiny    # 2 layers, hidden 512: seconds
    python benchmarks/scale_model.py --shape 8b-2blocks  # 2 of the 8b's blocks (about 3 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import AnonPeak
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from peftkit.files import atomic_directory, atomic_write_json

__all__ = ["SHAPES", "SHARD_BYTES", "cache_dir", "tensor_shapes", "write_model", "ensure_model"]

# Llama-3-8B's architecture (untied head, grouped-query attention), and a small one for development.
SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "1b": dict(  # TinyLlama-1.1B's shape: bench_fsdp.py
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "tiny": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
}
# The 8b's per-layer shapes, 2 of its 32 decoder blocks: for per-layer costs too slow to run on all
# (an exact SVD of each layer); its blocks' tensors are the 8b checkpoint's first two, seed for seed.
SHAPES["8b-2blocks"] = {**SHAPES["8b"], "num_hidden_layers": 2}
_COMMON = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=0.02,
    hidden_act="silu",
    bos_token_id=0,
    eos_token_id=1,
    torch_dtype="bfloat16",
)
SHARD_BYTES = 4 * 10**9
_CHUNK_ELEMENTS = 2**26  # rows drawn at once: 256 MB of float32 at most
_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"]


def cache_dir(shape: str) -> Path:
    root = Path(os.environ.get("PEFTKIT_BENCH_CACHE") or Path.home() / ".cache" / "peftkit-bench")
    return root / f"llama3-{shape}-shape"


def model_config(shape: dict[str, Any]) -> dict[str, Any]:
    """The config.json of a shape."""
    return {**_COMMON, **shape, "head_dim": shape["hidden_size"] // shape["num_attention_heads"]}


def tensor_shapes(shape: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a LlamaForCausalLM with this shape, in file order."""
    hidden, inner, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * hidden // shape["num_attention_heads"]
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        yield prefix + "input_layernorm.weight", (hidden,)
        yield prefix + "self_attn.q_proj.weight", (hidden, hidden)
        yield prefix + "self_attn.k_proj.weight", (kv, hidden)
        yield prefix + "self_attn.v_proj.weight", (kv, hidden)
        yield prefix + "self_attn.o_proj.weight", (hidden, hidden)
        yield prefix + "post_attention_layernorm.weight", (hidden,)
        yield prefix + "mlp.gate_proj.weight", (inner, hidden)
        yield prefix + "mlp.up_proj.weight", (inner, hidden)
        yield prefix + "mlp.down_proj.weight", (hidden, inner)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def _random_tensor(name: str, size: tuple[int, ...], seed: int) -> torch.Tensor:
    """One bfloat16 tensor from a generator seeded by (seed, name), drawn in row chunks of float32."""
    if len(size) == 1:  # RMSNorm weights
        return torch.ones(size, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    out = torch.empty(size, dtype=torch.bfloat16)
    rows = max(1, _CHUNK_ELEMENTS // size[1])
    for start in range(0, size[0], rows):
        chunk = out[start : start + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=generator).mul_(_COMMON["initializer_range"]))
    return out


def _shard_plan(shape: dict[str, Any], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards of at most `shard_bytes` (bfloat16; a bigger tensor alone), in file order."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensor_shapes(shape):
        nbytes = 2 * torch.Size(dims).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer: `t<id>` is id `id`, whitespace-separated; BOS, EOS, unknown are ids 0, 1, 2."""
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(_SPECIALS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=_SPECIALS[2]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=_SPECIALS[0], eos_token=_SPECIALS[1], unk_token=_SPECIALS[2]
    )
    fast.save_pretrained(directory)


def write_model(shape_name: str, directory: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """Write the checkpoint into `directory`; returns what was written and the writer's peak anonymous memory."""
    shape = SHAPES[shape_name]
    started = time.perf_counter()
    weight_map: dict[str, str] = {}
    plan = _shard_plan(shape, shard_bytes)
    shard_sizes = []
    with AnonPeak() as peak:
        for number, shard in enumerate(plan, 1):
            filename = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
            tensors = {name: _random_tensor(name, dims, seed) for name, dims in shard}
            save_file(tensors, directory / filename, metadata={"format": "pt"})
            shard_sizes.append(sum(t.untyped_storage().nbytes() for t in tensors.values()))
            weight_map.update(dict.fromkeys(tensors, filename))
            del tensors
            print(f"# shard {number}/{len(plan)}: {shard_sizes[-1] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    total = sum(shard_sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (directory / "config.json").write_text(json.dumps(model_config(shape), indent=2), encoding="utf-8")
    _write_tokenizer(directory, shape["vocab_size"])
    record = {
        "shape": shape,
        "seed": seed,
        "total_bytes": total,
        "largest_shard_bytes": max(shard_sizes),
        "writer_peak_anon_bytes": peak.peak,
        "writer_baseline_anon_bytes": peak.baseline,
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(directory / "bench_shape.json", record)
    return record


def ensure_model(shape_name: str, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """The cached checkpoint of `shape_name` (written first if absent or of another shape) and its record."""
    directory = cache_dir(shape_name)
    recorded = directory / "bench_shape.json"
    if recorded.is_file():
        record = json.loads(recorded.read_text(encoding="utf-8"))
        if record["shape"] == SHAPES[shape_name] and record["seed"] == seed:
            return directory, record
    with atomic_directory(directory, replace=True) as tmp:
        record = write_model(shape_name, tmp, seed)
    return directory, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    args = parser.parse_args()
    directory, record = ensure_model(args.shape)
    print(json.dumps({"directory": str(directory), **record}, indent=2))


if __name__ == "__main__":
    main()
