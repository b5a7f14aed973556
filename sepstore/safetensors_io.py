"""Reading and writing part files: plain safetensors files with deterministic bytes, without torch.

sepstore writes safetensors itself rather than through ``safetensors.torch.save`` so that a part
streams to disk tensor by tensor, with no whole-part buffer in memory, while its file digest and
every tensor digest are computed beside the writing. The layout is what any safetensors reader
expects: an 8-byte little-endian header length, a JSON header (keys sorted, padded with spaces to
a multiple of 8), then the tensor bytes, ordered by alignment (largest element first) and then by
name, so every tensor starts at an offset that is a multiple of its element size.

Tensors to write are :class:`RawTensor` values (dtype name, shape, bytes): a buffer in memory (a
torch tensor's, see :mod:`sepstore.tensors`) or a byte range of a source file, which is copied
into the part by the kernel (``copy_file_range``) without passing through this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from mmap import ACCESS_READ, mmap

from .errors import IntegrityError
from .hashing import Hasher, digest_of

__all__ = [
    "FLOATING",
    "ITEMSIZE",
    "BufferTensor",
    "HeaderEntry",
    "RawTensor",
    "TensorRecord",
    "WrittenPart",
    "copy_range",
    "header_end",
    "layout",
    "parse_header",
    "pread_exact",
    "pwrite_all",
    "write_part",
]

#: Bytes per element of every safetensors dtype sepstore stores (those safetensors' torch API knows).
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
#: The floating-point dtypes (what ``convert``'s ``dtype`` casts).
FLOATING = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F16", "BF16", "F32", "F64"})

#: Refuse headers larger than this before reading them (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

#: The most elements a tensor may have, counting each zero dimension as 1 so that no partial
#: product of its shape is larger either: torch keeps sizes and element counts in int64.
MAX_ELEMENTS = 2**63 - 1

#: Large buffers are written in pieces of this size: single multi-MiB writes were 2x slower here
#: (the kernel then fills huge page-cache folios, slow to come by on some VMs; see bench_convert.py).
WRITE_PIECE = 1024 * 1024

#: A part is written, and hashed behind the writing, in pieces of this size.
HASH_PIECE = 16 * 1024 * 1024


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """``os.pwrite`` of all of ``data`` at ``offset``, in ``WRITE_PIECE`` slices."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + WRITE_PIECE], offset + done)


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, count: int) -> int:
    """Copy ``count`` bytes between two files at the given offsets, in the kernel where it can
    (``copy_file_range``), else through a buffer; returns how many were copied (fewer only when
    ``src`` ends first)."""
    done = 0
    fast = hasattr(os, "copy_file_range")
    while done < count:
        if fast:
            try:
                n = os.copy_file_range(src, dst, count - done, src_offset + done, dst_offset + done)
            except OSError:  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: not between these files here
                n = 0
            if n == 0:  # an error, or a filesystem that copies nothing: the buffer says if src ended
                fast = False
                continue
        else:
            data = os.pread(src, min(count - done, WRITE_PIECE), src_offset + done)
            n = len(data)
            if n == 0:
                break
            pwrite_all(dst, data, dst_offset + done)
        done += n
    return done


def pread_exact(fd: int, count: int, offset: int) -> bytearray:
    """``count`` bytes of ``fd`` from ``offset`` (fewer only where the file ends first)."""
    data = bytearray()
    while len(data) < count:
        chunk = os.pread(fd, min(count - len(data), HASH_PIECE), offset + len(data))
        if not chunk:
            break
        data += chunk
    return data


class RawTensor:
    """A tensor as a part file holds it: a safetensors dtype name, a shape and row-major bytes."""

    __slots__ = ("dtype", "nbytes", "shape")

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, shape
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        self.nbytes = n

    def read(self) -> memoryview:
        """All of the tensor's bytes."""
        raise NotImplementedError

    def write_into(self, fd: int, at: int, start: int, stop: int) -> None:
        """Write the tensor's bytes ``[start, stop)`` into the file ``fd`` at offset ``at``."""
        pwrite_all(fd, self.read()[start:stop], at)


class BufferTensor(RawTensor):
    """A tensor whose bytes are in memory (anything with the buffer protocol; never copied)."""

    __slots__ = ("data",)

    def __init__(self, dtype: str, shape: tuple[int, ...], data: memoryview | bytes | bytearray) -> None:
        super().__init__(dtype, shape)
        self.data = memoryview(data).cast("B")
        if len(self.data) != self.nbytes:
            raise ValueError(f"{len(self.data)} bytes for a {dtype}{list(shape)} tensor of {self.nbytes}")

    def read(self) -> memoryview:
        return self.data


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """What a part file says of one tensor, with the digest of its raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    digest: str


@dataclass(frozen=True, slots=True)
class WrittenPart:
    digest: str
    size: int
    tensors: dict[str, TensorRecord]


def layout(
    tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = None
) -> tuple[list[tuple[str, int]], bytes]:
    """Each tensor's name and offset in file order, and the file's length prefix plus header (with
    ``__metadata__`` when given; parts have none)."""
    order = sorted(tensors, key=lambda n: (-ITEMSIZE[tensors[n].dtype], n))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata is not None else {}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    base = 8 + len(header_bytes)
    placed, offset = [], base
    for name in order:
        placed.append((name, offset))
        offset += tensors[name].nbytes
    return placed, struct.pack("<Q", len(header_bytes)) + header_bytes


def write_part(tensors: Mapping[str, RawTensor], fd: int) -> WrittenPart:
    """Write ``tensors`` as a safetensors file into the empty, readable and writable file ``fd``;
    returns its digest, size and table.

    The bytes are written piece by piece while a second thread hashes each piece once written, read
    back from ``fd`` itself (through a memory map, or ``pread`` where the file cannot be mapped): the
    digests are of the bytes in the file, whatever happens to the sources meanwhile. Every byte goes
    through the file hasher once and through its tensor's hasher once.
    """
    placed, head = layout(tensors)
    size = len(head) + sum(t.nbytes for t in tensors.values())
    os.ftruncate(fd, size)
    pwrite_all(fd, head, 0)
    file_hasher = Hasher()
    file_hasher.update(head)
    digests = {name: Hasher() for name, _ in placed}
    try:
        mapped: mmap | None = mmap(fd, size, access=ACCESS_READ)
    except OSError:  # a filesystem that cannot map files (FUSE with direct_io): read back instead
        mapped = None

    def hash_piece(name: str, lo: int, hi: int) -> None:
        if mapped is None:
            data = pread_exact(fd, hi - lo, lo)
            file_hasher.update(data)
            digests[name].update(data)
            return
        with memoryview(mapped) as whole, whole[lo:hi] as piece:  # released even if hashing fails
            file_hasher.update(piece)
            digests[name].update(piece)

    hashing = ThreadPoolExecutor(1, "sepstore-hash")
    try:
        pending: list[Future[None]] = []
        for name, at in placed:
            tensor = tensors[name]
            for start in range(0, tensor.nbytes, HASH_PIECE):
                stop = min(start + HASH_PIECE, tensor.nbytes)
                tensor.write_into(fd, at + start, start, stop)
                pending.append(hashing.submit(hash_piece, name, at + start, at + stop))
        for future in pending:
            future.result()
    finally:
        try:
            hashing.shutdown(cancel_futures=True)
        finally:
            if mapped is not None:
                with contextlib.suppress(BufferError):  # interrupted while a piece is hashed: GC closes it
                    mapped.close()
    records = {name: TensorRecord(t.dtype, t.shape, digest_of(digests[name])) for name, t in sorted(tensors.items())}
    return WrittenPart(digest_of(file_hasher), size, records)


@dataclass(frozen=True, slots=True)
class HeaderEntry:
    """One tensor of a parsed header: dtype, shape and absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def shape_problem(shape: tuple[int, ...] | list[int]) -> str | None:
    """Why ``shape`` cannot be a tensor's (a dimension that is not an int >= 0, or too many elements
    for torch), or ``None`` when it can."""
    volume = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return f"dimension {d!r} is not a whole number >= 0"
        volume *= max(d, 1)
        if volume > MAX_ELEMENTS:
            return f"more than {MAX_ELEMENTS} elements"
    return None


def header_end(prefix: bytes | memoryview, file_size: int) -> int:
    """How many of a file's first bytes :func:`parse_header` needs, from its first 8: the length
    prefix and the header, or just the prefix when the length cannot be right (it then says why)."""
    if len(prefix) < 8:
        return 8
    (length,) = struct.unpack("<Q", bytes(prefix[:8]))
    return 8 + length if length <= MAX_HEADER_BYTES and 8 + length <= file_size else 8


def parse_header(prefix: memoryview | bytes, file_size: int, *, where: str) -> dict[str, HeaderEntry]:
    """Parse and validate a safetensors header from the file's first bytes.

    ``prefix`` must hold at least the first 8 bytes; the header length is checked against
    ``file_size`` before the header is decoded, so a hostile length allocates nothing. Offsets must
    tile the data section exactly (no gaps, no overlaps, nothing outside the file), and each
    tensor's byte length must equal its shape times its element size, and its shape must be one torch
    can hold. ``__metadata__``, if present, must be what safetensors allows: a flat map of strings to
    strings.
    """

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{where}: invalid safetensors header: {why}")

    if file_size < 8 or len(prefix) < 8:
        raise bad(f"file is {file_size} bytes, too short for a header")
    (length,) = struct.unpack("<Q", bytes(prefix[:8]))
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise bad(f"header length {length} does not fit in a {file_size}-byte file")
    if len(prefix) < 8 + length:
        raise bad("header is truncated")
    try:
        raw = json.loads(bytes(prefix[8 : 8 + length]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    if not isinstance(raw, dict):
        raise bad("not a JSON object")
    metadata = raw.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not a map of strings to strings")
    base = 8 + length
    entries: dict[str, HeaderEntry] = {}
    for name, info in raw.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r:.200}")
        problem = shape_problem(shape) if isinstance(shape, list) else "not a list"
        if problem is not None:
            raise bad(f"tensor {name!r} has invalid shape {shape!r:.200}: {problem}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r:.200}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape!r:.200} of {dtype}")
        entries[name] = HeaderEntry(dtype, tuple(shape), base + offsets[0], base + offsets[1])
    position = base
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            raise bad("tensor data overlaps or leaves a gap")
        position = entry.end
    if position != file_size:
        raise bad(f"tensor data ends at byte {position}, file has {file_size}")
    return entries
