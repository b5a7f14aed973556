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

from ..dump import Placement
from ..errors import DeciderError
from ._family import Family, register

__all__ = ["decider", "family"]

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_BEGIN = ("token_embd.", "token_embd_norm.", "position_embd.", "token_types.")
_END = ("output_norm.", "output.", "rope_freqs.", "cls.")


def decider(key: str) -> Placement:
    """Place a GGUF tensor name; anything unknown is a :class:`DeciderError` naming it."""
    match = _LAYER.match(key)
    if match:
        return "mid", int(match[1]), match[2]
    if key.startswith(_BEGIN):
        return "begin", key
    if key.startswith(_END):
        return "end", key
    raise DeciderError(
        f"GGUF tensor {key!r} is not token_embd.* (begin), blk.N.* (layer N) or output_norm.*, output.*, "
        "rope_freqs.* (end)"
    )


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
