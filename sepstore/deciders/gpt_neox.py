"""GPT-NeoX (Pythia, GPT-NeoX-20B).

``gpt_neox.embed_in.*`` -> begin as ``embed_in.*``; ``gpt_neox.layers.N.rest`` -> layer N as
``rest`` (a ``GPTNeoXLayer``'s state dict); ``gpt_neox.final_layer_norm.*`` -> end as
``final_layer_norm.*``; the LM head ``embed_out.*`` (as checkpoints name it; transformers 5 calls
it ``lm_head`` in memory and renames it when loading) and ``lm_head.*`` -> end unchanged. Keys saved
from ``GPTNeoXModel`` (no ``gpt_neox.`` prefix) give the same parts. Buffers older checkpoints carry
(``attention.bias``, ``attention.masked_bias`` causal masks, rotary ``inv_freq``) are kept in their
layer's part (``gpt_neox.rotary_emb.*`` in begin) and named in :attr:`Family.buffers`.
"""

from __future__ import annotations

import re

from ._family import Family, Runtime, buffer_pattern, prefix_decider, register

__all__ = ["decider", "family"]

decider = prefix_decider(
    begin=("gpt_neox.embed_in.", "gpt_neox.rotary_emb."),
    layers="gpt_neox.layers",
    end=("gpt_neox.final_layer_norm.", "embed_out.", "lm_head.", "score."),
    base="gpt_neox.",
)

family = register(
    Family(
        name="gpt_neox",
        decider=decider,
        model_types=("gpt_neox",),
        architectures=("GPTNeoXForCausalLM", "GPTNeoXModel"),
        layers="gpt_neox.layers",
        base="gpt_neox.",
        embed_key="gpt_neox.embed_in.weight",
        head_key="embed_out.weight",
        signature=re.compile(r"^(?:gpt_neox\.)?layers\.\d+\.attention\.query_key_value\."),
        runtime=Runtime(("gpt_neox",)),
        buffers=buffer_pattern(r"attention\.bias"),
    )
)
