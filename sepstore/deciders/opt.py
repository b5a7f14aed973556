"""OPT.

``model.decoder.embed_tokens.*``, ``model.decoder.embed_positions.*`` and
``model.decoder.project_in.*`` -> begin as ``decoder.embed_tokens.*``, ...;
``model.decoder.layers.N.rest`` -> layer N as ``rest`` (an ``OPTDecoderLayer``'s state dict);
``model.decoder.final_layer_norm.*`` and ``model.decoder.project_out.*`` -> end as
``decoder.final_layer_norm.*``, ...; ``lm_head.*`` -> end unchanged. The hub's checkpoints
(``facebook/opt-125m``, ...) were saved from ``OPTModel`` and lack the ``model.`` prefix; they give
the same parts. OPT ties its head by default, so end gets ``lm_head.weight`` from the embedding when
the checkpoint has no head.
"""

from __future__ import annotations

import re

from ._family import Family, Runtime, prefix_decider, register

__all__ = ["decider", "family"]

decider = prefix_decider(
    begin=("model.decoder.embed_tokens.", "model.decoder.embed_positions.", "model.decoder.project_in."),
    layers="model.decoder.layers",
    end=("model.decoder.final_layer_norm.", "model.decoder.project_out.", "lm_head.", "score."),
    base="model.",
)

family = register(
    Family(
        name="opt",
        decider=decider,
        model_types=("opt",),
        architectures=("OPTForCausalLM", "OPTModel"),
        layers="model.decoder.layers",
        base="model.",
        embed_key="model.decoder.embed_tokens.weight",
        head_key="lm_head.weight",
        ties_by_default=True,
        signature=re.compile(r"^(?:model\.)?decoder\.layers\.\d+\.self_attn\."),
        runtime=Runtime(("opt",)),
    )
)
