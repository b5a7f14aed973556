"""A seeded synthetic checkpoint with TinyLlama-1.1B shapes in Hugging Face layout, for benchmarks.

``write_tinyllama_checkpoint(path)`` writes ``config.json``, ``model-0000N-of-0000M.safetensors``
shards and ``model.safetensors.index.json`` (written last, so its presence means the shards are
complete); a second call with the same arguments finds them and writes nothing.
``read_state_dict(path)`` reads all shards back into one state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["INDEX", "read_state_dict", "tinyllama_config", "tinyllama_shapes", "write_tinyllama_checkpoint"]

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, LAYERS = 2048, 5632, 32000, 32, 4, 22
INDEX = "model.safetensors.index.json"


def tinyllama_config(layers: int = LAYERS) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for TinyLlama-1.1B (with ``layers`` layers)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tinyllama_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, in checkpoint order."""
    kv = HIDDEN // HEADS * KV_HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def _nbytes(shape: tuple[int, ...]) -> int:
    return 2 * int(torch.Size(shape).numel())  # bf16


def _split(shapes: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    """Consecutive keys in ``shards`` groups of about equal bytes."""
    total = sum(_nbytes(s) for s in shapes.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for key, shape in shapes.items():
        groups[min(shards - 1, done * shards // total)].append(key)
        done += _nbytes(shape)
    return [g for g in groups if g]


def _tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights
        return (1 + torch.randn(shape, generator=gen) * 0.01).to(torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_tinyllama_checkpoint(path: str | Path, *, layers: int = LAYERS, shards: int = 3, seed: int = 0) -> Path:
    """Write the checkpoint into ``path`` (about 2 GiB of bf16 at full size) unless it is there."""
    path = Path(path)
    shapes = tinyllama_shapes(layers)
    groups = _split(shapes, shards)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    total = sum(_nbytes(s) for s in shapes.values())
    index = {
        "metadata": {"total_size": total, "seed": seed},
        "weight_map": {key: file for file, keys in zip(files, groups, strict=True) for key in keys},
    }
    config = tinyllama_config(layers)
    if (
        (path / INDEX).is_file()
        and json.loads((path / INDEX).read_text()) == index
        and (path / "config.json").is_file()
        and json.loads((path / "config.json").read_text()) == config
        and all((path / f).is_file() for f in files)
    ):
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / INDEX).unlink(missing_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for file, keys in zip(files, groups, strict=True):
        save_file({key: _tensor(shapes[key], gen) for key in keys}, path / file, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded Hugging Face checkpoint, in the index's order."""
    path = Path(path)
    weight_map: dict[str, str] = json.loads((path / INDEX).read_text())["weight_map"]
    loaded: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(weight_map.values()):
        loaded |= load_file(path / file)
    return {key: loaded[key] for key in weight_map}
