"""Numbers as people read them, for the command line and reprs."""

from __future__ import annotations

__all__ = ["counted", "human_bytes"]


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``2.0 GiB``."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def counted(n: int, noun: str) -> str:
    """``1 part``, ``2 parts``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
