"""Built-in deciders: where each key of a model family's checkpoint goes (begin, layer N, end).

Each family is a :class:`Family` in its own module (``sepstore.deciders.llama``, ...); its
``decider`` is a plain function usable with :func:`sepstore.dump`. :func:`detect` picks a family
from ``config.json`` (``model_type``, ``architectures``) and falls back to key patterns.
"""

from __future__ import annotations

from ._family import Family, detect, get, register

__all__ = ["Family", "detect", "get", "register"]
