"""The Llama family: llama, mistral, mixtral, qwen2/qwen3 (and their MoE variants), gemma, gemma2,
phi3, phi, and other models with Llama's module layout (starcoder2, olmo, granite, ...).

``model.embed_tokens.*`` -> begin as ``embed_tokens.*``; ``model.layers.N.rest`` -> layer N as
``rest`` (a ``LlamaDecoderLayer``'s own state dict); ``model.norm.*`` (``model.final_layernorm.*``
in phi) -> end as ``norm.*``; ``lm_head.*`` (and a classifier's ``score.*``) -> end unchanged.
Keys saved from the base model (``LlamaModel``: ``embed_tokens.weight``, ``layers.0....``) give the
same parts. Rotary ``inv_freq`` buffers older checkpoints hold are kept where they are
(``model.rotary_emb.*`` in begin, a layer's in its part) and named in :attr:`Family.buffers`, so a
loader may skip them (the model rebuilds them). Gemma ties the LM
head to the embeddings: when no ``lm_head.weight`` is stored, end gets the embedding as
``lm_head.weight``. Mixtral checkpoints keep their per-expert weights
(``block_sparse_moe.experts.E.w1``); transformers 5 fuses them when it loads a layer.
"""

from __future__ import annotations

import re

from ._family import Family, Runtime, prefix_decider, register

__all__ = ["LLAMA_TYPES", "decider", "family"]

LLAMA_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "phimoe",
    "phi",
    "starcoder2",
    "olmo",
    "olmo2",
    "stablelm",
    "granite",
)

decider = prefix_decider(
    begin=("model.embed_tokens.", "model.rotary_emb."),
    layers="model.layers",
    end=("model.norm.", "model.final_layernorm.", "lm_head.", "score."),
    base="model.",
)

family = register(
    Family(
        name="llama",
        decider=decider,
        model_types=LLAMA_TYPES,
        architectures=(
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "MixtralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "GemmaForCausalLM",
            "Gemma2ForCausalLM",
            "Phi3ForCausalLM",
            "PhiForCausalLM",
        ),
        layers="model.layers",
        base="model.",
        embed_key="model.embed_tokens.weight",
        head_key="lm_head.weight",
        signature=re.compile(r"^(?:model\.)?layers\.\d+\.self_attn\."),
        runtime=Runtime(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")),
    )
)
