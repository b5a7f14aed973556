"""Part specs: which parts of a model a node needs, as in llm_sepweight (``"b 0-5"``, ``"75-80 e"``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import NotFoundError, SpecError
from .manifest import Manifest, Part

__all__ = ["PartSpec", "select_parts"]

_RANGE = re.compile(r"^(\d+)-(\d+)\Z")


@dataclass(frozen=True, slots=True)
class PartSpec:
    """A parsed spec: whether begin and end are wanted, and half-open layer ranges in spec order."""

    begin: bool
    ranges: tuple[range, ...]
    end: bool
    full: bool = False

    @classmethod
    def parse(cls, spec: str, n_layers: int) -> PartSpec:
        """Parse ``spec`` for a model of ``n_layers`` layers.

        ``f`` is the whole model; ``b`` begin; ``e`` end; ``a-b`` layers ``a`` to ``b-1``. Tokens
        combine (``"b 0-5 e"``). Unknown tokens, empty or reversed ranges, ranges outside
        ``0..n_layers``, overlaps and repeats are :class:`SpecError`.
        """
        if not isinstance(spec, str):
            raise SpecError(f"a part spec is a string such as 'b 0-5', got {type(spec).__name__}")
        tokens = spec.split()
        if not tokens:
            raise SpecError("empty part spec: use 'f' for the whole model, or e.g. 'b 0-5', '5-10', '10-12 e'")
        if "f" in tokens:
            if len(tokens) > 1:
                raise SpecError(f"part spec {spec!r}: 'f' (the full model) cannot be combined with other tokens")
            return cls(begin=True, ranges=(range(n_layers),) if n_layers else (), end=True, full=True)
        begin = end = False
        ranges: list[range] = []
        for token in tokens:
            if token in ("b", "e"):
                if begin if token == "b" else end:
                    raise SpecError(f"part spec {spec!r}: {token!r} is given twice")
                begin, end = begin or token == "b", end or token == "e"
                continue
            match = _RANGE.match(token)
            if match is None:
                raise SpecError(
                    f"part spec {spec!r}: unknown token {token!r}; tokens are 'f', 'b', 'e' and ranges "
                    f"'a-b' of layers 0..{n_layers}"
                )
            start, stop = int(match[1]), int(match[2])
            if start >= stop:
                raise SpecError(
                    f"part spec {spec!r}: range {token!r} is empty or reversed (ranges are half-open, "
                    f"over the model's {n_layers} layers)"
                )
            if stop > n_layers:
                raise SpecError(f"part spec {spec!r}: range {token!r} is outside the model's {n_layers} layers")
            new = range(start, stop)
            for other in ranges:
                if new.start < other.stop and other.start < new.stop:
                    raise SpecError(f"part spec {spec!r}: range {token!r} overlaps {other.start}-{other.stop}")
            ranges.append(new)
        return cls(begin=begin, ranges=tuple(ranges), end=end)

    @property
    def layers(self) -> list[int]:
        """Every layer the spec names, in spec order."""
        return [i for r in self.ranges for i in r]

    @property
    def main_range(self) -> range | None:
        """The first range, onto which ``PartStateDict.to_dict`` numbers layers (llm_sepweight's rule)."""
        return self.ranges[0] if self.ranges else None

    def labels(self) -> list[str]:
        """Part labels in load order: ``begin``, ``mid.<i>`` ..., ``end``."""
        return (["begin"] if self.begin else []) + [f"mid.{i}" for i in self.layers] + (["end"] if self.end else [])

    def __str__(self) -> str:
        if self.full:
            return "f"
        tokens = (["b"] if self.begin else []) + [f"{r.start}-{r.stop}" for r in self.ranges]
        return " ".join(tokens + (["e"] if self.end else []))


def select_parts(manifest: Manifest, spec: str | PartSpec) -> tuple[PartSpec, list[tuple[str, Part]]]:
    """The parsed spec and the ``(label, part)`` pairs it selects from ``manifest``, in spec order;
    a :class:`NotFoundError` for a selected part the manifest lacks."""
    parsed = spec if isinstance(spec, PartSpec) else PartSpec.parse(spec, manifest.n_layers)
    chosen: list[tuple[str, Part]] = []
    if parsed.begin and (manifest.begin is not None or not parsed.full):
        if manifest.begin is None:
            raise NotFoundError(f"model {manifest.name!r} has no begin part (spec {str(parsed)!r})")
        chosen.append(("begin", manifest.begin))
    for layer in parsed.layers:
        part = manifest.mid[layer]
        if part is None:
            raise NotFoundError(f"model {manifest.name!r} has no part for layer {layer} yet (incomplete dump?)")
        chosen.append((f"mid.{layer}", part))
    if parsed.end and (manifest.end is not None or not parsed.full):
        if manifest.end is None:
            raise NotFoundError(f"model {manifest.name!r} has no end part (spec {str(parsed)!r})")
        chosen.append(("end", manifest.end))
    return parsed, chosen
