"""BLAKE3 digests in the OCI form ``blake3:<64 lowercase hex>``."""

from __future__ import annotations

import os
import re

from blake3 import blake3

__all__ = ["DIGEST_PATTERN", "END", "Hasher", "digest_buffer", "digest_file", "digest_hex", "digest_of"]

#: ``$(?!\n)`` ends every pattern sepstore checks: in Python ``$`` also matches before a final
#: newline, and msgspec applies ``Meta(pattern=)`` with ``re.search``; in JSON Schema (ECMA-262)
#: ``$`` is the end already and the lookahead changes nothing.
END = r"$(?!\n)"
DIGEST_PATTERN = rf"^blake3:[0-9a-f]{{64}}{END}"
_DIGEST_RE = re.compile(DIGEST_PATTERN)
_PREFIX = "blake3:"


def Hasher() -> blake3:  # noqa: N802 - reads as a type at call sites
    """A fresh BLAKE3 hasher that spreads large updates over all cores."""
    return blake3(max_threads=blake3.AUTO)


def _form(hasher: blake3) -> str:
    return _PREFIX + hasher.hexdigest()


def digest_buffer(data: bytes | bytearray | memoryview) -> str:
    """Digest of an in-memory buffer (anything with the buffer protocol, copied never)."""
    hasher = Hasher()
    hasher.update(data)
    return _form(hasher)


def digest_file(path: str | os.PathLike[str]) -> str:
    """Digest of a local file, hashed from a memory map with BLAKE3's threads."""
    hasher = Hasher()
    hasher.update_mmap(path)
    return _form(hasher)


def digest_of(hasher: blake3) -> str:
    """The ``blake3:<hex>`` form of a hasher's current state."""
    return _form(hasher)


def digest_hex(digest: str) -> str:
    """The hex of a validated ``blake3:<hex>`` digest; refuses anything else."""
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a blake3 digest: {digest!r}")
    return digest[len(_PREFIX) :]
