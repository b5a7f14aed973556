"""Reading and writing part files: plain safetensors files with deterministic bytes.

sepstore writes safetensors itself rather than through ``safetensors.torch.save`` so that a part
streams to disk tensor by tensor while its file digest and every tensor digest are computed in the
same pass, with no whole-part buffer in memory. The layout is what any safetensors reader expects:
an 8-byte little-endian header length, a JSON header (keys sorted, padded with spaces to a multiple
of 8), then the tensor bytes, ordered by alignment (largest element first) and then by name, so
every tensor starts at an offset that is a multiple of its element size.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch

from .errors import IntegrityError
from .hashing import Hasher, digest_buffer, digest_of

__all__ = [
    "DTYPES",
    "HeaderEntry",
    "TensorRecord",
    "dtype_name",
    "parse_header",
    "pwrite_all",
    "raw_bytes",
    "write_all",
    "write_part",
]

#: safetensors dtype name -> torch dtype, for every dtype safetensors' torch API knows.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "C64": torch.complex64,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

#: Refuse headers larger than this before reading them (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

#: Large buffers are written in pieces of this size: single multi-MiB writes were 2x slower here
#: (the kernel then fills huge page-cache folios, slow to come by on some VMs; see bench_convert.py).
WRITE_PIECE = 1024 * 1024


def write_all(out: BinaryIO, data: memoryview | bytes) -> None:
    """``out.write(data)`` in ``WRITE_PIECE`` slices (zero-copy views)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_PIECE):
        out.write(view[start : start + WRITE_PIECE])


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """``os.pwrite`` of all of ``data`` at ``offset``, in ``WRITE_PIECE`` slices."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + WRITE_PIECE], offset + done)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; a ``TypeError`` for dtypes safetensors lacks."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TypeError(f"safetensors cannot store tensors of dtype {dtype}") from None


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is already contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


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


def write_part(tensors: Mapping[str, torch.Tensor], out: BinaryIO) -> WrittenPart:
    """Write ``tensors`` to ``out`` as a safetensors file; returns its digest, size and table.

    Every byte goes through the file hasher once; each tensor's bytes also through its own.
    """
    prepared = {name: (dtype_name(t.dtype), tuple(t.shape), raw_bytes(t)) for name, t in tensors.items()}
    order = sorted(prepared, key=lambda n: (-DTYPES[prepared[n][0]].itemsize, n))
    header: dict[str, object] = {}
    offset = 0
    for name in order:
        dtype, shape, data = prepared[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    file_hasher = Hasher()
    for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
        file_hasher.update(chunk)
        out.write(chunk)
    records: dict[str, TensorRecord] = {}
    for name in order:
        dtype, shape, data = prepared[name]
        file_hasher.update(data)
        write_all(out, data)
        records[name] = TensorRecord(dtype, shape, digest_buffer(data))
    size = 8 + len(header_bytes) + offset
    return WrittenPart(digest_of(file_hasher), size, dict(sorted(records.items())))


@dataclass(frozen=True, slots=True)
class HeaderEntry:
    """One tensor of a parsed header: dtype, shape and absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def parse_header(prefix: memoryview | bytes, file_size: int, *, where: str) -> dict[str, HeaderEntry]:
    """Parse and validate a safetensors header from the file's first bytes.

    ``prefix`` must hold at least the first 8 bytes; the header length is checked against
    ``file_size`` before the header is decoded, so a hostile length allocates nothing. Offsets must
    tile the data section exactly (no gaps, no overlaps, nothing outside the file), and each
    tensor's byte length must equal its shape times its element size.
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
    if not isinstance(raw, dict):
        raise bad("not a JSON object")
    raw.pop("__metadata__", None)
    base = 8 + length
    entries: dict[str, HeaderEntry] = {}
    for name, info in raw.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * DTYPES[dtype].itemsize:
            raise bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
        entries[name] = HeaderEntry(dtype, tuple(shape), base + offsets[0], base + offsets[1])
    position = base
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            raise bad("tensor data overlaps or leaves a gap")
        position = entry.end
    if position != file_size:
        raise bad(f"tensor data ends at byte {position}, file has {file_size}")
    return entries
