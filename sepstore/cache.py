"""The local cache of remote parts: the store's ``parts/blake3/`` layout, verified on the way in.

A part is streamed into a temporary file in the cache while it is hashed and renamed to its digest
name only when its size and digest match, so the cache never holds a file whose bytes do not
match its name, and several processes can fill one cache at once.
"""

from __future__ import annotations

import contextlib
import os

import fsspec

from .errors import IntegrityError
from .hashing import Hasher, digest_hex, digest_of
from .manifest import Part
from .store import PARTS_DIR, backend_errors, create_temp

__all__ = ["Cache", "default_cache_dir"]

_CHUNK = 8 * 1024 * 1024


def default_cache_dir() -> str:
    """``$SEPSTORE_CACHE``, else ``~/.cache/sepstore``."""
    return os.environ.get("SEPSTORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sepstore")


class Cache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root) if root is not None else default_cache_dir())
        self.parts = os.path.join(self.root, *PARTS_DIR.split("/"))

    def path(self, digest: str) -> str:
        return os.path.join(self.parts, f"{digest_hex(digest)}.safetensors")

    def has(self, digest: str) -> bool:
        return os.path.exists(self.path(digest))

    def fetch(self, fs: fsspec.AbstractFileSystem, src: str, url: str, part: Part, label: str) -> str:
        """Copy the part at ``src`` into the cache, verifying it on the way; returns the cached path."""
        final = self.path(part.digest)
        os.makedirs(self.parts, exist_ok=True)
        fd, tmp = create_temp(self.parts, ".safetensors")
        try:
            hasher, size = Hasher(), 0
            with os.fdopen(fd, "wb") as out, backend_errors(url), fs.open(src, "rb") as remote:
                while chunk := remote.read(_CHUNK):
                    size += len(chunk)
                    if size > part.size:
                        raise IntegrityError(
                            f"part {label} at {url}: more than the {part.size} bytes the manifest says"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
            got = digest_of(hasher)
            if size != part.size:
                raise IntegrityError(f"part {label} at {url}: {size} bytes, manifest says {part.size}")
            if got != part.digest:
                raise IntegrityError(f"part {label} at {url}: digest is {got}, manifest says {part.digest}")
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return final
