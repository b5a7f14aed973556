"""Tensor sources for single checkpoint files: safetensors (read by ranges, on any fsspec
filesystem) and PyTorch pickles (``.bin``/``.pth``, always ``weights_only=True``)."""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from ..errors import IntegrityError, StoreError
from ..safetensors_io import DTYPES, MAX_HEADER_BYTES, HeaderEntry, parse_header
from ..store import backend_errors
from .source import TensorInfo

__all__ = ["PickleFile", "SafetensorsFile"]


class SafetensorsFile:
    """A safetensors file whose header is read first and each tensor on demand, by byte range."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
        self.fs, self.path, self.url = fs, path, url
        with backend_errors(url):
            size = int(fs.size(path))
            head = fs.cat_file(path, start=0, end=min(8, size))
            if len(head) == 8:
                (length,) = struct.unpack("<Q", head)
                if length <= MAX_HEADER_BYTES and 8 + length <= size:
                    head += fs.cat_file(path, start=8, end=8 + length)
        self._entries: dict[str, HeaderEntry] = parse_header(head, size, where=url)
        self.index: dict[str, TensorInfo] = {k: TensorInfo(DTYPES[e.dtype], e.shape) for k, e in self._entries.items()}
        self._file: Any = None

    def read(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        out = torch.empty(entry.end - entry.start, dtype=torch.uint8)
        with backend_errors(self.url):
            if self._file is None:
                self._file = self.fs.open(self.path, "rb")
            self._file.seek(entry.start)
            got = self._file.readinto(memoryview(out.numpy()))
        if got != entry.end - entry.start:
            raise IntegrityError(f"{self.url}: tensor {key!r} is truncated ({got} of {entry.end - entry.start} bytes)")
        return out.view(DTYPES[entry.dtype]).reshape(entry.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class PickleFile:
    """A ``torch.save`` checkpoint, loaded with ``weights_only=True`` (never arbitrary code) and,
    for local zip-format files, memory-mapped so tensors are read only when asked for."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
        self.url = url
        with backend_errors(url):
            source: str | io.BytesIO = path if isinstance(fs, LocalFileSystem) else io.BytesIO(fs.cat_file(path))
        try:
            loaded = _load_weights(source)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for what it refuses
            raise StoreError(f"{url}: cannot be loaded as weights only ({type(exc).__name__}: {exc})") from exc
        state = _state_dict_of(loaded, url)
        self._tensors = state
        self.index: dict[str, TensorInfo] = {k: TensorInfo(t.dtype, tuple(t.shape)) for k, t in state.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def _load_weights(source: str | io.BytesIO) -> object:
    if isinstance(source, str):
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
    return torch.load(source, map_location="cpu", weights_only=True)


def _state_dict_of(loaded: object, url: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle: a state dict, or one wrapped as ``{"state_dict": ...}``."""
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise StoreError(f"{url}: holds a {type(loaded).__name__}, not a state dict")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise StoreError(f"{url}: holds no tensors")
    return tensors
