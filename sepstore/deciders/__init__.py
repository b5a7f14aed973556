"""Built-in deciders: where each key of a model family's checkpoint goes (begin, layer N, end).

Each family is a :class:`Family` in its own module (``from sepstore.deciders.llama import
decider``, or ``sepstore.deciders.get("llama").decider``); its ``decider`` is a plain function for
:func:`sepstore.dump`, which also takes the family's name (``dump("llama", ...)``):

- ``sepstore.deciders.llama``: llama, mistral, mixtral, qwen2/qwen3, gemma, gemma2, phi3, phi, ...
- ``sepstore.deciders.gpt2``: gpt2 (and gpt_bigcode)
- ``sepstore.deciders.gpt_neox``: gpt_neox (Pythia)
- ``sepstore.deciders.falcon``, ``sepstore.deciders.bloom``, ``sepstore.deciders.opt``
- ``sepstore.deciders.bert``: bert and roberta encoders
- ``sepstore.deciders.gguf``: GGUF tensor names (``token_embd``, ``blk.N``, ``output``)

A layer part holds the checkpoint's keys made relative to the layer module, so
``layer.load_state_dict(family.skip_buffers(psd.mid[i], layer.state_dict()), strict=True)`` works
for ``layer = model.get_submodule(family.layers)[i]`` (``skip_buffers`` leaves out the buffers an
older checkpoint holds and the module rebuilds, :attr:`Family.buffers`; nothing is dropped, so
:func:`sepstore.export` gives the checkpoint back); begin and end keep the checkpoint's names less
the base model's prefix (``model.``, ``transformer.``). :meth:`Family.renames` is the record of
those renames a converted manifest holds.
:func:`get` gives a family by name or ``model_type``; :func:`detect` picks one from ``config.json``
(``model_type``, ``architectures``) and falls back to key patterns, and when no family places
every key it fails listing the keys. :func:`prefix_decider` builds a decider for another family
of the usual layout.
"""

from __future__ import annotations

from ._family import Family, Runtime, buffer_pattern, detect, families, get, prefix_decider, register

__all__ = ["Family", "Runtime", "buffer_pattern", "detect", "families", "get", "prefix_decider", "register"]
