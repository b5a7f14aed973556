"""The Llama family: llama, mistral, mixtral, qwen2, qwen3, gemma, gemma2, phi3 (and phi).

``model.embed_tokens`` -> begin; ``model.layers.N.*`` -> layer N; ``model.norm``, ``lm_head``
-> end. Rotary ``inv_freq`` buffers are dropped (the model rebuilds them).
"""

from __future__ import annotations

import re

from ._family import Family, prefix_decider, register

LLAMA_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "phi3",
    "phi",
)

decider = prefix_decider(
    begin=("model.embed_tokens.",),
    layers="model.layers",
    end=("model.norm.", "model.final_layernorm.", "lm_head."),
    drop=r"rotary_emb\.inv_freq$",
    strip="model.",
)

family = register(
    Family(
        name="llama",
        decider=decider,
        model_types=LLAMA_TYPES,
        layers="model.layers",
        embed_key="model.embed_tokens.weight",
        head_key="lm_head.weight",
        signature=re.compile(r"^model\.layers\.\d+\.self_attn\."),
    )
)
