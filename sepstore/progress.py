"""Progress bars for long transfers: bytes and rate on stderr, silent when it is not a terminal."""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(total: int, desc: str, *, quiet: bool = False) -> tqdm:
    """A bytes progress bar; off when ``quiet`` or when stderr is not a terminal."""
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=True if quiet else None)
