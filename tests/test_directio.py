"""DirectFile writes the same bytes as plain writes, its aligned blocks past the page cache."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from sepstore.directio import ALIGN, MIN_DIRECT, DirectFile, address_of, aligned_start

SIZE = 4 * MIN_DIRECT + 3 * ALIGN + 123


def sized_file(path: Path, size: int) -> str:
    path.write_bytes(b"")
    os.truncate(path, size)
    return str(path)


def pattern(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory holding bytes that differ from page to page."""
    memory = mmap.mmap(-1, size)
    memory.write(bytes(range(251)) * (size // 251) + bytes(size % 251))
    return memory


def resident(path: str, start: int, end: int) -> list[bool]:
    """Which pages of ``path``'s bytes ``start:end`` are in the page cache (``mincore`` of a private
    map of the file, which reports the file's cached pages until one is written)."""
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        vec = (ctypes.c_ubyte * -(-len(view) // mmap.PAGESIZE))()
        assert mincore(address_of(memoryview(view)), len(view), vec) == 0, ctypes.get_errno()
        return [bool(vec[p] & 1) for p in range(start // mmap.PAGESIZE, -(-end // mmap.PAGESIZE))]


@pytest.mark.parametrize("offset", [0, ALIGN, 7, ALIGN - 1])
@pytest.mark.parametrize("shift", [0, 64])
def test_pieces_at_any_offset_and_address_land_byte_for_byte(tmp_path: Path, offset: int, shift: int) -> None:
    source = pattern(SIZE + ALIGN)
    piece = memoryview(source)[shift : shift + SIZE]
    path = sized_file(tmp_path / "f", offset + SIZE + 10)
    with DirectFile(path) as f:
        f.pwrite(piece, offset)
    data = Path(path).read_bytes()
    assert data[offset : offset + SIZE] == piece.tobytes()
    assert data[:offset] == bytes(offset) and data[offset + SIZE :] == bytes(10)


def test_a_file_written_in_pieces_by_threads_of_its_own_is_whole(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    source = pattern(SIZE)
    cuts = [0, 1000, MIN_DIRECT + 5, 3 * MIN_DIRECT, SIZE]
    path = sized_file(tmp_path / "f", SIZE)
    with DirectFile(path) as f, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: f.pwrite(memoryview(source)[cuts[i] : cuts[i + 1]], cuts[i]), range(len(cuts) - 1)))
    assert Path(path).read_bytes() == bytes(source)


def test_read_only_bytes_are_written_through_the_page_cache(tmp_path: Path) -> None:
    data = bytes(pattern(SIZE))
    path = sized_file(tmp_path / "f", SIZE)
    with DirectFile(path) as f:
        f.pwrite(memoryview(data), 0)
    assert Path(path).read_bytes() == data


def test_aligned_blocks_skip_the_page_cache_and_the_ends_do_not(tmp_path: Path) -> None:
    path = sized_file(tmp_path / "f", SIZE)
    with DirectFile(path) as f:
        if not f.direct:
            pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT")
        source = pattern(SIZE + ALIGN)
        f.pwrite(memoryview(source)[ALIGN - 100 : ALIGN - 100 + SIZE - 200], ALIGN - 100)
        os.fsync(f.fd)
    pages = resident(path, 0, SIZE)
    assert pages[0] and pages[-1]  # the partial pages at either end went through the page cache
    assert not any(pages[1:-1])  # the aligned blocks between did not


def test_a_file_on_tmpfs_is_written_whole() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    path = sized_file(shm / f"sepstore-test-{os.getpid()}", SIZE)
    try:
        source = pattern(SIZE)
        with DirectFile(path) as f:
            f.pwrite(memoryview(source), 0)
        assert Path(path).read_bytes() == bytes(source)
    finally:
        os.unlink(path)


def test_aligned_start_names_the_bytes_to_skip_to_an_aligned_address() -> None:
    buffer = bytearray(3 * ALIGN)
    address = address_of(memoryview(buffer))
    pad = aligned_start(address)
    assert 0 <= pad < ALIGN and (address + pad) % ALIGN == 0
