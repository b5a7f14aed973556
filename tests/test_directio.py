"""DirectFile writes the same bytes as plain writes, its aligned blocks past the page cache; a load by
URL writes the cache file that way, straight from the tensors' memory."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import has_direct_io, resident_pages, same_bytes
from servers import StaticServer

import sepstore
import sepstore.cache
import sepstore.retry
from sepstore.demo import llama_decider, tiny_llama_state_dict
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
        direct = f.direct
        source = pattern(SIZE + ALIGN)
        f.pwrite(memoryview(source)[ALIGN - 100 : ALIGN - 100 + SIZE - 200], ALIGN - 100)
        os.fsync(f.fd)
    pages = resident_pages(path)
    assert pages[0] and pages[-1]  # the partial pages at either end went through the page cache
    if direct:
        assert not any(pages[1:-1])  # the aligned blocks between did not
    else:  # a filesystem without O_DIRECT: every page through the page cache
        assert all(pages)


def test_a_file_on_tmpfs_is_written_whole(tmp_path: Path) -> None:
    shm = Path("/dev/shm")  # tmpfs: O_DIRECT refused before Linux 6.6, a no-op after
    path = sized_file((shm if shm.is_dir() else tmp_path) / f"sepstore-test-{os.getpid()}", SIZE)
    try:
        source = pattern(SIZE)
        with DirectFile(path) as f:
            f.pwrite(memoryview(source), 0)
        assert Path(path).read_bytes() == bytes(source)
    finally:
        os.unlink(path)


def test_closing_twice_closes_no_other_file(tmp_path: Path) -> None:
    f = DirectFile(sized_file(tmp_path / "f", ALIGN))
    f.close()
    other = os.open(tmp_path / "f", os.O_RDONLY)  # may get one of the numbers just freed
    try:
        f.close()
        os.fstat(other)  # still open
    finally:
        os.close(other)


def test_aligned_start_names_the_bytes_to_skip_to_an_aligned_address() -> None:
    buffer = bytearray(3 * ALIGN)
    address = address_of(memoryview(buffer))
    pad = aligned_start(address)
    assert 0 <= pad < ALIGN and (address + pad) % ALIGN == 0


# -- a load by URL writes the cache file straight from the tensors' memory ---------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, torch.Tensor]]]:
    """A model whose first part (4 MiB of embeddings, and its header: not a whole number of pages)
    is served with ``Range`` by the aiohttp test server; its manifest URL, store and state dict."""
    www = tmp_path_factory.mktemp("www")
    sd = tiny_llama_state_dict(layers=1, hidden=64, intermediate=128, vocab=32768, seed=3)
    sepstore.dump(llama_decider, sd, www / "store", name="tiny", tag="v1", quiet=True)
    server = StaticServer(www).start()
    try:
        yield f"{server.url}/store/manifests/tiny/v1.json", www / "store", sd
    finally:
        server.stop()


def cached_begin(cache: Path, store: Path) -> tuple[str, bytes]:
    """The cache's file of the model's first part, and the store's bytes of it."""
    begin = sepstore.read_manifest(store / "manifests/tiny/v1.json").begin
    assert begin is not None and begin.size > 4 * 2**20 and begin.size % ALIGN
    name = f"parts/blake3/{begin.digest[7:]}.safetensors"
    return str(cache / name), (store / name).read_bytes()


@pytest.mark.parametrize("chunk_kib", [32 * 1024, 1024])
def test_a_load_by_url_writes_the_cache_file_past_the_page_cache_byte_for_byte(
    served: tuple[str, Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_kib: int
) -> None:
    """The part is received into page-aligned tensor memory and written from there to the cache
    file in aligned blocks (one part in one chunk, or in several chunks written as they come in)."""
    url, store, sd = served
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", chunk_kib * 1024)
    monkeypatch.setattr(sepstore.cache, "TRAIL_BYTES", MIN_DIRECT)
    psd = sepstore.load(url, "b", cache_dir=tmp_path / "cache")
    assert same_bytes(psd.begin["embed_tokens.weight"], sd["model.embed_tokens.weight"])  # type: ignore[index]
    path, expected = cached_begin(tmp_path / "cache", store)
    pages = resident_pages(path)  # before the file is read back below
    if has_direct_io(tmp_path):
        assert sum(pages) < len(pages) // 4, "most of the file went past the page cache"
    assert Path(path).read_bytes() == expected


def test_a_resumed_load_from_a_server_that_ignores_range_keeps_the_earlier_chunks(
    served: tuple[str, Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier process left chunks 0 and 3 in the partial file; a load by URL from a server that
    sends whole parts takes the other chunks from the whole answer into memory and the file, and
    reads chunks 0 and 3 from the file into memory, not written over."""
    _, store, sd = served
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", 2**20)
    monkeypatch.setattr(sepstore.cache, "TRAIL_BYTES", MIN_DIRECT)
    cache = tmp_path / "cache"
    path, expected = cached_begin(cache, store)
    partial = cache / "incoming" / Path(path).name.replace(".safetensors", ".partial")
    partial.parent.mkdir(parents=True)
    left = bytearray(len(expected))
    for i in (0, 3):
        left[i * 2**20 : (i + 1) * 2**20] = expected[i * 2**20 : (i + 1) * 2**20]
    partial.write_bytes(left)
    Path(f"{partial}.done").write_text("0\n3\n")
    whole = StaticServer(store.parent, ranges=False).start()
    try:
        psd = sepstore.load(f"{whole.url}/store/manifests/tiny/v1.json", "b", cache_dir=cache)
    finally:
        whole.stop()
    assert same_bytes(psd.begin["embed_tokens.weight"], sd["model.embed_tokens.weight"])  # type: ignore[index]
    assert Path(path).read_bytes() == expected


def test_a_load_cut_off_mid_chunk_logs_only_chunks_whose_bytes_are_in_the_file_and_resumes(
    served: tuple[str, Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, store, _ = served
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", 2**20)
    monkeypatch.setattr(sepstore.cache, "TRAIL_BYTES", MIN_DIRECT)
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 1)
    real = sepstore.cache._Download.fetch_chunk

    def cut_in_chunk_2(self: sepstore.cache._Download, index: int, bar: object) -> None:
        """Chunk 0 is asked for first, alone: from then on, chunk 2's transfer breaks off."""
        stream = self.item.source.stream_blob_range

        def cut(blob: object, start: int, end: int, write: Any, **kw: Any) -> Any:
            def until(offset: int, piece: memoryview) -> None:
                at = 2 * 2**20 + 3 * 2**18  # three quarters into chunk 2: past its first trailing writes
                if start == 2 * 2**20 and offset + len(piece) > at:
                    write(offset, piece[: max(at - offset, 0)])
                    raise sepstore.StoreError("killed mid-chunk")
                write(offset, piece)

            return stream(blob, start, end, until, **kw)  # type: ignore[arg-type]

        if index == 0:
            monkeypatch.setattr(self.item.source, "stream_blob_range", cut)
        return real(self, index, bar)  # type: ignore[arg-type]

    cache = tmp_path / "cache"
    monkeypatch.setattr(sepstore.cache._Download, "fetch_chunk", cut_in_chunk_2)
    with pytest.raises(sepstore.StoreError, match="killed mid-chunk"):
        sepstore.load(url, "b", cache_dir=cache)
    (partial,) = (cache / "incoming").glob("*.partial")
    logged = [int(i) for i in Path(f"{partial}.done").read_text().split()]
    assert 2 not in logged and logged
    data, expected = partial.read_bytes(), cached_begin(cache, store)[1]
    spans = {i: slice(i * 2**20, (i + 1) * 2**20) for i in range(-(-len(expected) // 2**20))}
    for i in logged:
        assert data[spans[i]] == expected[spans[i]]
    assert data[spans[2]] != expected[spans[2]]  # chunk 2 was cut short

    monkeypatch.setattr(sepstore.cache._Download, "fetch_chunk", real)
    report = sepstore.pull(url, "b", cache_dir=cache, quiet=True)
    assert report.transferred_bytes == len(expected) - sum(len(expected[spans[i]]) for i in logged)
    path, _ = cached_begin(cache, store)
    assert Path(path).read_bytes() == expected


def test_a_full_disk_under_a_load_by_url_is_a_store_error_naming_the_cache_file(
    served: tuple[str, Path, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache file's last write of a chunk comes after the transfer: a disk that is full then is
    sepstore's error naming the file (it was a bare OSError), and no file is left under the digest."""
    url, store, _ = served
    monkeypatch.setattr(sepstore.cache, "TRAIL_BYTES", 2**40)  # every byte written after its transfer
    real = os.pwrite

    def full(fd: int, data: Any, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(sepstore.StoreError, match=r"\.partial: OSError: .*No space left"):
        sepstore.load(url, "b", cache_dir=tmp_path / "cache")
    assert not Path(cached_begin(tmp_path / "cache", store)[0]).exists()


def test_the_memory_a_load_by_url_returns_holds_the_part_and_zeros_beyond_it(
    served: tuple[str, Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """The tensors' storage is the page-aligned allocation (a page larger than the part), which
    ``torch.save`` writes whole: its bytes beside the part are zeros, not the heap's earlier bytes."""
    url, store, _ = served
    for _ in range(3):  # leave freed, dirty memory of about that size for the allocator to hand out
        torch.full((5 * 2**20,), 0xAB, dtype=torch.uint8)
    psd = sepstore.load(url, "b", cache_dir=tmp_path / "cache")
    whole = torch.empty(0, dtype=torch.uint8).set_(psd.begin["embed_tokens.weight"].untyped_storage())  # type: ignore[index]
    storage = whole.numpy().tobytes()
    part = cached_begin(tmp_path / "cache", store)[1]
    at = storage.find(part)
    assert at >= 0 and len(storage) == len(part) + ALIGN
    assert storage[:at].count(0) == at and storage[at + len(part) :].count(0) == len(storage) - at - len(part)
