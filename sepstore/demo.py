"""``sepstore demo``: the main job end to end on a small built-in model, nothing downloaded."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch

from .diff import diff
from .dump import dump
from .load import load
from .verify import verify

__all__ = ["llama_decider", "run_demo", "tiny_llama_state_dict"]

NAME = "demo/tiny-llama"


def tiny_llama_state_dict(
    *, layers: int = 4, hidden: int = 256, intermediate: int = 688, vocab: int = 4096, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A seeded bf16 state dict with the names and shapes of a Hugging Face Llama checkpoint."""
    gen = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": w(hidden, hidden),
            p + "self_attn.k_proj.weight": w(hidden, hidden),
            p + "self_attn.v_proj.weight": w(hidden, hidden),
            p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "mlp.gate_proj.weight": w(intermediate, hidden),
            p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
        }
    sd["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd["lm_head.weight"] = w(vocab, hidden)
    return sd


def llama_decider(key: str) -> tuple[str, str] | tuple[str, int, str] | None:
    """Places Hugging Face Llama keys: embeddings in begin, ``model.layers.N.*`` in mid N, the rest in end."""
    if key.startswith("model.embed_tokens."):
        return "begin", key.removeprefix("model.")
    if key.startswith("model.layers."):
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        return None if rest.endswith("rotary_emb.inv_freq") else ("mid", int(layer), rest)
    return "end", key.removeprefix("model.")


def run_demo(directory: str | os.PathLike[str] = "sepstore-demo", *, say: Callable[[str], None] = print) -> None:
    """Publish two versions of a tiny Llama, diff them, load them as two nodes would, verify."""
    store = os.path.abspath(os.fspath(directory))
    if os.path.exists(store):
        shutil.rmtree(store)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "vocab_size": 4096,
    }
    v1 = tiny_llama_state_dict()
    size = sum(t.nbytes for t in v1.values())
    say(f"1. Built a seeded tiny Llama in memory: {len(v1)} tensors, {size:,} bytes of bf16.")
    m1 = dump(llama_decider, v1, store, name=NAME, tag="v1", config=config)
    say(
        f"2. Published {NAME}:v1 to {store}: begin, {m1.n_layers} layer parts and end, "
        "each a safetensors file named by its BLAKE3 digest."
    )
    v2 = dict(v1)
    for layer in (1, 3):
        key = f"model.layers.{layer}.mlp.down_proj.weight"
        v2[key] = (v1[key].float() * 1.01).to(torch.bfloat16)
    dump(llama_decider, v2, store, name=NAME, tag="v2", config=config)
    url1 = os.path.join(store, "manifests", NAME, "v1.json")
    url2 = os.path.join(store, "manifests", NAME, "v2.json")
    say("3. Fine-tuned layers 1 and 3 and published v2; unchanged parts are shared, not written again.")
    changes = diff(url1, url2)
    say(f"4. diff v1 -> v2: {len(changes.changed)} parts changed, {changes.bytes_to_fetch:,} bytes for a v1 node:")
    for p in changes.changed:
        say(f"     {p.part}: {p.status}, tensors {', '.join(p.tensors.changed)}, {p.bytes:,} bytes")
    for node, spec in (("A", "b 0-2"), ("B", "2-4 e")):
        psd = load(url2, spec)
        say(f"5. Node {node} loaded '{spec}': {len(psd.to_dict())} tensors, every byte verified against v2.")
    node_b = load(url2, "3-4")
    if not torch.equal(node_b.mid[3]["mlp.down_proj.weight"], v2["model.layers.3.mlp.down_proj.weight"]):
        raise RuntimeError("demo: layer 3 as loaded differs from what was published")
    report = verify(url2)
    verdict = "all verified" if report.ok else "FAILED"
    say(f"6. verify v2: {len(report.checks)} parts re-hashed, {verdict}; manifest digest {report.manifest_digest}.")
    say(f"Done. Next: sepstore info {url2}")
    say(f"      sepstore diff {url1} {url2}")
