"""The homes of a sepstore: one interface (:class:`Store`, :mod:`sepstore.stores.base`) with capability
flags, and its implementations: local disk (:mod:`.local`), fsspec object stores and read-only HTTP
(:mod:`.fsspec`), and OCI registries (:mod:`.registry`). ``Store(url)`` opens the right one."""

from __future__ import annotations

from .base import Store

__all__ = ["Store"]
