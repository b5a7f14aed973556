"""Part: an ``nn.Module`` holding some of a model's begin, layers and end, as in llm_sepweight."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import SpecError

__all__ = ["Part"]


class Part(nn.Module):
    """``begin``, ``mid`` (an ``nn.ModuleDict`` keyed by layer number) and ``end``, run in order.

    Its state-dict keys (``begin.X``, ``mid.<i>.X``, ``end.X``) are those of
    :meth:`PartStateDict.to_dict` and :func:`sepstore.lazy_load`.
    """

    def __init__(
        self,
        begin: Callable[[], nn.Module] | None = None,
        mid: Callable[[], nn.Module] | None = None,
        end: Callable[[], nn.Module] | None = None,
        mid_range: range | None = None,
    ) -> None:
        super().__init__()
        if mid_range is not None and not isinstance(mid_range, range):
            raise SpecError(f"mid_range must be a range, got {type(mid_range).__name__}")
        if (mid is None) != (mid_range is None):
            raise SpecError("mid and mid_range go together: give both or neither")
        self.begin = begin() if begin is not None else None
        self.mid = (
            nn.ModuleDict({str(i): mid() for i in mid_range}) if mid is not None and mid_range is not None else None
        )
        self.end = end() if end is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.begin is not None:
            x = self.begin(x)
        if self.mid is not None:
            for layer in self.mid.values():
                x = layer(x)
        if self.end is not None:
            x = self.end(x)
        return x
