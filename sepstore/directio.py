"""Writing a file from memory past the page cache (``O_DIRECT``), where the memory allows it.

A part fetched into the cache is written once and, most of the time, not read again soon: a node
that loads it by URL holds its bytes in the tensors already. Written the usual way, every byte is
first copied into fresh page-cache pages and written to disk later, by ``fsync`` at the latest;
both are kernel work, and on a VM they are most of a fetch's time (2 GiB: 2.3-6.0 s to write into
the page cache and 1.0-1.1 s to ``fsync``, against 1.1-1.3 s in all with ``O_DIRECT``, where the
disk reads the bytes straight from the process's memory; bench_remote.py's notes).

``O_DIRECT`` takes only whole blocks: memory, file offset and length all multiples of
:data:`ALIGN`. :meth:`DirectFile.pwrite` writes the blocks of a piece that are aligned in memory
*and* in the file that way, and its ends (and any piece whose memory is not aligned like its
file offset) through the page cache: the file's bytes are the same either way, and a page is
never written both ways (a partly written page is never one of the aligned blocks). Where the
filesystem refuses ``O_DIRECT`` (tmpfs before Linux 6.6), or the platform has none, every write
goes through the page cache, as before. The file must still be ``fsync``ed before it is trusted: ``O_DIRECT``
skips the page cache, not the disk's own cache or the filesystem's metadata.

Memory for :meth:`DirectFile.pwrite` to write directly is memory whose address is a multiple of
:data:`ALIGN` where the file offset 0 would be (:func:`aligned_start`).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from types import TracebackType

from .safetensors_io import pwrite_all

__all__ = ["ALIGN", "MIN_DIRECT", "WRITE_SLICE", "DirectFile", "address_of", "aligned_start"]

#: Memory, offsets and lengths written with ``O_DIRECT`` are multiples of this: a page, and a
#: multiple of any disk's logical block (512 or 4096 bytes).
ALIGN = max(4096, mmap.PAGESIZE)
#: Aligned runs shorter than this go through the page cache (one small write is not worth a
#: synchronous disk round trip).
MIN_DIRECT = 256 * 1024
#: Writes through the page cache are made this many bytes a call: here writes of 1 MiB and more
#: cost the kernel 1.5-5x the time of 256 KiB ones (it fills large page-cache folios; bench_remote.py).
WRITE_SLICE = 256 * 1024
#: ``os.O_DIRECT`` where the platform has it (Linux), else 0 (no direct writes).
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def address_of(memory: memoryview) -> int:
    """The address of ``memory``'s first byte (a writable, contiguous buffer)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(memory))


def aligned_start(address: int) -> int:
    """How many bytes past ``address`` the first :data:`ALIGN`-aligned address is (0 to ALIGN-1):
    memory for a file is allocated that much larger and used from there, so that
    :meth:`DirectFile.pwrite` can write its blocks directly."""
    return -address % ALIGN


class DirectFile:
    """A file open twice: for reading and writing at offsets through the page cache (:attr:`fd`),
    and for writing with ``O_DIRECT`` where the filesystem allows it. Safe to write from several
    threads at once (disjoint pieces)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self._direct_fd = -1
        if _O_DIRECT:
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | _O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this filesystem has no direct I/O
                    os.close(self.fd)
                    raise
        #: Whether aligned blocks are written with ``O_DIRECT`` (not where the filesystem refuses it).
        self.direct = self._direct_fd >= 0

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close both descriptors (once: a second call closes nothing another file now has)."""
        fds, self._direct_fd, self.fd, self.direct = (self._direct_fd, self.fd), -1, -1, False
        try:
            if fds[0] >= 0:
                os.close(fds[0])
        finally:
            if fds[1] >= 0:
                os.close(fds[1])

    def pwrite(self, piece: memoryview, offset: int) -> None:
        """Write all of ``piece`` at ``offset``: its blocks aligned in memory and in the file
        directly (see the module's notes), the rest through the page cache."""
        piece = piece.cast("B") if piece.format != "B" or piece.ndim != 1 else piece
        end = offset + len(piece)
        lo, hi = -(-offset // ALIGN) * ALIGN, end // ALIGN * ALIGN
        if self.direct and hi - lo >= MIN_DIRECT and not piece.readonly and (address_of(piece) - offset) % ALIGN == 0:
            self._write_cached(piece[: lo - offset], offset)
            self._write_direct(piece[lo - offset : hi - offset], lo)
            self._write_cached(piece[hi - offset :], hi)
        else:
            self._write_cached(piece, offset)

    def _write_cached(self, piece: memoryview, offset: int) -> None:
        for at in range(0, len(piece), WRITE_SLICE):
            pwrite_all(self.fd, piece[at : at + WRITE_SLICE], offset + at)

    def _write_direct(self, block: memoryview, offset: int) -> None:
        """Write ``block`` (aligned) with ``O_DIRECT``; what the filesystem refuses (its blocks
        are larger than ALIGN: no direct writes to this file from then on) through the page cache."""
        done = 0
        try:
            while done < len(block):
                wrote = os.pwrite(self._direct_fd, block[done:], offset + done)
                if wrote <= 0 or wrote % ALIGN:  # a short write leaves the rest unaligned
                    done += max(wrote, 0)
                    break
                done += wrote
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
        self._write_cached(block[done:], offset + done)
