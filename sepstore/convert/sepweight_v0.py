"""llm_sepweight 0.10.0 directories (``begin.pth``, ``mid.NNNNN.pth``, ``end.pth``), so their users
can migrate: every file is loaded with ``weights_only=True``, never as arbitrary pickles."""

from __future__ import annotations

import re
from collections.abc import Mapping

import fsspec

from ..dump import Placement
from ..errors import DeciderError
from ..safetensors_io import RawTensor
from .files import PickleFile
from .source import TensorInfo

__all__ = ["SepweightV0Part", "decider", "is_sepweight_v0", "sources"]

_MID = re.compile(r"^mid\.(\d+)\.pth\Z")
_KEY = re.compile(r"^mid\.(\d+)\.(.+)\Z", re.DOTALL)


class SepweightV0Part:
    """One llm_sepweight file, its keys presented as ``begin.X``, ``mid.<i>.X`` or ``end.X``.

    llm_sepweight 0.10.0 stores a layer's keys as ``h.<i>.X``; that prefix is removed.
    """

    def __init__(self, file: PickleFile, label: str) -> None:
        self._file = file
        layer = label.removeprefix("mid.")
        self._names: dict[str, str] = {}
        for key in file.index:
            short = key.removeprefix(f"h.{layer}.") if label.startswith("mid.") else key
            self._names[f"{label}.{short}"] = key
        self.index: Mapping[str, TensorInfo] = {new: file.index[old] for new, old in self._names.items()}

    def read(self, key: str) -> RawTensor:
        return self._file.read(self._names[key])


def is_sepweight_v0(names: set[str]) -> bool:
    return "begin.pth" in names or "end.pth" in names or any(_MID.match(n) for n in names)


def sources(fs: fsspec.AbstractFileSystem, folder: str, names: set[str]) -> list[SepweightV0Part]:
    """The parts of an llm_sepweight directory, in begin, layer, end order."""
    labelled = [("begin", "begin.pth")] if "begin.pth" in names else []
    mids = sorted((int(m[1]), n) for n in names if (m := _MID.match(n)))
    labelled += [(f"mid.{i}", n) for i, n in mids]
    labelled += [("end", "end.pth")] if "end.pth" in names else []
    return [
        SepweightV0Part(PickleFile(fs, f"{folder}/{n}", fs.unstrip_protocol(f"{folder}/{n}")), label)
        for label, n in labelled
    ]


def decider(key: str) -> Placement:
    """Places the keys :class:`SepweightV0Part` presents: their part is already in their name."""
    if key.startswith("begin."):
        return "begin", key.removeprefix("begin.")
    if key.startswith("end."):
        return "end", key.removeprefix("end.")
    match = _KEY.match(key)
    if match:
        return "mid", int(match[1]), match[2]
    raise DeciderError(f"key {key!r} is not from an llm_sepweight directory")
