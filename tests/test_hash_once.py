"""Fetching hashes each byte once, as it arrives: in order, whatever order the ranged chunks come
in, also the bytes of a resumed partial file; a part fetched and read in one call is not hashed
twice, and a later call re-hashes the cache. Counted with a BLAKE3 that records what it hashed."""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from aiohttp import web
from blake3 import blake3
from conftest import same_bytes
from servers import StaticServer

import sepstore
import sepstore.cache
import sepstore.hashing
import sepstore.retry
from sepstore.demo import llama_decider, tiny_llama_state_dict

CHUNK = 4096


class CountingBlake3:
    """BLAKE3 that adds, for each digest it gives, the bytes it hashed to ``hashed[digest]``."""

    AUTO = blake3.AUTO
    hashed: ClassVar[collections.Counter[str]] = collections.Counter()

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._hasher = blake3(*args, **kwargs)  # type: ignore[arg-type]
        self._bytes = 0

    def update(self, data: bytes | memoryview) -> CountingBlake3:
        self._bytes += memoryview(data).nbytes
        self._hasher.update(data)
        return self

    def update_mmap(self, path: str | os.PathLike[str]) -> CountingBlake3:
        self._bytes += os.path.getsize(path)
        self._hasher.update_mmap(path)
        return self

    def reset(self) -> None:
        self._bytes = 0
        self._hasher.reset()

    def hexdigest(self) -> str:
        digest = self._hasher.hexdigest()
        CountingBlake3.hashed[f"blake3:{digest}"] += self._bytes
        self._bytes = 0
        return digest


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Bytes hashed per digest, from now on (every hasher sepstore makes is :func:`sepstore.hashing.Hasher`)."""
    CountingBlake3.hashed = collections.Counter()
    monkeypatch.setattr(sepstore.hashing, "blake3", CountingBlake3)
    return CountingBlake3.hashed


class LateChunkServer(StaticServer):
    """Answers the ranged GET of a part that starts at byte ``late`` only after a pause, so the
    chunks after it arrive before it; the one that starts at ``spoil`` gets a flipped bit."""

    def __init__(self, root: Path, late: int, spoil: int = -1) -> None:
        super().__init__(root)
        self.late, self.spoil = late, spoil

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        asked = request.headers.get("Range", "")
        if "/parts/" in request.path and asked.startswith(f"bytes={self.late}-"):
            await asyncio.sleep(0.3)
        if "/parts/" in request.path and asked.startswith(f"bytes={self.spoil}-"):
            self.spoil = -1  # once: the part's second fetch gets good bytes
            path = self.root / request.path.lstrip("/")
            size = path.stat().st_size
            last = min(int(asked.removeprefix("bytes=").partition("-")[2]), size - 1)
            data = bytearray(path.read_bytes()[int(asked[6:].partition("-")[0]) : last + 1])
            data[0] ^= 0x01
            start = int(asked[6:].partition("-")[0])
            return web.Response(body=bytes(data), status=206, headers={"Content-Range": f"bytes {start}-{last}/{size}"})
        return await super()._handle(request)


@pytest.fixture
def model(tmp_path: Path) -> tuple[dict[str, torch.Tensor], sepstore.Manifest]:
    sd = tiny_llama_state_dict(layers=2, hidden=32, intermediate=64, vocab=256, seed=1)
    sd["model.layers.1.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"]  # not a whole part
    for key in [k for k in sd if k.startswith("model.layers.1.")]:
        sd[key] = sd[key.replace(".1.", ".0.")].clone()  # layer 1 is layer 0's bytes: one part, read twice
    return sd, sepstore.dump(llama_decider, sd, tmp_path / "www" / "store", name="tiny", tag="v1", quiet=True)


def serve(tmp_path: Path, server: StaticServer) -> Iterator[str]:
    server.start()
    try:
        yield f"{server.url}/store/manifests/tiny/v1.json"
    finally:
        server.stop()


@pytest.fixture
def url(tmp_path: Path, model: object) -> Iterator[str]:
    yield from serve(tmp_path, LateChunkServer(tmp_path / "www", late=CHUNK))


def parts_of(manifest: sepstore.Manifest) -> dict[str, int]:
    return {part.digest: part.size for _, part in manifest.labelled_parts()}


def test_load_by_url_hashes_every_fetched_byte_once_while_chunks_arrive_out_of_order(
    model: tuple[dict[str, torch.Tensor], sepstore.Manifest],
    url: str,
    counted: collections.Counter[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sd, manifest = model
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", CHUNK)
    assert manifest.begin is not None and manifest.begin.size > 4 * CHUNK  # chunks 2, 3, ... overtake chunk 1
    psd = sepstore.load(url, cache_dir=tmp_path / "cache")
    assert {d: counted[d] for d in parts_of(manifest)} == parts_of(manifest)
    assert same_bytes(psd.begin["embed_tokens.weight"], sd["model.embed_tokens.weight"])  # type: ignore[index]
    assert same_bytes(psd.mid[1]["mlp.up_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"])
    first, second = psd.mid[0]["mlp.up_proj.weight"], psd.mid[1]["mlp.up_proj.weight"]
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()  # a part read twice: two copies
    first.zero_()
    assert not torch.equal(first, second)

    counted.clear()  # a later call re-verifies what the cache holds, each part as often as it reads it
    sepstore.load(url, cache_dir=tmp_path / "cache")
    reads = collections.Counter(part.digest for _, part in manifest.labelled_parts())
    assert {d: counted[d] for d in reads} == {d: size * reads[d] for d, size in parts_of(manifest).items()}


def test_pull_hashes_once_and_the_load_after_it_hashes_the_cache_again(
    model: tuple[dict[str, torch.Tensor], sepstore.Manifest],
    url: str,
    counted: collections.Counter[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, manifest = model
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", CHUNK)
    sepstore.pull(url, cache_dir=tmp_path / "cache", quiet=True)
    assert {d: counted[d] for d in parts_of(manifest)} == parts_of(manifest)
    counted.clear()
    sepstore.load(url, "0-1", cache_dir=tmp_path / "cache")
    assert counted[manifest.mid[0].digest] == manifest.mid[0].size  # type: ignore[union-attr]

    counted.clear()  # one part at a time: fetched into the cache, read back, hashed only on the way in
    sepstore.lazy_load(torch.nn.Module(), url, "0-2", strict=False, cache_dir=tmp_path / "fresh")
    assert counted[manifest.mid[0].digest] == manifest.mid[0].size  # type: ignore[union-attr]


def test_a_bad_chunk_that_arrives_ahead_of_its_turn_is_caught(
    model: tuple[dict[str, torch.Tensor], sepstore.Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk 2 arrives before chunk 1 with a flipped bit: hashed in its turn, it fails the digest,
    and the part is fetched again (good bytes the second time) before it gets its name."""
    sd, manifest = model
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", CHUNK)
    server = LateChunkServer(tmp_path / "www", late=CHUNK, spoil=2 * CHUNK)
    for url in serve(tmp_path, server):
        psd = sepstore.load(url, "b", cache_dir=tmp_path / "cache")
        gets = [r for r in server.requests if r.method == "GET" and "/parts/" in r.path]
    assert manifest.begin is not None
    assert len(gets) == 2 * -(-manifest.begin.size // CHUNK)  # refused once, fetched whole again
    assert same_bytes(psd.begin["embed_tokens.weight"], sd["model.embed_tokens.weight"])  # type: ignore[index]


def test_a_resumed_partial_file_is_hashed_too(
    model: tuple[dict[str, torch.Tensor], sepstore.Manifest],
    url: str,
    counted: collections.Counter[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chunks an earlier process left are hashed from the file with the new ones, once each:
    a byte spoilt in them on disk is caught, and the part fetched again from scratch."""
    _, manifest = model
    begin = manifest.begin
    assert begin is not None
    monkeypatch.setattr(sepstore.cache, "CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(sepstore.retry, "ATTEMPTS", 1)
    real = sepstore.cache._Download.fetch_chunk

    def dies_after_two(self: sepstore.cache._Download, index: int, bar: object) -> None:
        if len(self.logged) >= 2:
            raise sepstore.StoreError("killed")
        real(self, index, bar)  # type: ignore[arg-type]

    monkeypatch.setattr(sepstore.cache._Download, "fetch_chunk", dies_after_two)
    cache = tmp_path / "cache"
    with pytest.raises(sepstore.StoreError, match="killed"):
        sepstore.pull(url, "b", cache_dir=cache, workers=1, quiet=True)
    monkeypatch.setattr(sepstore.cache._Download, "fetch_chunk", real)
    (partial,) = (cache / "incoming").glob("*.partial")
    assert sorted((cache / "incoming").glob("*.done"))[0].read_text() == "0\n1\n"

    counted.clear()  # resumed as it was left: every byte hashed once
    assert sepstore.pull(url, "b", cache_dir=cache, quiet=True).fetched == ["begin"]
    assert counted[begin.digest] == begin.size
    (cache / "parts/blake3" / f"{begin.digest[7:]}.safetensors").unlink()

    with pytest.raises(sepstore.StoreError, match="killed"):  # again, then spoil a byte of chunk 1 on disk
        monkeypatch.setattr(sepstore.cache._Download, "fetch_chunk", dies_after_two)
        sepstore.pull(url, "b", cache_dir=cache, workers=1, quiet=True)
    monkeypatch.setattr(sepstore.cache._Download, "fetch_chunk", real)
    with open(partial, "r+b") as f:
        f.seek(CHUNK + 10)
        byte = f.read(1)
        f.seek(CHUNK + 10)
        f.write(bytes([byte[0] ^ 0x01]))
    counted.clear()
    report = sepstore.pull(url, "b", cache_dir=cache, quiet=True)
    assert report.fetched == ["begin"]
    assert counted[begin.digest] == begin.size  # the refused first try hashed to another digest
    assert sepstore.verify(url, "b", cache_dir=cache).ok
