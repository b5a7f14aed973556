"""BLOOM.

``transformer.word_embeddings.*`` and ``transformer.word_embeddings_layernorm.*`` -> begin as
``word_embeddings.*``, ``word_embeddings_layernorm.*``; ``transformer.h.N.rest`` -> layer N as
``rest`` (a ``BloomBlock``'s state dict); ``transformer.ln_f.*`` -> end as ``ln_f.*``; ``lm_head.*``
-> end unchanged. The hub's checkpoints (``bigscience/bloom-560m``, ...) were saved from
``BloomModel`` and lack the ``transformer.`` prefix; they give the same parts. BLOOM ties its head by
default, so end gets ``lm_head.weight`` from the embedding when the checkpoint has no head.
"""

from __future__ import annotations

import re

from ._family import Family, Runtime, prefix_decider, register

__all__ = ["decider", "family"]

decider = prefix_decider(
    begin=("transformer.word_embeddings.", "transformer.word_embeddings_layernorm."),
    layers="transformer.h",
    end=("transformer.ln_f.", "lm_head.", "score."),
    base="transformer.",
)

family = register(
    Family(
        name="bloom",
        decider=decider,
        model_types=("bloom",),
        architectures=("BloomForCausalLM", "BloomModel"),
        layers="transformer.h",
        base="transformer.",
        embed_key="transformer.word_embeddings.weight",
        head_key="lm_head.weight",
        ties_by_default=True,
        signature=re.compile(r"^(?:transformer\.)?word_embeddings_layernorm\."),
        runtime=Runtime(("bloom",), layer_returns_tuple=True),
    )
)
