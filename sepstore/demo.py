"""``sepstore demo``: the main job end to end on a small built-in model, nothing downloaded."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from .convert import convert
from .diff import diff
from .load import load
from .sign import sign
from .signing import keygen
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


CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "vocab_size": 4096,
    "tie_word_embeddings": False,
}


def _write_checkpoint(folder: str, state_dict: dict[str, torch.Tensor]) -> None:
    """A Hugging Face model folder: ``model.safetensors`` and ``config.json``."""
    os.makedirs(folder, exist_ok=True)
    save_file(state_dict, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)


def _run_two_nodes(url: str, checkpoint: str, say: Callable[[str], None]) -> None:
    """Run v2 as two nodes with :mod:`sepstore.hf` and check their logits against the full model's."""
    try:
        import transformers
    except ImportError:
        say("8. (pip install 'sepstore[hf]' to also run v2 as two nodes with transformers.)")
        return
    from .hf import load_model, quiet_loading

    ids = torch.tensor([[1, 20, 300, 4000, 5]])
    with quiet_loading(transformers):
        full = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = full(input_ids=ids).logits
    first, second = load_model(url, "b 0-2"), load_model(url, "2-4 e")
    logits = second(hidden_states=first(input_ids=ids).hidden_states).logits
    if logits is None or not torch.equal(logits, expected):
        raise RuntimeError("demo: the two nodes' logits differ from the full model's")
    say(
        "8. Ran v2 as two nodes with sepstore.hf.load_model: node A ('b 0-2') turned 5 tokens into hidden states, "
        "node B ('2-4 e') into logits equal, bit for bit, to the full transformers model's; neither held the "
        "other's layers."
    )


def run_demo(directory: str | os.PathLike[str] = "sepstore-demo", *, say: Callable[[str], None] = print) -> None:
    """Convert two versions of a tiny Llama, diff them, load them as two nodes would, verify, sign
    v2 and load it under a trust policy, then run v2 as two transformers nodes (with ``sepstore[hf]``)."""
    root = os.path.abspath(os.fspath(directory))
    if os.path.exists(root):
        shutil.rmtree(root)
    store = os.path.join(root, "store")
    v1 = tiny_llama_state_dict()
    _write_checkpoint(os.path.join(root, "checkpoints", "v1"), v1)
    size = sum(t.nbytes for t in v1.values())
    say(f"1. Built a seeded tiny Llama (4 layers, {size / 2**20:.1f} MiB of bf16) as a Hugging Face folder:")
    say(f"     {root}/checkpoints/v1")
    m1 = convert(os.path.join(root, "checkpoints", "v1"), store, name=NAME, tag="v1", quiet=True)
    say(
        f"2. Converted it into the store {store} as {NAME}:v1 ({m1.metadata['decider']} decider, found from "
        f"config.json): begin, {m1.n_layers} layer parts and end, each a safetensors file named by its BLAKE3 digest."
    )
    v2 = dict(v1)
    for layer in (1, 3):
        key = f"model.layers.{layer}.mlp.down_proj.weight"
        v2[key] = (v1[key].float() * 1.01).to(torch.bfloat16)
    _write_checkpoint(os.path.join(root, "checkpoints", "v2"), v2)
    before = len(os.listdir(os.path.join(store, "parts", "blake3")))
    convert(os.path.join(root, "checkpoints", "v2"), store, name=NAME, tag="v2", quiet=True)
    written = len(os.listdir(os.path.join(store, "parts", "blake3"))) - before
    say(f"3. Fine-tuned layers 1 and 3 and converted v2: {written} new part files; every unchanged part is shared.")
    url1 = os.path.join(store, "manifests", NAME, "v1.json")
    url2 = os.path.join(store, "manifests", NAME, "v2.json")
    changes = diff(url1, url2)
    fetch = changes.bytes_to_fetch
    say(f"4. diff v1 -> v2: {len(changes.changed)} parts changed, {fetch:,} bytes for a v1 node to fetch:")
    for p in changes.changed:
        say(f"     {p.part}: {p.status}, tensors {', '.join(p.tensors.changed)}, {p.bytes:,} bytes")
    for step, node, spec in (("5a", "A", "b 0-2"), ("5b", "B", "2-4 e")):
        psd = load(url2, spec)
        say(f"{step}. Node {node} loaded '{spec}' of v2: {len(psd.to_dict())} tensors, every byte verified first.")
        for layer, tensors in psd.mid.items():
            if not torch.equal(tensors["mlp.down_proj.weight"], v2[f"model.layers.{layer}.mlp.down_proj.weight"]):
                raise RuntimeError(f"demo: layer {layer} as loaded differs from what was converted")
    report = verify(url2)
    verdict = "all verified" if report.ok else "FAILED"
    say(f"6. verify v2: {len(report.checks)} parts re-hashed, {verdict}; manifest digest {report.manifest_digest}.")
    key = os.path.join(root, "publisher.key")
    keygen(key)
    signed = sign(url2, key=key)
    trusted = load(url2, "e", trust=key + ".pub")
    say(
        f"7. Signed v2 with a new key ({signed.key_id[:12]}..., {os.path.relpath(signed.signature_url, root)}); a node "
        f"trusting only that key (trust={os.path.basename(key)}.pub, or $SEPSTORE_TRUST) loaded 'e': "
        f"{len(trusted.end or {})} tensors."
    )
    _run_two_nodes(url2, os.path.join(root, "checkpoints", "v2"), say)
    say(f"Done. Next: sepstore info {url2} --trust-key {key}.pub")
    say(f"      sepstore diff {url1} {url2}")
    say(f"      sepstore plan {url2} --nodes 2")
