"""push checks what the destination already holds (sizes; re-hashes with verify=True) and repairs
it, re-checks every part right before the manifest, and names a missing bucket as such."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest
from servers import CountingMotoServer

import sepstore
from sepstore.cli import main
from sepstore.demo import llama_decider, tiny_llama_state_dict
from sepstore.manifest import Blob, Part
from sepstore.stores.fsspec import FsspecStore


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    sepstore.dump(llama_decider, tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32), root)
    return root


@pytest.fixture(params=["local", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "dest")
    request.getfixturevalue("moto_server")
    bucket = f"push-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/store"


def damage(dest: str, part: Part, *, truncate: bool) -> None:
    """Spoil the destination's copy of ``part``: cut its last byte, or flip one (same size)."""
    fs, root = fsspec.url_to_fs(dest)
    path = f"{root}/parts/blake3/{part.digest[7:]}.safetensors"
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:-1] if truncate else data[:-1] + bytes([data[-1] ^ 1]))


def test_a_truncated_destination_part_is_uploaded_again(source: Path, dest: str) -> None:
    sepstore.push(source, dest, quiet=True)
    mid = sepstore.read_manifest(source).mid[1]
    assert mid is not None
    damage(dest, mid, truncate=True)
    report = sepstore.push(source, dest, dest_tag="v2", quiet=True)
    assert report.uploaded == ["mid.1"] and report.repaired == ["mid.1"] and not report.verified
    assert sepstore.verify(dest, name="model", tag="latest", quiet=True).ok


def test_push_verify_rehashes_destination_parts_and_replaces_a_flipped_byte(source: Path, dest: str) -> None:
    sepstore.push(source, dest, quiet=True)
    end = sepstore.read_manifest(source).end
    assert end is not None
    damage(dest, end, truncate=False)
    assert sepstore.push(source, dest, dest_tag="v2", quiet=True).uploaded == [], "same size: only a hash tells"
    report = sepstore.push(source, dest, dest_tag="v3", verify=True, quiet=True)
    assert report.verified and report.repaired == ["end"] and report.uploaded == ["end"]
    assert len(report.skipped) == 3
    assert sepstore.verify(dest, name="model", tag="v3", quiet=True).ok


def test_cli_push_says_what_it_checked(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "dest")
    sepstore.push(source, dest, quiet=True)
    begin = sepstore.read_manifest(source).begin
    assert begin is not None
    damage(dest, begin, truncate=False)
    assert main(["push", str(source), dest, "--as-tag", "v2", "--quiet"]) == 0
    assert "skipped 4 already there" in capsys.readouterr().out
    assert main(["push", str(source), dest, "--as-tag", "v3", "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "uploaded 1 part" in out and "replacing 1 damaged there" in out and "re-hashed" in out


@pytest.mark.parametrize("publisher", ["push", "dump"])
def test_a_part_deleted_behind_the_lease_is_written_again_before_the_manifest(
    source: Path, dest: str, publisher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gc that ignores leases (an older sepstore) removes a part after the publisher found or
    wrote it: the publisher's last check, right before the manifest, puts it back."""
    manifest = sepstore.read_manifest(source)
    victim = manifest.mid[0]
    assert victim is not None
    original = FsspecStore.has_blob
    removed: list[str] = []

    def has_blob(store: FsspecStore, blob: Blob) -> bool:
        if not removed:  # the publisher's first has_blob is its last check: a gc acts just before
            store.fs.rm_file(store.part_path(victim.digest))
            removed.append(blob.digest)
        return original(store, blob)

    monkeypatch.setattr(FsspecStore, "has_blob", has_blob)
    if publisher == "push":
        sepstore.push(source, dest, quiet=True)
    else:
        sd = tiny_llama_state_dict(layers=2, hidden=16, intermediate=16, vocab=32)
        sepstore.dump(llama_decider, sd, dest, quiet=True)
    assert removed
    monkeypatch.undo()
    assert sepstore.verify(dest, name="model", tag="latest", quiet=True).ok


@pytest.mark.parametrize("publisher", ["push", "dump"])
def test_publishing_to_a_missing_bucket_says_the_bucket_does_not_exist(
    source: Path, publisher: str, moto_server: CountingMotoServer
) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(sepstore.NotFoundError, match=rf"the bucket '{bucket}' does not exist; create it first"):
        if publisher == "push":
            sepstore.push(source, f"s3://{bucket}/store", quiet=True)
        else:
            sd = tiny_llama_state_dict(layers=1, hidden=8, intermediate=8, vocab=16)
            sepstore.dump(llama_decider, sd, f"s3://{bucket}/store", quiet=True)


def test_a_truncated_local_source_part_is_refused_naming_both_sizes(source: Path, tmp_path: Path) -> None:
    begin = sepstore.read_manifest(source).begin
    assert begin is not None
    path = source / "parts/blake3" / f"{begin.digest[7:]}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(sepstore.IntegrityError, match=rf"file is 100 bytes, manifest says {begin.size}"):
        sepstore.push(source, tmp_path / "dest", quiet=True)


def test_a_damaged_cached_copy_of_a_remote_source_is_fetched_again_not_uploaded(source: Path, tmp_path: Path) -> None:
    remote = f"memory://push-{uuid.uuid4().hex[:12]}/store"
    sepstore.push(source, remote, quiet=True)
    url = f"{remote}/manifests/model/latest.json"
    cache = tmp_path / "cache"
    sepstore.pull(url, cache_dir=cache, quiet=True)
    mid = sepstore.read_manifest(source).mid[0]
    assert mid is not None
    cached = cache / "parts/blake3" / mid.file_name
    data = bytearray(cached.read_bytes())
    data[-1] ^= 1
    cached.write_bytes(bytes(data))
    sepstore.push(url, tmp_path / "dest", cache_dir=cache, quiet=True)
    assert sepstore.verify(tmp_path / "dest", quiet=True).ok, "the flipped byte reached the destination"


def test_push_between_stores_of_one_s3_endpoint_copies_the_parts_server_side(
    source: Path, moto_server: CountingMotoServer, tmp_path: Path
) -> None:
    bucket = f"push-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    first = sepstore.push(source, f"s3://{bucket}/a", quiet=True)
    moto_server.requests.clear()
    report = sepstore.push(f"s3://{bucket}/a", f"s3://{bucket}/b", quiet=True, cache_dir=tmp_path / "cache")
    assert sorted(report.copied) == sorted(report.uploaded) == sorted(first.uploaded)
    assert report.transferred_bytes == 0 and report.copied_bytes == report.uploaded_bytes > 0
    puts = [r for r in moto_server.requests if r.method == "PUT" and "/parts/blake3/" in r.path]
    assert len(puts) == len(report.uploaded) and all(r.copy_source is not None for r in puts)
    assert not [r for r in moto_server.requests if r.method == "GET" and "/parts/blake3/" in r.path]  # nor fetched
    assert sepstore.verify(f"s3://{bucket}/b", quiet=True).ok
