"""What every checkpoint reader provides: a tensor index read up front, and tensors read one by one.

A converter never holds more than the part it is building: it reads the index first (safetensors
headers, an HF ``*.index.json``, a GGUF tensor table), groups keys into parts with a decider, then
asks for each part's tensors only when it builds that part.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import DeciderError
from ..safetensors_io import FLOATING, ITEMSIZE, RawTensor

__all__ = ["LazyStateDict", "TensorInfo", "TensorSource"]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What the index says of a tensor, before any of its bytes are read."""

    #: The safetensors dtype name (``"BF16"``).
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


class TensorSource(Protocol):
    """One file (or shard) of a checkpoint."""

    #: Every tensor in the file, by checkpoint key, read without reading tensor data.
    index: Mapping[str, TensorInfo]

    def read(self, key: str) -> RawTensor:
        """The tensor's bytes, in the file's own dtype (a file range, or a buffer once read)."""
        ...


class LazyStateDict(Mapping[str, RawTensor]):
    """A state dict over several sources whose tensors are read when asked for, one by one.

    ``aliases`` map an extra key onto an existing one (a tied LM head onto the embeddings);
    ``dtype`` (a safetensors dtype name) casts floating-point tensors as they are read.
    """

    def __init__(
        self,
        sources: Sequence[TensorSource],
        *,
        aliases: Mapping[str, str] | None = None,
        dtype: str | None = None,
    ) -> None:
        self._where: dict[str, tuple[TensorSource, str]] = {}
        for source in sources:
            for key in source.index:
                if key in self._where:
                    raise DeciderError(f"checkpoint key {key!r} is in more than one file")
                self._where[key] = (source, key)
        for alias, target in (aliases or {}).items():
            self._where[alias] = self._where[target]
        self.dtype = dtype

    def info(self, key: str) -> TensorInfo:
        source, name = self._where[key]
        info = source.index[name]
        if self.dtype is not None and info.dtype in FLOATING:
            return TensorInfo(self.dtype, info.shape)
        return info

    def nbytes_of(self, key: str) -> int:
        return self.info(key).nbytes

    def __getitem__(self, key: str) -> RawTensor:
        return self.read_many([key])[key]

    def read_many(self, keys: Sequence[str]) -> dict[str, RawTensor]:
        """The tensors of ``keys`` (a part's), each source asked once for all of its own: a remote
        source reads them concurrently."""
        names: dict[TensorSource, list[str]] = {}
        for key in keys:
            source, name = self._where[key]
            names.setdefault(source, []).append(name)
        read = {source: _read_all(source, wanted) for source, wanted in names.items()}
        out: dict[str, RawTensor] = {}
        for key in keys:
            source, name = self._where[key]
            out[key] = self._cast(read[source][name])
        return out

    def _cast(self, tensor: RawTensor) -> RawTensor:
        if self.dtype is None or tensor.dtype not in FLOATING or tensor.dtype == self.dtype:
            return tensor
        from ..tensors import cast

        return cast(tensor, self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors)"


def _read_all(source: TensorSource, names: Sequence[str]) -> dict[str, RawTensor]:
    """``source.read_many(names)`` where the source reads several at once, else one by one."""
    many = getattr(source, "read_many", None)
    return dict(many(names)) if many is not None else {name: source.read(name) for name in names}
