"""GPT-2 (and gpt_bigcode, which shares its layout).

``transformer.wte.*``, ``transformer.wpe.*`` -> begin as ``wte.*``, ``wpe.*``;
``transformer.h.N.rest`` -> layer N as ``rest`` (a ``GPT2Block``'s state dict);
``transformer.ln_f.*`` -> end as ``ln_f.*``; ``lm_head.*`` (and a classifier's ``score.*``) -> end
unchanged. The hub's original checkpoints were saved from ``GPT2Model`` and lack the
``transformer.`` prefix (``wte.weight``, ``h.0.attn.c_attn.weight``); they give the same parts.
The causal-mask buffers older checkpoints carry (``h.N.attn.bias``, ``h.N.attn.masked_bias``) are
kept in their layer's part and named in :attr:`Family.buffers` (the model rebuilds them). GPT-2
ties its LM head to ``wte`` by default, so end gets ``lm_head.weight`` from the embedding when the
checkpoint has no head.
"""

from __future__ import annotations

import re

from ._family import Family, Runtime, buffer_pattern, prefix_decider, register

__all__ = ["decider", "family"]

decider = prefix_decider(
    begin=("transformer.wte.", "transformer.wpe."),
    layers="transformer.h",
    end=("transformer.ln_f.", "lm_head.", "score."),
    base="transformer.",
)

family = register(
    Family(
        name="gpt2",
        decider=decider,
        model_types=("gpt2", "gpt_bigcode"),
        architectures=("GPT2LMHeadModel", "GPT2Model", "GPTBigCodeForCausalLM"),
        layers="transformer.h",
        base="transformer.",
        embed_key="transformer.wte.weight",
        head_key="lm_head.weight",
        ties_by_default=True,
        signature=re.compile(r"^(?:transformer\.)?h\.\d+\.attn\.c_attn\."),
        runtime=Runtime(("gpt2",)),
        buffers=buffer_pattern(r"(?:attn|crossattention)\.bias"),
    )
)
