"""GGUF tensor names (llama.cpp), whatever the architecture.

``token_embd.*`` (and ``token_embd_norm.*``, ``position_embd.*``, ``token_types.*``, which some
architectures have) -> begin; ``blk.N.rest`` -> layer N as ``rest``; ``output_norm.*``,
``output.*``, ``rope_freqs.*`` (and a reranker's ``cls.*``) -> end. Names are kept as they are: a
store made with this family mirrors the GGUF. ``convert`` uses it for GGUF architectures
transformers does not read as a llama-family model, and for any GGUF with ``gguf_names=True``
(``--gguf-names``); a llama or qwen2 GGUF otherwise gets Hugging Face names and the llama family
(:mod:`sepstore.convert.gguf_hf`). llama.cpp uses ``token_embd.weight`` as the LM head when a
file has no ``output.weight``, so end then gets it as ``output.weight``. No ``model_type`` selects
this family (GGUF files carry no HF config); ``detect`` finds it by the ``blk.N.`` names.
"""

from __future__ import annotations

import re

from ._family import Family, prefix_decider, register

__all__ = ["decider", "family"]

_BEGIN = ("token_embd.", "token_embd_norm.", "position_embd.", "token_types.")
_END = ("output_norm.", "output.", "rope_freqs.", "cls.")

#: Places a GGUF tensor name; anything unknown is a :class:`DeciderError` naming it.
decider = prefix_decider(begin=_BEGIN, layers="blk", end=_END)


family = register(
    Family(
        name="gguf",
        decider=decider,
        model_types=(),
        layers="blk",
        embed_key="token_embd.weight",
        head_key="output.weight",
        ties_by_default=True,
        signature=re.compile(r"^blk\.\d+\."),
    )
)
