"""Tensor sources for single checkpoint files: safetensors (read by ranges, on any fsspec
filesystem) and PyTorch pickles (``.bin``/``.pth``, always ``weights_only=True``)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .._text import human_bytes
from ..backends import stream_range
from ..cache import DEFAULT_WORKERS, default_cache_dir
from ..errors import IntegrityError, StoreError, TensorError
from ..retry import with_retries
from ..safetensors_io import (
    BufferTensor,
    HeaderEntry,
    RawTensor,
    copy_range,
    header_end,
    parse_header,
    pread_exact,
    pwrite_all,
)
from ..store import backend_call, backend_errors, read_prefix
from .source import TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["FileRange", "PickleFile", "SafetensorsFile"]

#: A remote tensor is read in ranges of this size, several at once (larger than
#: :data:`sepstore.reader.READ_PIECE`, the piece a part is hashed in: a range pays a round trip).
_RANGE_BYTES = 16 * 1024 * 1024

#: Errors of the file written to, not of the checkpoint read from.
_DESTINATION_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class FileRange(RawTensor):
    """A tensor's bytes in a local file: copied into a part by the kernel where the filesystems
    allow (``copy_file_range``), else through a small buffer; read whole only when asked to."""

    __slots__ = ("fd", "start", "where")

    def __init__(self, entry: HeaderEntry, fd: int, where: str) -> None:
        super().__init__(entry.dtype, entry.shape)
        self.fd, self.start, self.where = fd, entry.start, where

    def _check(self, got: int, wanted: int) -> None:
        if got != wanted:
            raise IntegrityError(
                f"{self.where}: the file is shorter than its header says (truncated while being read?)"
            )

    def read(self) -> memoryview:
        try:
            data = pread_exact(self.fd, self.nbytes, self.start)
        except OSError as exc:
            raise StoreError(f"{self.where}: cannot be read ({exc})") from exc
        self._check(len(data), self.nbytes)
        return memoryview(data)

    def write_into(self, fd: int, at: int, start: int, stop: int) -> None:
        try:
            got = copy_range(self.fd, self.start + start, fd, at, stop - start)
        except OSError as exc:
            if exc.errno in _DESTINATION_ERRNOS:
                raise  # the part being written: the store says so
            raise StoreError(f"{self.where}: cannot be copied ({exc})") from exc
        self._check(got, stop - start)


class SafetensorsFile:
    """A safetensors file whose header is read first and each tensor on demand, by byte range:
    a local file's ranges are copied into parts by the kernel, a remote one's read into memory."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
        self.fs, self.path, self.url = fs, path, url
        self.size = size = int(backend_call(fs, url, lambda: fs.size(path)))
        head = read_prefix(fs, path, url, 8)
        end = header_end(head, size)  # at most 8 + MAX_HEADER_BYTES
        if end > 8:
            head = read_prefix(fs, path, url, end)
        self._entries: dict[str, HeaderEntry] = parse_header(head, size, where=url)
        self.index: dict[str, TensorInfo] = {k: TensorInfo(e.dtype, e.shape) for k, e in self._entries.items()}
        self._local = isinstance(fs, LocalFileSystem)
        self._fd: int | None = None

    def read(self, key: str) -> RawTensor:
        return self.read_many([key])[key]

    def read_many(self, keys: Sequence[str]) -> dict[str, RawTensor]:
        """Several tensors: from a local file as ranges the writer copies, from a remote one read
        into memory by concurrent ranged reads (a part's tensors at a time: network latency is
        paid once per part, not once per tensor)."""
        if self._local:
            with backend_errors(self.url):
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
            return {key: FileRange(self._entries[key], self._fd, f"{self.url}: tensor {key!r}") for key in keys}
        buffers = {key: bytearray(self._entries[key].end - self._entries[key].start) for key in keys}
        pieces = [
            (key, lo, min(lo + _RANGE_BYTES, len(buffers[key])))
            for key in keys
            for lo in range(0, len(buffers[key]), _RANGE_BYTES)
        ]

        def fetch(key: str, lo: int, hi: int) -> None:
            start, view = self._entries[key].start, memoryview(buffers[key])

            def write(offset: int, piece: bytes) -> None:
                if offset < start + lo:  # the whole file, from its first byte: no tensor starts there
                    raise StoreError(
                        f"{self.url}: the server ignores Range requests and sends the whole file each time; "
                        "download the checkpoint and convert the local copy"
                    )
                view[offset - start : offset - start + len(piece)] = piece

            with_retries(
                lambda: stream_range(self.fs, self.path, self.url, start + lo, start + hi, self.size, write), self.url
            )

        with ThreadPoolExecutor(min(DEFAULT_WORKERS, len(pieces)) or 1, "sepstore-read") as pool:
            futures = [pool.submit(fetch, *piece) for piece in pieces]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:  # fail now, without fetching the rest of the part first
                    future.cancel()
                raise
        return {key: BufferTensor(self._entries[key].dtype, self._entries[key].shape, buffers[key]) for key in keys}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PickleFile:
    """A ``torch.save`` checkpoint, loaded with ``weights_only=True`` (never arbitrary code) and,
    for zip-format files, memory-mapped so tensors are read only when asked for. A remote file is
    first streamed into a temporary file in the cache folder, cut at the size the server declares."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
        from ..tensors import dtype_name

        self.url = url
        local = isinstance(fs, LocalFileSystem)
        source = path if local else _download(fs, path, url)
        try:
            loaded = _load_weights(source)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for what it refuses
            raise StoreError(f"{url}: cannot be loaded as weights only ({type(exc).__name__}: {exc})") from exc
        finally:
            if not local:  # its memory map (if any) outlives the name
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(source)
        state = _state_dict_of(loaded, url)
        self._tensors = state
        self.index: dict[str, TensorInfo] = {}
        for key, tensor in state.items():
            try:
                self.index[key] = TensorInfo(dtype_name(tensor.dtype), tuple(tensor.shape))
            except TypeError as exc:
                raise TensorError(f"{url}: tensor {key!r}: {exc}") from None

    def read(self, key: str) -> RawTensor:
        from ..tensors import as_raw

        return as_raw(self._tensors[key], key)


def _download(fs: fsspec.AbstractFileSystem, path: str, url: str) -> str:
    """Stream a remote file into a new file in the cache's ``incoming`` folder, in bounded pieces
    and no longer than the size the server declares; the new file's path."""
    size = backend_call(fs, url, lambda: fs.size(path))
    if not isinstance(size, int) or size < 0:
        raise StoreError(
            f"{url}: the server does not say how large the file is; download it and convert the local copy"
        )
    folder = os.path.join(default_cache_dir(), "incoming")
    with backend_errors(folder):
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if size > free:
            raise StoreError(
                f"{url}: is {human_bytes(size)}, only {human_bytes(free)} is free in {folder}; free some space "
                "or set SEPSTORE_CACHE to a folder on a larger disk"
            )
        fd, temp = tempfile.mkstemp(prefix="convert-", suffix=".partial", dir=folder)
    try:
        with_retries(lambda: stream_range(fs, path, url, 0, size, size, lambda at, b: pwrite_all(fd, b, at)), url)
    except BaseException:
        os.unlink(temp)
        raise
    finally:
        os.close(fd)
    return temp


def _load_weights(source: str) -> object:
    import torch

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
    import torch

    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise StoreError(f"{url}: holds no tensors")
    return tensors
