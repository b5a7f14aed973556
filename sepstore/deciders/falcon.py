"""Falcon (including the older ``RefinedWeb``/``RefinedWebModel`` checkpoints).

``transformer.word_embeddings.*`` -> begin as ``word_embeddings.*``; ``transformer.h.N.rest`` ->
layer N as ``rest`` (a ``FalconDecoderLayer``'s state dict); ``transformer.ln_f.*`` -> end as
``ln_f.*``; ``lm_head.*`` -> end unchanged. Keys saved from ``FalconModel`` (no ``transformer.``)
give the same parts. Rotary ``inv_freq`` buffers older checkpoints hold are kept (``transformer.rotary_emb.*``
in begin, a layer's in its part) and named in :attr:`Family.buffers`. Falcon ties its head by default, so
end gets ``lm_head.weight`` from the embedding when the checkpoint has no head. Unlike BLOOM,
Falcon has no ``word_embeddings_layernorm``, which is how the two are told apart without a config.
"""

from __future__ import annotations

import re

from ._family import Family, Runtime, prefix_decider, register

__all__ = ["decider", "family"]

decider = prefix_decider(
    begin=("transformer.word_embeddings.", "transformer.rotary_emb."),
    layers="transformer.h",
    end=("transformer.ln_f.", "lm_head.", "score."),
    base="transformer.",
)

family = register(
    Family(
        name="falcon",
        decider=decider,
        model_types=("falcon", "RefinedWeb", "RefinedWebModel"),
        architectures=("FalconForCausalLM", "FalconModel", "RWForCausalLM"),
        layers="transformer.h",
        base="transformer.",
        embed_key="transformer.word_embeddings.weight",
        head_key="lm_head.weight",
        ties_by_default=True,
        signature=re.compile(r"^(?:transformer\.)?h\.\d+\.self_attention\.query_key_value\."),
        runtime=Runtime(("falcon",), layer_returns_tuple=True),
    )
)
