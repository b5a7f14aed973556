"""Numbers as people read and write them, for the command line and reprs."""

from __future__ import annotations

import re

from .errors import SpecError

__all__ = ["counted", "human_bytes", "parse_size"]

_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


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


def parse_size(text: str) -> int:
    """``"24GiB"``, ``"16G"``, ``"512MB"``, ``"1000"`` to bytes (``Ki``/``Mi``/``Gi`` are powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise SpecError(f"cannot read {text!r} as a size; write e.g. 24GiB, 16GB or 512MiB")
    number, unit, binary = float(match[1]), match[2].upper(), bool(match[3])
    factor = 1024 ** "KMGT".index(unit) * 1024 if binary and unit else _UNITS[unit]
    return int(number * factor)
