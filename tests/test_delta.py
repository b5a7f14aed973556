"""Tensor-level delta: a node upgrading from v1 to v2 assembles each changed part from the tensors
it already holds plus ranged reads of the changed ones, on S3 (moto) and HTTP (aiohttp), with the
bytes counted at the server; every assembled part is verified whole, and anything wrong (a
damaged cached source, a server without ``Range``) falls back to fetching whole parts."""

from __future__ import annotations

import asyncio
import collections
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import msgspec
import pytest
import torch
from aiohttp import web
from conftest import has_direct_io, resident_pages
from safetensors.torch import save as save_safetensors
from servers import CountingMotoServer, FaultProxy, Request, StaticServer
from test_hash_once import CountingBlake3

import sepstore
import sepstore.delta
import sepstore.hashing
from sepstore.compose import MIN_PART, Composer, Run, plan_runs
from sepstore.delta import INDEX_DIR, predicted_head
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.directio import ALIGN, MIN_DIRECT
from sepstore.hashing import digest_buffer, digest_file, digest_hex
from sepstore.manifest import Manifest, Part, Tensor, encode_manifest
from sepstore.store import Store

LAYERS = 3
CHANGED = ("self_attn.q_proj.weight", "self_attn.v_proj.weight")
#: Changed tensors with an unchanged one (o_proj, 64 KiB) between them in the file.
APART = ("self_attn.k_proj.weight", "self_attn.q_proj.weight")


def v1() -> dict[str, torch.Tensor]:
    return tiny_llama_state_dict(layers=LAYERS, hidden=128, intermediate=512, vocab=256, seed=3)


def lora_merged(sd: dict[str, torch.Tensor], changed: tuple[str, ...] = CHANGED) -> dict[str, torch.Tensor]:
    """v1 with q_proj and v_proj (or ``changed``) changed in every layer (as a merged LoRA does)."""
    return {k: v + 1 if k.endswith(changed) else v for k, v in sd.items()}


def moved(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v1 with layer 0's and layer 1's MLPs swapped: new parts, every tensor already known."""
    out = dict(sd)
    for name in ("gate_proj", "up_proj", "down_proj"):
        a, b = f"model.layers.0.mlp.{name}.weight", f"model.layers.1.mlp.{name}.weight"
        out[a], out[b] = sd[b], sd[a]
    return out


def rewritten(store: Path, tag: str, layer: int, name: str = "m") -> None:
    """Rewrite layer ``layer`` of ``name:tag`` as safetensors' own writer does, with ``__metadata__``
    (another header), and publish the manifest that names it."""
    path = store / "manifests" / name / f"{tag}.json"
    manifest = sepstore.read_manifest(path)
    part = manifest.mid[layer]
    assert part is not None
    tensors = sepstore.load(path, f"{layer}-{layer + 1}").mid[layer]
    data = save_safetensors(tensors, metadata={"writer": "another"})
    new = msgspec.structs.replace(part, digest=digest_buffer(data), size=len(data))
    (store / "parts" / "blake3" / f"{digest_hex(new.digest)}.safetensors").write_bytes(data)
    mid = [new if p is part else p for p in manifest.mid]
    path.write_bytes(encode_manifest(msgspec.structs.replace(manifest, mid=mid)))


@pytest.fixture(scope="session")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``m:v1``; ``m:v2`` (q_proj, v_proj changed); ``m:v3`` (v2 with mid.1 written by safetensors
    itself); ``m:apart`` (k_proj, q_proj changed); ``other:moved`` (v1's MLPs swapped between layers
    0 and 1, another model)."""
    store = tmp_path_factory.mktemp("delta") / "store"
    sd = v1()
    sepstore.dump(llama_decider, sd, store, name="m", tag="v1", quiet=True)
    sepstore.dump(llama_decider, lora_merged(sd), store, name="m", tag="v2", quiet=True)
    sepstore.dump(llama_decider, lora_merged(sd), store, name="m", tag="v3", quiet=True)
    rewritten(store, "v3", 1)
    sepstore.dump(llama_decider, lora_merged(sd, APART), store, name="m", tag="apart", quiet=True)
    sepstore.dump(llama_decider, moved(sd), store, name="other", tag="moved", quiet=True)
    return store


@dataclass
class Remote:
    kind: str
    root: str
    requests: list[Request]

    def url(self, name: str, tag: str) -> str:
        return f"{self.root}/manifests/{name}/{tag}.json"

    def part_bytes(self) -> int:
        """Bytes of part files the server sent (every GET of a part asks for a range)."""
        total = 0
        for r in self.part_gets():
            assert r.range is not None and r.range.startswith("bytes="), r
            first, _, last = r.range.removeprefix("bytes=").partition("-")
            total += int(last) - int(first) + 1
        return total

    def part_gets(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and "/parts/blake3/" in r.path]


@pytest.fixture(scope="session")
def http_remote(local_store: Path) -> Iterator[Remote]:
    server = StaticServer(local_store.parent).start()
    yield Remote("http", f"{server.url}/store", server.requests)
    server.stop()


@pytest.fixture(scope="session")
def s3_remote(local_store: Path, moto_server: CountingMotoServer) -> Remote:
    bucket = f"delta-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", endpoint_url=moto_server.endpoint)
    fs.mkdir(bucket)
    fs.put(str(local_store), f"{bucket}/", recursive=True)
    return Remote("s3", f"s3://{bucket}/store", moto_server.requests)


@pytest.fixture(params=["s3", "http"])
def remote(request: pytest.FixtureRequest) -> Remote:
    served: Remote = request.getfixturevalue(f"{request.param}_remote")
    return served


def manifest(local_store: Path, name: str, tag: str) -> Manifest:
    return sepstore.read_manifest(local_store / "manifests" / name / f"{tag}.json")


def data_bytes(part: Part, names: tuple[str, ...] | None = None) -> int:
    return sum(
        sepstore.safetensors_io.RawTensor(t.dtype, tuple(t.shape)).nbytes
        for n, t in part.tensors.items()
        if names is None or n in names
    )


def upgraded(remote: Remote, cache: Path, name: str = "m", tag: str = "v2") -> sepstore.PullReport:
    """Pull v1 into ``cache``, then ``name:tag`` with the server's requests counted."""
    sepstore.pull(remote.url("m", "v1"), cache_dir=cache, quiet=True)
    remote.requests.clear()
    return sepstore.pull(remote.url(name, tag), cache_dir=cache, quiet=True)


def test_an_upgrade_fetches_only_the_changed_tensors_and_the_headers(
    remote: Remote, local_store: Path, tmp_path: Path
) -> None:
    report = upgraded(remote, tmp_path / "cache")
    new = manifest(local_store, "m", "v2")
    mids = [p for p in new.mid if p is not None]
    assert sorted(report.fetched) == [f"mid.{i}" for i in range(LAYERS)]
    changed = sum(data_bytes(p, CHANGED) for p in mids)
    headers = sum(p.size - data_bytes(p) for p in mids)
    # the server sent the headers and the changed tensors (q_proj and v_proj are adjacent), nothing else
    assert remote.part_bytes() == report.transferred_bytes == changed + headers
    assert report.reused_bytes == report.fetched_bytes - report.transferred_bytes
    assert len(remote.part_gets()) == 2 * LAYERS
    for p in mids:
        assert digest_file(tmp_path / "cache" / "parts" / "blake3" / p.file_name) == p.digest
    got = sepstore.load(remote.url("m", "v2"), cache_dir=tmp_path / "cache").to_dict()
    assert all(torch.equal(got[k], v) for k, v in sepstore.load(local_store / "manifests/m/v2.json").to_dict().items())


def test_a_load_by_url_assembles_the_changed_parts_in_memory_and_returns_v2s_tensors(
    remote: Remote, local_store: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    sepstore.pull(remote.url("m", "v1"), cache_dir=cache, quiet=True)
    remote.requests.clear()
    got = sepstore.load(remote.url("m", "v2"), cache_dir=cache).to_dict()
    mids = [p for p in manifest(local_store, "m", "v2").mid if p is not None]
    # the headers and the changed tensors crossed, nothing else
    assert remote.part_bytes() == sum(data_bytes(p, CHANGED) + p.size - data_bytes(p) for p in mids)
    expected = sepstore.load(local_store / "manifests/m/v2.json").to_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert sepstore.verify(remote.url("m", "v2"), cache_dir=cache).ok


def test_a_damaged_cached_source_is_caught_by_the_part_digest_and_the_part_is_fetched_whole(
    remote: Remote, local_store: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    sepstore.pull(remote.url("m", "v1"), cache_dir=cache, quiet=True)
    old = manifest(local_store, "m", "v1").mid[1]
    assert old is not None
    source = cache / "parts" / "blake3" / old.file_name
    data = bytearray(source.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside mlp.down_proj, a tensor v2's mid.1 reuses
    source.write_bytes(data)
    remote.requests.clear()
    report = sepstore.pull(remote.url("m", "v2"), cache_dir=cache, quiet=True)
    new = manifest(local_store, "m", "v2").mid[1]
    assert new is not None
    assert digest_file(cache / "parts" / "blake3" / new.file_name) == new.digest
    whole = [r for r in remote.part_gets() if digest_hex(new.digest) in r.path and r.range == f"bytes=0-{new.size - 1}"]
    assert len(whole) == 1
    assert not (cache / INDEX_DIR / f"{digest_hex(old.digest)}.json").exists()  # no longer trusted
    assert report.transferred_bytes == remote.part_bytes()


def test_tensors_moved_between_layers_and_models_are_reused(remote: Remote, local_store: Path, tmp_path: Path) -> None:
    report = upgraded(remote, tmp_path / "cache", "other", "moved")
    new = manifest(local_store, "other", "moved")
    assert sorted(report.fetched) == ["mid.0", "mid.1"]
    assert report.transferred_bytes == remote.part_bytes() == sum(p.size - data_bytes(p) for p in new.mid[:2] if p)


def test_a_part_with_another_header_and_tensor_order_is_assembled_and_verified(
    remote: Remote, local_store: Path, tmp_path: Path
) -> None:
    report = upgraded(remote, tmp_path / "cache", "m", "v3")
    part = manifest(local_store, "m", "v3").mid[1]
    assert part is not None and part != manifest(local_store, "m", "v2").mid[1]
    assert digest_file(tmp_path / "cache" / "parts" / "blake3" / part.file_name) == part.digest
    gets = [r for r in remote.part_gets() if digest_hex(part.digest) in r.path]
    assert len(gets) == 3  # a header longer than sepstore's own is read on, then the changed tensors
    assert report.transferred_bytes < report.fetched_bytes / 2


def test_a_server_without_range_support_gets_whole_parts(local_store: Path, tmp_path: Path) -> None:
    server = StaticServer(local_store.parent, ranges=False).start()
    try:
        remote = Remote("http", f"{server.url}/store", server.requests)
        cache = tmp_path / "cache"
        sepstore.pull(remote.url("m", "v1"), cache_dir=cache, quiet=True)
        report = sepstore.pull(remote.url("m", "v2"), cache_dir=cache, quiet=True)
    finally:
        server.stop()
    new = manifest(local_store, "m", "v2")
    assert report.reused_bytes == 0 and report.transferred_bytes == report.fetched_bytes
    for p in new.mid:
        assert p is not None and digest_file(cache / "parts" / "blake3" / p.file_name) == p.digest


def test_concurrent_upgrades_into_one_cache_stay_correct(remote: Remote, local_store: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sepstore.pull(remote.url("m", "v1"), cache_dir=cache, quiet=True)
    script = "import sepstore, sys; sepstore.pull(sys.argv[1], cache_dir=sys.argv[2], quiet=True)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sepstore.__file__).parents[1]), *sys.path])}
    runs = [
        subprocess.Popen([sys.executable, "-c", script, remote.url(*ref), str(cache)], env=env)
        for ref in (("m", "v2"), ("m", "v2"), ("m", "v3"))
    ]
    assert [run.wait(timeout=120) for run in runs] == [0, 0, 0]
    for tag in ("v2", "v3"):
        for p in manifest(local_store, "m", tag).mid:
            assert p is not None and digest_file(cache / "parts" / "blake3" / p.file_name) == p.digest
    assert not [f for f in os.listdir(cache / "incoming") if not f.endswith(".lock")]


# -- push: server-side copies on S3 ------------------------------------------------------------------


def big_layer() -> dict[str, torch.Tensor]:
    """One layer whose unchanged tensors (about 10 MiB, adjacent) exceed S3's 5 MiB part minimum."""
    return tiny_llama_state_dict(layers=1, hidden=768, intermediate=2048, vocab=64, seed=5)


@pytest.fixture(scope="session")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("delta-push") / "store"
    sd = big_layer()
    sepstore.dump(llama_decider, sd, store, name="big", tag="v1", quiet=True)
    sepstore.dump(llama_decider, lora_merged(sd), store, name="big", tag="v2", quiet=True)
    return store


def s3_with_v1(big_store: Path, moto_server: CountingMotoServer) -> tuple[str, fsspec.AbstractFileSystem]:
    bucket = f"push-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", endpoint_url=moto_server.endpoint)
    fs.mkdir(bucket)
    sepstore.push(big_store / "manifests/big/v1.json", f"s3://{bucket}/store", quiet=True)
    moto_server.requests.clear()
    return f"s3://{bucket}/store", fs


def s3_with_v1_object(
    big_store: Path, moto_server: CountingMotoServer
) -> tuple[str, fsspec.AbstractFileSystem, Part, str]:
    """A destination holding ``big:v1``, and v1's mid.0 with the key of its object there."""
    dest, fs = s3_with_v1(big_store, moto_server)
    old = manifest(big_store, "big", "v1").mid[0]
    assert old is not None
    return dest, fs, old, f"{dest.removeprefix('s3://')}/parts/blake3/{old.file_name}"


def sent(moto_server: CountingMotoServer) -> tuple[int, int]:
    """Bytes of part objects the client sent to moto, and how many server-side copies it asked for."""
    parts = [r for r in moto_server.requests if r.method == "PUT" and "/parts/blake3/" in r.path]
    return sum(r.length for r in parts if r.copy_source is None), sum(r.copy_source is not None for r in parts)


def test_push_to_s3_sends_the_changed_tensors_and_copies_the_rest_server_side(
    big_store: Path, moto_server: CountingMotoServer
) -> None:
    dest, _ = s3_with_v1(big_store, moto_server)
    report = sepstore.push(big_store / "manifests/big/v2.json", dest, quiet=True)
    part = manifest(big_store, "big", "v2").mid[0]
    assert part is not None and report.uploaded == ["mid.0"]
    changed = data_bytes(part, CHANGED)
    body, copies = sent(moto_server)
    assert body == report.transferred_bytes == changed  # q_proj and v_proj: the last of the layer's bytes
    assert copies == 1 and report.copied_bytes == part.size - changed
    assert all(c.error is None for c in sepstore.verify(f"{dest}/manifests/big/v2.json").checks)


def test_a_source_object_with_other_bytes_is_caught_by_its_etag_and_the_part_is_uploaded_whole(
    big_store: Path, moto_server: CountingMotoServer
) -> None:
    dest, fs, _, key = s3_with_v1_object(big_store, moto_server)
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0x01  # a reused tensor's byte, in the object the copy reads
    fs.pipe_file(key, bytes(data))
    moto_server.requests.clear()
    report = sepstore.push(big_store / "manifests/big/v2.json", dest, quiet=True)
    part = manifest(big_store, "big", "v2").mid[0]
    assert part is not None
    # what the aborted upload sent counts too
    assert report.copied_bytes == 0 and report.transferred_bytes == sent(moto_server)[0] > part.size
    assert all(c.error is None for c in sepstore.verify(f"{dest}/manifests/big/v2.json").checks)


def test_push_to_a_store_without_server_side_copies_uploads_whole_parts(big_store: Path, tmp_path: Path) -> None:
    sepstore.push(big_store / "manifests/big/v1.json", tmp_path / "dest", quiet=True)
    report = sepstore.push(big_store / "manifests/big/v2.json", tmp_path / "dest", quiet=True)
    assert report.copied_bytes == 0 and report.transferred_bytes == report.uploaded_bytes > 0


def test_s3_parts_are_at_least_5_mib_but_the_last() -> None:
    mib, copy = 1024 * 1024, "bucket/old"
    header, long_copy = Run(0, 1000), Run(1000, 12 * mib, copy, 1000)
    short_copy, rest = Run(12 * mib, 12 * mib + 10, copy, 0), Run(12 * mib + 10, 13 * mib)
    # the header takes the copy's first bytes; the 10-byte copy is uploaded with the last run
    assert plan_runs([header, long_copy, short_copy, rest]) == [
        Run(0, MIN_PART),
        Run(MIN_PART, 12 * mib, copy, MIN_PART),
        Run(12 * mib, 13 * mib),
    ]
    # a copy too short is uploaded, and a long upload is sent in equal pieces of at most 16 MiB
    third = 40 * mib // 3
    assert plan_runs([Run(0, 3 * mib, copy), Run(3 * mib, 40 * mib)]) == [
        Run(0, third),
        Run(third, 2 * third),
        Run(2 * third, 40 * mib),
    ]


def killed_assembly(remote: Remote, cache: Path) -> Path:
    """``cache`` holding v1, and the file of an assembly a killed process left (returned)."""
    sepstore.pull(remote.url("m", "v1"), cache_dir=cache, quiet=True)
    left = cache / "incoming" / f"{'ab' * 32}.assembling"
    left.write_bytes(b"x" * 4096)
    return left


def test_an_assembly_a_killed_process_left_is_removed_and_stray_index_files_are_ignored(
    remote: Remote, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    left = killed_assembly(remote, cache)
    (cache / INDEX_DIR / "not-an-index.json").write_text("{")
    (cache / INDEX_DIR / f"{'cd' * 32}.json").write_text('{"size": 1, "tensors": {}}')  # its part is not cached
    report = sepstore.pull(remote.url("m", "v2"), cache_dir=cache, quiet=True)
    assert report.reused_bytes > 0 and not left.exists()
    assert not (cache / INDEX_DIR / f"{'cd' * 32}.json").exists()


def test_a_part_header_longer_than_its_tensors_need_is_not_read_and_the_part_is_fetched_whole(
    local_store: Path, tmp_path: Path
) -> None:
    www = tmp_path / "www"
    shutil.copytree(local_store, www / "store")
    part = manifest(local_store, "m", "v2").mid[0]
    assert part is not None
    # a hostile server's part: a header as long as the file, parsed (~20x its size in memory) if read
    body = b"[" + b"{}," * ((part.size - 8 - 2) // 3 - 1) + b"{}]"
    hostile = struct.pack("<Q", part.size - 8) + body + b" " * (part.size - 8 - len(body))
    (www / "store" / "parts" / "blake3" / part.file_name).write_bytes(hostile)
    server = StaticServer(www).start()
    try:
        remote = Remote("http", f"{server.url}/store", server.requests)
        sepstore.pull(remote.url("m", "v1"), cache_dir=tmp_path / "cache", quiet=True)
        with pytest.raises(sepstore.IntegrityError, match=part.digest):
            sepstore.pull(remote.url("m", "v2"), cache_dir=tmp_path / "cache", quiet=True)
    finally:
        server.stop()
    gets = {r.range for r in remote.part_gets() if part.file_name in r.path}
    assert gets == {f"bytes=0-{predicted_head(part) - 1}", f"bytes=0-{part.size - 1}"}


def test_a_pull_after_incoming_was_deleted_still_assembles_parts(http_remote: Remote, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sepstore.pull(http_remote.url("m", "v1"), cache_dir=cache, quiet=True)
    shutil.rmtree(cache / "incoming")
    report = sepstore.pull(http_remote.url("m", "v2"), cache_dir=cache, quiet=True)
    assert report.reused_bytes > 0


def test_a_tensor_inside_a_fetched_range_counts_once_and_diff_says_what_pull_transfers(
    remote: Remote, tmp_path: Path
) -> None:
    expected = sepstore.diff(remote.url("m", "v1"), remote.url("m", "apart")).tensor_bytes_to_fetch
    report = upgraded(remote, tmp_path / "cache", "m", "apart")
    assert report.transferred_bytes + report.reused_bytes == report.fetched_bytes
    assert report.transferred_bytes == remote.part_bytes() == expected


def test_leftovers_of_killed_assemblies_are_listed_and_pruned_and_stale_index_temp_files_swept(
    http_remote: Remote, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    left = killed_assembly(http_remote, cache)
    listing = sepstore.cache_ls(cache)
    assert [f.path for f in listing.partial] == [str(left)]
    assert listing.total_bytes == sum(f.size for f in listing.parts) + listing.partial[0].size
    os.utime(left, (1, 1))  # the least recently used
    pruned = sepstore.cache_prune(listing.total_bytes - 1, cache_dir=cache)
    assert [f.path for f in pruned.removed] == [str(left)] and not left.exists()
    temp = cache / INDEX_DIR / ".tmp-0123456789abcdef.json"
    temp.write_text('{"size"')
    os.utime(temp, (1, 1))
    sepstore.pull(http_remote.url("m", "v2"), cache_dir=cache, quiet=True)
    assert not temp.exists()


def with_unknown_dtype(big_store: Path, folder: Path) -> Path:
    """A store in ``folder`` with ``big:packed``: v1 with mid.0 replaced by a part holding a 6 MiB
    tensor of dtype F4 (a newer writer's, unknown here) and v1's q_proj."""
    old = manifest(big_store, "big", "v1")
    source = old.mid[0]
    assert source is not None
    packed = bytes(range(256)) * (6 * 4096)
    q_proj = source.tensors["self_attn.q_proj.weight"]
    q_bytes = sepstore.load(big_store / "manifests/big/v1.json", "0-1").mid[0]["self_attn.q_proj.weight"]
    raw = q_bytes.contiguous().view(torch.uint8).numpy().tobytes()
    header = {
        "packed": {"dtype": "F4", "shape": [2 * len(packed)], "data_offsets": [0, len(packed)]},
        "self_attn.q_proj.weight": {
            "dtype": q_proj.dtype,
            "shape": list(q_proj.shape),
            "data_offsets": [len(packed), len(packed) + len(raw)],
        },
    }
    text = msgspec.json.encode(header)
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + packed + raw
    tensors = {"packed": Tensor("F4", (2 * len(packed),), digest_buffer(packed)), "self_attn.q_proj.weight": q_proj}
    part = Part(digest_buffer(data), len(data), tensors)
    (folder / "parts" / "blake3").mkdir(parents=True)
    (folder / "manifests" / "big").mkdir(parents=True)
    for kept in (old.begin, old.end):
        assert kept is not None
        shutil.copy(big_store / "parts" / "blake3" / kept.file_name, folder / "parts" / "blake3")
    (folder / "parts" / "blake3" / part.file_name).write_bytes(data)
    path = folder / "manifests" / "big" / "packed.json"
    path.write_bytes(encode_manifest(msgspec.structs.replace(old, mid=[part])))
    return path


def test_push_to_s3_of_a_part_with_an_unknown_dtype_or_beside_one_uploads_whole(
    big_store: Path, moto_server: CountingMotoServer, tmp_path: Path
) -> None:
    packed = with_unknown_dtype(big_store, tmp_path / "store")
    dest, fs = s3_with_v1(big_store, moto_server)
    # the destination's manifests name such a part (not uploaded yet): it is no source to copy from
    fs.pipe_file(f"{dest.removeprefix('s3://')}/manifests/big/packed.json", packed.read_bytes())
    assert sepstore.push(big_store / "manifests/big/v2.json", dest, quiet=True).copied_bytes > 0
    report = sepstore.push(packed, dest, quiet=True, force=True)
    part = sepstore.read_manifest(packed).mid[0]
    assert part is not None and report.uploaded == ["mid.0"] and report.copied_bytes == 0
    assert digest_buffer(fs.cat_file(f"{dest.removeprefix('s3://')}/parts/blake3/{part.file_name}")) == part.digest


class NotMd5Proxy(FaultProxy):
    """S3 through a proxy that answers every multipart part with an ETag that is not its MD5 (as a
    bucket with KMS keys does), the uploaded ones later than the copied ones."""

    methods = FaultProxy.methods

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        answer = await super()._handle(request)
        if request.method != "PUT" or "partNumber" not in request.query:
            return answer
        assert isinstance(answer, web.Response) and isinstance(answer.body, bytes)
        headers = {k: v for k, v in answer.headers.items() if k.lower() != "content-length"}
        if "x-amz-copy-source" in request.headers:
            body = re.sub(rb"<ETag>.*?</ETag>", b"<ETag>&quot;" + b"1" * 32 + b"&quot;</ETag>", answer.body)
            return web.Response(body=body, status=answer.status, headers=headers)
        await asyncio.sleep(0.3)  # the copy's mismatch is seen first
        return web.Response(body=answer.body, status=answer.status, headers={**headers, "ETag": '"' + "0" * 32 + '"'})


def test_composing_stops_after_an_uploaded_part_etag_mismatch_even_when_a_copy_failed_first(
    big_store: Path, moto_server: CountingMotoServer
) -> None:
    dest, _ = s3_with_v1(big_store, moto_server)
    proxy = NotMd5Proxy(moto_server.endpoint).start()
    try:
        store = Store(dest, {"endpoint_url": proxy.url, "skip_instance_cache": True})
        new = manifest(big_store, "big", "v2")
        part = new.mid[0]
        assert part is not None
        composer = Composer(store, new, workers=2)
        path = str(big_store / "parts" / "blake3" / part.file_name)
        assert composer.put(path, part).tried  # composed, and refused
        assert not composer.put(path, part).tried  # not tried again in this push
    finally:
        proxy.stop()


class KmsProxy(NotMd5Proxy):
    """S3 through a proxy that answers as a bucket whose default encryption is SSE-KMS: the ETags of
    a multipart upload's parts are not their MD5s, and a new upload says so at once, in its
    ``x-amz-server-side-encryption: aws:kms`` (moto's do not). ``parts`` counts the parts sent or copied."""

    parts = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "PUT" and "partNumber" in request.query:
            self.parts += 1
        answer = await super()._handle(request)
        if request.method == "POST" and "uploads" in request.query:
            answer.headers["x-amz-server-side-encryption"] = "aws:kms"
        return answer


def test_a_push_to_a_kms_encrypted_bucket_uploads_changed_parts_whole_without_composing_first(
    big_store: Path, moto_server: CountingMotoServer
) -> None:
    """S3 says it encrypts the object as the upload is created: no part is copied or sent in vain."""
    dest, _ = s3_with_v1(big_store, moto_server)
    proxy = KmsProxy(moto_server.endpoint).start()
    try:
        options = {"endpoint_url": proxy.url, "skip_instance_cache": True}
        report = sepstore.push(big_store / "manifests/big/v2.json", dest, dest_storage_options=options, quiet=True)
    finally:
        proxy.stop()
    assert report.uploaded == ["mid.0"] and report.copied_bytes == 0
    assert proxy.parts == 0, "no part composed, none sent in vain"
    assert sepstore.verify(dest, name="big", tag="v2", quiet=True).ok


def test_a_destination_object_with_a_header_longer_than_its_tensors_need_is_no_source(
    big_store: Path, moto_server: CountingMotoServer
) -> None:
    dest, fs, old, key = s3_with_v1_object(big_store, moto_server)
    fs.pipe_file(key, struct.pack("<Q", old.size - 8) + b" " * (old.size - 8))
    moto_server.requests.clear()
    report = sepstore.push(big_store / "manifests/big/v2.json", dest, quiet=True)
    assert report.copied_bytes == 0
    reads = [r.range for r in moto_server.requests if r.method == "GET" and old.file_name in r.path]
    assert reads == [f"bytes=0-{predicted_head(old) - 1}"]


def test_each_byte_of_an_assembled_part_is_hashed_once_as_it_is_written(
    http_remote: Remote, local_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copied in small pieces and fetched in small chunks that land in any order, every byte of
    each assembled part is hashed once, as it is written (no second pass over the file), and the
    parts verify."""

    class OnePass(CountingBlake3):
        def update_mmap(self, path: str | os.PathLike[str]) -> OnePass:
            raise AssertionError(f"{path} hashed again after it was written")

    counted = collections.Counter[str]()
    CountingBlake3.hashed = counted
    monkeypatch.setattr(sepstore.hashing, "blake3", OnePass)
    monkeypatch.setattr(sepstore.delta, "COPY_BYTES", 4096)
    monkeypatch.setattr(sepstore.delta, "CHUNK_BYTES", 4096)
    cache = tmp_path / "cache"
    sepstore.pull(http_remote.url("m", "v1"), cache_dir=cache, quiet=True)
    counted.clear()
    report = sepstore.pull(http_remote.url("m", "v2"), cache_dir=cache, quiet=True)
    mids = [p for p in manifest(local_store, "m", "v2").mid if p is not None]
    assert sorted(report.fetched) == [f"mid.{i}" for i in range(LAYERS)] and report.reused_bytes > 0
    assert {p.digest: counted[p.digest] for p in mids} == {p.digest: p.size for p in mids}
    monkeypatch.undo()
    assert sepstore.verify(http_remote.url("m", "v2"), cache_dir=cache).ok


def flip_a_reused_byte(cache: Path, part: Part | None) -> None:
    """Flip a byte of the cached ``part`` inside mlp.down_proj, a tensor v2's part reuses."""
    assert part is not None
    source = cache / "parts" / "blake3" / part.file_name
    data = bytearray(source.read_bytes())
    data[len(data) // 3] ^= 0x01
    source.write_bytes(data)


def test_a_damaged_source_spoils_only_the_part_that_copied_from_it_and_reused_bytes_count_parts_kept(
    http_remote: Remote, local_store: Path, tmp_path: Path
) -> None:
    """Parts are verified and committed one by one: the part that copied a flipped byte is fetched
    whole, the others are assembled all the same, and only their copied bytes count as reused."""
    cache = tmp_path / "cache"
    sepstore.pull(http_remote.url("m", "v1"), cache_dir=cache, quiet=True)
    flip_a_reused_byte(cache, manifest(local_store, "m", "v1").mid[1])
    report = sepstore.pull(http_remote.url("m", "v2"), cache_dir=cache, quiet=True)
    mids = [p for p in manifest(local_store, "m", "v2").mid if p is not None]
    assert report.reused_bytes == sum(data_bytes(p) - data_bytes(p, CHANGED) for p in mids if p is not mids[1])
    assert report.reused_bytes + report.transferred_bytes > report.fetched_bytes  # mid.1's assembly fetched too
    assert sepstore.verify(http_remote.url("m", "v2"), cache_dir=cache).ok


# -- pull: copied tensors written past the page cache ---------------------------------------------


@pytest.fixture(scope="session")
def big_remote(big_store: Path) -> Iterator[Remote]:
    """``big_store`` served over HTTP, with ``big:v3``: v2 with its layer written by safetensors
    itself (another header, so every tensor lies at another offset modulo a block than in v1)."""
    sepstore.dump(llama_decider, lora_merged(big_layer()), big_store, name="big", tag="v3", quiet=True)
    rewritten(big_store, "v3", 0, name="big")
    server = StaticServer(big_store.parent).start()
    yield Remote("http", f"{server.url}/store", server.requests)
    server.stop()


def resident_bytes(path: Path) -> int:
    """Bytes of the file at ``path`` that the page cache holds."""
    return sum(resident_pages(path)) * mmap.PAGESIZE


def v1_with_a_flipped_byte(big_remote: Remote, big_store: Path, cache: Path) -> None:
    """``big:v1`` pulled into ``cache``, with a byte of a tensor v2 reuses flipped there."""
    sepstore.pull(big_remote.url("big", "v1"), cache_dir=cache, quiet=True)
    flip_a_reused_byte(cache, manifest(big_store, "big", "v1").mid[0])


def offsets(path: Path) -> dict[str, int]:
    """Each tensor's first byte in the safetensors file at ``path``."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = msgspec.json.decode(file.read(length))
    return {n: 8 + length + e["data_offsets"][0] for n, e in header.items() if n != "__metadata__"}


@pytest.mark.parametrize("copy_bytes", [sepstore.delta.COPY_BYTES, 300_001])
@pytest.mark.parametrize("tag", ["v2", "v3"])
def test_copied_tensors_go_past_the_page_cache_from_any_offset_and_the_part_is_byte_identical(
    big_remote: Remote, big_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str, copy_bytes: int
) -> None:
    """Each copied tensor's whole blocks are written with ``O_DIRECT`` (not left in the page cache),
    whether it lies at the same offset modulo a block in its source (v2) or not (v3), in pieces of
    a block multiple or not; the part is assembled, not fetched whole, so its bytes are exact."""
    monkeypatch.setattr(sepstore.delta, "COPY_BYTES", copy_bytes)
    cache = tmp_path / "cache"
    sepstore.pull(big_remote.url("big", "v1"), cache_dir=cache, quiet=True)
    report = sepstore.pull(big_remote.url("big", tag), cache_dir=cache, quiet=True)
    old, new = manifest(big_store, "big", "v1").mid[0], manifest(big_store, "big", tag).mid[0]
    assert old is not None and new is not None
    path = cache / "parts" / "blake3" / new.file_name
    moved = {n: at - offsets(big_store / "parts" / "blake3" / old.file_name)[n] for n, at in offsets(path).items()}
    assert all((shift % ALIGN == 0) == (tag == "v2") for shift in moved.values())
    assert report.reused_bytes == data_bytes(new) - data_bytes(new, CHANGED)
    if has_direct_io(tmp_path):
        # in the page cache: the header, the fetched tensors, and of each copied one at most its end
        # blocks and a last piece too short to be worth a direct write
        assert resident_bytes(path) <= new.size - report.reused_bytes + (2 * ALIGN + MIN_DIRECT) * len(new.tensors)
    assert path.read_bytes() == (big_store / "parts" / "blake3" / new.file_name).read_bytes()


def test_a_flipped_byte_of_a_source_in_a_block_written_past_the_page_cache_is_caught(
    big_remote: Remote, big_store: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    v1_with_a_flipped_byte(big_remote, big_store, cache)
    report = sepstore.pull(big_remote.url("big", "v2"), cache_dir=cache, quiet=True)
    assert report.reused_bytes == 0
    assert sepstore.verify(big_remote.url("big", "v2"), cache_dir=cache).ok


# -- load by URL: assembled parts received into the tensors' memory ------------------------------


def assert_tensors_of(big_store: Path, tag: str, got: dict[str, torch.Tensor]) -> None:
    """``got`` holds the tensors of ``big:{tag}`` in the store, byte for byte."""
    expected = sepstore.load(big_store / f"manifests/big/{tag}.json").to_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("tag", ["v2", "v3"])
def test_a_load_by_url_takes_an_assembled_part_from_memory_without_reading_its_file_back(
    big_remote: Remote, big_store: Path, tmp_path: Path, tag: str
) -> None:
    """The assembled part's bytes (copied and fetched) land in the tensors' memory, are hashed and
    written to the file from there, so the load does not read the file back: its copied and fetched
    blocks never enter the page cache (a read would bring them all in), and the tensors are v2's."""
    cache = tmp_path / "cache"
    sepstore.pull(big_remote.url("big", "v1"), cache_dir=cache, quiet=True)
    big_remote.requests.clear()
    got = sepstore.load(big_remote.url("big", tag), cache_dir=cache).to_dict()
    new = manifest(big_store, "big", tag).mid[0]
    assert new is not None
    assembled = [r for r in big_remote.part_gets() if digest_hex(new.digest) in r.path]
    assert assembled and all(r.range != f"bytes=0-{new.size - 1}" for r in assembled)  # not fetched whole
    path = cache / "parts" / "blake3" / new.file_name
    if has_direct_io(tmp_path):
        # at most each tensor's and each fetched range's partial end blocks, and a piece too short for O_DIRECT
        assert resident_bytes(path) <= (2 * ALIGN + MIN_DIRECT) * (len(new.tensors) + len(assembled))
    assert digest_file(path) == new.digest
    assert_tensors_of(big_store, tag, got)


def test_a_load_by_url_whose_assembled_part_copied_a_flipped_byte_fetches_it_whole_and_returns_v2(
    big_remote: Remote, big_store: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    v1_with_a_flipped_byte(big_remote, big_store, cache)
    big_remote.requests.clear()
    got = sepstore.load(big_remote.url("big", "v2"), cache_dir=cache).to_dict()
    new = manifest(big_store, "big", "v2").mid[0]
    assert new is not None
    ranges = [r.range for r in big_remote.part_gets() if digest_hex(new.digest) in r.path]
    assert f"bytes=0-{new.size - 1}" in ranges and len(ranges) > 1  # assembled, refused, fetched whole
    assert digest_file(cache / "parts" / "blake3" / new.file_name) == new.digest
    assert_tensors_of(big_store, "v2", got)
